"""The federation server: FedProx strategy with LR/mu scheduling, evaluation, run directory, launcher."""

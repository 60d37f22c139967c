"""What agent and server share: policy factory, local trainer with FedProx, update codecs, statistics, checkpoints."""

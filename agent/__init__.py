"""The robot host: recorder, Flower SuperNode side, policy store, rollout."""

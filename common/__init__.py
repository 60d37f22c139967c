"""What every zk0 layer may use: the typed-YAML config builder and the Flower process plumbing.

Nothing here imports another zk0 package, so `hw`, `learn`, `agent`, `server` and the compositions in
`zk0.cli` can all depend on it without a cycle (see ARCHITECTURE.md: dependencies point one way).
"""

"""Hardware: robots and teleoperators built from config through lerobot, cameras, safety envelope."""

"""Simulated SO-100/SO-101 hardware: Feetech bus on a pty, world, cameras, scripted operator."""

"""Policies: everything that maps an observation to joint targets (scripted expert now, the VLA next)."""

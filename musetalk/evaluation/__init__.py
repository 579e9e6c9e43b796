"""Objective realism figures for any talking-head video (ours, upstream's, a peer's): see metrics.py."""

"""Pipelines: the command-line entry points of edge-kd (`python -m pipelines.compress`)."""

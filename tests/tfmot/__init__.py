"""Tests of edge_kd.tfmot (a package, so that its conftest does not shadow tests/conftest.py)."""

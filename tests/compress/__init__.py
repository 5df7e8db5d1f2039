"""Tests of edge_kd.compress (a package, so that its conftest does not shadow tests/conftest.py)."""

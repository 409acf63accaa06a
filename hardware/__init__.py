"""Differentiable hardware cost models and co-design (source in ``hardware/``)."""

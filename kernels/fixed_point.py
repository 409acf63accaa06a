"""Parallel fixed-point solvers: ``jaxcore.kernels.fixed_point``."""

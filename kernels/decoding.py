"""Parallel and speculative decoding: ``jaxcore.kernels.decoding``."""

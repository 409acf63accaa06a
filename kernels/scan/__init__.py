"""Selective scans and linear recurrences: ``jaxcore.kernels.scan``."""

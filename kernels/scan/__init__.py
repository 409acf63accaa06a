"""Selective scans and linear recurrences: ``jaxcore.kernels.scan``.

- :func:`linear_scan`: h_t = a_t * h_{t-1} + b_t along axis 1 (scalar, elementwise or matrix a),
  with segment resets, reverse scans and an adjoint (reverse-scan) gradient.
"""

from ._linear import linear_scan, linear_scan_reference

__all__ = [
    "linear_scan",
    "linear_scan_reference",
]

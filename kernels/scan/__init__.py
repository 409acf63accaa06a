"""Selective scans and linear recurrences: ``jaxcore.kernels.scan``.

- :func:`linear_scan`: h_t = a_t * h_{t-1} + b_t along axis 1 (scalar, elementwise or matrix a),
  with segment resets, reverse scans and an adjoint (reverse-scan) gradient.
- :func:`selective_scan` / :func:`selective_scan_step`: Mamba-1 (mamba_ssm ``selective_scan_ref``
  semantics) in (batch, length, channels) layout; the default "chunked" path never materialises
  the (B, L, D, N) state and recomputes it in a custom backward.
- :func:`ssd`: Mamba-2 state-space duality (scalar A per head) in its chunked matmul form.
"""

from ._linear import linear_scan, linear_scan_reference
from ._selective import selective_scan, selective_scan_reference, selective_scan_step
from ._ssd import ssd, ssd_reference

__all__ = [
    "linear_scan",
    "linear_scan_reference",
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_step",
    "ssd",
    "ssd_reference",
]

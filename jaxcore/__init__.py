"""jaxcore: compiled, differentiable JAX kernels and differentiable hardware cost models.

The core package (this one) holds what every layer stands on: implementation selection
(:mod:`jaxcore.backend`), argument checks (:mod:`jaxcore.checks`) and device/mesh helpers
(:mod:`jaxcore.devices`). The layers above are imported explicitly::

    import jaxcore.kernels    # attention, scans, solvers, low precision, decoding
    import jaxcore.models     # Flax NNX models and generated tasks
    import jaxcore.hardware   # differentiable cost models and co-design
"""

from jaxcore import backend as backend
from jaxcore import checks as checks
from jaxcore.backend import IMPLEMENTATIONS as IMPLEMENTATIONS
from jaxcore.backend import resolve_implementation as resolve_implementation

__version__ = "0.1.0"

__all__ = ["IMPLEMENTATIONS", "backend", "checks", "resolve_implementation", "__version__"]

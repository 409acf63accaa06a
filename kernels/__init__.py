"""Pure functional kernels: ``jaxcore.kernels`` (source in ``kernels/``)."""

"""Flax NNX models and generated tasks: ``jaxcore.models`` (source in ``models/``)."""

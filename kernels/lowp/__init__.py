"""Low-precision arithmetic (see issue: low precision)."""

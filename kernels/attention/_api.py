"""Public ``dot_product_attention``: argument checks, implementation choice, q-length masking."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcore import backend

from ._common import Inputs, normalize
from ._reference import attention_reference
from ._xla import attention_xla

FAMILY = "attention"
IMPLEMENTATIONS = ("reference", "xla", "pallas", "pallas_interpret", "mosaic", "mosaic_interpret")


def _default(platform: str) -> str:
    return "pallas" if platform == "gpu" else "xla"


backend.register_family(
    FAMILY,
    IMPLEMENTATIONS,
    _default,
    doc="dot_product_attention: 'pallas' on GPU ('mosaic' on Hopper where it applies), else 'xla'",
)


# The GPU default takes the Mosaic GPU kernel on Hopper where it applies (bf16 / f16, no bias or
# mask; see _mosaic.supports). On an H200 (session 5, bf16 B=4 N=16 H=128 T=8192 causal) its
# forward ran at 507 TFLOP/s, 1.07x cuDNN and 2.1x the Triton kernel; with its Mosaic backward
# forward+backward took 8.5 ms vs cuDNN 7.6 ms and Triton 19.2 ms.
PREFER_MOSAIC_ON_HOPPER = True


def is_hopper(device: Any) -> bool:
    try:
        return device.platform == "gpu" and float(device.compute_capability) >= 9.0
    except (AttributeError, TypeError, ValueError):
        return False


def gpu_default(inp: Inputs, device: Any, prefer_mosaic: bool | None = None) -> str:
    """The GPU default for these inputs: "mosaic" on Hopper when preferred and supported."""
    from ._mosaic import supports  # lazy: imports the Mosaic GPU Pallas backend

    prefer = PREFER_MOSAIC_ON_HOPPER if prefer_mosaic is None else prefer_mosaic
    if prefer and is_hopper(device) and supports(inp) is None:
        return "mosaic"
    return "pallas"


def _run(inp: Inputs, impl: str) -> tuple[jax.Array, jax.Array]:
    if impl == "reference":
        return attention_reference(inp)
    if impl == "xla":
        return attention_xla(inp)
    if impl == "pallas" and backend.platform() != "gpu":  # a TPU passes the backend's check
        raise ValueError(
            f"implementation='pallas': the attention kernel lowers through Triton (GPU only), "
            f"the default backend is {backend.platform()!r}; use 'xla' or 'pallas_interpret'"
        )
    if impl.startswith("mosaic"):
        from ._mosaic import attention_mosaic  # lazy: imports the Mosaic GPU Pallas backend

        return attention_mosaic(inp, interpret=impl == "mosaic_interpret")
    from ._pallas import attention_pallas  # lazy: imports jax.experimental.pallas

    return attention_pallas(inp, interpret=impl == "pallas_interpret")


def dot_product_attention(
    query: Any,
    key: Any,
    value: Any,
    bias: Any = None,
    mask: Any = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: Any = None,
    key_value_seq_lengths: Any = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: Any = None,
    logits_soft_cap: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Scaled dot-product attention; a drop-in superset of :func:`jax.nn.dot_product_attention`.

    Args:
      query: (B, T, N, H) or (T, N, H).
      key: (B, S, K, H) with N % K == 0 (GQA/MQA without repeating K/V).
      value: (B, S, K, Hv); Hv may differ from H.
      bias: added to the logits; 4-D, broadcastable to (B, N, T, S). Differentiable.
      mask: boolean, True = attend; 4-D, broadcastable to (B, N, T, S).
      scale: logit scale, default 1/sqrt(H).
      is_causal: query t sees keys s <= t (top-left aligned, as jax.nn).
      query_seq_lengths, key_value_seq_lengths: int (B,); positions past the length are padding.
      local_window_size: int or (left, right): query t sees keys in [t - left, t + right].
      segment_ids: int (B, T) (needs T == S) or a pair ((B, T), (B, S)); a query sees only
        keys of its own segment (packed sequences).
      logits_soft_cap: c > 0 applies c * tanh(logits / c) to the scaled logits (before bias).
      return_lse: also return the log-sum-exp (B, T, N) in float32 (float64 under x64),
        differentiable; -inf for a fully masked row.
      implementation: None (default: "pallas" on GPU, else "xla"), "reference", "xla",
        "pallas" (GPU only; a ValueError elsewhere), "pallas_interpret" (the same kernel
        run by the Pallas interpreter, any platform), "mosaic" (Hopper GPUs: a Mosaic GPU
        forward with wgmma/TMA and the Triton backward; bf16/f16 without bias, mask or
        segment_ids, else a ValueError), "mosaic_interpret" (that
        kernel in the Mosaic GPU interpreter). Every other option works on every platform.

    Returns:
      (B, T, N, Hv) in the query dtype (and the lse if ``return_lse``). A fully masked query row
      gives zeros and zero gradients, never NaN.
    """
    inp = normalize(
        query,
        key,
        value,
        bias,
        mask,
        scale=scale,
        is_causal=is_causal,
        query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size,
        segment_ids=segment_ids,
        logits_soft_cap=logits_soft_cap,
    )
    impl = backend.resolve_implementation(FAMILY, implementation)
    if implementation is None and impl == "pallas" and PREFER_MOSAIC_ON_HOPPER:
        impl = gpu_default(inp, jax.devices()[0])
    out, lse = _run(inp, impl)
    if inp.q_seqlen is not None and impl != "reference":
        ok = jnp.arange(inp.spec.t)[None, :] < inp.q_seqlen[:, None]  # (B, T)
        out = jnp.where(ok[:, :, None, None], out, jnp.zeros((), out.dtype))
        lse = jnp.where(ok[:, :, None], lse, -jnp.inf)
    if inp.squeeze:
        out, lse = out[0], lse[0]
    return (out, lse) if return_lse else out

"""Attention kernels: exact, O(T) memory, one API on every platform.

* :func:`dot_product_attention` - drop-in superset of :func:`jax.nn.dot_product_attention`
  (BTNH; GQA/MQA; value head dim may differ; causal, sliding window, lengths, segment ids,
  bias, mask, soft cap; differentiable float32 log-sum-exp). Implementations "reference",
  "xla" (chunked flash attention with block skipping and a FlashAttention-2 custom VJP),
  "pallas" / "pallas_interpret" (a Pallas flash-attention kernel, forward and backward,
  Triton lowering), "mosaic" / "mosaic_interpret" (a Hopper Mosaic GPU forward: wgmma, TMA,
  warp specialisation; the Triton backward).
* :func:`dot_product_attention_bwd` - the FlashAttention-2 backward from a saved output and
  lse (no forward recompute; the building block of the ring attention backward).
* :func:`merge` - exact combination of attention over disjoint key sets (split-KV decoding,
  shared prefixes, ring attention).
* :func:`decode_attention` - flash-decoding of a few new tokens against a KV cache.
* :func:`paged_decode_attention` - the same against a paged KV cache (a shared pool of pages
  and per-sequence block tables, as in vLLM); :func:`paged_kv_write` writes new tokens
  through the tables, :func:`gather_pages` gives the contiguous view.
* :func:`linear_attention` - causal linear attention (chunked form, optional decay).

Families registered with :mod:`jaxcore.backend`: "attention", "attention_decode",
"attention_paged_decode", "linear_attention".
"""

from ._api import dot_product_attention
from ._decode import decode_attention
from ._linear import linear_attention
from ._merge import merge
from ._paged import gather_pages, paged_decode_attention, paged_kv_write
from ._xla import dot_product_attention_bwd

__all__ = [
    "decode_attention",
    "dot_product_attention",
    "dot_product_attention_bwd",
    "gather_pages",
    "linear_attention",
    "merge",
    "paged_decode_attention",
    "paged_kv_write",
]

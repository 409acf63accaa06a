"""Sequence parallelism: kernels whose sequence axis is sharded over devices.

Every collective is JAX's own (``ppermute``, ``all_to_all``, ``all_gather`` inside
``jax.shard_map``); the same code runs on host CPU devices, on the GPUs of one node (NCCL) and
across hosts after :func:`jaxcore.distributed.initialize`.

Two levels of API:

* **inside ``shard_map``** (the building blocks; arrays are the local shards, the sequence axis
  is axis 1, sharded over ``axis_name``):

  - :func:`ring_attention`: K/V blocks rotate around the ring with ``ppermute``; per-step partial
    attention (:func:`jaxcore.kernels.attention.dot_product_attention` with its float32 lse) is
    combined with :func:`jaxcore.kernels.attention.merge`. Causal attention uses the zigzag
    layout (device i holds chunks i and 2P-1-i of 2P) so every device does the same work. A
    custom VJP runs a second ring in the backward pass and stores only the local shards, the
    output and the lse: O(T/P) per device.
  - :func:`ulysses_attention`: DeepSpeed-Ulysses, ``all_to_all`` from sequence shards to head
    shards and back, GQA-aware; with ``ring_axis_name`` it is the 2-D Ulysses x ring
    combination of Unified Sequence Parallelism (:func:`usp_attention`).
  - :func:`sequence_parallel_linear_attention`: LASP-2, one all-gather of the per-device
    d_k x d_v states, a prefix combine, and a local chunked pass.
  - :func:`sequence_parallel_scan`: :func:`jaxcore.kernels.scan.linear_scan` with the sequence
    sharded: local chunk scans, an all-gather of (a-product, last state) carries, a prefix
    combine and a local correction; :func:`sequence_parallel_selective_scan` (Mamba-1) and
    :func:`sequence_parallel_ssd` (Mamba-2) exchange the same carries and rerun the local
    scan from the state entering the shard.

* **on a Mesh with global arrays** (:func:`sharded_ring_attention`,
  :func:`sharded_ulysses_attention`, :func:`sharded_usp_attention`,
  :func:`sharded_linear_attention`, :func:`sharded_scan`): they place the arrays, apply the
  zigzag permutation where needed and call ``jax.shard_map`` for the user.

All building blocks also run under ``jax.pmap`` with the same ``axis_name``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcore import backend, checks
from jaxcore.autodiff import tangent_call

Array = Any
AxisName = Any  # a mesh axis name or a tuple of them

LAYOUTS = ("zigzag", "contiguous")

__all__ = [
    "LAYOUTS",
    "from_zigzag",
    "ring_attention",
    "sequence_parallel_linear_attention",
    "sequence_parallel_scan",
    "sequence_parallel_selective_scan",
    "sequence_parallel_ssd",
    "sharded_linear_attention",
    "sharded_ring_attention",
    "sharded_scan",
    "sharded_ulysses_attention",
    "sharded_usp_attention",
    "to_zigzag",
    "ulysses_attention",
    "usp_attention",
    "zigzag_indices",
]


def _attention():
    from jaxcore.kernels import attention  # lazy: kernels import each other only on use

    return attention


def _scan_module():
    from jaxcore.kernels import scan

    return scan


def _axis_size(axis_name: AxisName) -> int:
    return int(lax.axis_size(axis_name))


def _ring_perm(p: int, shift: int = 1) -> list[tuple[int, int]]:
    return [(d, (d + shift) % p) for d in range(p)]


def _cdt(dtype: Any) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


# ----------------------------------------------------------------------------------------------
# zigzag layout


def zigzag_indices(length: int, num_shards: int) -> np.ndarray:
    """Gather indices putting a length-``length`` axis in zigzag order for ``num_shards`` devices.

    The axis is cut into ``2 * num_shards`` equal chunks; shard i (a contiguous 1/P of the
    result) holds chunks i and 2P-1-i, so causal attention gives every shard the same work.
    """
    p = int(num_shards)
    if length % (2 * p):
        raise ValueError(
            f"length: expected a multiple of 2 * num_shards = {2 * p} for the zigzag layout, "
            f"got {length}"
        )
    c = length // (2 * p)
    chunks = [i for d in range(p) for i in (d, 2 * p - 1 - d)]
    return np.concatenate([np.arange(i * c, (i + 1) * c) for i in chunks])


def _permute_axis(x: Array, idx: np.ndarray, axis: int) -> Array:
    x = jnp.asarray(x)
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is not None and len(spec) > axis and spec[axis] is not None:
        # Explicit-sharding mode: gather along a sharded axis is ambiguous; gather it first.
        spec = P(*[None if i == axis else e for i, e in enumerate(spec)])
        x = jax.reshard(x, NamedSharding(sharding.mesh, spec))
    return jnp.take(x, idx, axis=axis, unique_indices=True, indices_are_sorted=False)


def to_zigzag(x: Array, num_shards: int, axis: int = 1) -> Array:
    """``x`` with ``axis`` reordered into the zigzag layout (see :func:`zigzag_indices`)."""
    return _permute_axis(x, zigzag_indices(x.shape[axis], num_shards), axis)


def from_zigzag(x: Array, num_shards: int, axis: int = 1) -> Array:
    """Inverse of :func:`to_zigzag`."""
    return _permute_axis(x, np.argsort(zigzag_indices(x.shape[axis], num_shards)), axis)


# ----------------------------------------------------------------------------------------------
# ring attention


@dataclasses.dataclass(frozen=True)
class _RingConfig:
    axis_name: AxisName
    num_shards: int
    is_causal: bool
    layout: str
    scale: float
    implementation: str | None


def _vary_like(x: Array, *refs: Array) -> Array:
    """``x`` marked device-varying over every mesh axis the ``refs`` vary over (check_vma)."""
    axes: set = set()
    for r in refs:
        axes |= backend.vma(r)
    axes -= backend.vma(x)
    return lax.pcast(x, tuple(sorted(axes, key=str)), to="varying") if axes else x


def _empty(q: Array, v: Array, rows: int) -> tuple[Array, Array]:
    """No visible key: output 0 and lse -inf for ``rows`` query rows."""
    b, _, n, _ = q.shape
    cdt = _cdt(q.dtype)
    out = jnp.zeros((b, rows, n, v.shape[-1]), cdt)
    lse = jnp.full((b, rows, n), -jnp.inf, cdt)
    return _vary_like(out, q, v), _vary_like(lse, q, v)


# Block sizes of the ring's chunked kernel (forward and backward): the per-device state is
# several local-size arrays, so the kernel's (B*K, block_q * G, block_k) float32 logits
# buffers are kept small.
_BLOCKS = (64, 128)


def _resolved(implementation: str | None) -> str:
    return backend.resolve_implementation("attention", implementation)


def _attend(cfg: _RingConfig, q, k, v, qs, ks, causal: bool) -> tuple[Array, Array]:
    seg = None if qs is None else (qs, ks)
    if _resolved(cfg.implementation) == "xla":  # the chunked kernel with small blocks
        from jaxcore.kernels.attention import _common, _xla

        inp = _common.normalize(q, k, v, scale=cfg.scale, is_causal=causal, segment_ids=seg)
        out, lse = _xla.attention_xla(inp, block_q=_BLOCKS[0], block_k=_BLOCKS[1])
        cdt = _cdt(q.dtype)
        return out.astype(cdt), lse.astype(cdt)
    out, lse = _attention().dot_product_attention(
        q,
        k,
        v,
        scale=cfg.scale,
        is_causal=causal,
        segment_ids=seg,
        return_lse=True,
        implementation=cfg.implementation,
    )
    cdt = _cdt(q.dtype)
    return out.astype(cdt), lse.astype(cdt)


def _branches(cfg: _RingConfig):
    """Block functions (q, k, v, qs, ks) -> (out, lse) for the visiting K/V block.

    Returns (own, others, which): ``own`` for the device's own block (step 0), ``others`` a list
    of branches for the blocks of other devices and ``which(me, src)`` the branch index.
    """

    def full(q, k, v, qs, ks):
        return _attend(cfg, q, k, v, qs, ks, False)

    def diag(q, k, v, qs, ks):
        return _attend(cfg, q, k, v, qs, ks, True)

    if not cfg.is_causal:
        return full, [full], lambda me, src: 0

    if cfg.layout == "contiguous":

        def skip(q, k, v, qs, ks):
            return _empty(q, v, q.shape[1])

        # src < me: all visible; src > me: nothing visible (that device idles: no balancing)
        return diag, [full, skip], lambda me, src: jnp.where(src < me, 0, 1)

    # zigzag: local rows/keys are [chunk me | chunk 2P-1-me] and [chunk src | chunk 2P-1-src].
    def lower(q, k, v, qs, ks):  # src < me: every query sees the first key chunk only
        c = k.shape[1] // 2
        return _attend(cfg, q, k[:, :c], v[:, :c], qs, None if ks is None else ks[:, :c], False)

    def upper(q, k, v, qs, ks):  # src > me: only the second query chunk sees, all keys
        c = q.shape[1] // 2
        o2, l2 = _attend(cfg, q[:, c:], k, v, None if qs is None else qs[:, c:], ks, False)
        o1, l1 = _empty(q, v, c)
        return jnp.concatenate([o1, o2], axis=1), jnp.concatenate([l1, l2], axis=1)

    return diag, [lower, upper], lambda me, src: jnp.where(src < me, 0, 1)


def _run_branch(branches, idx, *args):
    if len(branches) == 1:
        return branches[0](*args)
    return lax.switch(idx, branches, *args)


def _merge(out: Array, lse: Array, ob: Array, lb: Array) -> tuple[Array, Array]:
    o, l = _attention().merge([out, ob], [lse, lb])
    return o.astype(out.dtype), l.astype(lse.dtype)


def _rotate(tree, axis_name: AxisName, p: int):
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, _ring_perm(p)), tree)


def _ring_forward(cfg: _RingConfig, q, k, v, qs, ks):
    p = cfg.num_shards
    own, others, which = _branches(cfg)
    out, lse = own(q, k, v, qs, ks)
    if p == 1:
        return out, lse
    me = lax.axis_index(cfg.axis_name)

    def step(carry, s):
        out, lse, kv = carry
        kv = _rotate(kv, cfg.axis_name, p)  # now holding the block of device me - s
        src = (me - s) % p
        ob, lb = _run_branch(others, which(me, src), q, *kv[:2], qs, kv[2])
        out, lse = _merge(out, lse, ob, lb)
        return (out, lse, kv), None

    (out, lse, _), _ = lax.scan(step, (out, lse, (k, v, ks)), jnp.arange(1, p))
    return out, lse


def _grad_branches(cfg: _RingConfig):
    """Backward twins of :func:`_branches`, accumulating into (dq, dk, dv).

    Each branch maps (acc, q, k, v, qs, ks, delta, lse, dout) -> acc + this block's
    gradients, where ``delta`` (rowsum(dout * out) - dlse) and ``lse`` come from the MERGED
    output and lse of the whole ring: the
    block's probabilities are exp(logits - lse) directly (FlashAttention-2 backward,
    :func:`jaxcore.kernels.attention.dot_product_attention_bwd`), so there is no per-block
    forward recompute and no per-block residual.
    """
    blocks = _BLOCKS

    impl = _resolved(cfg.implementation)

    def bwd(q, k, v, qs, ks, delta, lse, dout, causal):
        from jaxcore.kernels.attention import _common, _pallas, _xla

        seg = None if qs is None else (qs, ks)
        inp = _common.normalize(q, k, v, scale=cfg.scale, is_causal=causal, segment_ids=seg)
        if impl.startswith(("pallas", "mosaic")):  # the Triton backward kernels (GPU / interpret)
            return _pallas.attention_bwd_pallas(
                inp, lse, dout, delta, interpret=impl.endswith("_interpret")
            )
        return _xla.attention_bwd_xla(
            inp, None, lse, dout, delta=delta, block_q=blocks[0], block_k=blocks[1]
        )

    def add(acc, g):
        return tuple(a + x for a, x in zip(acc, g))

    def full(acc, *a):
        return add(acc, bwd(*a, False))

    def diag(acc, *a):
        return add(acc, bwd(*a, True))

    if not cfg.is_causal:
        return full, [full]

    if cfg.layout == "contiguous":

        def skip(acc, *a):
            return acc

        return diag, [full, skip]

    def add_at(x, g, lo):  # x[:, lo:lo + len(g)] += g
        cur = lax.dynamic_slice_in_dim(x, lo, g.shape[1], axis=1)
        return lax.dynamic_update_slice_in_dim(x, cur + g, lo, axis=1)

    # zigzag: local rows/keys are [chunk me | chunk 2P-1-me] and [chunk src | chunk 2P-1-src]
    def lower(acc, q, k, v, qs, ks, delta, lse, dout):  # src < me: first key chunk only
        c = k.shape[1] // 2
        ksc = None if ks is None else ks[:, :c]
        dq, dk, dv = bwd(q, k[:, :c], v[:, :c], qs, ksc, delta, lse, dout, False)
        return acc[0] + dq, add_at(acc[1], dk, 0), add_at(acc[2], dv, 0)

    def upper(acc, q, k, v, qs, ks, delta, lse, dout):  # src > me: second query chunk only
        c = q.shape[1] // 2
        h = lambda x: None if x is None else x[:, c:]  # noqa: E731
        dq, dk, dv = bwd(h(q), k, v, h(qs), ks, h(delta), h(lse), h(dout), False)
        return add_at(acc[0], dq, c), acc[1] + dk, acc[2] + dv

    return diag, [lower, upper]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _ring(cfg: _RingConfig, q, k, v, qs, ks):
    """(out, lse) of the ring. A custom JVP whose tangent map is a ``linear_call``
    (:func:`jaxcore.autodiff.tangent_call`): forward mode evaluates the JVP of the same ring
    (the tangents of K/V travel with them), reverse mode transposes it with :func:`_ring_bwd`
    (dK/dV travel home around the ring)."""
    return _ring_forward(cfg, q, k, v, qs, ks)


@functools.partial(_ring.defjvp, symbolic_zeros=True)
def _ring_jvp(cfg, primals, tangents):
    q, k, v, qs, ks = primals
    out = _ring(cfg, *primals)  # itself: differentiable again

    def fun(consts, q, k, v):
        return _ring_forward(cfg, q, k, v, *consts)

    def backward(prim, consts, saved, cts):
        return _ring_bwd(cfg, (*prim, *consts, *saved), cts)[:3]

    tan = tangent_call(fun, backward, (q, k, v), tangents[:3], (qs, ks), out, out)
    return out, tuple(tan)


def _ring_bwd(cfg, res, cts):
    q0, k0, v0, qs, ks, out, lse = res
    dout, dlse = cts
    cdt = out.dtype
    q, k, v = q0.astype(cdt), k0.astype(cdt), v0.astype(cdt)  # accumulate in float32
    dout = dout.astype(cdt)
    dlse = dlse.astype(cdt)
    p = cfg.num_shards
    own, others = _grad_branches(cfg)
    _, _, which = _branches(cfg)
    delta = jnp.sum(dout * out, axis=-1) - dlse  # the residual `out` is dead after this
    zeros = tuple(_vary_like(jnp.zeros_like(x), q, k, v, dout) for x in (q, k, v))
    if p == 1:
        dq, dk, dv = own(zeros, q, k, v, qs, ks, delta, lse, dout)
    else:
        me = lax.axis_index(cfg.axis_name)
        branches = [*others, own]

        def step(carry, s):
            # Step s holds the K/V block of device me - s and the dK/dV travelling with it: add
            # its gradients, then pass both on. After P passes every dK/dV is back home (the
            # last K/V pass is spare); the loop state are ppermute results, not input copies.
            dq, kv, dkv = carry
            idx = jnp.where(s == 0, len(others), which(me, (me - s) % p))
            kk, vv, kss = kv
            acc = (dq, *dkv)
            dq, dk, dv = _run_branch(branches, idx, acc, q, kk, vv, qs, kss, delta, lse, dout)
            kv, dkv = _rotate((kv, (dk, dv)), cfg.axis_name, p)
            return (dq, kv, dkv), None

        carry = (zeros[0], (k, v, ks), zeros[1:])
        (dq, _, (dk, dv)), _ = lax.scan(step, carry, jnp.arange(p))
    return dq.astype(q0.dtype), dk.astype(k0.dtype), dv.astype(v0.dtype), None, None


def _check_attention_args(query, key, value, segment_ids) -> None:
    checks.check_rank(query, 4, "query")
    checks.check_rank(key, 4, "key")
    checks.check_rank(value, 4, "value")
    b, t, n, h = query.shape
    checks.check_shape(key, (b, None, None, h), "key")
    checks.check_shape(value, (b, key.shape[1], key.shape[2], None), "value")
    if key.shape[1] != t:
        raise ValueError(
            f"key: expected the local query length {t} (self-attention over one sharded "
            f"sequence), got shape {key.shape}"
        )
    if n % key.shape[2]:
        raise ValueError(
            f"key: expected a number of heads dividing the query's {n}, got shape {key.shape}"
        )
    if segment_ids is not None:
        checks.check_shape(segment_ids, (b, t), "segment_ids")
        checks.check_dtype(segment_ids, "segment_ids", kinds="iu")


def ring_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    axis_name: AxisName,
    is_causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Ring attention over the sequence shards of ``axis_name`` (call inside ``shard_map``).

    Args:
      query: local shard (B, T/P, N, H) of the query sequence.
      key, value: local shards (B, T/P, K, H) and (B, T/P, K, Hv); N % K == 0 (GQA).
      axis_name: the mesh axis (or tuple of axes) the sequence is sharded over, P devices.
      is_causal: causal self-attention over the global sequence.
      segment_ids: local shard (B, T/P) of integer segment ids (packed sequences).
      scale: logit scale (default 1/sqrt(H)).
      layout: how the global sequence is laid out over the shards when ``is_causal``:
        "zigzag" (default; shard i holds chunks i and 2P-1-i of 2P, see :func:`to_zigzag`:
        balanced) or "contiguous" (shard i holds chunk i: correct but device P-1 does P
        times the work of device 0). Ignored when not causal.
      return_lse: also return the float32 log-sum-exp (B, T/P, N).
      implementation: passed to :func:`jaxcore.kernels.attention.dot_product_attention` for
        each block of the forward ("xla" runs the chunked kernel with small blocks); the
        backward is always the "xla" one
        (:func:`jaxcore.kernels.attention.dot_product_attention_bwd`).

    Returns:
      The local output shard (B, T/P, N, Hv) in the query dtype (and the lse).
    """
    _check_attention_args(query, key, value, segment_ids)
    checks.check_choice(layout, LAYOUTS, "layout")
    p = _axis_size(axis_name)
    t = query.shape[1]
    if is_causal and layout == "zigzag" and t % 2:
        raise ValueError(
            f"query: expected an even local length for the zigzag layout, got shape {query.shape}"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    cfg = _RingConfig(axis_name, p, bool(is_causal), layout, float(scale), implementation)
    out, lse = _ring(cfg, query, key, value, segment_ids, segment_ids)
    out = out.astype(query.dtype)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------------------------
# Ulysses and its 2-D combination with the ring


def _kv_repeat(n: int, k: int, p: int, name: str) -> int:
    """How many times to repeat the K key/value heads so they split evenly over p devices."""
    if n % p:
        raise ValueError(
            f"query: expected a number of heads divisible by the {p} devices of the Ulysses "
            f"axis, got {n} heads"
        )
    r = p // math.gcd(k, p)
    if n % (k * r):  # cannot happen when p | n and k | n (lcm(k, p) | n), kept as a guard
        raise ValueError(f"{name}: cannot spread {k} key/value heads over {p} devices")
    return r


def ulysses_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    axis_name: AxisName,
    is_causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    implementation: str | None = None,
    ring_axis_name: AxisName | None = None,
    layout: str = "zigzag",
) -> Array | tuple[Array, Array]:
    """DeepSpeed-Ulysses attention over the sequence shards of ``axis_name`` (inside shard_map).

    An ``all_to_all`` turns (B, T/P, N, H) sequence shards into (B, T, N/P, H) head shards,
    each device runs the single-device kernel on its heads, and a second ``all_to_all`` turns
    the output back. GQA: with K key/value heads not divisible by P, each key/value head is
    repeated P / gcd(K, P) times before the exchange (query head n keeps key/value head
    n // (N/K)). Needs N % P == 0.

    With ``ring_axis_name`` the per-head attention is itself :func:`ring_attention` over a
    second mesh axis (Unified Sequence Parallelism, Fang & Zhao 2024): the sequence is sharded
    over (ring_axis_name, axis_name), ring-major, and for causal attention the ring level uses
    ``layout`` (the global sequence is in zigzag order for ring_size shards).

    Arguments as :func:`ring_attention`; returns the local output shard (and lse).
    """
    _check_attention_args(query, key, value, segment_ids)
    p = _axis_size(axis_name)
    n, kh = query.shape[2], key.shape[2]
    r = _kv_repeat(n, kh, p, "key")
    if r > 1:
        key = jnp.repeat(key, r, axis=2)
        value = jnp.repeat(value, r, axis=2)

    def seq_to_heads(x):
        return lax.all_to_all(x, axis_name, split_axis=2, concat_axis=1, tiled=True)

    def heads_to_seq(x):
        return lax.all_to_all(x, axis_name, split_axis=1, concat_axis=2, tiled=True)

    q, k, v = seq_to_heads(query), seq_to_heads(key), seq_to_heads(value)
    seg = None
    if segment_ids is not None:
        seg = lax.all_gather(segment_ids, axis_name, axis=1, tiled=True)
    if ring_axis_name is not None:
        out, lse = ring_attention(
            q,
            k,
            v,
            axis_name=ring_axis_name,
            is_causal=is_causal,
            segment_ids=seg,
            scale=scale,
            layout=layout,
            return_lse=True,
            implementation=implementation,
        )
    else:
        out, lse = _attention().dot_product_attention(
            q,
            k,
            v,
            scale=scale,
            is_causal=is_causal,
            segment_ids=seg,
            return_lse=True,
            implementation=implementation,
        )
    out = heads_to_seq(out)
    if not return_lse:
        return out
    return out, heads_to_seq(lse[..., None])[..., 0]


def usp_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    ulysses_axis: AxisName,
    ring_axis: AxisName,
    is_causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    layout: str = "zigzag",
    return_lse: bool = False,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """2-D sequence parallelism: Ulysses over ``ulysses_axis`` x ring over ``ring_axis``.

    The sequence axis is sharded over ``(ring_axis, ulysses_axis)`` (ring-major, as
    ``PartitionSpec(None, (ring_axis, ulysses_axis))``); for causal attention the global sequence
    is in the zigzag order of the ring size (``to_zigzag(x, ring_size)``). See
    :func:`ulysses_attention`.
    """
    return ulysses_attention(
        query,
        key,
        value,
        axis_name=ulysses_axis,
        is_causal=is_causal,
        segment_ids=segment_ids,
        scale=scale,
        return_lse=return_lse,
        implementation=implementation,
        ring_axis_name=ring_axis,
        layout=layout,
    )


# ----------------------------------------------------------------------------------------------
# carries across devices: all-gather of (a-product, state) pairs and a prefix combine


def _prefix_states(a_all: Array, h_all: Array, h0: Array) -> tuple[Array, Array]:
    """States entering each of P shards and the final one.

    a_all: (P, ...) the total decay of each shard (broadcastable against h_all); h_all: (P, ...)
    each shard's last state from a zero initial state; h0: the state entering shard 0.
    Returns (h_in (P, ...), h_final).
    """
    h0 = _vary_like(h0, a_all, h_all)

    def step(h, x):
        a_e, h_e = x
        return a_e * h + h_e, h

    h_final, h_in = lax.scan(step, h0, (a_all, h_all))
    return h_in, h_final


def _invariant(x: Array, axis_name: AxisName) -> Array:
    """x (equal on every device by construction) typed as device-invariant: device 0's copy."""
    me = lax.axis_index(axis_name)
    return lax.psum(jnp.where(me == 0, x, jnp.zeros((), x.dtype)), axis_name)


def _gather(x: Array, axis_name: AxisName) -> Array:
    return lax.all_gather(x, axis_name, axis=0, tiled=False)


# ----------------------------------------------------------------------------------------------
# LASP-2: sequence-parallel linear attention


def sequence_parallel_linear_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    axis_name: AxisName,
    decay: Array | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    chunk_size: int = 64,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Causal linear attention with the sequence sharded over ``axis_name`` (LASP-2).

    Semantics of :func:`jaxcore.kernels.attention.linear_attention` over the global sequence
    (``o_t = q_t S_t``, ``S_t = d_t S_{t-1} + k_t^T v_t``), sharded contiguously (shard i holds
    positions [i T/P, (i+1) T/P)). Each device computes its shard's state
    ``M_i = sum_s (prod_{s<r} d_r) k_s^T v_s`` and total decay ``D_i = prod_s d_s``; one
    ``all_gather`` exchanges the (D_i, M_i) pairs (P x N x d_k x d_v floats, independent of T);
    a prefix combine gives the state entering the shard, and the local chunked kernel runs
    with it as ``initial_state``. Memory O(T/P + P d_k d_v) per device.

    Args:
      query, key: local shards (B, T/P, N, H); value: (B, T/P, N, Hv).
      axis_name: mesh axis (or axes) the sequence is sharded over.
      decay: optional local shard of per-step decay in [0, 1], broadcastable to (B, T/P, N).
      initial_state: (B, N, H, Hv) state before the global sequence (same on every device).
      return_final_state: also return the state after the global sequence (device-invariant,
        so ``out_specs=P()`` returns it).
      chunk_size, implementation: passed to the local ``linear_attention``.

    Returns:
      Local output shard (B, T/P, N, Hv) in the query dtype (and the final state).
    """
    la = _attention().linear_attention
    checks.check_rank(query, 4, "query")
    b, t, n, h = query.shape
    checks.check_shape(key, (b, t, n, h), "key")
    checks.check_rank(value, 4, "value")
    checks.check_shape(value, (b, t, n, None), "value")
    hv = value.shape[-1]
    cdt = _cdt(query.dtype)
    q, k, v = (jnp.asarray(x).astype(cdt) for x in (query, key, value))
    if decay is None:
        a = jnp.zeros((b, t, n), cdt)
        dec = None
    else:
        dec = jnp.asarray(decay)
        try:
            dec = jnp.broadcast_to(dec.astype(cdt), (b, t, n))
        except ValueError:
            raise ValueError(
                f"decay: expected shape broadcastable to (B, T/P, N) = {(b, t, n)}, "
                f"got {jnp.shape(decay)}"
            ) from None
        a = jnp.cumsum(jnp.log(jnp.clip(dec, jnp.finfo(cdt).tiny, 1.0)), axis=1)  # (B, t, N)
    if initial_state is None:
        s0 = jnp.zeros((b, n, h, hv), cdt)
    else:
        s0 = jnp.asarray(initial_state)
        checks.check_shape(s0, (b, n, h, hv), "initial_state")
        s0 = s0.astype(cdt)
    a_last = a[:, -1]  # (B, N): log of the shard's total decay
    w = jnp.exp(a_last[:, None, :] - a)  # (B, t, N): decay from step s to the shard's end
    hi = lax.Precision.HIGHEST
    m_local = jnp.einsum("btnh,btnv->bnhv", k * w[..., None], v, precision=hi)
    d_all = _gather(jnp.exp(a_last)[..., None, None], axis_name)  # (P, B, N, 1, 1)
    m_all = _gather(m_local, axis_name)  # (P, B, N, H, Hv): the one all-gather of states
    s_in, s_final = _prefix_states(d_all, m_all, s0)
    me = lax.axis_index(axis_name)
    s_me = lax.dynamic_index_in_dim(s_in, me, axis=0, keepdims=False)
    out = la(
        q,
        k,
        v,
        decay=dec,
        chunk_size=chunk_size,
        initial_state=s_me,
        implementation=implementation,
    ).astype(query.dtype)
    return (out, _invariant(s_final, axis_name)) if return_final_state else out


# ----------------------------------------------------------------------------------------------
# sequence-parallel linear scan


def sequence_parallel_scan(
    a: Array,
    b: Array,
    *,
    axis_name: AxisName,
    initial_state: Array | None = None,
    reverse: bool = False,
    segment_ids: Array | None = None,
    return_final_state: bool = False,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """:func:`jaxcore.kernels.scan.linear_scan` with axis 1 sharded over ``axis_name``.

    ``h_t = a_t * h_{t-1} + b_t`` over the global sequence, sharded contiguously. Each device
    scans its shard from a zero state (the single-device kernel, any implementation), the
    pairs (prod_t a_t, last state) are all-gathered (P x state floats), a prefix combine gives
    the state entering each shard, and the local correction adds
    ``cumprod(a)_t * h_in``. Memory O(T/P) per device plus P states.

    Args:
      a: local shard of the coefficients: (B, T/P) or any prefix of b's shape (elementwise /
        diagonal, as in ``linear_scan``). Dense matrix coefficients are not supported here.
      b: local shard (B, T/P, *state).
      axis_name: mesh axis (or axes) the sequence is sharded over.
      initial_state: (B, *state) state before the global sequence (h_L when ``reverse``).
      reverse: run from the end of the global sequence.
      segment_ids: local shard (B, T/P) of integer ids; the state resets where the id changes,
        also across shard boundaries.
      return_final_state: also return the state after the whole sequence (every device).
      chunk_size, implementation: passed to the local ``linear_scan``.

    Returns:
      Local shard of all states (B, T/P, *state) (and the final state (B, *state)).
    """
    ls = _scan_module().linear_scan
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    checks.check_rank(b, tuple(range(2, 16)), "b")
    if not (2 <= a.ndim <= b.ndim and a.shape == b.shape[: a.ndim]):
        raise ValueError(
            f"a: expected shape {b.shape[:2]} or another prefix of b's shape {b.shape} "
            f"(dense matrix coefficients are not supported by sequence_parallel_scan), "
            f"got {a.shape}"
        )
    bsz, t = b.shape[:2]
    state_shape = (bsz,) + b.shape[2:]
    if initial_state is not None:
        initial_state = jnp.asarray(initial_state)
        checks.check_shape(initial_state, state_shape, "initial_state")
    if segment_ids is not None:
        checks.check_shape(segment_ids, (bsz, t), "segment_ids")
        checks.check_dtype(segment_ids, "segment_ids", kinds="iu")
    dts = [a.dtype, b.dtype] + ([initial_state.dtype] if initial_state is not None else [])
    dtype = jnp.result_type(*dts)
    if not jnp.issubdtype(dtype, jnp.inexact):
        dtype = jnp.result_type(dtype, jnp.float32)
    a = a.astype(dtype)  # kept in its own shape for linear_scan; broadcast for the carries
    b = b.astype(dtype)
    p = _axis_size(axis_name)
    me = lax.axis_index(axis_name)
    shift = 1
    if reverse:  # the mirror image: flip time and the device order
        a, b = jnp.flip(a, 1), jnp.flip(b, 1)
        segment_ids = None if segment_ids is None else jnp.flip(segment_ids, 1)
        me = p - 1 - me
        shift = -1
    if segment_ids is not None:
        seg = segment_ids
        prev_last = lax.ppermute(seg[:, -1], axis_name, _ring_perm(p, shift))  # (B,)
        first = jnp.logical_and(me > 0, seg[:, 0] != prev_last)[:, None]
        reset = jnp.concatenate([first, seg[:, 1:] != seg[:, :-1]], axis=1)  # (B, t)
        reset = reset.reshape(reset.shape + (1,) * (a.ndim - 2))
        a = jnp.where(reset, jnp.zeros((), dtype), a)
    h_loc = ls(a, b, chunk_size=chunk_size, implementation=implementation)
    a = a.reshape(a.shape + (1,) * (b.ndim - a.ndim))
    cum = jnp.cumprod(a, axis=1)  # (B, t, ...): product of a from the shard start
    a_all = _gather(cum[:, -1], axis_name)  # (P, B, ...)
    h_all = _gather(h_loc[:, -1], axis_name)  # (P, B, *state)
    if reverse:
        a_all, h_all = jnp.flip(a_all, 0), jnp.flip(h_all, 0)
    h0 = jnp.zeros(state_shape, dtype) if initial_state is None else initial_state.astype(dtype)
    h_in, h_final = _prefix_states(a_all, h_all, h0)
    h_me = lax.dynamic_index_in_dim(h_in, me, axis=0, keepdims=False)  # (B, *state)
    hs = h_loc + cum * h_me[:, None]
    if reverse:
        hs = jnp.flip(hs, 1)
    return (hs, _invariant(h_final, axis_name)) if return_final_state else hs


def _carry_in(
    axis_name: AxisName,
    a_tot: Array,
    h_last: Array,
    h0: Array,
    segment_ids: Array | None,
) -> tuple[Array, Array]:
    """The state entering this shard and the final state, from every shard's (decay, state).

    a_tot: (B, ...) the shard's total decay (broadcastable to the state); h_last: (B, *state)
    the shard's last state from a zero initial state; h0: the state before the sequence. With
    segment ids a shard with a segment boundary inside passes no state through (decay 0), and a
    shard whose first id differs from the previous shard's last one starts from zero.
    """
    p = _axis_size(axis_name)
    me = lax.axis_index(axis_name)
    bsz = h_last.shape[0]
    fresh = jnp.zeros((bsz,), bool)
    if segment_ids is not None:
        seg = segment_ids
        inner = jnp.any(seg[:, 1:] != seg[:, :-1], axis=1)  # (B,)
        a_tot = jnp.where(inner.reshape((bsz,) + (1,) * (a_tot.ndim - 1)), 0, a_tot)
        prev_last = lax.ppermute(seg[:, -1], axis_name, _ring_perm(p))
        fresh = jnp.logical_and(me > 0, seg[:, 0] != prev_last)
    a_all = _gather(a_tot, axis_name)
    h_all = _gather(h_last, axis_name)
    f_all = _gather(fresh, axis_name).reshape((p, bsz) + (1,) * (h_last.ndim - 1))
    h = _vary_like(h0.astype(h_last.dtype), a_all, h_all, f_all)

    def step(h, x):
        a_e, h_e, f_e = x
        h = jnp.where(f_e, jnp.zeros((), h.dtype), h)
        return a_e * h + h_e, h

    h_final, h_in = lax.scan(step, h, (a_all, h_all, f_all))
    h_me = lax.dynamic_index_in_dim(h_in, me, axis=0, keepdims=False)
    return h_me, _invariant(h_final, axis_name)


def sequence_parallel_selective_scan(
    u: Array,
    delta: Array,
    A: Array,
    B: Array,
    C: Array,
    D: Array | None = None,
    z: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
    *,
    axis_name: AxisName,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """:func:`jaxcore.kernels.scan.selective_scan` (Mamba-1) with axis 1 sharded over ``axis_name``.

    Arguments as ``selective_scan`` on the local shards (u, delta, time-varying B/C, z,
    segment_ids: (B, T/P, ...)); ``initial_state`` (B, D, N) is the state before the global
    sequence. Local scan from a zero state for the shard's last state, an all-gather of
    (exp(A * sum delta), last state) pairs, a prefix combine, then the local scan again from the
    state entering the shard (the correction; 2x the local compute, O(T/P) memory).
    """
    ss = _scan_module().selective_scan
    u = jnp.asarray(u)
    checks.check_rank(u, 3, "u")
    kw = dict(
        D=D,
        z=z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        segment_ids=segment_ids,
        chunk_size=chunk_size,
        implementation=implementation,
    )
    A = jnp.asarray(A)
    checks.check_shape(A, (u.shape[2], None), "A")
    sdt = jnp.result_type(A.dtype, jnp.float32)
    zero = _vary_like(jnp.zeros((u.shape[0],) + A.shape, sdt), u)
    _, h_last = ss(u, delta, A, B, C, initial_state=zero, return_final_state=True, **kw)
    dlt = jnp.asarray(delta).astype(jnp.result_type(jnp.asarray(delta).dtype, jnp.float32))
    if delta_bias is not None:
        dlt = dlt + jnp.asarray(delta_bias).astype(dlt.dtype)[None, None, :]
    if delta_softplus:
        dlt = jax.nn.softplus(dlt)
    a_tot = jnp.exp(A[None] * jnp.sum(dlt, axis=1)[:, :, None])  # (B, D, N)
    h0 = zero if initial_state is None else jnp.asarray(initial_state)
    h_in, h_final = _carry_in(axis_name, a_tot, h_last, h0, segment_ids)
    y = ss(u, delta, A, B, C, initial_state=h_in, **kw)
    return (y, h_final) if return_final_state else y


def sequence_parallel_ssd(
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    axis_name: AxisName,
    chunk_size: int = 64,
    D: Array | None = None,
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """:func:`jaxcore.kernels.scan.ssd` (Mamba-2) with axis 1 sharded over ``axis_name``.

    Local shards x (B, T/P, H, P), dt (B, T/P, H), B/C (B, T/P, [G,] N); ``initial_state``
    (B, H, P, N) before the global sequence. Same carry exchange as
    :func:`sequence_parallel_selective_scan` with the per-head decay exp(A * sum dt).
    """
    ssd = _scan_module().ssd
    x = jnp.asarray(x)
    checks.check_rank(x, 4, "x")
    kw = dict(chunk_size=chunk_size, D=D, segment_ids=segment_ids, implementation=implementation)
    bsz, _, nh, hp = x.shape
    n = jnp.shape(B)[-1]
    sdt = jnp.result_type(x.dtype, jnp.float32)
    zero = _vary_like(jnp.zeros((bsz, nh, hp, n), sdt), x)
    _, h_last = ssd(x, dt, A, B, C, initial_state=zero, return_final_state=True, **kw)
    dts = jnp.asarray(dt).astype(sdt)
    a_tot = jnp.exp(jnp.asarray(A).astype(sdt)[None] * jnp.sum(dts, axis=1))  # (B, H)
    h0 = zero if initial_state is None else jnp.asarray(initial_state)
    h_in, h_final = _carry_in(
        axis_name, a_tot[:, :, None, None], h_last.astype(sdt), h0, segment_ids
    )
    y = ssd(x, dt, A, B, C, initial_state=h_in, **kw)
    return (y, h_final) if return_final_state else y


# ----------------------------------------------------------------------------------------------
# wrappers on a Mesh with global arrays. Each takes ``check_vma`` (passed to jax.shard_map; keep
# the default True, set False only to run an inner kernel that is not yet varying-type clean).


def _axis_sizes(mesh: Mesh, axes: AxisName) -> int:
    names = axes if isinstance(axes, tuple) else (axes,)
    for a in names:
        if a not in mesh.shape:
            raise ValueError(f"axis: expected a mesh axis name in {tuple(mesh.shape)}, got {a!r}")
    return int(np.prod([mesh.shape[a] for a in names]))


def _explicit(mesh: Mesh) -> bool:
    types = getattr(mesh, "axis_types", ()) or ()
    return any(t == jax.sharding.AxisType.Explicit for t in types)


def _place(x: Array | None, mesh: Mesh, spec: P) -> Array | None:
    if x is None:
        return None
    sh = NamedSharding(mesh, spec)
    if _explicit(mesh):
        return jax.reshard(x, sh)
    return jax.lax.with_sharding_constraint(x, sh)


def _check_len(x: Array, multiple: int, name: str, what: str) -> None:
    if x.shape[1] % multiple:
        raise ValueError(
            f"{name}: expected a sequence length (axis 1) divisible by {multiple} ({what}), "
            f"got shape {x.shape}"
        )


def _seq_spec(batch_axis: AxisName | None, seq: AxisName, ndim: int) -> P:
    return P(batch_axis, seq, *([None] * (ndim - 2)))


def _call(
    mesh: Mesh,
    fn,
    args: Sequence[Array | None],
    specs: Sequence[P],
    out_specs,
    check_vma: bool = True,
) -> Any:
    args = [_place(x, mesh, s) for x, s in zip(args, specs)]
    in_specs = tuple(None if x is None else s for x, s in zip(args, specs))
    return jax.shard_map(
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=check_vma
    )(*args)


def _sharded_attention(
    mesh: Mesh,
    attn,
    query: Array,
    key: Array,
    value: Array,
    segment_ids: Array | None,
    *,
    seq: AxisName,
    batch_axis: AxisName | None,
    zigzag_shards: int | None,
    check_vma: bool,
) -> Array:
    """``attn(q, k, v, segment_ids=s)`` inside ``jax.shard_map`` on global arrays.

    query/key/value (B, T, N|K, H) and segment_ids (B, T) have T sharded over the mesh axis (or
    axes) ``seq`` and B over ``batch_axis``. With ``zigzag_shards`` the sequence is put in the
    zigzag order of that many shards before and restored after. Returns the global output
    (B, T, N, Hv).
    """
    args = [query, key, value, segment_ids]
    if zigzag_shards is not None:
        args = [None if x is None else to_zigzag(x, zigzag_shards) for x in args]
    spec4 = _seq_spec(batch_axis, seq, 4)
    spec2 = _seq_spec(batch_axis, seq, 2)

    def fn(q, k, v, s):
        return attn(q, k, v, segment_ids=s)

    out = _call(mesh, fn, args, [spec4, spec4, spec4, spec2], spec4, check_vma=check_vma)
    return out if zigzag_shards is None else from_zigzag(out, zigzag_shards)


def sharded_ring_attention(
    mesh: Mesh,
    query: Array,
    key: Array,
    value: Array,
    *,
    axis: AxisName = "seq",
    batch_axis: AxisName | None = None,
    is_causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    check_vma: bool = True,
) -> Array:
    """:func:`ring_attention` on global arrays (B, T, N, H): shards T over ``mesh`` axis ``axis``.

    For causal attention the sequence is put in zigzag order before and restored after (an
    all-to-all's worth of traffic; a model can keep its activations in zigzag order instead and
    call :func:`ring_attention` directly). ``batch_axis`` optionally shards B too.
    Returns the global output (B, T, N, Hv).
    """
    p = _axis_sizes(mesh, axis)
    zig = bool(is_causal)
    _check_len(query, 2 * p if zig else p, "query", "2 x the ring size" if zig else "ring size")
    attn = functools.partial(
        ring_attention,
        axis_name=axis,
        is_causal=is_causal,
        scale=scale,
        implementation=implementation,
    )
    return _sharded_attention(
        mesh,
        attn,
        query,
        key,
        value,
        segment_ids,
        seq=axis,
        batch_axis=batch_axis,
        zigzag_shards=p if zig else None,
        check_vma=check_vma,
    )


def sharded_ulysses_attention(
    mesh: Mesh,
    query: Array,
    key: Array,
    value: Array,
    *,
    axis: AxisName = "seq",
    batch_axis: AxisName | None = None,
    is_causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    check_vma: bool = True,
) -> Array:
    """:func:`ulysses_attention` on global arrays (B, T, N, H), T sharded over ``axis``."""
    p = _axis_sizes(mesh, axis)
    _check_len(query, p, "query", "the Ulysses axis size")
    attn = functools.partial(
        ulysses_attention,
        axis_name=axis,
        is_causal=is_causal,
        scale=scale,
        implementation=implementation,
    )
    return _sharded_attention(
        mesh,
        attn,
        query,
        key,
        value,
        segment_ids,
        seq=axis,
        batch_axis=batch_axis,
        zigzag_shards=None,
        check_vma=check_vma,
    )


def sharded_usp_attention(
    mesh: Mesh,
    query: Array,
    key: Array,
    value: Array,
    *,
    ulysses_axis: AxisName = "ulysses",
    ring_axis: AxisName = "ring",
    batch_axis: AxisName | None = None,
    is_causal: bool = False,
    segment_ids: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
    check_vma: bool = True,
) -> Array:
    """:func:`usp_attention` on global arrays: T sharded over (ring_axis, ulysses_axis)."""
    r = _axis_sizes(mesh, ring_axis)
    u = _axis_sizes(mesh, ulysses_axis)
    zig = bool(is_causal)
    _check_len(query, (2 * r if zig else r) * u, "query", "the ring x Ulysses sizes")
    attn = functools.partial(
        usp_attention,
        ulysses_axis=ulysses_axis,
        ring_axis=ring_axis,
        is_causal=is_causal,
        scale=scale,
        implementation=implementation,
    )
    return _sharded_attention(
        mesh,
        attn,
        query,
        key,
        value,
        segment_ids,
        seq=(ring_axis, ulysses_axis),
        batch_axis=batch_axis,
        zigzag_shards=r if zig else None,
        check_vma=check_vma,
    )


def sharded_linear_attention(
    mesh: Mesh,
    query: Array,
    key: Array,
    value: Array,
    *,
    axis: AxisName = "seq",
    batch_axis: AxisName | None = None,
    decay: Array | None = None,
    chunk_size: int = 64,
    implementation: str | None = None,
    check_vma: bool = True,
) -> Array:
    """:func:`sequence_parallel_linear_attention` (LASP-2) on global arrays (B, T, N, H)."""
    p = _axis_sizes(mesh, axis)
    _check_len(query, p, "query", "the sequence axis size")
    spec4 = _seq_spec(batch_axis, axis, 4)
    if decay is not None:
        decay = jnp.broadcast_to(jnp.asarray(decay), query.shape[:3])

    def fn(q, k, v, d):
        return sequence_parallel_linear_attention(
            q, k, v, axis_name=axis, decay=d, chunk_size=chunk_size, implementation=implementation
        )

    spec3 = _seq_spec(batch_axis, axis, 3)
    return _call(
        mesh,
        fn,
        [query, key, value, decay],
        [spec4, spec4, spec4, spec3],
        spec4,
        check_vma=check_vma,
    )


def sharded_scan(
    mesh: Mesh,
    a: Array,
    b: Array,
    *,
    axis: AxisName = "seq",
    batch_axis: AxisName | None = None,
    initial_state: Array | None = None,
    reverse: bool = False,
    segment_ids: Array | None = None,
    chunk_size: int | None = None,
    implementation: str | None = None,
    check_vma: bool = True,
) -> Array:
    """:func:`sequence_parallel_scan` on global arrays: axis 1 of ``a``/``b`` over ``axis``."""
    p = _axis_sizes(mesh, axis)
    _check_len(b, p, "b", "the sequence axis size")
    spec_a = _seq_spec(batch_axis, axis, jnp.ndim(a))
    spec_b = _seq_spec(batch_axis, axis, jnp.ndim(b))
    spec_h = P(batch_axis, *([None] * (jnp.ndim(b) - 2)))
    spec_s = _seq_spec(batch_axis, axis, 2)

    def fn(a_, b_, h0, s):
        return sequence_parallel_scan(
            a_,
            b_,
            axis_name=axis,
            initial_state=h0,
            reverse=reverse,
            segment_ids=s,
            chunk_size=chunk_size,
            implementation=implementation,
        )

    return _call(
        mesh,
        fn,
        [a, b, initial_state, segment_ids],
        [spec_a, spec_b, spec_h, spec_s],
        spec_b,
        check_vma=check_vma,
    )

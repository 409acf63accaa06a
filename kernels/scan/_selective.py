"""Mamba-1 selective scan, mamba_ssm ``selective_scan_ref`` semantics, (batch, length, D) layout.

    x_t = exp(delta_t * A) * x_{t-1} + delta_t * B_t * u_t          state x: (batch, D, N)
    y_t = <x_t, C_t>  (2 Re<x_t, C_t> for complex state)  + D * u_t,  then * silu(z_t)

Implementations:

- "reference": mamba_ssm's algorithm: materialise exp(delta*A) and delta*B*u as (B, L, D, N), then
  ``lax.scan``; differentiated by JAX.
- "sequential" / "associative": the same materialised tensors through :func:`linear_scan`.
  Forward mode (jax.jvp, jacfwd) works on every implementation: here through linear_scan's
  primitive; "chunked" and "pallas" have a custom JVP whose tangent map is a ``linear_call``
  (the JVP of the chunked scan; reverse mode transposes it with the hand backward), so
  Hessian-vector products work too (through the Pallas kernels: their XLA twins' JVPs).
- "chunked" (default): never materialises (B, L, D, N). A ``lax.scan`` over chunks, inside it a
  ``lax.scan`` over the steps of the chunk computing exp(delta*A) on the fly; only the states at
  chunk starts are stored. Its custom JVP's tangent map (a ``linear_call``) is transposed by a
  hand backward that walks the chunks in reverse, recomputes the chunk's states from its start
  state and runs the per-step VJP in reverse.
- "pallas" / "pallas_interpret": Pallas forward kernels (real A, time-varying or grouped B/C); by
  default the chunked three-phase kernel with delta_bias/softplus, D and silu(z) fused (see
  ``_pallas.py``; ``_pallas.SELECTIVE_KERNEL = "sequential"`` selects the older one-program-per-
  channel-block kernel). Both also write the chunk-start states for the backward: the Pallas
  reverse kernels of ``_pallas_bwd.py`` when compiled (``_pallas.SELECTIVE_BACKWARD``), the
  chunked XLA recompute in interpret mode.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcore import backend, checks
from jaxcore.autodiff import tangent_call

from ._common import SCAN_IMPLEMENTATIONS, check_chunk, check_segment_ids, pad_time, reset_mask
from ._linear import linear_scan

Array = Any

FAMILY = "selective_scan"

backend.register_family(
    FAMILY,
    SCAN_IMPLEMENTATIONS,
    # On GPU the Pallas forward ran 27x faster than "chunked" (H200, B=2 L=8192 D=1024 N=16);
    # inputs it does not cover (complex A, constant B/C) fall back to "chunked".
    {"gpu": "pallas", "*": "chunked"},
    doc="Mamba-1 selective scan (mamba_ssm selective_scan_ref semantics), (B, L, D) layout.",
)


# ----------------------------------------------------------------------------------------------
# argument handling


def _bc_layout(x: Array, name: str, bsz: int, length: int, dim: int, n: int) -> str:
    """'const' (D, N), 'time' (B, L, N) or 'group' (B, L, G, N) with G dividing D."""
    if x.ndim == 2:
        checks.check_shape(x, (dim, n), name)
        return "const"
    if x.ndim == 3:
        checks.check_shape(x, (bsz, length, n), name)
        return "time"
    if x.ndim == 4:
        checks.check_shape(x, (bsz, length, None, n), name)
        g = x.shape[2]
        if g < 1 or dim % g:
            raise ValueError(f"{name}: expected a group count dividing D={dim}, got {g}")
        return "group"
    raise ValueError(
        f"{name}: expected shape ({dim}, {n}), ({bsz}, {length}, {n}) or ({bsz}, {length}, G, {n}),"
        f" got {x.shape}"
    )


def _expand(v: Array, layout: str, dim: int) -> Array:
    """One step's B or C -> broadcastable against the (batch, D, N) state (rank 3)."""
    if layout == "const":
        return v[None]  # (1, D, N)
    if layout == "time":
        return v[:, None, :]  # (B, 1, N)
    return jnp.repeat(v, dim // v.shape[1], axis=1)  # (B, G, N) -> (B, D, N)


def _step(x, A, u_t, dt_t, keep_t, B_t, C_t, lb: str, lc: str):
    """One recurrence step on the (batch, D, N) state; returns (x_t, y_t (batch, D) real)."""
    dim = x.shape[1]
    dA = jnp.exp(dt_t[..., None] * A[None])
    dA = jnp.where(keep_t[:, None, None] > 0, dA, jnp.zeros((), dA.dtype))
    x = dA * x + (dt_t * u_t)[..., None] * _expand(B_t, lb, dim)
    y = jnp.sum(x * _expand(C_t, lc, dim), axis=-1)
    if jnp.iscomplexobj(y):
        y = 2.0 * jnp.real(y)
    return x, y


# ----------------------------------------------------------------------------------------------
# chunked core: time-major chunked inputs (nc, T, batch, ...), custom VJP with recomputation


def _chunk_forward(u, dt, A, Bm, Cm, h0, keep, lb, lc):
    """Returns (y (nc, T, B, D), final state, chunk start states (nc, B, D, N))."""
    bx = None if lb == "const" else Bm
    cx = None if lc == "const" else Cm

    def chunk(x, inp):
        u_c, dt_c, k_c, b_c, c_c = inp

        def step(x, s):
            u_t, dt_t, k_t, b_t, c_t = s
            b_t = Bm if lb == "const" else b_t
            c_t = Cm if lc == "const" else c_t
            return _step(x, A, u_t, dt_t, k_t, b_t, c_t, lb, lc)

        x_end, ys = lax.scan(step, x, (u_c, dt_c, k_c, b_c, c_c))
        return x_end, (ys, x)

    h_t, (ys, starts) = lax.scan(chunk, h0, (u, dt, keep, bx, cx))
    return ys, h_t, starts


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8))
def _chunked_core(u, dt, A, Bm, Cm, h0, keep, lb, lc):
    """y (nc, T, B, D), final state of the chunked scan on time-major chunks.

    Differentiated by a custom JVP whose tangent map is a ``linear_call`` (as ``ssd``'s core):
    forward mode runs the JVP of the scan over chunks (tangent states carried beside the
    states, nothing per step stored); reverse mode transposes that call with
    :func:`_chunked_backward`, which recomputes each chunk from its saved start state. So
    ``grad`` keeps only the inputs and the chunk-start states, and ``jvp``/``jacfwd`` work too.
    """
    ys, h_t, _ = _chunk_forward(u, dt, A, Bm, Cm, h0, keep, lb, lc)
    return ys, h_t


@functools.partial(_chunked_core.defjvp, symbolic_zeros=True)
def _chunked_jvp(lb, lc, primals, tangents):
    ys, h_t, starts = _chunk_forward(*primals, lb, lc)

    def fun(keep, *p):
        return _chunk_forward(*p, keep, lb, lc)[:2]

    def backward(p, keep, starts, cts):
        return _chunked_backward(lb, lc, (*p[:5], keep, starts), cts)[:6]

    # keep (a 0/1 mask) is not differentiated
    out_t = tangent_call(fun, backward, primals[:6], tangents[:6], primals[6], starts, (ys, h_t))
    return (ys, h_t), tuple(out_t)


def _chunked_backward(lb, lc, res, cts):
    u, dt, A, Bm, Cm, keep, starts = res
    gy, gh = cts
    bx = None if lb == "const" else Bm
    cx = None if lc == "const" else Cm
    zeros = lambda v: jnp.zeros_like(v) if v is not None else None
    gbc = zeros(Bm) if lb == "const" else None
    gcc = zeros(Cm) if lc == "const" else None

    def chunk(carry, inp):
        u_c, dt_c, k_c, b_c, c_c, gy_c, x0 = inp

        def pick(s):
            u_t, dt_t, k_t, b_t, c_t = s
            b_t = Bm if lb == "const" else b_t
            c_t = Cm if lc == "const" else c_t
            return u_t, dt_t, k_t, b_t, c_t

        def fwd(x, s):
            u_t, dt_t, k_t, b_t, c_t = pick(s)
            x_new, _ = _step(x, A, u_t, dt_t, k_t, b_t, c_t, lb, lc)
            return x_new, x  # the state entering this step

        xs = (u_c, dt_c, k_c, b_c, c_c)
        _, x_prev = lax.scan(fwd, x0, xs)

        def bwd(carry, s):
            gx, ga, gb_acc, gc_acc = carry
            xp, gy_t, step_in = s
            u_t, dt_t, k_t, b_t, c_t = pick(step_in)
            f = lambda x, a, u_, d_, b_, c_: _step(x, a, u_, d_, k_t, b_, c_, lb, lc)
            _, vjp = jax.vjp(f, xp, A, u_t, dt_t, b_t, c_t)
            gx, ga_t, gu_t, gdt_t, gb_t, gc_t = vjp((gx, gy_t.astype(u_t.dtype)))
            ga = ga + ga_t
            if lb == "const":
                gb_acc, gb_t = gb_acc + gb_t, None
            if lc == "const":
                gc_acc, gc_t = gc_acc + gc_t, None
            return (gx, ga, gb_acc, gc_acc), (gu_t, gdt_t, gb_t, gc_t)

        carry, outs = lax.scan(bwd, carry, (x_prev, gy_c, xs), reverse=True)
        return carry, outs

    init = (gh.astype(starts.dtype), jnp.zeros_like(A), gbc, gcc)
    (gh0, ga, gbc, gcc), (gu, gdt, gb, gc) = lax.scan(
        chunk, init, (u, dt, keep, bx, cx, gy, starts), reverse=True
    )
    gb = gbc if lb == "const" else gb
    gc = gcc if lc == "const" else gc
    return gu, gdt, ga, gb, gc, gh0, jnp.zeros_like(keep)


def _to_chunks(x: Array, t: int, nc: int, value: float = 0.0) -> Array:
    """(B, L, ...) -> time-major chunks (nc, T, B, ...), padded at the end with ``value``."""
    x = pad_time(x, nc * t, value=value)
    x = jnp.moveaxis(x, 1, 0)
    return x.reshape((nc, t) + x.shape[1:])


def _from_chunks(y: Array, length: int) -> Array:
    """(nc, T, B, ...) -> (B, L, ...)."""
    y = y.reshape((-1,) + y.shape[2:])[:length]
    return jnp.moveaxis(y, 0, 1)


def _run_chunked(u, dt, A, Bm, Cm, h0, keep, lb, lc, chunk):
    length = u.shape[1]
    if chunk > length:
        chunk = length
    t = min(chunk, length)
    nc = -(-length // t)
    # Padded steps have delta = 0: exp(0) = 1 and no input, so the final state is unchanged.
    args = [_to_chunks(v, t, nc) for v in (u, dt)]
    bm = Bm if lb == "const" else _to_chunks(Bm, t, nc)
    cm = Cm if lc == "const" else _to_chunks(Cm, t, nc)
    kp = _to_chunks(keep, t, nc, value=1.0)
    ys, h_t = _chunked_core(args[0], args[1], A, bm, cm, h0, kp, lb, lc)
    return _from_chunks(ys, length), h_t


# ----------------------------------------------------------------------------------------------
# materialised paths (mamba_ssm's algorithm)


def _materialise(u, dt, A, Bm, Cm, lb, lc):
    """(exp(delta*A), delta*B*u) as (B, L, D, N) and C as broadcastable (B, L, D|1, N)."""
    dim = u.shape[2]
    dA = jnp.exp(jnp.einsum("bld,dn->bldn", dt, A))
    if lb == "const":
        bfull = Bm[None, None]
    elif lb == "time":
        bfull = Bm[:, :, None, :]
    else:
        bfull = jnp.repeat(Bm, dim // Bm.shape[2], axis=2)
    dbu = (dt * u)[..., None] * bfull
    if lc == "const":
        cfull = Cm[None, None]
    elif lc == "time":
        cfull = Cm[:, :, None, :]
    else:
        cfull = jnp.repeat(Cm, dim // Cm.shape[2], axis=2)
    return dA, dbu, cfull


def _readout(hs: Array, cfull: Array) -> Array:
    y = jnp.sum(hs * cfull, axis=-1)
    return 2.0 * jnp.real(y) if jnp.iscomplexobj(y) else y


def _run_reference(u, dt, A, Bm, Cm, h0, keep, lb, lc):
    dA, dbu, cfull = _materialise(u, dt, A, Bm, Cm, lb, lc)
    dA = jnp.where(keep[:, :, None, None] > 0, dA, jnp.zeros((), dA.dtype))
    cfull = jnp.broadcast_to(cfull, dA.shape[:2] + cfull.shape[2:])

    def step(x, s):
        da, db, c = s
        x = da * x + db
        return x, _readout(x, c)

    h_t, ys = lax.scan(
        step, h0, (jnp.moveaxis(dA, 1, 0), jnp.moveaxis(dbu, 1, 0), jnp.moveaxis(cfull, 1, 0))
    )
    return jnp.moveaxis(ys, 0, 1), h_t


def _run_linear(u, dt, A, Bm, Cm, h0, keep, lb, lc, impl, chunk):
    dA, dbu, cfull = _materialise(u, dt, A, Bm, Cm, lb, lc)
    dA = jnp.where(keep[:, :, None, None] > 0, dA, jnp.zeros((), dA.dtype))
    hs = linear_scan(dA, dbu, initial_state=h0, implementation=impl, chunk_size=chunk)
    return _readout(hs, cfull), hs[:, -1]


# ----------------------------------------------------------------------------------------------
# public API


def selective_scan(
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
    initial_state: Array | None = None,
    return_final_state: bool = False,
    segment_ids: Array | None = None,
    chunk_size: int | None = None,
    implementation: str | None = None,
) -> Array | tuple[Array, Array]:
    """Mamba-1 selective scan (mamba_ssm ``selective_scan_ref`` semantics, (B, L, D) layout).

    Args:
      u: (batch, length, D) input.
      delta: (batch, length, D) step sizes (``delta + delta_bias``, then softplus if asked).
      A: (D, N) real or complex state matrix (diagonal per channel).
      B, C: (D, N) constant, (batch, length, N) time-varying, or (batch, length, G, N) grouped
        (channel d uses group d // (D / G)); complex allowed with complex A.
      D: (D,) skip connection; z: (batch, length, D) gate (y *= silu(z)); delta_bias: (D,).
      initial_state: (batch, D, N) state before step 0 (zeros if None).
      return_final_state: also return the (batch, D, N) state after the last step; it is
        differentiable (unlike mamba_ssm's ``return_last_state``).
      segment_ids: (batch, length) ints; the state resets to zero where the id changes.
      chunk_size: steps per chunk for "chunked"/"pallas" (default near sqrt(length), <= 256).
      implementation: None (default "chunked"), "reference", "sequential", "associative",
        "chunked", "pallas", "pallas_interpret". All have forward and reverse mode.

    Returns:
      y (batch, length, D) in u's dtype; with ``return_final_state`` also the final state, in
      float32 (float64 under x64 with float64 inputs; complex if the state is complex).
    """
    impl = backend.resolve_implementation(FAMILY, implementation)
    u, delta, A, B, C = (jnp.asarray(v) for v in (u, delta, A, B, C))
    checks.check_rank(u, 3, "u")
    bsz, length, dim = u.shape
    if length == 0:
        raise ValueError(f"u: expected length >= 1 along axis 1, got shape {u.shape}")
    checks.check_shape(delta, u.shape, "delta")
    checks.check_rank(A, 2, "A")
    checks.check_shape(A, (dim, None), "A")
    n = A.shape[1]
    lb = _bc_layout(B, "B", bsz, length, dim, n)
    lc = _bc_layout(C, "C", bsz, length, dim, n)
    if D is not None:
        checks.check_shape(D, (dim,), "D")
    if z is not None:
        checks.check_shape(z, u.shape, "z")
    if delta_bias is not None:
        checks.check_shape(delta_bias, (dim,), "delta_bias")
    check_segment_ids(segment_ids, bsz, length)
    chunk = check_chunk(chunk_size, length)

    acc = jnp.promote_types(u.dtype, jnp.float32)
    uf = u.astype(acc)
    dt = delta.astype(acc)
    if delta_bias is not None:
        dt = dt + jnp.asarray(delta_bias).astype(acc)[None, None]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    sdt = jnp.result_type(acc, A.dtype, B.dtype, C.dtype)
    if jnp.issubdtype(sdt, jnp.complexfloating):
        sdt = jnp.promote_types(sdt, jnp.complex64)
    A = A.astype(sdt if jnp.iscomplexobj(A) else acc)
    Bm = B.astype(jnp.promote_types(B.dtype, acc))
    Cm = C.astype(jnp.promote_types(C.dtype, acc))
    if initial_state is None:
        h0 = jnp.zeros_like(uf, dtype=sdt, shape=(bsz, dim, n))
    else:
        initial_state = jnp.asarray(initial_state)
        checks.check_shape(initial_state, (bsz, dim, n), "initial_state")
        h0 = initial_state.astype(sdt)
    # inside shard_map: the state varies over the mesh axes the inputs vary over (one carry type)
    h0 = backend.vary_together(h0, uf, dt, Bm, Cm)[0]
    if segment_ids is None:
        keep = jnp.ones((bsz, length), acc)
    else:
        keep = 1.0 - reset_mask(segment_ids).astype(acc)

    if impl == "reference":
        y, h_t = _run_reference(uf, dt, A, Bm, Cm, h0, keep, lb, lc)
    elif impl in ("sequential", "associative"):
        y, h_t = _run_linear(uf, dt, A, Bm, Cm, h0, keep, lb, lc, impl, chunk)
    elif impl == "chunked":
        y, h_t = _run_chunked(uf, dt, A, Bm, Cm, h0, keep, lb, lc, chunk)
    else:
        pallas_ok = not (jnp.iscomplexobj(h0) or lb == "const" or lc == "const")
        if not pallas_ok and implementation is None:  # the platform default: fall back
            impl = "chunked"
        if not pallas_ok and impl == "chunked":
            y, h_t = _run_chunked(uf, dt, A, Bm, Cm, h0, keep, lb, lc, chunk)
        elif not pallas_ok:
            raise ValueError(
                f"implementation={impl!r} supports real A with time-varying or grouped B and C; "
                f"got A {A.dtype}, B {B.shape}, C {C.shape}; use 'chunked'"
            )
        else:
            from . import _pallas

            interpret = impl == "pallas_interpret"
            kernel = _pallas._check_kernel(
                _pallas.SELECTIVE_KERNEL, "SELECTIVE_KERNEL", _pallas.SELECTIVE_KERNELS
            )
            if kernel != "sequential":
                # chunked kernel: delta_bias/softplus, D and silu(z) fused, y in u's dtype
                fl = lambda v: v if jnp.issubdtype(v.dtype, jnp.floating) else v.astype(acc)
                zz = None if z is None else fl(jnp.asarray(z))
                y, h_t = _pallas.selective_scan_fused(
                    fl(u), fl(delta), A, fl(B), fl(C), D, zz, delta_bias, delta_softplus, h0,
                    None if segment_ids is None else keep, lb, lc, chunk, interpret,
                )  # fmt: skip
                return (y, h_t) if return_final_state else y
            y, h_t = _pallas.selective_scan_pallas(
                uf, dt, A, Bm, Cm, h0, keep, lb, lc, min(chunk, length), interpret
            )

    if D is not None:
        y = y + uf * jnp.asarray(D).astype(acc)[None, None]
    if z is not None:
        y = y * jax.nn.silu(jnp.asarray(z).astype(acc))
    y = y.astype(u.dtype)
    return (y, h_t) if return_final_state else y


def selective_scan_reference(u, delta, A, B, C, D=None, z=None, delta_bias=None,
                             delta_softplus=False, **kwargs):  # fmt: skip
    """mamba_ssm's ``selective_scan_ref`` algorithm (materialised, ``lax.scan``); same arguments."""
    kwargs.pop("implementation", None)
    kwargs.pop("chunk_size", None)
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                          implementation="reference", **kwargs)  # fmt: skip


def selective_scan_step(
    state: Array,
    u_t: Array,
    delta_t: Array,
    A: Array,
    B_t: Array,
    C_t: Array,
    D: Array | None = None,
    z_t: Array | None = None,
    delta_bias: Array | None = None,
    delta_softplus: bool = False,
) -> tuple[Array, Array]:
    """One decode step consistent with :func:`selective_scan`.

    Args:
      state: (batch, D, N); u_t, delta_t, z_t: (batch, D); A: (D, N);
      B_t, C_t: (D, N) constant, (batch, N) time-varying or (batch, G, N) grouped.

    Returns:
      (y_t (batch, D) in u_t's dtype, new state (dtype of ``state`` promoted with the scan's)).
    """
    state, u_t, delta_t, A, B_t, C_t = (jnp.asarray(v) for v in (state, u_t, delta_t, A, B_t, C_t))
    checks.check_rank(u_t, 2, "u_t")
    bsz, dim = u_t.shape
    checks.check_shape(delta_t, (bsz, dim), "delta_t")
    checks.check_shape(A, (dim, None), "A")
    n = A.shape[1]
    checks.check_shape(state, (bsz, dim, n), "state")
    layouts = []
    for name, v in (("B_t", B_t), ("C_t", C_t)):
        if v.ndim == 2 and v.shape == (dim, n):
            layouts.append("const")
        elif v.ndim == 2:
            checks.check_shape(v, (bsz, n), name)
            layouts.append("time")
        elif v.ndim == 3:
            checks.check_shape(v, (bsz, None, n), name)
            if dim % v.shape[1]:
                raise ValueError(f"{name}: expected a group count dividing D={dim}, got {v.shape}")
            layouts.append("group")
        else:
            raise ValueError(
                f"{name}: expected shape ({dim}, {n}), ({bsz}, {n}) or ({bsz}, G, {n}), "
                f"got {v.shape}"
            )
    acc = jnp.promote_types(u_t.dtype, jnp.float32)
    uf = u_t.astype(acc)
    dt = delta_t.astype(acc)
    if delta_bias is not None:
        checks.check_shape(delta_bias, (dim,), "delta_bias")
        dt = dt + jnp.asarray(delta_bias).astype(acc)[None]
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    sdt = jnp.result_type(acc, A.dtype, B_t.dtype, C_t.dtype, state.dtype)
    A = A.astype(sdt if jnp.iscomplexobj(A) else acc)
    b = B_t.astype(jnp.promote_types(B_t.dtype, acc))
    c = C_t.astype(jnp.promote_types(C_t.dtype, acc))
    keep = jnp.ones((bsz,), acc)
    x, y = _step(state.astype(sdt), A, uf, dt, keep, b, c, layouts[0], layouts[1])
    if D is not None:
        checks.check_shape(D, (dim,), "D")
        y = y + uf * jnp.asarray(D).astype(acc)[None]
    if z_t is not None:
        checks.check_shape(z_t, (bsz, dim), "z_t")
        y = y * jax.nn.silu(jnp.asarray(z_t).astype(acc))
    return y.astype(u_t.dtype), x

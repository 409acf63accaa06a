"""Parallel fixed-point solvers: ``jaxcore.kernels.fixed_point``.

Evaluate "sequential" computations in parallel and exactly.

- :func:`solve_recurrence` solves ``h_t = f(h_{t-1}, x_t)`` for all t at once as the fixed point
  of ``H -> F(H)`` (DEER, Lim et al. 2024; quasi-DEER and ELK, Gonzalez et al. 2024): Newton with
  dense Jacobians ("newton"), their diagonal ("quasi_newton"), the diagonal with Levenberg-Marquardt
  damping solved as a Kalman smoother ("elk"), or plain fixed-point iteration ("jacobi"). The
  linearised recurrences are solved by :func:`jaxcore.kernels.scan.linear_scan`.
- :func:`solve_triangular` solves triangular systems ``x_i = f_i(x_{<i})`` by Jacobi,
  Gauss-Seidel and the two hybrid block iterations of Song et al. (ICML 2021).

Guarantee (both solvers): after k iterations the first k positions are exact and frozen, so no
method ever needs more than T iterations to return exactly the sequential answer.

Automatic fallback to ``lax.scan`` (``fallback=True``; the rule is also in docs/solvers.md):

1. static, at trace time: ``method="newton"`` falls back when the dense Jacobians would be too
   large: ``n > NEWTON_MAX_DIM`` (32) or ``T * n * n > DENSE_MAX_ENTRIES`` (2**27 entries);
   ``"quasi_newton"``/``"elk"`` fall back when ``n > DIAG_MAX_DIM`` (256);
2. inputs (initial state, xs, closed-over arrays of f) with a NaN/inf: the sequential scan gives
   the answer (NaN propagates exactly as it would sequentially);
3. dynamic: when the residual has not halved within ``PATIENCE`` (10) consecutive iterations
   (divergence, stagnation, overflow of the iterates), the solve finishes with ``lax.scan``.

``Solution.fell_back`` says whether the sequential path produced the states. Under ``vmap`` the
dynamic choices become selects, so both branches run.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from jaxcore import backend, checks
from jaxcore.autodiff import linear_call

from .scan import linear_scan

Array = Any
PyTree = Any

FAMILY = "fixed_point"
METHODS = ("newton", "quasi_newton", "elk", "jacobi", "sequential")
TRIANGULAR_METHODS = ("jacobi", "gauss_seidel", "jacobi_gs", "gs_jacobi")

NEWTON_MAX_DIM = 32
DENSE_MAX_ENTRIES = 2**27
DIAG_MAX_DIM = 256
PATIENCE = 10
_JVP_CHUNK = 8

backend.register_family(
    FAMILY,
    ("reference", "xla"),
    "xla",
    doc="Parallel fixed-point solvers: recurrences (DEER/ELK), triangular systems (Song et al.).",
)


class RESULTS:
    """Result codes of :class:`Solution` (int32)."""

    successful = 0
    max_steps_reached = 1

    _messages = {
        0: "successful",
        1: "did not converge within max_iters iterations",
    }

    @classmethod
    def message(cls, code: int) -> str:
        return cls._messages.get(int(code), f"unknown result code {int(code)}")


class Solution(NamedTuple):
    """Result of :func:`solve_recurrence` (a pytree).

    states: pytree like ``initial_state`` with a leading axis T: h_0 .. h_{T-1}.
    iterations: int32, parallel iterations taken (0 for the sequential method).
    converged: bool, the final scaled residual is <= tol (or every position is frozen exact).
    residual: max_t |f(h_{t-1}, x_t) - h_t| / (1 + |f(h_{t-1}, x_t)|) of the returned iterate
      (before a fallback; 0 after the sequential path).
    result: int32 code, see :class:`RESULTS`.
    fell_back: bool, the sequential ``lax.scan`` produced ``states``.
    """

    states: PyTree
    iterations: Array
    converged: Array
    residual: Array
    result: Array
    fell_back: Array


class _Opts(NamedTuple):
    scan_impl: str | None
    method: str
    tol: float
    max_iters: int
    damping: float
    fallback: bool
    length: int
    block: int | None = None  # Newton: diagonal Jacobian blocks of this size (None: dense)


def default_tol(dtype: Any) -> float:
    """Default scaled-residual tolerance: 1e-12 (f64), 1e-6 (f32), 1e-3 (16-bit)."""
    dt = jnp.dtype(dtype)
    if dt == jnp.float64:
        return 1e-12
    if dt.itemsize >= 4:
        return 1e-6
    return 1e-3


# ----------------------------------------------------------------------------------------------
# evaluation helpers on flat states: H (T, n); f_conv(h, x, *consts) -> (n,)


def _prev(h0: Array, H: Array) -> Array:
    return jnp.concatenate([h0[None], H[:-1]], axis=0)


def _feval(f_conv, consts, Hprev, xs):
    return jax.vmap(lambda h, x: f_conv(h, x, *consts))(Hprev, xs)


def _dense_jac(f_conv, consts, Hprev, xs):
    return jax.vmap(lambda h, x: jax.jacfwd(lambda hh: f_conv(hh, x, *consts))(h))(Hprev, xs)


def _block_jac(f_conv, consts, Hprev, xs, bs: int):
    """Diagonal blocks of df/dh for every t: (T, n // bs, bs, bs) (row, column within a block).

    One JVP per state coordinate, in chunks of ``_JVP_CHUNK`` basis vectors, keeping only the
    rows of the coordinate's own block: O(T * n * (bs + chunk)) memory.
    """
    T, n = Hprev.shape
    nb = n // bs
    chunk = min(n, _JVP_CHUNK)
    nchunks = -(-n // chunk)
    F = lambda H: _feval(f_conv, consts, H, xs)

    def one_chunk(idx):  # idx (chunk,) basis indices (clipped at the end)
        tang = jax.nn.one_hot(idx, n, dtype=Hprev.dtype)

        def jv(e):
            return jax.jvp(F, (Hprev,), (jnp.broadcast_to(e, Hprev.shape),))[1]

        out = jax.vmap(jv)(tang)  # (chunk, T, n): column idx of J
        rows = (idx // bs)[:, None] * bs + jnp.arange(bs)[None, :]  # (chunk, bs)
        return jnp.take_along_axis(out, rows[:, None, :], axis=2)  # (chunk, T, bs)

    ids = jnp.minimum(jnp.arange(nchunks * chunk).reshape(nchunks, chunk), n - 1)
    if nchunks == 1:
        cols = one_chunk(ids[0])
    else:
        cols = lax.map(one_chunk, ids).reshape(nchunks * chunk, T, bs)
    cols = cols[:n].reshape(nb, bs, T, bs)  # [block k, column j, t, row r]
    return jnp.transpose(cols, (2, 0, 3, 1))


def _diag_jac(f_conv, consts, Hprev, xs):
    """diag(df/dh) for every t, (T, n), with O(T * n * chunk) memory."""
    T, n = Hprev.shape
    return _block_jac(f_conv, consts, Hprev, xs, 1).reshape(T, n)


def _scaled_residual(fh: Array, H: Array) -> Array:
    r = jnp.abs(fh - H) / (1 + jnp.abs(fh))
    return jnp.max(r)


def _linsolve(a: Array, b: Array, h0: Array, impl: str | None) -> Array:
    return linear_scan(a[None], b[None], initial_state=h0[None], implementation=impl)[0]


def _elk_solve(a: Array, b: Array, h0: Array, H: Array, lam: Array) -> Array:
    """argmin_h sum_t |h_t - a_t h_{t-1} - b_t|^2 + lam |h_t - H_t|^2 per coordinate (h_{-1}=h0).

    The normal equations are a symmetric positive-definite tridiagonal system in t for each
    coordinate (the Kalman smoother of the ELK paper), solved by ``lax.linalg.tridiagonal_solve``.
    """
    T = a.shape[0]
    a_next = jnp.concatenate([a[1:], jnp.zeros_like(a[:1])], axis=0)
    b_next = jnp.concatenate([b[1:], jnp.zeros_like(b[:1])], axis=0)
    d = 1 + lam + a_next**2
    du = -a_next
    dl = jnp.concatenate([jnp.zeros_like(a[:1]), -a[1:]], axis=0)
    rhs = b - a_next * b_next + lam * H
    rhs = rhs.at[0].add(a[0] * h0)
    if T == 1:
        return rhs / d
    sol = lax.linalg.tridiagonal_solve(dl.T, d.T, du.T, rhs.T[..., None])[..., 0]
    return sol.T


class _Carry(NamedTuple):
    k: Array  # linear solves done; positions < k are exact and frozen
    H: Array  # current iterate (T, n)
    res: Array  # scaled residual of H (inf before the first evaluation)
    best: Array  # best residual seen
    stall: Array  # evaluations since the residual last halved
    lam: Array  # ELK damping
    done: Array


def _evaluate(opts: _Opts, f_conv, consts, h0, xs, H):
    Hprev = _prev(h0, H)
    fh = _feval(f_conv, consts, Hprev, xs)
    if opts.method == "newton" and opts.block is not None:
        jac = _block_jac(f_conv, consts, Hprev, xs, opts.block)
    elif opts.method == "newton":
        jac = _dense_jac(f_conv, consts, Hprev, xs)
    elif opts.method in ("quasi_newton", "elk"):
        jac = _diag_jac(f_conv, consts, Hprev, xs)
    else:
        jac = None
    return Hprev, fh, jac, _scaled_residual(fh, H)


def _update(opts: _Opts, c: _Carry, h0, Hprev, fh, jac):
    H = c.H
    m = opts.method
    if m == "jacobi":
        Hn = fh
    elif m == "newton" and opts.block is not None:
        T, n = H.shape
        nb, bs = n // opts.block, opts.block
        Hb = Hprev.reshape(T, nb, bs)
        b = fh.reshape(T, nb, bs) - jnp.einsum("tkij,tkj->tki", jac, Hb)
        Hn = _linsolve(jac, b, h0.reshape(nb, bs), opts.scan_impl).reshape(T, n)
    elif m == "newton":
        Hn = _linsolve(jac, fh - jnp.einsum("tij,tj->ti", jac, Hprev), h0, opts.scan_impl)
    elif m == "quasi_newton":
        Hn = _linsolve(jac, fh - jac * Hprev, h0, opts.scan_impl)
    elif m == "elk":
        Hn = _elk_solve(jac, fh - jac * Hprev, h0, H, c.lam)
    else:
        raise AssertionError(m)
    # Freeze the exact prefix: f(H_{t-1}) is exact for t <= k because H_{<k} already is.
    t = jnp.arange(H.shape[0])[:, None]
    return jnp.where(t <= c.k, fh, Hn)


def _step(opts: _Opts, f_conv, consts, h0, xs, c: _Carry) -> _Carry:
    """Evaluate f (and its Jacobian) at the iterate; stop or take one linear-solve step."""
    Hprev, fh, jac, res = _evaluate(opts, f_conv, consts, h0, xs, c.H)
    converged = (res <= opts.tol) | (c.k >= opts.length)
    improved = res < 0.5 * c.best
    best = jnp.where(improved, res, c.best)
    stall = jnp.where(improved, 0, c.stall + 1).astype(jnp.int32)
    stalled = jnp.asarray(opts.fallback) & (stall > PATIENCE)
    done = converged | (c.k >= opts.max_iters) | stalled
    # Levenberg-Marquardt: trust the linearisation more after a good step, less after a bad one.
    lam = jnp.where(res < c.res, c.lam * 0.25, jnp.minimum(c.lam * 4, 1e8)).astype(c.lam.dtype)
    Hn = lax.cond(done, lambda: c.H, lambda: _update(opts, c, h0, Hprev, fh, jac))
    k = c.k + (~done).astype(jnp.int32)
    return _Carry(k, Hn, res, best, stall, lam, done)


def _sequential(f_conv, consts, h0, xs):
    def body(h, x):
        h = f_conv(h, x, *consts)
        return h, h

    return lax.scan(body, h0, xs)[1]


def _all_finite(tree) -> Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.result_type(x), jnp.inexact)
    ]
    return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))


def _solve(opts: _Opts, f_conv, consts, h0, xs, guess, unrolled: bool):
    """Iterate; then finish with ``lax.scan`` if inputs were not finite or the iteration stalled."""
    finite = _all_finite((consts, h0, xs))
    inf = jnp.asarray(jnp.inf, h0.dtype)
    lam = jnp.asarray(opts.damping, h0.dtype)
    c = _Carry(jnp.int32(0), guess, inf, inf, jnp.int32(0), lam, ~finite)
    step = functools.partial(_step, opts, f_conv, consts, h0, xs)
    if unrolled:

        def body(c, _):
            cn = step(c)
            return jax.tree.map(lambda u, v: jnp.where(c.done, v, u), cn, c), None

        c, _ = lax.scan(body, c, None, length=opts.max_iters + 1)
    else:
        c = lax.while_loop(lambda c: ~c.done, step, c)
    converged = finite & ((c.res <= opts.tol) | (c.k >= opts.length))
    use_seq = ~finite | (jnp.asarray(opts.fallback) & (c.stall > PATIENCE) & ~converged)
    states = lax.cond(use_seq, lambda: _sequential(f_conv, consts, h0, xs), lambda: c.H)
    ok = converged | use_seq
    result = jnp.where(ok, RESULTS.successful, RESULTS.max_steps_reached).astype(jnp.int32)
    res = jnp.where(use_seq, jnp.zeros_like(c.res), c.res)
    return states, (c.k, ok, res, result, use_seq)


# ----------------------------------------------------------------------------------------------
# implicit adjoint: one transposed linear scan with the converged Jacobians


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _solve_implicit(opts, f_conv, consts, h0, xs, guess):
    """The solver, differentiated implicitly at its answer H (H_t = f(H_{t-1}, x_t)): the
    tangent dH_t = J_t dH_{t-1} + (df/d(x_t, consts, h0) along the input tangents) is one linear
    scan with the Jacobians J_t = df/dh at (H_{t-1}, x_t), never the solver's iterations. A
    custom JVP whose tangent map is a ``linear_call``: forward mode runs that scan, reverse mode
    its transpose, the adjoint scan of :func:`_adjoint`."""
    return _solve(opts, f_conv, consts, h0, xs, guess, unrolled=False)


def _dense(opts, H) -> bool:
    return H.shape[0] * H.shape[1] ** 2 <= DENSE_MAX_ENTRIES


def _f_at(f_conv, H):
    """(consts, h0, xs) -> f(H_{t-1}, x_t) for every t, with H fixed but h0 = H_{-1} free: the
    inputs' part of the tangent and adjoint maps."""
    return lambda consts, h0, xs: _feval(f_conv, consts, _prev(h0, H), xs)


def _tangent(opts, f_conv, res, lin):
    """dH for input tangents lin = (dconsts, dh0, dxs) at the answer H."""
    consts, h0, xs, H = res
    Hprev = _prev(h0, H)
    b = jax.jvp(_f_at(f_conv, H), (consts, h0, xs), tuple(lin))[1]
    if _dense(opts, H):  # dH_t = J_t dH_{t-1} + b_t
        jac = _dense_jac(f_conv, consts, Hprev, xs)
        return linear_scan(jac[None], b[None], implementation=opts.scan_impl)[0]

    def body(dh, inp):  # dense Jacobians too large: the same recurrence by JVPs
        h, x, b_t = inp
        dh = jax.jvp(lambda hh: f_conv(hh, x, *consts), (h,), (dh,))[1] + b_t
        return dh, dh

    return lax.scan(body, jnp.zeros_like(h0), (Hprev, xs, b))[1]


def _adjoint(opts, f_conv, res, g):
    """The transpose of :func:`_tangent`: (dconsts, dh0, dxs) from the cotangent g of H."""
    consts, h0, xs, H = res
    Hprev = _prev(h0, H)
    if _dense(opts, H):
        jac = _dense_jac(f_conv, consts, Hprev, xs)  # J_t = df/dh at (h_{t-1}, x_t)
        # lam_t = g_t + J_{t+1}^T lam_{t+1}
        at = jnp.swapaxes(jac, -1, -2)
        a_next = jnp.concatenate([at[1:], jnp.zeros_like(at[:1])], axis=0)
        lam = linear_scan(a_next[None], g[None], reverse=True, implementation=opts.scan_impl)[0]
    else:  # dense Jacobians too large: the same adjoint recurrence, sequentially, by VJPs

        def body(lam_next, inp):
            h_t, x_next, g_t = inp  # J_{t+1} = df/dh at (h_t, x_{t+1})
            _, vjp = jax.vjp(lambda h: f_conv(h, x_next, *consts), h_t)
            lam = g_t + vjp(lam_next)[0]
            return lam, lam

        inputs = (H[:-1], jax.tree.map(lambda a: a[1:], xs), g[:-1])
        _, lams = lax.scan(body, g[-1], inputs, reverse=True)
        lam = jnp.concatenate([lams, g[-1:]], axis=0)

    _, vjp = jax.vjp(_f_at(f_conv, H), consts, h0, xs)
    return vjp(lam.astype(H.dtype))


@_solve_implicit.defjvp
def _solve_implicit_jvp(opts, f_conv, primals, tangents):
    consts, h0, xs, guess = primals
    out = _solve_implicit(opts, f_conv, *primals)  # itself: differentiable again
    H, aux = out
    # the linear operands: the tangents that are not float0 (integer inputs)
    flat, tree = jax.tree.flatten(tangents[:3])
    live = [jax.dtypes.result_type(t) != jax.dtypes.float0 for t in flat]

    def full(lin):
        it = iter(lin)
        return jax.tree.unflatten(tree, [next(it) if z else t for z, t in zip(live, flat)])

    def fun(res, lin):
        return _tangent(opts, f_conv, res, full(lin))

    def fun_t(res, g):
        got = jax.tree.leaves(_adjoint(opts, f_conv, res, g))
        return [x for z, x in zip(live, got) if z]

    lin = [t for z, t in zip(live, flat) if z]
    dH = linear_call(fun, fun_t, (consts, h0, xs, H), lin) if lin else jnp.zeros_like(H)
    return out, (dH, jax.tree.map(_zero_tangent, aux))


def _zero_tangent(x):
    """The tangent of a diagnostic output (iterations, flags, residual): zero."""
    t = jax.typeof(x).to_tangent_aval()
    return jnp.zeros(t.shape, t.dtype)


# ----------------------------------------------------------------------------------------------
# errors on traced values


def _raise_if_failed(result, iterations, residual, max_iters):
    def cb(result, iterations, residual):
        result = np.asarray(result)
        if np.any(result != RESULTS.successful):
            bad = np.flatnonzero(result.reshape(-1) != RESULTS.successful)
            it = np.asarray(iterations).reshape(-1)[bad[0]]
            r = np.asarray(residual).reshape(-1)[bad[0]]
            raise RuntimeError(
                f"solve_recurrence: {RESULTS.message(result.reshape(-1)[bad[0]])} "
                f"(iterations={it}, max_iters={max_iters}, scaled residual={r:.3g}; "
                f"{bad.size} of {result.size} solves failed). Raise max_iters, use "
                "method='elk' or 'sequential', or pass throw=False and read Solution.result."
            )

    jax.debug.callback(cb, result, iterations, residual)


# ----------------------------------------------------------------------------------------------
# public API


def solve_recurrence(
    f: Callable[[PyTree, PyTree], PyTree],
    initial_state: PyTree,
    xs: PyTree,
    *,
    method: str = "newton",
    tol: float | None = None,
    max_iters: int | None = None,
    damping: float | None = None,
    init_guess: PyTree | Solution | None = None,
    adjoint: str = "implicit",
    throw: bool = True,
    fallback: bool = True,
    implementation: str | None = None,
    scan_implementation: str | None = None,
    jacobian_block_size: int | None = None,
) -> Solution:
    """Solve ``h_t = f(h_{t-1}, x_t)``, t = 0..T-1, ``h_{-1} = initial_state``, in parallel.

    Args:
      f: ``f(h, x) -> h``, pure; ``h`` a pytree of float arrays (flattened to n numbers), ``x``
        one time step of ``xs``. Arrays it closes over are differentiated (closure conversion).
      initial_state: pytree h_{-1}.
      xs: pytree whose leaves have a leading time axis T >= 1.
      method: "newton" (dense Jacobians, DEER), "quasi_newton" (diagonal, O(T n) memory),
        "elk" (diagonal + Levenberg-Marquardt damping), "jacobi" or "sequential" (``lax.scan``).
      tol: scaled residual ``max |f(h_{t-1}) - h_t| / (1 + |f(h_{t-1})|)`` to stop at
        (default :func:`default_tol` of the state dtype).
      max_iters: iteration cap (default T, which always suffices: positions < k are exact
        and frozen after k iterations).
      damping: ELK's lambda >= 0 (default 1.0); larger is more cautious. Only for "elk".
      init_guess: warm start, states like a previous ``Solution.states`` (or a Solution).
        Default: ``initial_state`` repeated T times.
      adjoint: "implicit" (one transposed linear scan with the converged Jacobians) or
        "unrolled" (reverse-mode through ``max_iters`` masked iterations; memory grows with it).
      throw: raise (through ``jax.debug.callback``, works under jit/vmap) when the solve fails;
        otherwise read ``Solution.result``.
      fallback: allow the automatic fallback to ``lax.scan`` (see the module docstring).
      implementation: "xla" (default) or "reference" (always ``lax.scan``).
      scan_implementation: passed to :func:`jaxcore.kernels.scan.linear_scan` for the linear
        solves (None: "associative", log depth, on GPU; linear_scan's default elsewhere).
      jacobian_block_size: Newton only: keep the diagonal blocks of this size of each Jacobian
        (block-diagonal Newton, O(T n b) memory; exact for head-wise block-diagonal cells such as
        ``rnn.gru_init(..., num_heads=n // b)``). None: dense.

    Returns:
      :class:`Solution`. Forward-mode (jvp) is not available with ``adjoint="implicit"``.
    """
    checks.check_choice(method, METHODS, "method")
    checks.check_choice(adjoint, ("implicit", "unrolled"), "adjoint")
    impl = backend.resolve_implementation(FAMILY, implementation)
    leaves0 = jax.tree.leaves(initial_state)
    if not leaves0:
        raise ValueError("initial_state: expected a pytree with at least one array, got none")
    for i, leaf in enumerate(leaves0):
        checks.check_dtype(leaf, f"initial_state (leaf {i})")
    h0, unravel = ravel_pytree(initial_state)
    n = h0.shape[0]
    x_leaves = jax.tree.leaves(xs)
    if not x_leaves:
        raise ValueError(
            "xs: expected a pytree with at least one array (time axis first), got none"
        )
    lengths = {int(np.shape(a)[0]) if np.ndim(a) else -1 for a in x_leaves}
    if len(lengths) != 1 or -1 in lengths or 0 in lengths:
        shapes = [tuple(np.shape(a)) for a in x_leaves]
        raise ValueError(f"xs: expected leaves with one common leading length T >= 1, got {shapes}")
    T = lengths.pop()
    xs = jax.tree.map(jnp.asarray, xs)
    x_example = jax.tree.map(lambda a: a[0], xs)

    out_shape = jax.eval_shape(f, initial_state, x_example)
    want = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), initial_state
    )
    if jax.tree.structure(out_shape) != jax.tree.structure(want) or any(
        (o.shape, o.dtype) != (w.shape, w.dtype)
        for o, w in zip(jax.tree.leaves(out_shape), jax.tree.leaves(want))
    ):
        raise ValueError(
            f"f: expected f(h, x) to return the structure of initial_state {want}, got {out_shape}"
        )

    def fflat(h, x):
        return ravel_pytree(f(unravel(h), x))[0]

    f_conv, consts = jax.closure_convert(fflat, h0, x_example)
    unravel_T = jax.vmap(unravel)

    if tol is None:
        tol = default_tol(h0.dtype)
    checks.check_positive(tol, "tol", allow_zero=True)
    if max_iters is None:
        max_iters = T
    if not isinstance(max_iters, int | np.integer) or max_iters < 1:
        raise ValueError(f"max_iters: expected a positive int, got {max_iters!r}")
    max_iters = int(min(max_iters, T))
    if damping is None:
        damping = 1.0
    checks.check_positive(damping, "damping", allow_zero=True)

    if jacobian_block_size is not None:
        if method != "newton":
            raise ValueError(
                f"jacobian_block_size: only used by method='newton', got method={method!r}"
            )
        ok = isinstance(jacobian_block_size, int | np.integer) and jacobian_block_size >= 1
        if not ok or n % jacobian_block_size:
            raise ValueError(
                f"jacobian_block_size: expected a positive divisor of the state size {n}, "
                f"got {jacobian_block_size!r}"
            )
        jacobian_block_size = int(jacobian_block_size)
    bs = n if jacobian_block_size is None else jacobian_block_size
    eff = method
    static_fallback = False
    if impl == "reference":
        eff = "sequential"
    elif (
        fallback and method == "newton" and (bs > NEWTON_MAX_DIM or T * n * bs > DENSE_MAX_ENTRIES)
    ):
        eff, static_fallback = "sequential", True
    elif fallback and method in ("quasi_newton", "elk") and n > DIAG_MAX_DIM:
        eff, static_fallback = "sequential", True

    if eff == "sequential":
        states = _sequential(f_conv, consts, h0, xs)
        z = jnp.zeros((), h0.dtype)
        return Solution(
            unravel_T(states),
            jnp.int32(0),
            jnp.asarray(True),
            z,
            jnp.int32(RESULTS.successful),
            jnp.asarray(static_fallback),
        )

    if init_guess is None:
        guess = jnp.broadcast_to(h0, (T, n))
    else:
        if isinstance(init_guess, Solution):
            init_guess = init_guess.states
        gl = jax.tree.leaves(init_guess)
        ok = jax.tree.structure(init_guess) == jax.tree.structure(initial_state) and all(
            np.shape(g) == (T,) + np.shape(l) for g, l in zip(gl, leaves0)
        )
        if not ok:
            raise ValueError(
                "init_guess: expected states like initial_state with a leading axis "
                f"{T}, got {jax.tree.map(np.shape, init_guess)}"
            )
        guess = jax.vmap(lambda s: ravel_pytree(s)[0])(init_guess).astype(h0.dtype)
    guess = lax.stop_gradient(guess)

    if scan_implementation is None and backend.platform() == "gpu":
        scan_implementation = "associative"  # log depth; measured 3-20x faster than chunked
    block = None if jacobian_block_size in (None, n) else jacobian_block_size
    opts = _Opts(
        scan_implementation, eff, float(tol), max_iters, float(damping), bool(fallback), T, block
    )
    if adjoint == "implicit":
        states, aux = _solve_implicit(opts, f_conv, consts, h0, xs, guess)
    else:
        states, aux = _solve(opts, f_conv, consts, h0, xs, guess, unrolled=True)
    iterations, converged, residual, result, fell_back = aux
    if throw:
        _raise_if_failed(result, iterations, residual, max_iters)
    return Solution(
        unravel_T(states),
        iterations.astype(jnp.int32),
        converged,
        residual,
        result,
        jnp.asarray(fell_back),
    )


def solve_recurrence_reference(f: Callable, initial_state: PyTree, xs: PyTree) -> PyTree:
    """The obvious ``lax.scan`` oracle: all states h_0..h_{T-1} of ``h_t = f(h_{t-1}, x_t)``."""

    def body(h, x):
        h = f(h, x)
        return h, h

    return lax.scan(body, initial_state, xs)[1]


# ----------------------------------------------------------------------------------------------
# triangular systems (Song et al., ICML 2021)


class TriangularSolution(NamedTuple):
    """Result of :func:`solve_triangular` (a pytree).

    x: the solution (same structure as ``x0``).
    iterations: int32, outer iterations (sweeps) taken.
    evaluations: int32, calls of the (vectorised) step function; the sequential cost is
      ``num_steps``.
    converged: bool, the last sweep changed nothing by more than ``tol`` (or all positions exact).
    """

    x: PyTree
    iterations: Array
    evaluations: Array
    converged: Array


def _pos_where(mask: Array, a: PyTree, b: PyTree, listy: bool) -> PyTree:
    """Per position: a where mask else b (mask (num_steps,) bool)."""
    if listy:
        return [jnp.where(mask[i], u, v) for i, (u, v) in enumerate(zip(a, b))]

    def w(u, v):
        m = mask.reshape(mask.shape + (1,) * (u.ndim - 1))
        return jnp.where(m, u, v)

    return jax.tree.map(w, a, b)


def _pos_change(a: PyTree, b: PyTree, listy: bool, num_steps: int) -> Array:
    """Max |a - b| per position, (num_steps,); NaN counts as a change."""

    def d(u, v):
        r = jnp.abs(u - v)
        r = jnp.where(jnp.isnan(r), jnp.inf, r)
        return r

    if listy:
        return jnp.stack([jnp.max(d(u, v)) if jnp.size(u) else 0.0 for u, v in zip(a, b)])
    per = [
        jnp.max(d(u, v).reshape(num_steps, -1), axis=1)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    ]
    return functools.reduce(jnp.maximum, per)


def solve_triangular(
    step_fns: Callable[[PyTree], PyTree] | Sequence[Callable[[list], Array]],
    x0: PyTree,
    num_steps: int,
    *,
    method: str = "jacobi",
    block_size: int = 1,
    tol: float = 0.0,
    max_iters: int | None = None,
) -> TriangularSolution:
    """Solve the triangular system ``x_i = f_i(x_{<i})``, i = 0..num_steps-1 (Song et al. 2021).

    Args:
      step_fns: either one function ``f(x) -> x`` on the whole state (leaves with a leading axis
        num_steps; output i may depend only on positions < i, e.g. a MADE network with fixed
        noise), or a sequence of num_steps functions ``step_fns[i](x_list) -> x_i`` reading only
        ``x_list[:i]`` (DenseNet-like chains with differently shaped layers; ``x0`` a list).
      x0: initial guess (any values; the result does not depend on it).
      num_steps: number of positions.
      method: "jacobi" (all positions at once, <= num_steps sweeps), "gauss_seidel" (one
        position after another: the sequential evaluation), "jacobi_gs" (blocks of
        ``block_size`` in parallel, Gauss-Seidel inside each block, <= num_blocks sweeps),
        "gs_jacobi" (blocks one after another, Jacobi inside each block until it settles).
      block_size: positions per block for the hybrids.
      tol: stop when a sweep changes no position by more than tol (0: exact fixed point).
      max_iters: cap on sweeps (default: the count that guarantees exactness).

    Exactness assumes f_i really ignores positions >= i; masking by multiplying with 0 breaks this
    only for inf/NaN values.
    """
    checks.check_choice(method, TRIANGULAR_METHODS, "method")
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps: expected a positive int, got {num_steps!r}")
    if not isinstance(block_size, int | np.integer) or block_size < 1:
        raise ValueError(f"block_size: expected a positive int, got {block_size!r}")
    checks.check_positive(tol, "tol", allow_zero=True)
    listy = not callable(step_fns)
    if listy:
        fns = list(step_fns)
        if len(fns) != num_steps:
            raise ValueError(f"step_fns: expected {num_steps} functions, got {len(fns)}")
        x0 = [jnp.asarray(v) for v in x0]
        if len(x0) != num_steps:
            raise ValueError(f"x0: expected a list of {num_steps} arrays, got {len(x0)}")

        def f(x):
            return [
                jnp.asarray(fn(list(x)), dtype=x[i].dtype).reshape(x[i].shape)
                for i, fn in enumerate(fns)
            ]
    else:
        f = step_fns
        x0 = jax.tree.map(jnp.asarray, x0)
        for leaf in jax.tree.leaves(x0):
            if np.ndim(leaf) < 1 or np.shape(leaf)[0] != num_steps:
                raise ValueError(
                    f"x0: expected leaves with leading axis num_steps={num_steps}, got "
                    f"{jax.tree.map(np.shape, x0)}"
                )
    pos = jnp.arange(num_steps)
    B = int(min(block_size, num_steps))
    nblocks = -(-num_steps // B)

    if method == "gauss_seidel":
        if listy:
            x = list(x0)
            for i, fn in enumerate(fns):
                x[i] = jnp.asarray(fn(list(x)), dtype=x0[i].dtype).reshape(x0[i].shape)
        else:

            def body(i, x):
                return _pos_where(pos == i, f(x), x, listy)

            x = lax.fori_loop(0, num_steps, body, x0)
        n = jnp.int32(num_steps)
        return TriangularSolution(x, n, n, jnp.asarray(True))

    if method == "jacobi":
        cap = num_steps if max_iters is None else min(int(max_iters), num_steps)

        def cond(c):
            k, _, done = c
            return (~done) & (k < cap)

        def body(c):
            k, x, _ = c
            xn = _pos_where(pos < k, x, f(x), listy)  # positions < k are exact: frozen
            ch = _pos_change(xn, x, listy, num_steps)
            done = (jnp.max(ch) <= tol) | (k + 1 >= num_steps)
            return k + 1, xn, done

        k, x, done = lax.while_loop(cond, body, (jnp.int32(0), x0, jnp.asarray(False)))
        return TriangularSolution(x, k, k, done)

    block_of = pos // B
    within = pos % B

    if method == "jacobi_gs":
        # All blocks at once; inside each block positions one after another (B evaluations).
        cap = nblocks if max_iters is None else min(int(max_iters), nblocks)

        def sweep(x):
            def inner(s, x):
                return _pos_where(within == s, f(x), x, listy)

            return lax.fori_loop(0, B, inner, x)

        def cond(c):
            k, _, done = c
            return (~done) & (k < cap)

        def body(c):
            k, x, _ = c
            xn = _pos_where(block_of < k, x, sweep(x), listy)  # blocks < k are exact
            ch = _pos_change(xn, x, listy, num_steps)
            done = (jnp.max(ch) <= tol) | (k + 1 >= nblocks)
            return k + 1, xn, done

        k, x, done = lax.while_loop(cond, body, (jnp.int32(0), x0, jnp.asarray(False)))
        return TriangularSolution(x, k, k * B, done)

    # gs_jacobi: blocks one after another, Jacobi inside the block until it stops changing.
    cap_inner = B if max_iters is None else min(int(max_iters), B)

    def block_body(j, c):
        x, evals, ok = c
        inb = block_of == j

        def cond(ci):
            k, _, done = ci
            return (~done) & (k < cap_inner)

        def body(ci):
            k, x, _ = ci
            xn = _pos_where(inb & (within >= k), f(x), x, listy)
            ch = jnp.where(inb, _pos_change(xn, x, listy, num_steps), 0.0)
            done = (jnp.max(ch) <= tol) | (k + 1 >= B)
            return k + 1, xn, done

        k, x, done = lax.while_loop(cond, body, (jnp.int32(0), x, jnp.asarray(False)))
        return x, evals + k, ok & done

    x, evals, ok = lax.fori_loop(0, nblocks, block_body, (x0, jnp.int32(0), jnp.asarray(True)))
    return TriangularSolution(x, jnp.int32(nblocks), evals, ok)


def solve_triangular_reference(f: Callable[[PyTree], PyTree], x0: PyTree, num_steps: int) -> PyTree:
    """Sequential evaluation: ``x[i] = f(x)[i]`` for i = 0, 1, ... (the oracle)."""
    x = x0
    for i in range(num_steps):
        fx = f(x)
        x = jax.tree.map(lambda u, v, i=i: v.at[i].set(u[i]), fx, x)
    return x


__all__ = [
    "DENSE_MAX_ENTRIES",
    "DIAG_MAX_DIM",
    "METHODS",
    "NEWTON_MAX_DIM",
    "PATIENCE",
    "RESULTS",
    "Solution",
    "TriangularSolution",
    "default_tol",
    "solve_recurrence",
    "solve_recurrence_reference",
    "solve_triangular",
    "solve_triangular_reference",
]

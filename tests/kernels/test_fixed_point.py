"""jaxcore.kernels.fixed_point: parallel recurrence solvers (DEER/quasi-DEER/ELK/Jacobi) and
Song et al.'s triangular block iterations, held to the sequential loop."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from jaxcore.kernels import fixed_point as fp
from jaxcore.kernels import rnn


def scale_recurrent(params, s):
    """Scale the recurrent weights (PyTorch's uniform init has std 1/sqrt(3H); x sqrt(3))."""
    return {**params, "w_hh": params["w_hh"] * (s * np.sqrt(3.0))}


ITERATIVE = ("newton", "quasi_newton", "elk", "jacobi")
T0, N0, D0 = 200, 4, 3  # the common shape: tests share compiled solvers through `solve`


def cell_fn(kind):
    return rnn.gru_cell if kind == "gru" else rnn.lstm_cell


def make(kind, n, d, scale, seed=0, dtype=jnp.float64):
    """(params, h0) for a GRU or LSTM cell whose recurrent weights are scaled by ``scale``."""
    key = jax.random.PRNGKey(seed)
    init = rnn.gru_init if kind == "gru" else rnn.lstm_init
    params = scale_recurrent(init(key, d, n, dtype=dtype), scale)
    z = jnp.zeros((n,), dtype)
    return params, (z if kind == "gru" else (z, z))


@functools.partial(
    jax.jit, static_argnames=("kind", "method", "fallback", "tol", "max_iters", "throw", "adjoint")
)
def solve(params, h0, xs, init_guess=None, *, kind="gru", method, **kw):
    cell = cell_fn(kind)
    return fp.solve_recurrence(
        lambda h, x: cell(params, h, x), h0, xs, method=method, init_guess=init_guess, **kw
    )


@functools.partial(jax.jit, static_argnames=("kind",))
def sequential(params, h0, xs, *, kind="gru"):
    cell = cell_fn(kind)
    return fp.solve_recurrence_reference(lambda h, x: cell(params, h, x), h0, xs)


def inputs(T, d, seed=1, dtype=jnp.float64):
    return jax.random.normal(jax.random.PRNGKey(seed), (T, d), dtype)


def max_err(a, b):
    return max(
        float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


STRICT = {"fallback": False, "tol": 1e-13}


@pytest.mark.parametrize("kind", ["gru", "lstm"])
@pytest.mark.parametrize("method", ITERATIVE)
def test_every_method_equals_sequential(x64, kind, method):
    xs = inputs(T0, D0)
    for scale in (0.5, 3.0, 6.0):  # contracting, expanding, strongly expanding
        params, h0 = make(kind, N0, D0, scale)
        ref = sequential(params, h0, xs, kind=kind)
        # The problem's own rounding sensitivity: how far 1e-16 on h0 moves the sequential answer
        # (strongly expanding LSTMs are chaotic; no evaluation order can do better than this).
        bumped = sequential(params, jax.tree.map(lambda a: a + 1e-16, h0), xs, kind=kind)
        bound = max(1e-10, 1e3 * max_err(bumped, ref))
        # fallback=False: the parallel iteration itself must reach the sequential answer.
        sol = solve(params, h0, xs, kind=kind, method=method, **STRICT)
        assert bool(sol.converged) and int(sol.result) == fp.RESULTS.successful
        assert not bool(sol.fell_back)
        # a solve that did no iteration, or more than the T a sequential scan needs, is a bug
        assert int(sol.iterations) >= 1, int(sol.iterations)
        assert int(sol.iterations) <= T0, (int(sol.iterations), T0)
        assert max_err(sol.states, ref) < bound, (scale, bound)
        if scale < 1 and method == "newton":
            assert int(sol.iterations) <= 8


@pytest.mark.parametrize("method", ITERATIVE)
def test_nan_inputs_propagate_like_sequential(x64, method):
    params, h0 = make("gru", N0, D0, 0.5)
    xs = inputs(T0, D0).at[20, 0].set(jnp.nan)
    ref = sequential(params, h0, xs)
    sol = solve(params, h0, xs, method=method, **STRICT)
    assert np.all(np.isnan(np.asarray(sol.states[20:])))
    np.testing.assert_array_equal(np.asarray(sol.states[:20]), np.asarray(ref[:20]))
    sol = solve(params, h0.at[0].set(jnp.nan), inputs(T0, D0), method=method, **STRICT)
    assert np.all(np.isnan(np.asarray(sol.states)))


def test_long_sequence_newton_and_quasi_newton(x64):
    T = 10_000
    params, h0 = make("gru", N0, D0, 0.5)
    xs = inputs(T, D0)
    ref = sequential(params, h0, xs)
    for method, cap in (("newton", 10), ("quasi_newton", 50)):
        sol = solve(params, h0, xs, method=method, fallback=False)
        assert int(sol.iterations) <= cap, (method, int(sol.iterations))
        assert max_err(sol.states, ref) < 1e-10


def test_jacobi_adversarial_needs_exactly_T(x64):
    # h_t = h_{t-1} + x_t: after k Jacobi sweeps only the first k partial sums are right.
    T = 64
    xs = jnp.arange(1.0, T + 1, dtype=jnp.float64)
    f = lambda h, x: h + x
    h0 = jnp.float64(0.0)
    run = jax.jit(
        lambda xs, max_iters, method="jacobi": fp.solve_recurrence(
            f, h0, xs, method=method, fallback=False, tol=0.0, max_iters=max_iters, throw=False
        ),
        static_argnums=(1, 2),
    )
    sol = run(xs, None)
    assert int(sol.iterations) == T and bool(sol.converged)
    np.testing.assert_array_equal(np.asarray(sol.states), np.cumsum(np.arange(1.0, T + 1)))
    # one sweep fewer is not enough, and the result code says so
    short = run(xs, T - 1)
    assert int(short.result) == fp.RESULTS.max_steps_reached and not bool(short.converged)
    # a cap above T is clipped to T
    assert int(run(xs, 10 * T).iterations) == T
    # a linear recurrence is one Newton step (plus rounding)
    newton = fp.solve_recurrence(f, h0, xs, method="newton", tol=1e-14)
    assert int(newton.iterations) <= 2
    np.testing.assert_allclose(newton.states, np.cumsum(np.arange(1.0, T + 1)), rtol=1e-14)


@pytest.mark.parametrize("method", ["newton", "quasi_newton"])
def test_implicit_gradients_equal_sequential_gradients(x64, method):
    T = 60
    params, h0 = make("gru", 3, 2, 0.8)
    xs = inputs(T, 2)
    h0 = h0 + 0.1
    w = jnp.arange(T, dtype=jnp.float64)[:, None]

    def loss_ref(p, xs, h0):
        return jnp.sum(jnp.sin(sequential(p, h0, xs)) * w)

    def loss(p, xs, h0):
        return jnp.sum(jnp.sin(solve(p, h0, xs, method=method, **STRICT).states) * w)

    g_ref = jax.grad(loss_ref, argnums=(0, 1, 2))(params, xs, h0)
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, xs, h0)
    assert max_err(g, g_ref) < 1e-9


def test_implicit_gradients_check_grads_and_unrolled(x64):
    T = 12
    params, h0 = make("lstm", 2, 2, 0.8)
    xs = inputs(T, 2)

    @jax.jit
    def loss(p, xs):
        s = solve(p, h0, xs, kind="lstm", method="newton", tol=1e-14)
        return jnp.sum(s.states[0] ** 2)

    check_grads(loss, (params, xs), order=1, modes=["rev"], eps=1e-6)

    def loss_unrolled(p, xs):
        s = solve(p, h0, xs, kind="lstm", method="jacobi", adjoint="unrolled", tol=1e-14)
        return jnp.sum(s.states[0] ** 2)

    def loss_ref(p, xs):
        return jnp.sum(sequential(p, h0, xs, kind="lstm")[0] ** 2)

    g1 = jax.grad(loss_ref, argnums=(0, 1))(params, xs)
    g2 = jax.jit(jax.grad(loss_unrolled, argnums=(0, 1)))(params, xs)
    assert max_err(g1, g2) < 1e-9


@pytest.mark.parametrize("dense", [True, False], ids=["dense_jacobians", "jvp_scan"])
@pytest.mark.parametrize("method", ["newton", "quasi_newton", "jacobi"])
def test_implicit_forward_mode_and_hvp_equal_sequential(x64, monkeypatch, method, dense):
    """jax.jvp (every input: params, xs, h0) and Hessian-vector products of the implicit
    adjoint against the sequential loop's; dense=False takes the JVP-per-step branch."""
    if not dense:
        monkeypatch.setattr(fp, "DENSE_MAX_ENTRIES", 0)
    T = 40
    params, h0 = make("gru", 3, 2, 0.8)
    xs = inputs(T, 2)
    h0 = h0 + 0.1
    tan = jax.tree.map(lambda a: jnp.cos(3.0 * a) + 0.5, (params, xs, h0))

    def run(p, xs, h0, ref):  # fresh traces: DENSE_MAX_ENTRIES is read at trace time
        f = lambda h, x: rnn.gru_cell(p, h, x)  # noqa: E731
        if ref:
            return fp.solve_recurrence_reference(f, h0, xs)
        return fp.solve_recurrence(f, h0, xs, method=method, **STRICT).states

    got = jax.jit(lambda a, t: jax.jvp(lambda *x: run(*x, False), a, t))((params, xs, h0), tan)
    want = jax.jvp(lambda *x: run(*x, True), (params, xs, h0), tan)
    assert max_err(got, want) < 1e-9
    w = jnp.arange(T, dtype=jnp.float64)[:, None]

    def hvp(ref):
        g = jax.grad(lambda *a: jnp.sum(jnp.sin(run(*a, ref)) * w), argnums=(0, 1, 2))
        return jax.jvp(g, (params, xs, h0), tan)[1]

    assert max_err(jax.jit(lambda: hvp(False))(), hvp(True)) < 1e-8


def test_implicit_derivatives_check_grads_second_order(x64):
    params, h0 = make("lstm", 2, 2, 0.8)
    xs = inputs(8, 2)

    def loss(xs):
        s = fp.solve_recurrence(
            lambda h, x: rnn.lstm_cell(params, h, x), h0, xs, method="newton", tol=1e-14
        )
        return jnp.sum(jnp.tanh(s.states[0]))

    check_grads(jax.jit(loss), (xs,), order=2, modes=["fwd", "rev"], eps=1e-5)


def test_nonconvergence_result_code_and_throw(x64):
    params, h0 = make("gru", N0, D0, 0.9)
    xs = inputs(T0, D0)
    kw = {"method": "jacobi", "max_iters": 3, "tol": 1e-14}
    sol = solve(params, h0, xs, throw=False, **kw)
    assert int(sol.result) == fp.RESULTS.max_steps_reached
    assert not bool(sol.converged) and int(sol.iterations) == 3
    assert float(sol.residual) > 1e-14
    with pytest.raises(Exception, match="did not converge within max_iters"):
        jax.block_until_ready(solve(params, h0, xs, throw=True, **kw))
    with pytest.raises(Exception, match="did not converge within max_iters"):
        jax.block_until_ready(jax.vmap(lambda x: solve(params, h0, x, **kw).states)(xs[None]))
    # converging solves do not raise
    ok = solve(params, h0, xs, method="newton")
    assert int(ok.result) == fp.RESULTS.successful


def test_fallback_rules_and_warm_start(x64):
    xs = inputs(T0, D0)
    params, h0 = make("gru", N0, D0, 6.0)
    ref = sequential(params, h0, xs)
    # dynamic: quasi-Newton stalls on expanding dynamics -> finishes with lax.scan
    sol = solve(params, h0, xs, method="quasi_newton")
    assert bool(sol.fell_back) and int(sol.iterations) <= 2 * fp.PATIENCE
    assert max_err(sol.states, ref) == 0.0
    # static: dense Newton on a wide state goes straight to lax.scan
    wp, wh0 = make("gru", fp.NEWTON_MAX_DIM + 1, D0, 0.5)
    s = fp.solve_recurrence(lambda h, x: rnn.gru_cell(wp, h, x), wh0, xs[:10], method="newton")
    assert bool(s.fell_back) and int(s.iterations) == 0
    # warm start from the converged solution: no further iteration needed
    p2, _ = make("gru", N0, D0, 0.5)
    first = solve(p2, h0, xs, method="quasi_newton")
    again = solve(p2, h0, xs, first.states, method="quasi_newton")
    assert int(again.iterations) == 0 and int(first.iterations) > 3
    again = fp.solve_recurrence(
        lambda h, x: rnn.gru_cell(p2, h, x), h0, xs, method="jacobi", init_guess=first
    )
    assert int(again.iterations) == 0


def test_block_diagonal_newton(x64):
    # Head-wise GRU (2 heads of 2): its Jacobian is block-diagonal, so block Newton is exact Newton.
    xs = inputs(T0, D0)
    params = scale_recurrent(rnn.gru_init(jax.random.PRNGKey(0), D0, N0, num_heads=2,
                                          dtype=jnp.float64), 0.5)  # fmt: skip
    h0 = jnp.zeros((N0,), jnp.float64)
    f = lambda h, x: rnn.gru_cell(params, h, x)
    ref = sequential(params, h0, xs)
    blk = fp.solve_recurrence(f, h0, xs, method="newton", jacobian_block_size=2, tol=1e-13)
    dense = fp.solve_recurrence(f, h0, xs, method="newton", tol=1e-13)
    assert int(blk.iterations) == int(dense.iterations) <= 8
    assert max_err(blk.states, ref) < 1e-12
    # On a dense GRU the blocks are an approximation: still converges to the sequential answer.
    dparams, _ = make("gru", N0, D0, 0.5)
    g = lambda h, x: rnn.gru_cell(dparams, h, x)
    approx = fp.solve_recurrence(g, h0, xs, method="newton", jacobian_block_size=2, tol=1e-13)
    assert max_err(approx.states, sequential(dparams, h0, xs)) < 1e-10
    with pytest.raises(ValueError, match="jacobian_block_size: expected a positive divisor"):
        fp.solve_recurrence(g, h0, xs, method="newton", jacobian_block_size=3)
    with pytest.raises(ValueError, match="only used by method='newton'"):
        fp.solve_recurrence(g, h0, xs, method="jacobi", jacobian_block_size=2)


def test_elk_step_is_the_damped_least_squares_solution(x64):
    # argmin_h sum_t (h_t - a_t h_{t-1} - b_t)^2 + lam (h_t - H_t)^2, h_{-1} = h0, per coordinate
    T, n = 7, 2
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    a = jax.random.normal(k[0], (T, n), jnp.float64)
    b = jax.random.normal(k[1], (T, n), jnp.float64)
    H = jax.random.normal(k[2], (T, n), jnp.float64)
    h0 = jax.random.normal(k[3], (n,), jnp.float64)
    lam = 0.7
    got = fp._elk_solve(a, b, h0, H, jnp.float64(lam))
    for j in range(n):
        # residual rows r = M h - c: (h_t - a_t h_{t-1} - b_t) and sqrt(lam) (h_t - H_t)
        M = np.eye(T) - np.diag(np.asarray(a[1:, j]), -1)
        c = np.asarray(b[:, j]).copy()
        c[0] += float(a[0, j] * h0[j])
        M = np.vstack([M, np.sqrt(lam) * np.eye(T)])
        c = np.concatenate([c, np.sqrt(lam) * np.asarray(H[:, j])])
        want = np.linalg.lstsq(M, c, rcond=None)[0]
        np.testing.assert_allclose(np.asarray(got[:, j]), want, rtol=1e-12, atol=1e-12)
    # lam = 0 is the undamped quasi-Newton step (the linear recurrence itself)
    undamped = fp._elk_solve(a, b, h0, H, jnp.float64(0.0))
    ref = fp.solve_recurrence_reference(lambda h, ab: ab[0] * h + ab[1], h0, (a, b))
    np.testing.assert_allclose(undamped, ref, rtol=1e-10)


def test_vmap_batch(x64):
    params, h0 = make("gru", N0, D0, 0.5)
    xs = jax.random.normal(jax.random.PRNGKey(5), (3, T0, D0), jnp.float64)
    out = jax.vmap(lambda x: solve(params, h0, x, method="quasi_newton"))(xs)
    ref = jax.vmap(lambda x: sequential(params, h0, x))(xs)
    assert max_err(out.states, ref) < 1e-10
    assert out.iterations.shape == (3,)


def test_float32_default_tolerance():
    T, n = 1000, 8
    params, h0 = make("gru", n, D0, 0.5, dtype=jnp.float32)
    xs = inputs(T, D0, dtype=jnp.float32)
    ref = sequential(params, h0, xs)
    for method in ("newton", "quasi_newton"):
        sol = solve(params, h0, xs, method=method)
        assert bool(sol.converged) and not bool(sol.fell_back)
        assert max_err(sol.states, ref) < 1e-5


def test_argument_errors():
    f = lambda h, x: h + x
    h0 = jnp.zeros((2,))
    with pytest.raises(ValueError, match="method: expected one of"):
        fp.solve_recurrence(f, h0, jnp.zeros((3, 2)), method="bogus")
    with pytest.raises(ValueError, match="xs: expected leaves with one common leading length"):
        fp.solve_recurrence(f, h0, (jnp.zeros((3, 2)), jnp.zeros((4, 2))))
    with pytest.raises(ValueError, match="f: expected f"):
        fp.solve_recurrence(lambda h, x: jnp.sum(h), h0, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="init_guess"):
        fp.solve_recurrence(f, h0, jnp.zeros((3, 2)), init_guess=jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match="adjoint"):
        fp.solve_recurrence(f, h0, jnp.zeros((3, 2)), adjoint="backprop")


# ----------------------------------------------------------------------------------------------
# triangular systems


def made_sampler(D, hidden, seed):
    """x_i = mu_i(x_<i) + exp(alpha_i(x_<i)) * eps_i with MADE masks; returns f(x) for fixed eps."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    deg_in = jnp.arange(D)
    deg_h = jnp.arange(hidden) % max(D - 1, 1)
    m1 = (deg_h[:, None] >= deg_in[None, :]).astype(jnp.float64)  # hidden j sees x_<=deg
    m2 = (deg_in[:, None] > deg_h[None, :]).astype(jnp.float64)  # output i sees deg < i
    w1 = jax.random.normal(k1, (hidden, D), jnp.float64) * m1
    w_mu = jax.random.normal(k2, (D, hidden), jnp.float64) * m2 * 0.5
    w_al = jax.random.normal(k3, (D, hidden), jnp.float64) * m2 * 0.1
    eps = jax.random.normal(k4, (D,), jnp.float64)

    def f(x):
        h = jnp.tanh(w1 @ x)
        return w_mu @ h + jnp.exp(w_al @ h) * eps

    return f


@pytest.mark.parametrize(
    "method,block", [("jacobi", 1), ("gauss_seidel", 1), ("jacobi_gs", 4), ("gs_jacobi", 4)]
)
def test_triangular_made_sampler_exact(x64, method, block):
    D = 16
    f = made_sampler(D, 32, seed=0)
    x0 = jnp.zeros((D,), jnp.float64)
    ref = jax.jit(lambda x0: fp.solve_triangular_reference(f, x0, D))(x0)
    run = jax.jit(lambda x0: fp.solve_triangular(f, x0, D, method=method, block_size=block))
    sol = run(x0)
    np.testing.assert_array_equal(np.asarray(sol.x), np.asarray(ref))
    assert bool(sol.converged)
    assert int(sol.evaluations) <= D + D // block  # never (much) worse than sequential
    # a different initial guess gives the same answer
    sol2 = run(jnp.ones((D,), jnp.float64))
    np.testing.assert_array_equal(np.asarray(sol2.x), np.asarray(ref))


def test_triangular_jacobi_fewer_evaluations_when_dependencies_are_short(x64):
    # x_i depends on x_{i-1} only weakly: Jacobi settles at tol long before D sweeps.
    D = 64
    f = lambda x: jnp.concatenate([jnp.ones(1), 1.0 + 0.1 * jnp.sin(x[:-1])])
    ref = fp.solve_triangular_reference(f, jnp.zeros(D), D)
    sol = fp.solve_triangular(f, jnp.zeros(D), D, method="jacobi", tol=1e-13)
    assert int(sol.iterations) < D // 2
    np.testing.assert_allclose(sol.x, ref, rtol=1e-12)


def test_triangular_step_fns_densenet_chain(x64):
    widths = [3, 5, 2, 4]
    keys = jax.random.split(jax.random.PRNGKey(0), len(widths))
    inp = jnp.linspace(-1.0, 1.0, 3, dtype=jnp.float64)
    ws = [
        jax.random.normal(k, (w, 3 + sum(widths[:i])), jnp.float64) * 0.5
        for i, (k, w) in enumerate(zip(keys, widths))
    ]

    def layer(i):
        return lambda xs: jnp.tanh(ws[i] @ jnp.concatenate([inp] + list(xs[:i])))

    fns = [layer(i) for i in range(len(widths))]
    x0 = [jnp.zeros((w,), jnp.float64) for w in widths]
    seq = fp.solve_triangular(fns, x0, len(widths), method="gauss_seidel")
    for method in ("jacobi", "jacobi_gs", "gs_jacobi"):
        sol = fp.solve_triangular(fns, x0, len(widths), method=method, block_size=2)
        for a, b in zip(sol.x, seq.x):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="step_fns: expected 4 functions"):
        fp.solve_triangular(fns[:3], x0, 4)
    with pytest.raises(ValueError, match="method: expected one of"):
        fp.solve_triangular(fns, x0, 4, method="sor")

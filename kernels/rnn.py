"""LSTM and GRU as pure functions: ``jaxcore.kernels.rnn``.

Parameters are plain dicts of arrays (pytrees), gates laid out as (G, H) with G = 4 (LSTM: i, f, g,
o) or 3 (GRU: r, z, n), following PyTorch's equations:

    LSTM: i, f, o = sigmoid(.), g = tanh(.); c' = f * c + i * g; h' = o * tanh(c')
    GRU:  r, z = sigmoid(.); n = tanh(W_in x + b_in + r * (W_hn h + b_hn)); h' = (1 - z) * n + z * h

The recurrent weight ``w_hh`` has shape (num_heads, H / num_heads, G, H / num_heads): with
``num_heads=1`` it is the usual dense matrix, with more heads it is head-wise block-diagonal as in
FlashRNN (each head's state only feeds its own gates). ``lstm``/``gru`` run a sequence with a fused
step: the input projection of every step is one matmul before the loop, the loop only does the
recurrent matmul and the gate nonlinearity; ``remat=True`` recomputes the step in backward.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxcore import checks

Array = Any
Params = dict[str, Array]

__all__ = [
    "gru",
    "gru_cell",
    "gru_init",
    "gru_reference",
    "lstm",
    "lstm_cell",
    "lstm_init",
    "lstm_reference",
]

_LSTM_GATES = 4
_GRU_GATES = 3


def _init(
    key: Array, input_size: int, hidden_size: int, gates: int, num_heads: int, dtype: Any
) -> Params:
    checks.check_positive(input_size, "input_size")
    checks.check_positive(hidden_size, "hidden_size")
    checks.check_positive(num_heads, "num_heads")
    if hidden_size % num_heads:
        raise ValueError(
            f"num_heads: expected a divisor of hidden_size={hidden_size}, got {num_heads}"
        )
    dh = hidden_size // num_heads
    k = jax.random.split(key, 4)
    s = 1.0 / float(dh) ** 0.5  # PyTorch's uniform(-1/sqrt(H), 1/sqrt(H)), per head
    u = lambda kk, shape: jax.random.uniform(kk, shape, dtype, -s, s)
    return {
        "w_ih": u(k[0], (input_size, gates, hidden_size)),
        "w_hh": u(k[1], (num_heads, dh, gates, dh)),
        "b_ih": u(k[2], (gates, hidden_size)),
        "b_hh": u(k[3], (gates, hidden_size)),
    }


def lstm_init(
    key: Array,
    input_size: int,
    hidden_size: int,
    *,
    num_heads: int = 1,
    dtype: Any = jnp.float32,
) -> Params:
    """LSTM parameters: w_ih (in, 4, H), w_hh (heads, H/heads, 4, H/heads), b_ih/b_hh (4, H)."""
    return _init(key, input_size, hidden_size, _LSTM_GATES, num_heads, dtype)


def gru_init(
    key: Array,
    input_size: int,
    hidden_size: int,
    *,
    num_heads: int = 1,
    dtype: Any = jnp.float32,
) -> Params:
    """GRU parameters: w_ih (in, 3, H), w_hh (heads, H/heads, 3, H/heads), b_ih/b_hh (3, H)."""
    return _init(key, input_size, hidden_size, _GRU_GATES, num_heads, dtype)


def _check_params(params: Params, gates: int, name: str) -> tuple[int, int, int]:
    for k in ("w_ih", "w_hh", "b_ih", "b_hh"):
        if k not in params:
            raise ValueError(f"{name}: expected keys w_ih, w_hh, b_ih, b_hh, got {sorted(params)}")
    w_ih, w_hh = params["w_ih"], params["w_hh"]
    checks.check_rank(w_ih, 3, f"{name}['w_ih']")
    n_in, g, hidden = w_ih.shape
    checks.check_same(g, gates, f"{name}['w_ih']", "number of gates (axis 1)")
    checks.check_rank(w_hh, 4, f"{name}['w_hh']")
    nh = w_hh.shape[0]
    if nh < 1 or hidden % nh:
        raise ValueError(f"{name}['w_hh']: expected a head count dividing {hidden}, got {nh}")
    checks.check_shape(w_hh, (nh, hidden // nh, gates, hidden // nh), f"{name}['w_hh']")
    checks.check_shape(params["b_ih"], (gates, hidden), f"{name}['b_ih']")
    checks.check_shape(params["b_hh"], (gates, hidden), f"{name}['b_hh']")
    return n_in, hidden, nh


def _recurrent(w_hh: Array, h: Array) -> Array:
    """h (..., H) -> (..., G, H) through the (block-diagonal) recurrent weight."""
    nh, dh, g, _ = w_hh.shape
    hh = h.reshape(h.shape[:-1] + (nh, dh))
    out = jnp.einsum("...nd,ndge->...gne", hh, w_hh.astype(h.dtype))
    return out.reshape(h.shape[:-1] + (g, nh * dh))


def _input_proj(params: Params, x: Array) -> Array:
    """x (..., in) -> (..., G, H) = x @ w_ih + b_ih."""
    xp = jnp.einsum("...i,igh->...gh", x, params["w_ih"].astype(x.dtype))
    return xp + _bias(params["b_ih"], xp)


def _bias(b: Array, like: Array) -> Array:
    """b with leading singleton axes to ``like``'s rank (rank promotion stays explicit)."""
    return b.astype(like.dtype).reshape((1,) * (like.ndim - b.ndim) + b.shape)


def _lstm_gates(xp: Array, params: Params, state: tuple[Array, Array]) -> tuple[Array, Array]:
    h, c = state
    pre = xp + _recurrent(params["w_hh"], h)
    pre = pre + _bias(params["b_hh"], pre)
    i = jax.nn.sigmoid(pre[..., 0, :])
    f = jax.nn.sigmoid(pre[..., 1, :])
    g = jnp.tanh(pre[..., 2, :])
    o = jax.nn.sigmoid(pre[..., 3, :])
    c = f * c + i * g
    return o * jnp.tanh(c), c


def _gru_gates(xp: Array, params: Params, h: Array) -> Array:
    hp = _recurrent(params["w_hh"], h)
    hp = hp + _bias(params["b_hh"], hp)
    r = jax.nn.sigmoid(xp[..., 0, :] + hp[..., 0, :])
    z = jax.nn.sigmoid(xp[..., 1, :] + hp[..., 1, :])
    n = jnp.tanh(xp[..., 2, :] + r * hp[..., 2, :])
    return (1.0 - z) * n + z * h


def _check_state(s: Array, lead: tuple[int, ...], hidden: int, name: str) -> None:
    checks.check_shape(s, lead + (hidden,), name)


def lstm_cell(params: Params, state: tuple[Array, Array], x: Array) -> tuple[Array, Array]:
    """One LSTM step: state (h, c) each (..., H), x (..., in) -> (h', c')."""
    n_in, hidden, _ = _check_params(params, _LSTM_GATES, "params")
    checks.check_shape(x, x.shape[:-1] + (n_in,), "x")
    h, c = state
    _check_state(h, x.shape[:-1], hidden, "state[0] (h)")
    _check_state(c, x.shape[:-1], hidden, "state[1] (c)")
    return _lstm_gates(_input_proj(params, x), params, (h, c))


def gru_cell(params: Params, h: Array, x: Array) -> Array:
    """One GRU step: h (..., H), x (..., in) -> h' (..., H)."""
    n_in, hidden, _ = _check_params(params, _GRU_GATES, "params")
    checks.check_shape(x, x.shape[:-1] + (n_in,), "x")
    _check_state(h, x.shape[:-1], hidden, "h")
    return _gru_gates(_input_proj(params, x), params, h)


def _check_xs(xs: Array, n_in: int) -> tuple[int, int]:
    checks.check_rank(xs, 3, "xs")
    checks.check_shape(xs, (None, None, n_in), "xs")
    return xs.shape[0], xs.shape[1]


def _run(step, carry, xp: Array, reverse: bool, remat: bool):
    if remat:
        step = jax.checkpoint(step)

    def body(carry, xp_t):
        carry, h = step(carry, xp_t)
        return carry, h

    carry, hs = lax.scan(body, carry, jnp.moveaxis(xp, 1, 0), reverse=reverse)
    return jnp.moveaxis(hs, 0, 1), carry


def lstm(
    params: Params,
    xs: Array,
    initial_state: tuple[Array, Array] | None = None,
    *,
    reverse: bool = False,
    remat: bool = False,
) -> tuple[Array, tuple[Array, Array]]:
    """Run an LSTM over xs (batch, length, in) -> (hs (batch, length, H), (h_T, c_T)).

    initial_state: (h0, c0) each (batch, H), zeros if None. ``reverse`` runs from the end.
    """
    n_in, hidden, _ = _check_params(params, _LSTM_GATES, "params")
    bsz, _ = _check_xs(xs, n_in)
    if initial_state is None:
        z = jnp.zeros((bsz, hidden), xs.dtype)
        initial_state = (z, z)
    h0, c0 = initial_state
    _check_state(h0, (bsz,), hidden, "initial_state[0] (h)")
    _check_state(c0, (bsz,), hidden, "initial_state[1] (c)")
    xp = _input_proj(params, xs)  # fused: one matmul for every step

    def step(state, xp_t):
        state = _lstm_gates(xp_t, params, state)
        return state, state[0]

    hs, final = _run(step, (h0, c0), xp, reverse, remat)
    return hs, final


def gru(
    params: Params,
    xs: Array,
    initial_state: Array | None = None,
    *,
    reverse: bool = False,
    remat: bool = False,
) -> tuple[Array, Array]:
    """Run a GRU over xs (batch, length, in) -> (hs (batch, length, H), h_T (batch, H))."""
    n_in, hidden, _ = _check_params(params, _GRU_GATES, "params")
    bsz, _ = _check_xs(xs, n_in)
    h0 = jnp.zeros((bsz, hidden), xs.dtype) if initial_state is None else initial_state
    _check_state(h0, (bsz,), hidden, "initial_state")
    xp = _input_proj(params, xs)

    def step(h, xp_t):
        h = _gru_gates(xp_t, params, h)
        return h, h

    return _run(step, h0, xp, reverse, remat)


def lstm_reference(
    params: Params, xs: Array, initial_state: tuple[Array, Array] | None = None
) -> tuple[Array, tuple[Array, Array]]:
    """The obvious loop over :func:`lstm_cell` (no fusion), with dense w_hh materialised."""
    n_in, hidden, _ = _check_params(params, _LSTM_GATES, "params")
    bsz, length = _check_xs(xs, n_in)
    w = _dense_whh(params["w_hh"])
    if initial_state is None:
        initial_state = (jnp.zeros((bsz, hidden), xs.dtype),) * 2
    h, c = initial_state
    hs = []
    for t in range(length):
        pre = xs[:, t] @ params["w_ih"].reshape(n_in, -1) + params["b_ih"].reshape(1, -1)
        pre = (pre + h @ w + params["b_hh"].reshape(1, -1)).reshape(bsz, _LSTM_GATES, hidden)
        i, f, g, o = (pre[:, k] for k in range(4))
        c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
        h = jax.nn.sigmoid(o) * jnp.tanh(c)
        hs.append(h)
    return jnp.stack(hs, 1), (h, c)


def gru_reference(
    params: Params, xs: Array, initial_state: Array | None = None
) -> tuple[Array, Array]:
    """The obvious loop for :func:`gru` (no fusion), with dense w_hh materialised."""
    n_in, hidden, _ = _check_params(params, _GRU_GATES, "params")
    bsz, length = _check_xs(xs, n_in)
    w = _dense_whh(params["w_hh"])
    h = jnp.zeros((bsz, hidden), xs.dtype) if initial_state is None else initial_state
    hs = []
    for t in range(length):
        xp = (xs[:, t] @ params["w_ih"].reshape(n_in, -1) + params["b_ih"].reshape(1, -1)).reshape(
            bsz, 3, hidden
        )
        hp = (h @ w + params["b_hh"].reshape(1, -1)).reshape(bsz, 3, hidden)
        r = jax.nn.sigmoid(xp[:, 0] + hp[:, 0])
        z = jax.nn.sigmoid(xp[:, 1] + hp[:, 1])
        n = jnp.tanh(xp[:, 2] + r * hp[:, 2])
        h = (1.0 - z) * n + z * h
        hs.append(h)
    return jnp.stack(hs, 1), h


def _dense_whh(w_hh: Array) -> Array:
    """(heads, dh, G, dh) -> the dense block-diagonal (H, G * H) matrix."""
    nh, dh, g, _ = w_hh.shape
    hidden = nh * dh
    dense = jnp.zeros((nh, dh, g, nh, dh), w_hh.dtype)
    for n in range(nh):
        dense = dense.at[n, :, :, n, :].set(w_hh[n])
    return dense.reshape(hidden, g * hidden)

"""Parallel and speculative decoding: ``jaxcore.kernels.decoding``.

Autoregressive models are pure functions ``logits = model(params, tokens)`` with tokens (L,) int
and logits (L, V), causal (logits[i] depends on tokens[:i+1] only). Every decoder works on a
fixed-length token buffer, runs under ``jit`` (model, lengths and options static) and ``vmap``,
and returns a :class:`DecodeResult` that reports tokens per target-model call.

- :func:`greedy_decode`: the sequential reference (one call per token).
- :func:`jacobi_decode`: Jacobi iteration on all future tokens at once (Santilli et al. 2023);
  exactly the greedy tokens, at most ``num_tokens`` calls.
- :func:`lookahead_decode`: Jacobi window + an n-gram pool harvested from the Jacobi iterates,
  verified in the same (batched) call (after Fu et al. 2024); exactly the greedy tokens.
- :func:`speculative_sample`: speculative sampling (Leviathan et al. 2023, Chen et al. 2023) with
  the exact accept/reject rule; its samples are distributed as the target model's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcore import backend, checks

Array = Any
Model = Callable[[Any, Array], Array]

FAMILY = "decoding"

backend.register_family(
    FAMILY,
    ("reference", "xla"),
    "xla",
    doc="Greedy-exact parallel decoding (Jacobi, lookahead) and exact speculative sampling.",
)


class DecodeResult(NamedTuple):
    """What a decoder returns (a pytree).

    tokens: (num_tokens,) int32 generated tokens (the prompt not included).
    target_calls: int32 calls of the target model (a batched verification call counts once).
    draft_calls: int32 calls of the draft model (speculative sampling only, else 0).
    tokens_per_call: float32 num_tokens / target_calls.
    step_tokens: (num_tokens,) int32 tokens committed by each target call, in order; 0 after the
      last call.
    """

    tokens: Array
    target_calls: Array
    draft_calls: Array
    tokens_per_call: Array
    step_tokens: Array


def _check(prompt: Array, num_tokens: int) -> Array:
    prompt = jnp.asarray(prompt)
    checks.check_rank(prompt, 1, "prompt")
    checks.check_dtype(prompt, "prompt", kinds="iu")
    if prompt.shape[0] < 1:
        raise ValueError(f"prompt: expected at least one token, got shape {prompt.shape}")
    if not isinstance(num_tokens, int | np.integer) or num_tokens < 1:
        raise ValueError(f"num_tokens: expected a positive int, got {num_tokens!r}")
    return prompt.astype(jnp.int32)


def _logits(model: Model, params: Any, buf: Array, name: str) -> Array:
    out = model(params, buf)
    if out.ndim != 2 or out.shape[0] != buf.shape[0]:
        raise ValueError(
            f"{name}: expected logits of shape ({buf.shape[0]}, vocab) for tokens of shape "
            f"{buf.shape}, got {out.shape}"
        )
    return out


def _result(buf, p, n, calls, draft_calls, steps) -> DecodeResult:
    calls = jnp.asarray(calls, jnp.int32)
    return DecodeResult(
        lax.dynamic_slice(buf, (p,), (n,)),
        calls,
        jnp.asarray(draft_calls, jnp.int32),
        (jnp.float32(n) / jnp.maximum(calls, 1).astype(jnp.float32)),
        steps,
    )


def greedy_decode(
    model: Model, params: Any, prompt: Array, num_tokens: int, *, buffer_len: int | None = None
) -> DecodeResult:
    """Greedy sequential decoding (the reference): one model call per token.

    The buffer holds prompt + num_tokens tokens (or ``buffer_len``, to match another decoder).
    """
    prompt = _check(prompt, num_tokens)
    p = prompt.shape[0]
    L = p + num_tokens if buffer_len is None else int(buffer_len)
    buf = jnp.zeros((L,), jnp.int32).at[:p].set(prompt)

    def body(i, buf):
        logits = _logits(model, params, buf, "model")
        tok = jnp.argmax(logits[p - 1 + i]).astype(jnp.int32)
        return buf.at[p + i].set(tok)

    buf = lax.fori_loop(0, num_tokens, body, buf)
    steps = jnp.ones((num_tokens,), jnp.int32)
    return _result(buf, p, num_tokens, num_tokens, 0, steps)


def _agree_prefix(a: Array, b: Array) -> Array:
    """Length of the common prefix of two equal-length token vectors."""
    return jnp.sum(jnp.cumprod((a == b).astype(jnp.int32)))


def jacobi_decode(
    model: Model,
    params: Any,
    prompt: Array,
    num_tokens: int,
    *,
    init_guess: Array | None = None,
    buffer_len: int | None = None,
) -> DecodeResult:
    """Greedy decoding by Jacobi iteration: every future token updated in one call.

    After each call the tokens that agree with the previous guess, plus one, are exact; the loop
    stops when all ``num_tokens`` are, so the output equals :func:`greedy_decode`'s and the
    number of calls is at most ``num_tokens``. ``init_guess`` (num_tokens,) seeds the guess.
    """
    prompt = _check(prompt, num_tokens)
    p = prompt.shape[0]
    n = num_tokens
    L = p + n if buffer_len is None else int(buffer_len)
    if L < p + n:
        raise ValueError(f"buffer_len: expected >= {p + n}, got {L}")
    buf = jnp.zeros((L,), jnp.int32).at[:p].set(prompt)
    if init_guess is not None:
        init_guess = jnp.asarray(init_guess)
        checks.check_shape(init_guess, (n,), "init_guess")
        buf = buf.at[p : p + n].set(init_guess.astype(jnp.int32))

    def cond(c):
        _, _, exact, _ = c
        return exact < n

    def body(c):
        it, buf, exact, steps = c
        logits = _logits(model, params, buf, "model")
        pred = jnp.argmax(logits[p - 1 : p - 1 + n], axis=-1).astype(jnp.int32)
        m = _agree_prefix(pred, buf[p : p + n])
        new_exact = jnp.minimum(jnp.maximum(m + 1, exact + 1), n)
        steps = steps.at[it].set(new_exact - exact)
        return it + 1, buf.at[p : p + n].set(pred), new_exact, steps

    init = (jnp.int32(0), buf, jnp.int32(0), jnp.zeros((n,), jnp.int32))
    it, buf, _, steps = lax.while_loop(cond, body, init)
    return _result(buf, p, n, it, 0, steps)


def lookahead_decode(
    model: Model,
    params: Any,
    prompt: Array,
    num_tokens: int,
    *,
    window: int = 4,
    ngram: int = 3,
    pool_size: int = 64,
    num_candidates: int = 4,
) -> DecodeResult:
    """Greedy decoding with a Jacobi lookahead window and an n-gram pool, verified per call.

    Each step makes one batched model call over 1 + ``num_candidates`` sequences: the committed
    text followed by (a) the current Jacobi window of ``window`` guessed tokens and (b) the
    continuations of pool n-grams whose first token is the last committed token. The longest
    continuation that agrees with the model's greedy predictions is committed plus one token, so
    the output equals :func:`greedy_decode`'s. The Jacobi predictions update the window, and
    n-grams read diagonally off the last ``ngram`` Jacobi iterates (the token predicted for
    position q in iteration t follows the one predicted for q - 1 in iteration t - 1) go into a
    ring pool of ``pool_size`` entries.
    """
    prompt = _check(prompt, num_tokens)
    for name, v, lo in (
        ("window", window, 1),
        ("ngram", ngram, 2),
        ("pool_size", pool_size, 1),
        ("num_candidates", num_candidates, 0),
    ):
        if not isinstance(v, int | np.integer) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    num_candidates = min(num_candidates, pool_size)
    p = prompt.shape[0]
    n = num_tokens
    W, g, G = int(window), int(ngram), int(num_candidates)
    span = max(W, g - 1) + 1  # tokens written at once (candidate + bonus)
    L = p + n + span
    buf = jnp.zeros((L,), jnp.int32).at[:p].set(prompt)
    H = g  # Jacobi prediction arrays kept: the current one and g - 1 older ones

    def body(c):
        it, cur, buf, y, pool, ptr, steps, hist, hstart = c
        last = buf[cur - 1]
        if G > 0:
            match = pool[:, 0] == last
            score = jnp.where(match, (ptr - jnp.arange(pool_size) - 1) % pool_size, -1)
            _, idx = lax.top_k(score, G)
            valid = match[idx]
            cands = pool[idx, 1:]  # (G, g - 1)
        seqs = [lax.dynamic_update_slice(buf, y, (cur,))]
        if G > 0:
            seqs += [lax.dynamic_update_slice(buf, cands[i], (cur,)) for i in range(G)]
        seqs = jnp.stack(seqs)
        logits = jax.vmap(lambda s: _logits(model, params, s, "model"))(seqs)  # one batched call
        win = jax.vmap(lambda lg: lax.dynamic_slice_in_dim(lg, cur - 1, span, axis=0))(logits)
        preds = jnp.argmax(win, axis=-1).astype(jnp.int32)  # (1 + G, span)
        acc = [_agree_prefix(y, preds[0, :W])]
        if G > 0:
            acc += [
                jnp.where(valid[i], _agree_prefix(cands[i], preds[1 + i, : g - 1]), -1)
                for i in range(G)
            ]
        acc = jnp.stack(acc)
        best = jnp.argmax(acc)
        a = acc[best]
        buf = lax.dynamic_update_slice(buf, preds[best], (cur,))
        s = a + 1
        steps = steps.at[it].set(jnp.minimum(s, p + n - cur))
        # Jacobi update of the window, shifted past the committed tokens.
        jac = preds[0, : W + 1]
        ext = jnp.concatenate([jac, jnp.broadcast_to(jac[-1], (W,))])
        y = lax.dynamic_slice(ext, (jnp.minimum(s, W + 1),), (W,))
        # Jacobi trajectory n-grams: the prediction for position q made in iteration t follows
        # the token at q - 1 predicted in iteration t - 1 (it was the guess there), so
        # (pred^{t-g+1}_{q-g+1}, ..., pred^{t-1}_{q-1}, pred^t_q) is a consistent chain.
        hist = jnp.concatenate([hist[1:], jac[None]], axis=0)  # (H, W + 1), oldest first
        hstart = jnp.concatenate([hstart[1:], cur[None]])
        q = cur + jnp.arange(W + 1)  # end positions of the n-grams
        toks, ok = [], jnp.ones((W + 1,), bool)
        for lvl in range(H):
            off = q - (H - 1 - lvl) - hstart[lvl]
            ok &= (off >= 0) & (off <= W)
            toks.append(hist[lvl][jnp.clip(off, 0, W)])
        grams = jnp.where(ok[:, None], jnp.stack(toks, axis=1), -1)  # (W + 1, g)
        rows = (ptr + jnp.arange(W + 1)) % pool_size
        pool = pool.at[rows].set(grams)
        ptr = (ptr + W + 1) % pool_size
        return it + 1, cur + s, buf, y, pool, ptr, steps, hist, hstart

    def cond(c):
        return c[1] < p + n

    init = (
        jnp.int32(0),
        jnp.int32(p),
        buf,
        jnp.zeros((W,), jnp.int32),
        jnp.full((pool_size, g), -1, jnp.int32),
        jnp.int32(0),
        jnp.zeros((n,), jnp.int32),
        jnp.zeros((H, W + 1), jnp.int32),
        jnp.full((H,), -(2**30), jnp.int32),  # no history yet: every offset invalid
    )
    it, _, buf, _, _, _, steps, _, _ = lax.while_loop(cond, body, init)
    return _result(buf, p, n, it, 0, steps)


def speculative_sample(
    target: Model,
    draft: Model,
    params_t: Any,
    params_d: Any,
    prompt: Array,
    num_tokens: int,
    *,
    k: int,
    key: Array,
    temperature: float = 1.0,
) -> DecodeResult:
    """Sample ``num_tokens`` tokens from ``target`` using ``draft`` proposals (exact).

    Per step the draft proposes k tokens (k draft calls), the target scores them in one call;
    draft token d is accepted with probability min(1, p(d) / q(d)); at the first rejection a
    token is drawn from (p - q)+ normalised, and when all k are accepted a bonus token is drawn
    from p. The tokens are distributed exactly as ancestral sampling from ``target`` (at
    ``temperature``). With a constant acceptance rate a = sum_v min(p_v, q_v), a step yields
    (1 - a^(k+1)) / (1 - a) tokens on average (``DecodeResult.step_tokens``).
    """
    prompt = _check(prompt, num_tokens)
    if not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k: expected a positive int, got {k!r}")
    checks.check_positive(temperature, "temperature")
    p = prompt.shape[0]
    n = num_tokens
    L = p + n + k + 1
    buf = jnp.zeros((L,), jnp.int32).at[:p].set(prompt)
    inv_t = 1.0 / float(temperature)

    def probs(logits):
        return jax.nn.softmax(logits.astype(jnp.float32) * inv_t, axis=-1)

    def body(c):
        it, cur, buf, steps = c
        kit = jax.random.fold_in(key, it)
        k_draft, k_acc, k_res = jax.random.split(kit, 3)
        draft_keys = jax.random.split(k_draft, k)

        def draft_step(buf, j):
            q = probs(_logits(draft, params_d, buf, "draft")[cur - 1 + j])
            d = jax.random.categorical(draft_keys[j], jnp.log(q)).astype(jnp.int32)
            return buf.at[cur + j].set(d), (q, d)

        buf, (qs, ds) = lax.scan(draft_step, buf, jnp.arange(k))  # (k, V), (k,)
        lt = _logits(target, params_t, buf, "target")
        ps = probs(lax.dynamic_slice_in_dim(lt, cur - 1, k + 1, axis=0))  # (k + 1, V)
        pd = jnp.take_along_axis(ps[:k], ds[:, None], axis=1)[:, 0]
        qd = jnp.take_along_axis(qs, ds[:, None], axis=1)[:, 0]
        u = jax.random.uniform(k_acc, (k,), dtype=jnp.float32)
        accept = u * qd < pd  # u < p/q without dividing (q(d) > 0 since d ~ q)
        a = jnp.sum(jnp.cumprod(accept.astype(jnp.int32)))
        p_a = ps[a]
        q_a = jnp.concatenate([qs, jnp.zeros_like(qs[:1])])[a]  # q = 0 for the bonus token
        r = jnp.maximum(p_a - q_a, 0.0)
        r = jnp.where(jnp.sum(r) > 0, r, p_a)
        tok = jax.random.categorical(k_res, jnp.log(r)).astype(jnp.int32)
        buf = buf.at[cur + a].set(tok)
        s = a + 1
        steps = steps.at[it].set(s)
        return it + 1, cur + s, buf, steps

    def cond(c):
        return c[1] < p + n

    init = (jnp.int32(0), jnp.int32(p), buf, jnp.zeros((n,), jnp.int32))
    it, _, buf, steps = lax.while_loop(cond, body, init)
    return _result(buf, p, n, it, it * k, steps)


def target_sample_reference(
    target: Model,
    params_t: Any,
    prompt: Array,
    num_tokens: int,
    *,
    key: Array,
    temperature: float = 1.0,
) -> DecodeResult:
    """Ancestral sampling from ``target`` alone (the distribution speculative sampling matches)."""
    prompt = _check(prompt, num_tokens)
    p = prompt.shape[0]
    buf = jnp.zeros((p + num_tokens,), jnp.int32).at[:p].set(prompt)
    inv_t = 1.0 / float(temperature)

    def body(i, buf):
        lg = _logits(target, params_t, buf, "target")[p - 1 + i].astype(jnp.float32) * inv_t
        tok = jax.random.categorical(jax.random.fold_in(key, i), lg).astype(jnp.int32)
        return buf.at[p + i].set(tok)

    buf = lax.fori_loop(0, num_tokens, body, buf)
    steps = jnp.ones((num_tokens,), jnp.int32)
    return _result(buf, p, num_tokens, num_tokens, 0, steps)


__all__ = [
    "DecodeResult",
    "greedy_decode",
    "jacobi_decode",
    "lookahead_decode",
    "speculative_sample",
    "target_sample_reference",
]

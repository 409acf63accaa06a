"""jaxcore.kernels.decoding: greedy-exact Jacobi/lookahead decoding, exact speculative sampling."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxcore.kernels import decoding as dec
from scipy import stats

V = 11
D = 16
LMAX = 64


def tiny_lm(params, tokens):
    """A one-layer causal attention LM: logits (L, V) for tokens (L,)."""
    emb, pos, wq, wk, wv, wo = params
    n = tokens.shape[0]
    x = emb[tokens] + pos[:n]
    q, k, v = x @ wq, x @ wk, x @ wv
    s = (q @ k.T) / np.sqrt(D)
    mask = jnp.tril(jnp.ones((n, n), bool))
    s = jnp.where(mask, s, -jnp.inf)
    h = x + jax.nn.softmax(s, axis=-1) @ v
    return h @ wo


def lm_params(seed, scale=1.0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    shapes = [(V, D), (LMAX, D), (D, D), (D, D), (D, D), (D, V)]
    return [scale * jax.random.normal(k, s) / np.sqrt(s[0]) * 2 for k, s in zip(ks, shapes)]


def bigram(table, tokens):
    """logits[i] = table[tokens[i]]: next-token distribution depends on the last token only."""
    return table[tokens]


def cycle_table(vocab=5):
    """Greedy continuation cycles 0 -> 1 -> 2 -> ... -> 0 (a repetitive text)."""
    t = np.full((vocab, vocab), -1.0, np.float32)
    for i in range(vocab):
        t[i, (i + 1) % vocab] = 1.0
    return jnp.asarray(t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_jacobi_and_lookahead_equal_greedy(seed):
    params = lm_params(seed)
    prompt = jax.random.randint(jax.random.PRNGKey(100 + seed), (5,), 0, V)
    n = 24
    greedy = jax.jit(functools.partial(dec.greedy_decode, tiny_lm, num_tokens=n))(params, prompt)
    jac = jax.jit(functools.partial(dec.jacobi_decode, tiny_lm, num_tokens=n))(params, prompt)
    look = jax.jit(functools.partial(dec.lookahead_decode, tiny_lm, num_tokens=n))(params, prompt)
    np.testing.assert_array_equal(jac.tokens, greedy.tokens)
    np.testing.assert_array_equal(look.tokens, greedy.tokens)
    for r in (jac, look):
        # at least one target call, and never more than greedy's one call per token
        assert int(r.target_calls) >= 1, int(r.target_calls)
        assert int(r.target_calls) <= n, (int(r.target_calls), n)
        assert int(r.step_tokens.sum()) == n
        assert int((r.step_tokens > 0).sum()) == int(r.target_calls)
        np.testing.assert_allclose(float(r.tokens_per_call), n / int(r.target_calls), rtol=1e-6)
    assert int(greedy.target_calls) == n


def test_jacobi_warm_start_one_call_and_vmap():
    params = lm_params(3)
    prompts = jax.random.randint(jax.random.PRNGKey(7), (3, 4), 0, V)
    n = 12
    greedy = jax.vmap(lambda p: dec.greedy_decode(tiny_lm, params, p, n))(prompts)
    jac = jax.jit(jax.vmap(lambda p: dec.jacobi_decode(tiny_lm, params, p, n)))(prompts)
    np.testing.assert_array_equal(jac.tokens, greedy.tokens)
    warm = dec.jacobi_decode(tiny_lm, params, prompts[0], n, init_guess=greedy.tokens[0])
    np.testing.assert_array_equal(warm.tokens, greedy.tokens[0])
    assert int(warm.target_calls) == 1


def test_parallel_decoders_beat_one_token_per_call_on_repetitive_text():
    table = cycle_table()
    prompt = jnp.array([0, 1, 2], jnp.int32)
    n = 40
    greedy = dec.greedy_decode(bigram, table, prompt, n)
    look = jax.jit(functools.partial(dec.lookahead_decode, bigram, num_tokens=n))(table, prompt)
    np.testing.assert_array_equal(look.tokens, greedy.tokens)
    # The pool holds the cycle after a few steps; then each call commits up to ngram tokens.
    assert float(look.tokens_per_call) >= 2.0, look.step_tokens  # measured 2.5
    # Jacobi: a context-free chain converges one token per call (its worst case) -- still exact.
    jac = dec.jacobi_decode(bigram, table, prompt, n)
    np.testing.assert_array_equal(jac.tokens, greedy.tokens)
    assert int(jac.target_calls) <= n


def test_decoding_argument_errors():
    params = lm_params(0)
    with pytest.raises(ValueError, match="prompt: expected rank 1"):
        dec.jacobi_decode(tiny_lm, params, jnp.zeros((2, 3), jnp.int32), 4)
    with pytest.raises(ValueError, match="num_tokens"):
        dec.jacobi_decode(tiny_lm, params, jnp.zeros((3,), jnp.int32), 0)
    with pytest.raises(ValueError, match="k: expected"):
        dec.speculative_sample(
            bigram, bigram, cycle_table(), cycle_table(), jnp.zeros((1,), jnp.int32), 3,
            k=0, key=jax.random.PRNGKey(0),
        )  # fmt: skip
    with pytest.raises(ValueError, match="model: expected logits"):
        dec.jacobi_decode(lambda p, t: jnp.zeros((3,)), None, jnp.zeros((3,), jnp.int32), 2)


# ----------------------------------------------------------------------------------------------
# speculative sampling: the output distribution is the target's


def _chain_probs(table, first, m):
    """Exact distribution of m tokens sampled from a bigram chain after token ``first``."""
    t = np.asarray(table, np.float64)
    p = np.exp(t - t.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    vocab = p.shape[0]
    out = np.zeros((vocab,) * m)
    for idx in np.ndindex(*out.shape):
        prob, prev = 1.0, first
        for t in idx:
            prob *= p[prev, t]
            prev = t
        out[idx] = prob
    return out.reshape(-1)


def _chi2_pvalue(samples, probs, vocab, m):
    codes = np.zeros(samples.shape[0], np.int64)
    for j in range(m):
        codes = codes * vocab + samples[:, j]
    counts = np.bincount(codes, minlength=probs.size)
    expected = probs * samples.shape[0]
    assert expected.min() >= 5, "test design: expected counts too small for chi-square"
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    return stats.chi2.sf(chi2, probs.size - 1)


def test_speculative_sampling_distribution_equals_target():
    vocab, m, k, n_samples = 3, 3, 3, 20000
    kt, kd = jax.random.split(jax.random.PRNGKey(42))
    target_t = jax.random.normal(kt, (vocab, vocab)) * 0.8
    draft_t = jax.random.normal(kd, (vocab, vocab)) * 0.8
    prompt = jnp.array([1], jnp.int32)
    keys = jax.random.split(jax.random.PRNGKey(0), n_samples)

    spec = jax.jit(
        jax.vmap(
            lambda key: dec.speculative_sample(
                bigram, bigram, target_t, draft_t, prompt, m, k=k, key=key
            )
        )
    )(keys)
    probs = _chain_probs(target_t, 1, m)
    p_spec = _chi2_pvalue(np.asarray(spec.tokens), probs, vocab, m)
    # Negative control: the same test on the draft's own samples must reject decisively, so the
    # test has the power to catch a wrong accept/reject rule at this sample size.
    draft_samples = jax.jit(
        jax.vmap(lambda key: dec.target_sample_reference(bigram, draft_t, prompt, m, key=key))
    )(keys)
    p_draft = _chi2_pvalue(np.asarray(draft_samples.tokens), probs, vocab, m)
    assert p_draft < 1e-12, p_draft
    assert p_spec > 1e-4, p_spec
    assert np.all(np.asarray(spec.target_calls) <= m)
    np.testing.assert_array_equal(np.asarray(spec.draft_calls), k * np.asarray(spec.target_calls))


def test_speculative_mean_accepted_length_matches_formula():
    vocab, k, n_samples = 5, 4, 20000
    lt = jnp.array([2.0, 1.0, 0.0, -1.0, 0.5])
    lq = jnp.array([0.5, 1.5, 0.0, 0.5, -1.0])
    target = lambda prm, toks: jnp.broadcast_to(prm, (toks.shape[0], vocab))
    p = np.asarray(jax.nn.softmax(lt))
    q = np.asarray(jax.nn.softmax(lq))
    a = float(np.minimum(p, q).sum())
    expected = (1 - a ** (k + 1)) / (1 - a)
    keys = jax.random.split(jax.random.PRNGKey(1), n_samples)
    out = jax.jit(
        jax.vmap(
            lambda key: dec.speculative_sample(
                target, target, lt, lq, jnp.array([0], jnp.int32), k + 1, k=k, key=key
            )
        )
    )(keys)
    first = np.asarray(out.step_tokens[:, 0], np.float64)  # the first step is never truncated
    se = first.std() / np.sqrt(n_samples)
    assert abs(first.mean() - expected) < 5 * se, (first.mean(), expected, se)
    assert abs(expected - 1) > 20 * se and abs(expected - (k + 1)) > 20 * se  # not trivial
    # p == q: every draft accepted.
    same = dec.speculative_sample(
        target, target, lt, lt, jnp.array([0], jnp.int32), 10, k=k, key=jax.random.PRNGKey(3)
    )
    assert int(same.step_tokens[0]) == k + 1

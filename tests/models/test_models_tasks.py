"""Generated tasks: determinism, masks, length splits, and answers checked independently."""

import itertools

import numpy as np
import pytest
from jaxcore.models import tasks as T


def _answers(task, b):
    """Per example: (prompt tokens, answer tokens) read back from a batch."""
    out = []
    for i in range(b["inputs"].shape[0]):
        seq = np.concatenate([b["inputs"][i, :1], b["targets"][i]])
        valid = np.concatenate([[1], (b["targets"][i] != 0) | (b["loss_mask"][i] > 0)])
        seq = seq[valid.astype(bool)]
        ans_pos = np.nonzero(b["answer_mask"][i])[0] + 1
        sep = int(np.nonzero(seq == T.SEP)[0][0])
        out.append((seq[:sep], seq[ans_pos]))
    return out


@pytest.mark.parametrize("name", list(T.TASKS))
@pytest.mark.parametrize("cot", [False, True])
def test_batches_are_deterministic_and_well_formed(name, cot):
    task = (
        T.get_task(name, max_len=5, cot=cot) if name != "charlm" else T.get_task(name, context=16)
    )
    a = task.batch(4, step=7, seed=3)
    b = task.batch(4, step=7, seed=3)
    c = task.batch(4, step=8, seed=3)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
        assert a[k].shape == (4, task.seq_len("train"))
    assert any(not np.array_equal(a[k], c[k]) for k in a)
    assert a["inputs"].dtype == np.int32 and a["loss_mask"].dtype == np.float32
    assert a["inputs"].max() < task.vocab_size and a["targets"].max() < task.vocab_size
    assert (a["answer_mask"] <= a["loss_mask"]).all() and a["answer_mask"].sum(1).min() >= 1
    ood = task.batch(4, step=0, split="ood")
    assert ood["inputs"].shape[1] >= a["inputs"].shape[1]


def test_length_splits():
    t = T.Parity(min_len=3, max_len=6, ood_max_len=9)
    assert t.length_range("train") == (3, 6) and t.length_range("ood") == (7, 9)
    b = t.batch(64, split="ood")
    n_bits = (b["inputs"] >= 2).sum(1)
    assert n_bits.min() >= 7 and n_bits.max() <= 9
    with pytest.raises(ValueError, match="ood_max_len: expected None or an integer > max_len=6"):
        T.Parity(max_len=6, ood_max_len=5)
    with pytest.raises(ValueError, match="split: expected one of"):
        t.batch(2, split="valid")


def test_parity_and_s5_answers():
    for prompt, ans in _answers(T.Parity(max_len=8), T.Parity(max_len=8).batch(16)):
        assert ans[0] - 2 == (prompt - 2).sum() % 2
    perms = list(itertools.permutations(range(5)))
    for prompt, ans in _answers(T.S5(max_len=6), T.S5(max_len=6).batch(16)):
        acc = np.arange(5)
        for g in prompt - 2:
            acc = np.asarray(perms[g])[acc]
        assert perms[ans[0] - 2] == tuple(acc)


def test_addition_and_squaring_answers():
    task = T.Addition(max_len=5, cot=True)
    for prompt, ans in _answers(task, task.batch(16)):
        plus = int(np.nonzero(prompt == task.PLUS)[0][0])
        num = lambda d: int("".join(str(x - 2) for x in d[::-1]))
        assert num(ans) == num(prompt[:plus]) + num(prompt[plus + 1 :])
    sq = T.IteratedSquaring(max_len=5, p=13)
    for prompt, ans in _answers(sq, sq.batch(16)):
        x, n = prompt[0] - 2, len(prompt) - 1
        assert ans[0] - 2 == pow(int(x), 2**n, 13)
    with pytest.raises(ValueError, match="p: expected a prime"):
        T.IteratedSquaring(p=12)


def test_circuit_value_and_dyck_answers():
    cv = T.CircuitValue(max_len=6)
    for prompt, ans in _answers(cv, cv.batch(16)):
        vals = []
        for kind, a, b, _ in prompt.reshape(-1, 4):
            ia, ib = a - cv._IDX0, b - cv._IDX0
            if kind in (cv.IN0, cv.IN1):
                v = kind - cv.IN0
            elif kind == cv.NOT:
                v = 1 - vals[ia]
            elif kind == cv.AND:
                v = vals[ia] & vals[ib]
            else:
                v = vals[ia] | vals[ib]
            vals.append(v)
        assert ans[0] - cv.V0 == vals[-1]
    dy = T.Dyck(max_len=5, k=3)
    results = []
    for prompt, ans in _answers(dy, dy.batch(32)):
        stack, ok = [], True
        for tok in prompt - 2:
            if tok < 3:
                stack.append(tok)
            elif stack and stack[-1] == tok - 3:
                stack.pop()
            else:
                ok = False
        ok = ok and not stack
        results.append(ok)
        assert ans[0] == (dy.VALID if ok else dy.VALID + 1)
    assert 0 < sum(results) < len(results)  # both classes occur


def test_streaming_parity_targets():
    b = T.StreamingParity(max_len=6).batch(8)
    bits = np.where(b["loss_mask"] > 0, b["inputs"] - 2, 0)
    np.testing.assert_array_equal(
        np.where(b["loss_mask"] > 0, b["targets"] - 2, 0),
        np.cumsum(bits, 1) % 2 * (b["loss_mask"] > 0),
    )


def test_char_corpus_is_the_standard_library():
    corpus = T.stdlib_corpus()
    assert len(corpus) >= 10 and sum(map(len, corpus)) > 100_000
    b = T.CharLM(context=32).batch(2)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    text = bytes(b["inputs"][0].astype(np.uint8)).decode("utf-8", "replace")
    assert any(t for t in corpus if text[:8].encode() in t)


def test_get_task_errors():
    with pytest.raises(ValueError, match="task: expected one of"):
        T.get_task("chess")
    with pytest.raises(ValueError, match="width: not a setting of task 'parity'"):
        T.get_task("parity", width=3)

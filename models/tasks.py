"""Generated sequence tasks: ``jaxcore.models.tasks``.

Every task draws its examples from a numpy generator seeded by ``(seed, split, step)``, so batch
``step`` is the same array every time it is asked for (what makes kill-and-resume exact), and
nothing is ever downloaded. A batch is a dict of numpy arrays, all of shape ``(batch, length)``:

``inputs`` (int32)
    the tokens the causal model reads;
``targets`` (int32)
    the token it must predict at each position (``targets[t]`` is predicted from ``inputs[:t+1]``);
``loss_mask`` (float32)
    1 where the position is trained on (the chain-of-thought trace and the answer);
``answer_mask`` (float32)
    1 where the position is an answer token (accuracy is measured there only).

Token 0 is padding and token 1 the separator ``=`` in every task. Sequence-to-answer tasks are laid
out ``prompt = [trace] answer`` and trained as next-token prediction on the part after ``=``.

Length generalisation: examples of split ``"train"`` and ``"test"`` have task length ``n`` drawn
uniformly from ``[min_len, max_len]``; split ``"ood"`` draws ``n`` from
``[max_len + 1, ood_max_len]``. All examples of one split are padded to one length (static
shapes under ``jit``). ``cot=True`` adds the chain-of-thought trace (intermediate results, the
"Chain of Thought Empowers Transformers" setting) before the answer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
from typing import Any, ClassVar

import numpy as np

PAD = 0
SEP = 1
SPLITS = ("train", "test", "ood")
_SPLIT_ID = {"train": 0, "test": 1, "ood": 2}

Batch = dict[str, np.ndarray]


def _rng(seed: int, split: str, step: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLIT_ID[split], int(step)])


@dataclasses.dataclass(frozen=True)
class Task:
    """Base class: a generated task with a length-generalisation split.

    Subclasses set ``name``, implement :meth:`vocab_size`, :meth:`_example` (one example of task
    length ``n`` as ``(prompt, trace, answer)`` token lists) and :meth:`_total_len`.
    """

    name: ClassVar[str] = "task"
    min_len: int = 2
    max_len: int = 16
    ood_max_len: int | None = None
    cot: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.min_len, int) or self.min_len < 1:
            raise ValueError(f"min_len: expected an integer >= 1, got {self.min_len!r}")
        if not isinstance(self.max_len, int) or self.max_len < self.min_len:
            raise ValueError(
                f"max_len: expected an integer >= min_len={self.min_len}, got {self.max_len!r}"
            )
        if self.ood_max_len is not None and (
            not isinstance(self.ood_max_len, int) or self.ood_max_len <= self.max_len
        ):
            raise ValueError(
                f"ood_max_len: expected None or an integer > max_len={self.max_len}, "
                f"got {self.ood_max_len!r}"
            )

    # -- what subclasses provide -------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _example(self, rng: np.random.Generator, n: int) -> tuple[list[int], list[int], list[int]]:
        raise NotImplementedError

    def _total_len(self, n: int) -> int:
        """Length of prompt + separator + trace + answer for task length ``n``."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------
    @property
    def ood_max(self) -> int:
        return self.ood_max_len if self.ood_max_len is not None else 2 * self.max_len

    def length_range(self, split: str = "train") -> tuple[int, int]:
        """Inclusive range of the task length ``n`` in ``split``."""
        _check_split(split)
        if split == "ood":
            return self.max_len + 1, self.ood_max
        return self.min_len, self.max_len

    def seq_len(self, split: str = "train") -> int:
        """Padded length of the arrays of a batch of ``split``."""
        lo, hi = self.length_range(split)
        return max(self._total_len(n) for n in (lo, hi)) - 1

    def batch(
        self, batch_size: int, *, step: int = 0, seed: int = 0, split: str = "train"
    ) -> Batch:
        """Batch number ``step`` of ``split``: a deterministic function of its arguments."""
        _check_split(split)
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        rng = _rng(seed, split, step)
        lo, hi = self.length_range(split)
        T = self.seq_len(split)
        out = {
            "inputs": np.zeros((batch_size, T), np.int32),
            "targets": np.zeros((batch_size, T), np.int32),
            "loss_mask": np.zeros((batch_size, T), np.float32),
            "answer_mask": np.zeros((batch_size, T), np.float32),
        }
        for b in range(batch_size):
            n = int(rng.integers(lo, hi + 1))
            self._fill(out, b, n, rng)
        return out

    def _fill(self, out: Batch, b: int, n: int, rng: np.random.Generator) -> None:
        prompt, trace, answer = self._example(rng, n)
        trace = trace if self.cot else []
        seq = prompt + [SEP] + trace + answer
        L = len(seq) - 1
        out["inputs"][b, :L] = seq[:-1]
        out["targets"][b, :L] = seq[1:]
        start = len(prompt)  # position whose target is the first token after "="
        out["loss_mask"][b, start:L] = 1.0
        out["answer_mask"][b, L - len(answer) : L] = 1.0

    def describe(self) -> dict[str, Any]:
        """The task's settings as a plain dict (for metrics files)."""
        d = dataclasses.asdict(self)
        d["name"] = self.name
        d["vocab_size"] = self.vocab_size
        return d


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")


# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Parity(Task):
    """Parity of ``n`` random bits. Trace: the running parities; answer: the last one."""

    name: ClassVar[str] = "parity"

    @property
    def vocab_size(self) -> int:
        return 4  # PAD, SEP, 0, 1

    def _total_len(self, n: int) -> int:
        return n + 1 + (n - 1 if self.cot else 0) + 1

    def _example(self, rng, n):
        bits = rng.integers(0, 2, n)
        run = np.cumsum(bits) % 2
        return list(bits + 2), list(run[:-1] + 2), [int(run[-1]) + 2]


@dataclasses.dataclass(frozen=True)
class StreamingParity(Task):
    """At every position, the parity of the bits so far (a transduction: no separator).

    The outputs already are the running trace, so ``cot`` has nothing to add and is ignored.
    """

    name: ClassVar[str] = "streaming_parity"

    @property
    def vocab_size(self) -> int:
        return 4

    def _total_len(self, n: int) -> int:
        return n + 1

    def _fill(self, out, b, n, rng):
        bits = rng.integers(0, 2, n)
        out["inputs"][b, :n] = bits + 2
        out["targets"][b, :n] = np.cumsum(bits) % 2 + 2
        out["loss_mask"][b, :n] = 1.0
        out["answer_mask"][b, :n] = 1.0


@functools.cache
def _s5_tables() -> tuple[np.ndarray, np.ndarray]:
    perms = np.array(list(itertools.permutations(range(5))), np.int64)  # (120, 5)
    index = {tuple(p): i for i, p in enumerate(perms)}
    # compose[i, j] = index of (perm_j after perm_i), i.e. x -> p_j[p_i[x]]
    comp = np.array([[index[tuple(perms[j][perms[i]])] for j in range(120)] for i in range(120)])
    return perms, comp


@dataclasses.dataclass(frozen=True)
class S5(Task):
    """The S5 word problem: the composition of ``n`` permutations of 5 elements.

    Tokens 2..121 are the 120 permutations. Trace: the prefix compositions; answer: the product.
    """

    name: ClassVar[str] = "s5"

    @property
    def vocab_size(self) -> int:
        return 122

    def _total_len(self, n: int) -> int:
        return n + 1 + (n - 1 if self.cot else 0) + 1

    def _example(self, rng, n):
        _, comp = _s5_tables()
        word = rng.integers(0, 120, n)
        acc = [int(word[0])]
        for g in word[1:]:
            acc.append(int(comp[acc[-1], g]))
        return list(word + 2), [a + 2 for a in acc[:-1]], [acc[-1] + 2]


@dataclasses.dataclass(frozen=True)
class IteratedSquaring(Task):
    """``x^(2^n) mod p`` from ``x`` and ``n`` squaring marks. Trace: ``x^2, x^4, ...``.

    Tokens 2..p+1 are the residues, ``p + 2`` the squaring mark.
    """

    name: ClassVar[str] = "iterated_squaring"
    p: int = 97

    def __post_init__(self) -> None:
        super().__post_init__()
        if (
            not isinstance(self.p, int)
            or self.p < 2
            or any(self.p % q == 0 for q in range(2, int(self.p**0.5) + 1))
        ):
            raise ValueError(f"p: expected a prime, got {self.p!r}")

    @property
    def vocab_size(self) -> int:
        return self.p + 3

    def _total_len(self, n: int) -> int:
        return 1 + n + 1 + (n - 1 if self.cot else 0) + 1

    def _example(self, rng, n):
        x = int(rng.integers(0, self.p))
        vals = []
        v = x
        for _ in range(n):
            v = v * v % self.p
            vals.append(v)
        return [x + 2] + [self.p + 2] * n, [v + 2 for v in vals[:-1]], [vals[-1] + 2]


@dataclasses.dataclass(frozen=True)
class CircuitValue(Task):
    """The circuit value problem: the value of the last of ``n`` gates.

    Each gate is 4 tokens ``type a b ;`` with type in {IN0, IN1, AND, OR, NOT} and operands
    indexing earlier gates (``-`` for none). The first two gates are inputs. Trace: every gate's
    value in order.
    """

    name: ClassVar[str] = "circuit_value"
    # token layout
    V0, V1, IN0, IN1, AND, OR, NOT, NONE, END = range(2, 11)
    _IDX0: ClassVar[int] = 11

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_len < 2:
            raise ValueError(f"min_len: expected >= 2 (two input gates), got {self.min_len}")

    @property
    def vocab_size(self) -> int:
        return self._IDX0 + self.ood_max

    def _total_len(self, n: int) -> int:
        return 4 * n + 1 + (n - 1 if self.cot else 0) + 1

    def _example(self, rng, n):
        prompt, vals = [], []
        for i in range(n):
            kind = (
                self.IN0 + int(rng.integers(0, 2))
                if i < 2
                else int(rng.integers(self.IN0, self.NOT + 1))
            )
            if kind in (self.IN0, self.IN1):
                a = b = self.NONE
                v = kind - self.IN0
            elif kind == self.NOT:
                ia = int(rng.integers(0, i))
                a, b = self._IDX0 + ia, self.NONE
                v = 1 - vals[ia]
            else:
                ia, ib = (int(j) for j in rng.integers(0, i, 2))
                a, b = self._IDX0 + ia, self._IDX0 + ib
                v = vals[ia] & vals[ib] if kind == self.AND else vals[ia] | vals[ib]
            vals.append(v)
            prompt += [kind, a, b, self.END]
        return prompt, [self.V0 + v for v in vals[:-1]], [self.V0 + vals[-1]]


@dataclasses.dataclass(frozen=True)
class Addition(Task):
    """``a + b`` for two ``n``-digit numbers, digits least significant first (right to left).

    Tokens 2..11 are digits, 12 is ``+``. Answer: ``n + 1`` digits of the sum, least significant
    first. Trace: the carry out of every position.
    """

    name: ClassVar[str] = "addition"
    PLUS: ClassVar[int] = 12

    @property
    def vocab_size(self) -> int:
        return 13

    def _total_len(self, n: int) -> int:
        return 2 * n + 1 + 1 + (n if self.cot else 0) + n + 1

    def _example(self, rng, n):
        a = rng.integers(0, 10, n)
        b = rng.integers(0, 10, n)
        digits, carries, c = [], [], 0
        for i in range(n):
            s = int(a[i] + b[i]) + c
            digits.append(s % 10)
            c = s // 10
            carries.append(c)
        digits.append(c)
        prompt = list(a + 2) + [self.PLUS] + list(b + 2)
        return prompt, [c + 2 for c in carries], [d + 2 for d in digits]


@dataclasses.dataclass(frozen=True)
class Dyck(Task):
    """Is a word over ``k`` bracket pairs well nested? Length ``n`` counts pairs (2n tokens).

    Half the words are balanced, half are a balanced word with one token corrupted. Answer:
    VALID or INVALID. Trace: after each token, the top of the stack (EMPTY, a bracket type, or
    ERROR once the word has failed).
    """

    name: ClassVar[str] = "dyck"
    k: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k: expected a positive integer, got {self.k!r}")

    # opens 2..k+1, closes k+2..2k+1, VALID, INVALID, EMPTY, TOP_1..TOP_k, ERROR
    @property
    def VALID(self) -> int:
        return 2 * self.k + 2

    @property
    def EMPTY(self) -> int:
        return 2 * self.k + 4

    @property
    def ERROR(self) -> int:
        return 3 * self.k + 5

    @property
    def vocab_size(self) -> int:
        return 3 * self.k + 6

    def _total_len(self, n: int) -> int:
        return 2 * n + 1 + (2 * n if self.cot else 0) + 1

    def _balanced(self, rng, n):
        out, stack, opens_left = [], [], n
        while len(out) < 2 * n:
            if opens_left and (not stack or rng.random() < 0.5):
                t = int(rng.integers(0, self.k))
                stack.append(t)
                out.append(2 + t)
                opens_left -= 1
            else:
                out.append(2 + self.k + stack.pop())
        return out

    def _trace(self, word):
        stack, trace, failed = [], [], False
        for tok in word:
            if not failed:
                if tok < 2 + self.k:
                    stack.append(tok - 2)
                elif stack and stack[-1] == tok - 2 - self.k:
                    stack.pop()
                else:
                    failed = True
            trace.append(
                self.ERROR if failed else (self.EMPTY + 1 + stack[-1] if stack else self.EMPTY)
            )
        return trace, (not failed and not stack)

    def _example(self, rng, n):
        word = self._balanced(rng, n)
        if rng.random() < 0.5:
            while True:
                i = int(rng.integers(0, 2 * n))
                new = int(rng.integers(2, 2 + 2 * self.k))
                cand = word[:i] + [new] + word[i + 1 :]
                if not self._trace(cand)[1]:
                    word = cand
                    break
        trace, ok = self._trace(word)
        return word, trace, [self.VALID if ok else self.VALID + 1]


# ---------------------------------------------------------------------------------------------
# Character-level language model on the Python standard library's own sources.

CORPUS_MODULES: tuple[str, ...] = (
    "textwrap",
    "string",
    "functools",
    "heapq",
    "bisect",
    "fractions",
    "statistics",
    "difflib",
    "argparse",
    "json.encoder",
    "json.decoder",
    "dataclasses",
    "enum",
    "shlex",
    "glob",
    "fnmatch",
    "copy",
    "pprint",
    "colorsys",
    "calendar",
    "base64",
    "csv",
    "contextlib",
    "abc",
    "operator",
)


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> tuple[bytes, ...]:
    """Source files of :data:`CORPUS_MODULES` from this Python's standard library, as bytes.

    The corpus ships with every Python installation; nothing is downloaded. Modules whose source
    is not installed are skipped; a RuntimeError says so if none is found.
    """
    texts = []
    for mod in CORPUS_MODULES:
        spec = importlib.util.find_spec(mod)
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py"):
            with open(origin, "rb") as f:
                texts.append(f.read())
    if not texts:
        raise RuntimeError(
            "no Python standard-library sources found for the character-level corpus"
        )
    return tuple(texts)


@dataclasses.dataclass(frozen=True)
class CharLM(Task):
    """Byte-level language modelling on Python standard-library source (vocab 256).

    Windows of ``context`` bytes; the last tenth of every file is the held-out text of splits
    ``"test"`` and ``"ood"``. Every position is trained on and scored.
    """

    name: ClassVar[str] = "charlm"
    context: int = 128

    def __post_init__(self) -> None:
        if not isinstance(self.context, int) or self.context < 2:
            raise ValueError(f"context: expected an integer >= 2, got {self.context!r}")

    @property
    def vocab_size(self) -> int:
        return 256

    def seq_len(self, split: str = "train") -> int:
        _check_split(split)
        return self.context

    @functools.cached_property
    def _text(self) -> dict[str, np.ndarray]:
        train, held = [], []
        for t in stdlib_corpus():
            a = np.frombuffer(t, np.uint8)
            cut = int(0.9 * len(a))
            train.append(a[:cut])
            held.append(a[cut:])
        return {"train": np.concatenate(train), "test": np.concatenate(held)}

    def batch(
        self, batch_size: int, *, step: int = 0, seed: int = 0, split: str = "train"
    ) -> Batch:
        _check_split(split)
        if not isinstance(batch_size, int | np.integer) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        text = self._text["train" if split == "train" else "test"]
        rng = _rng(seed, split, step)
        starts = rng.integers(0, len(text) - self.context - 1, batch_size)
        win = np.stack([text[s : s + self.context + 1] for s in starts]).astype(np.int32)
        ones = np.ones((batch_size, self.context), np.float32)
        return {
            "inputs": win[:, :-1],
            "targets": win[:, 1:],
            "loss_mask": ones,
            "answer_mask": ones,
        }

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "context": self.context, "vocab_size": self.vocab_size}


TASKS: dict[str, type[Task]] = {
    t.name: t
    for t in (Parity, StreamingParity, S5, IteratedSquaring, CircuitValue, Addition, Dyck, CharLM)
}


def get_task(name: str, **kwargs: Any) -> Task:
    """A task by name (see :data:`TASKS`) with its settings as keywords."""
    if name not in TASKS:
        raise ValueError(f"task: expected one of {tuple(TASKS)}, got {name!r}")
    cls = TASKS[name]
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - fields)
    if unknown:
        raise ValueError(
            f"{unknown[0]}: not a setting of task {name!r}; settings: {sorted(fields)}"
        )
    return cls(**kwargs)

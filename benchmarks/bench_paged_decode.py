"""CPU paged decode attention: jaxcore paged_decode_attention vs gather-then-attend peers.

B=8, N=32 query heads, K=8 KV heads, H=128, page_size 16, Tq=1, context lengths ragged around 4096
(one sequence at the 8192 maximum), pages of all sequences interleaved in one pool (random
permutation), table entries past each length set to -1. f32 and bf16. Peers, same process,
alternating:
  * "take+decode_attention": gather each sequence's pages into a contiguous (B, 8192, K, H) cache
    with ``jnp.take``, then ``jaxcore.kernels.attention.decode_attention`` (its default "xla");
  * "take+jax.nn": the same gathered cache into ``jax.nn.dot_product_attention`` with
    ``key_value_seq_lengths``.
Ours: the default (on CPU one sequence per loop step with per-sequence split skipping, ~512
positions per split) and ``sequences_per_step=B`` (all sequences per step, the GPU default).
On a GPU it also times ``implementation="pallas"`` (the Triton kernel; not run here yet).
Outputs are checked against the first peer before timing. ``--quick``: B=2, max 1024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from harness import Bench
from jaxcore.kernels.attention import decode_attention, gather_pages, paged_decode_attention

from jaxcore import backend


def _inputs(b: int, n: int, kh: int, h: int, ps: int, max_len: int, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    mean = max_len // 2
    lengths = np.clip(rng.normal(mean, mean / 4, b).astype(np.int64), 1, max_len)
    lengths[0] = max_len
    m = max_len // ps
    used = -(-lengths // ps)
    npool = int(used.sum()) + 8
    perm = rng.permutation(npool)
    tables = np.full((b, m), -1, np.int32)
    off = 0
    for i in range(b):
        tables[i, : used[i]] = perm[off : off + used[i]]
        off += used[i]
    q = jnp.asarray(rng.standard_normal((b, 1, n, h), dtype=np.float32), dtype)
    kp = jnp.asarray(rng.standard_normal((npool, ps, kh, h), dtype=np.float32), dtype)
    vp = jnp.asarray(rng.standard_normal((npool, ps, kh, h), dtype=np.float32), dtype)
    return q, kp, vp, jnp.asarray(tables), jnp.asarray(lengths, jnp.int32)


def main() -> None:
    bench = Bench("paged_decode")
    args = bench.parse()
    b, n, kh, h, ps = (2, 32, 8, 128, 16) if args.quick else (8, 32, 8, 128, 16)
    max_len = 1024 if args.quick else 8192

    ours = jax.jit(lambda q, kp, vp, t, l: paged_decode_attention(q, kp, vp, t, l))
    ours_all = jax.jit(
        lambda q, kp, vp, t, l: paged_decode_attention(
            q, kp, vp, t, l, sequences_per_step=t.shape[0]
        )
    )
    ours_pallas = jax.jit(
        lambda q, kp, vp, t, l: paged_decode_attention(q, kp, vp, t, l, implementation="pallas")
    )
    take_decode = jax.jit(
        lambda q, kp, vp, t, l: decode_attention(
            q, gather_pages(kp, t), gather_pages(vp, t), l, implementation="xla"
        )
    )

    def _jaxnn(q, kp, vp, t, l):
        k = jnp.take(kp, jnp.clip(t, 0, kp.shape[0] - 1), axis=0)
        v = jnp.take(vp, jnp.clip(t, 0, vp.shape[0] - 1), axis=0)
        k = k.reshape(t.shape[0], -1, *kp.shape[2:])
        v = v.reshape(t.shape[0], -1, *vp.shape[2:])
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=l)

    take_jaxnn = jax.jit(_jaxnn)

    for dtype in (jnp.float32, jnp.bfloat16):
        dt = jnp.dtype(dtype).name
        q, kp, vp, tables, lengths = _inputs(b, n, kh, h, ps, max_len, dtype)
        args_ = (q, kp, vp, tables, lengths)
        want = np.asarray(take_decode(*args_), np.float32)
        tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
        checked = [("ours", ours), ("ours all", ours_all), ("jax.nn", take_jaxnn)]
        if backend.platform() == "gpu":
            checked.append(("ours pallas", ours_pallas))
        for name, f in checked:
            got = np.asarray(f(*args_), np.float32)
            err = float(np.max(np.abs(got - want)))
            if not err <= tol:
                raise SystemExit(f"{name} {dt}: max |diff| {err} > {tol} vs take+decode_attention")
        shape = dict(
            B=b, N=n, K=kh, H=h, page_size=ps, max_len=max_len, mean_len=float(lengths.mean())
        )
        # K and V bytes of the valid cache positions read once: the memory-bound floor
        kv_bytes = 2 * int(lengths.sum()) * kh * h * jnp.dtype(dtype).itemsize
        variants = [("default", ours), ("sequences_per_step=B", ours_all)]
        if backend.platform() == "gpu":  # the Triton kernel (never timed on CPU: GPU only)
            variants.append(("pallas", ours_pallas))
        for oname, of in variants:
            for pname, pf in (("take+decode_attention", take_decode), ("take+jax.nn", take_jaxnn)):
                rec = bench.compare(
                    f"paged decode {dt} ours {oname}",
                    ours=of,
                    peer=pf,
                    peer_name=pname,
                    args=args_,
                    dtype=dt,
                    **shape,
                )
                print(
                    f"# {dt} ours[{oname}] {rec['ours_s'] * 1e3:.2f} ms, {pname} "
                    f"{rec['peer_s'] * 1e3:.2f} ms, ratio {rec['ratio']:.2f}x; ours reads "
                    f"{kv_bytes / rec['ours_s'] / 1e9:.1f} GB/s of valid K/V",
                    flush=True,
                )
    bench.finish()


if __name__ == "__main__":
    main()

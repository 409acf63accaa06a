"""Sequence parallelism on P=8 host devices vs the single-device kernels (forward + backward).

Cases (default T=16384; ``--quick``: T=2048):

- ring attention (causal, zigzag) and Ulysses attention vs the single-device chunked
  ``dot_product_attention`` (implementation "xla");
- LASP-2 linear attention (with decay) vs the single-device chunked ``linear_attention``;
- the sequence-parallel linear scan vs the single-device chunked ``linear_scan``.

"ours" is the sharded program (jit of grad of a shard_map over the 8 devices; inputs already
sharded, in zigzag order for ring), "peer" the single-device kernel on one device. Memory is
the compiled temporary allocation PER DEVICE (``memory_analysis``) - the figure that must
scale as 1/P. Host devices share this machine's cores, so the parallel wall time measures
the overhead of the partitioned program, not a speed-up; report it honestly.
"""

from __future__ import annotations

import os
import sys

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from harness import Bench, temp_bytes, time_alternating  # noqa: E402
from jax.sharding import AxisType, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from jaxcore.kernels import attention, scan  # noqa: E402
from jaxcore.kernels import parallel as par  # noqa: E402

NUM = 8


def _grad(f, argnums=(0, 1, 2)):
    return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=argnums))


def _shard(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _sharded_grad(mesh, body, in_specs, out_spec, n_diff):
    """jit(grad) of a shard_map; check_vma=True if the inner kernels allow it, else False."""
    for check in (True, False):
        fn = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=check)
        g = _grad(fn, argnums=tuple(range(n_diff)))
        yield g, check


def _case(bench, name, peer_name, ours_list, ours_args, peer, peer_args, **extra):
    ours, check = None, None
    for g, chk in ours_list:
        try:
            g.lower(*ours_args).compile()
            ours, check = g, chk
            break
        except Exception as e:  # an inner kernel that fails check_vma: retry without it
            print(f"# {name}: check_vma={chk} failed: {type(e).__name__}: {str(e)[:200]}")
    if ours is None:
        raise RuntimeError(f"{name}: the sharded program does not compile")
    t_ours, t_peer = time_alternating(
        [lambda: ours(*ours_args), lambda: peer(*peer_args)], (), reps=bench.reps
    )
    rec = {
        "case": name,
        "peer": peer_name,
        "ours_s": t_ours,
        "peer_s": t_peer,
        "ratio": t_peer / t_ours,
        "ours_temp_bytes": temp_bytes(ours, *ours_args),
        "peer_temp_bytes": temp_bytes(peer, *peer_args),
        "devices": NUM,
        "check_vma": check,
        **extra,
    }
    if rec["ours_temp_bytes"] and rec["peer_temp_bytes"]:
        rec["mem_ratio"] = rec["ours_temp_bytes"] / rec["peer_temp_bytes"]
    bench.record(rec)


def main() -> None:
    bench = Bench("parallel")
    args = bench.parse(lambda p: p.add_argument("--length", type=int, default=None))
    t = args.length or (2048 if args.quick else 16384)
    if jax.device_count() < NUM:
        raise SystemExit(f"needs {NUM} devices, found {jax.device_count()}")
    mesh = jax.make_mesh((NUM,), ("seq",), (AxisType.Auto,), devices=jax.devices()[:NUM])
    one = jax.devices()[0]
    rng = np.random.default_rng(0)
    b, n, h = 1, 8, 32  # Ulysses needs heads divisible by P
    spec = P(None, "seq")

    def arr(*shape, scale=1.0):
        return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)

    q, k, v = arr(b, t, n, h), arr(b, t, n, h), arr(b, t, n, h)
    qk1 = [jax.device_put(x, one) for x in (q, k, v)]
    single = _grad(lambda q, k, v: attention.dot_product_attention(q, k, v, is_causal=True))
    shape = f"B={b} T={t} N={n} H={h} f32 causal"

    # ring attention: inputs in zigzag order, sharded
    zz = [_shard(par.to_zigzag(x, NUM), mesh, spec) for x in (q, k, v)]
    ring_body = lambda q, k, v: par.ring_attention(q, k, v, axis_name="seq", is_causal=True)  # noqa: E731
    _case(
        bench,
        f"ring attention fwd+bwd P={NUM}",
        "single-device chunked attention",
        _sharded_grad(mesh, ring_body, (spec,) * 3, spec, 3),
        zz,
        single,
        qk1,
        shape=shape,
    )

    # Ulysses attention: contiguous shards
    sh = [_shard(x, mesh, spec) for x in (q, k, v)]
    uly_body = lambda q, k, v: par.ulysses_attention(q, k, v, axis_name="seq", is_causal=True)  # noqa: E731
    _case(
        bench,
        f"ulysses attention fwd+bwd P={NUM}",
        "single-device chunked attention",
        _sharded_grad(mesh, uly_body, (spec,) * 3, spec, 3),
        sh,
        single,
        qk1,
        shape=shape,
    )

    # LASP-2 linear attention with decay
    ql, kl, vl = arr(b, t, n, h, scale=0.1), arr(b, t, n, h, scale=0.1), arr(b, t, n, h)
    dec = jnp.asarray(rng.uniform(0.9, 1.0, (b, t, n)), jnp.float32)
    lin_single = _grad(lambda q, k, v, d: attention.linear_attention(q, k, v, decay=d))
    lin_body = lambda q, k, v, d: par.sequence_parallel_linear_attention(  # noqa: E731
        q, k, v, axis_name="seq", decay=d
    )
    _case(
        bench,
        f"LASP-2 linear attention fwd+bwd P={NUM}",
        "single-device chunked linear_attention",
        _sharded_grad(mesh, lin_body, (spec,) * 4, spec, 3),
        [_shard(x, mesh, spec) for x in (ql, kl, vl, dec)],
        lin_single,
        [jax.device_put(x, one) for x in (ql, kl, vl, dec)],
        shape=f"B={b} T={t} N={n} H={h} f32 decay",
    )

    # sequence-parallel linear scan, elementwise a
    d_state = 512
    a = jnp.asarray(rng.uniform(0.9, 1.0, (b, t, d_state)), jnp.float32)
    x = arr(b, t, d_state)
    scan_single = _grad(lambda a, x: scan.linear_scan(a, x), argnums=(0, 1))
    scan_body = lambda a, x: par.sequence_parallel_scan(a, x, axis_name="seq")  # noqa: E731
    _case(
        bench,
        f"sharded linear_scan fwd+bwd P={NUM}",
        "single-device chunked linear_scan",
        _sharded_grad(mesh, scan_body, (spec,) * 2, spec, 2),
        [_shard(y, mesh, spec) for y in (a, x)],
        scan_single,
        [jax.device_put(y, one) for y in (a, x)],
        shape=f"B={b} T={t} D={d_state} f32 elementwise a",
    )
    bench.finish()


if __name__ == "__main__":
    main()

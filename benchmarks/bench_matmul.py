"""Harness example: jnp.dot under jit vs numpy.dot (f32), same process, alternating."""

import jax
import jax.numpy as jnp
import numpy as np
from harness import Bench


def main() -> None:
    bench = Bench("matmul")
    args = bench.parse()
    sizes = [256, 512] if args.quick else [512, 1024, 2048]
    dot = jax.jit(jnp.dot)
    for n in sizes:
        rng = np.random.default_rng(0)
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        bench.compare(
            f"dot {n}^3 f32",
            ours=lambda x, y, ja=ja, jb=jb: dot(ja, jb),  # device-resident copies
            peer=lambda x, y: np.dot(x, y),
            peer_name="numpy.dot",
            args=(a, b),
            flops=2.0 * n**3,
            memory=False,
        )
    bench.finish()


if __name__ == "__main__":
    main()

"""Machine peak for MFU: float32 matmul FLOP/s on the JAX backend.

`matmul_gflops(n, reps)` times a jitted `[n, n] @ [n, n]` float32 matmul
(`2·n³` FLOP) and returns the median rate in GFLOP/s. Other benchmarks import
it (`from machine_peak import matmul_gflops`, the scripts' own directory is
on `sys.path` when they run as `python benchmarks/<script>.py`) and measure
the peak in the same run as the model, so that model FLOP utilisation (MFU)
is relative to what this machine delivers under its current load.

    python benchmarks/machine_peak.py            # n = 1024, 2048, 4096
    python benchmarks/machine_peak.py --quick    # n = 512, 1024
    python benchmarks/machine_peak.py --bandwidth  # also the memory copy bandwidth
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

_CACHE = {}


def _operands(n, dtype):
    key = (n, dtype)
    if key not in _CACHE:
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.standard_normal((n, n)), dtype)
        b = jnp.asarray(rng.standard_normal((n, n)), dtype)
        f = jax.jit(jnp.matmul)
        f(a, b).block_until_ready()  # compile + warm up
        _CACHE[key] = (f, a, b)
    return _CACHE[key]


def matmul_times(n=2048, reps=5, dtype="float32"):
    """Seconds per `[n, n] @ [n, n]` matmul, one entry per repetition."""
    f, a, b = _operands(n, dtype)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        f(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def matmul_gflops(n=2048, reps=5, dtype="float32"):
    """Median GFLOP/s of a jitted `[n, n] @ [n, n]` matmul (`2·n³` FLOP)."""
    return 2 * n**3 / statistics.median(matmul_times(n, reps, dtype)) / 1e9


def copy_times(mib=256, reps=5):
    """Seconds per jitted `x + 1` over a float32 array of `mib` MiB (reads and
    writes it once: `2 · mib` MiB moved), one entry per repetition. The input
    is donated, so the output reuses its buffer, as a donated train step does:
    without donation each call maps fresh pages and on this machine reads
    about 2 GB/s instead of 9-25."""
    key = ("copy", mib)
    if key not in _CACHE:
        f = jax.jit(lambda v: v + 1.0, donate_argnums=0)
        _CACHE[key] = [f, f(jnp.ones((mib * 2**20 // 4,), "float32")).block_until_ready()]
    entry = _CACHE[key]
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        entry[1] = entry[0](entry[1]).block_until_ready()
        times.append(time.perf_counter() - t0)
    return times


def copy_gbps(mib=256, reps=5):
    """Median memory bandwidth in GB/s (10^9 bytes/s) of `copy_times`: the
    bandwidth term of the step-time model's `cpu-here` entry."""
    return 2 * mib * 2**20 / statistics.median(copy_times(mib, reps)) / 1e9


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None)
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--bandwidth", action="store_true",
                        help="also the copy bandwidth of a 256 MiB float32 array")
    args = parser.parse_args()
    sizes = args.sizes or ([512, 1024] if args.quick else [1024, 2048, 4096])
    reps = args.reps or (3 if args.quick else 7)
    print(f"jax {jax.__version__}, devices {jax.devices()}, {os.cpu_count()} CPUs, "
          f"os.getloadavg() {tuple(round(x, 2) for x in os.getloadavg())}")
    print("| n | median ms | best ms | median GFLOP/s | best GFLOP/s |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        times = matmul_times(n, reps)
        flop = 2 * n**3
        print(f"| {n} | {statistics.median(times) * 1e3:.1f} | {min(times) * 1e3:.1f} | "
              f"{flop / statistics.median(times) / 1e9:.1f} | "
              f"{flop / min(times) / 1e9:.1f} |", flush=True)
    if args.bandwidth:
        mib = 64 if args.quick else 256
        times = copy_times(mib, reps)
        moved = 2 * mib * 2**20
        print(f"\ncopy bandwidth ({mib} MiB float32, read + write): median "
              f"{moved / statistics.median(times) / 1e9:.1f} GB/s, best "
              f"{moved / min(times) / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()

"""One-GPU benchmark suite, with the step-time model's predictions beside it.

Runs, on the JAX backend, in this order (about 6-8 minutes on one H100/H200
with the defaults; `--cpu` runs the same on small shapes in tens of seconds):

1. **matmul peak**: bf16 and float32 `[n, n] @ [n, n]` (`machine_peak.py`),
   and the donated copy bandwidth;
2. **MoE layer vs equal-FLOP dense FFN**: the training step (forward +
   backward, `moe_layer.make_step`) of `MoEFeedForward` with top-2, capacity
   factor 1.25 and index (slot) dispatch, and dropless top-2 with the
   `ragged_dot` path (`dropless_impl="ragged"`), each against
   `FeedForward(intermediate_dim=2·h)`, as median paired ratios (`moe_layer.time_pair`);
3. **training throughput**: Keras' jitted `train_step` (Adam, as in
   `training_throughput.py`) of the ~100M presets (GPU: full size, 32
   experts, 256K vocabulary, `mixed_bfloat16`, batch 8 x 1024; `--cpu`: the
   tiny presets, float32, batch 2 x 64), step time, tokens/s, MFU against
   the chip's bf16 peak, and the Brainformer / GLaM step-time ratio;
4. **cached generation**: `generation.py` (cached `generate()` vs uncached
   decoding).

Beside each training step it prints `predict_step_time(...)` for the same
preset, batch and dtype on the detected hardware entry (`--hardware` to
override; `cpu-here` with the peak and bandwidth measured in step 1 under
`--cpu`), and measured / predicted.

    pip install -e ".[cuda]"                  # jax[cuda12]; see docs/performance_model.md
    python benchmarks/device_suite.py         # one GPU, ~8 min
    python benchmarks/device_suite.py --cpu   # small shapes on CPU, tens of seconds
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import generation  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from machine_peak import copy_gbps  # noqa: E402
from machine_peak import matmul_gflops  # noqa: E402
from moe_layer import compile_all  # noqa: E402
from moe_layer import make_step  # noqa: E402
from moe_layer import time_pair  # noqa: E402
from training_throughput import FAMILIES  # noqa: E402
from training_throughput import Runner  # noqa: E402

from keras_brainformer.distribution.hardware import HARDWARE  # noqa: E402
from keras_brainformer.distribution.hardware import HARDWARE_NAMES  # noqa: E402
from keras_brainformer.distribution.step_time import predict_step_time  # noqa: E402
from keras_brainformer.layers import FeedForward  # noqa: E402
from keras_brainformer.layers import MoEFeedForward  # noqa: E402
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config  # noqa: E402

# GPU and CPU settings: matmul size, MoE layer shape (batch, length, d, h, E),
# training batch x length, dtype policy, families, generation arguments.
SETTINGS = {
    "gpu": {
        "matmul_n": 8192, "reps": 10, "copy_mib": 1024,
        "moe": (16, 1024, 1024, 4096, 32),
        "train": (8, 1024), "dtype": "mixed_bfloat16", "scale": 1, "rounds": 5,
        "generation": [],
    },
    "cpu": {
        "matmul_n": 512, "reps": 3, "copy_mib": 32,
        "moe": (2, 256, 128, 256, 8),
        "train": (2, 64), "dtype": "float32", "scale": 0, "rounds": 2,
        "generation": ["--quick"],
    },
}
DEFAULT_FAMILIES = ("brainformer1", "brainformer2", "glam", "dense")


def detect_hardware():
    """The `HARDWARE` name of the first JAX device (None if unknown)."""
    kind = jax.devices()[0].device_kind.lower()
    for name in ("h200", "h100", "a100"):
        if name in kind:
            return name
    for name in ("v5p", "v5e", "v5 lite", "v4"):
        if name in kind:
            return {"v5 lite": "tpu-v5e"}.get(name, f"tpu-{name}")
    return None


def section_peak(s):
    print("\n## 1. matmul peak and memory bandwidth", flush=True)
    peaks = {}
    for dtype in ("bfloat16", "float32"):
        peaks[dtype] = matmul_gflops(s["matmul_n"], s["reps"], dtype) * 1e9
        print(f"{dtype} {s['matmul_n']}³ matmul: {peaks[dtype] / 1e12:.2f} TFLOP/s", flush=True)
    bandwidth = copy_gbps(s["copy_mib"], s["reps"]) * 1e9
    print(f"copy bandwidth ({s['copy_mib']} MiB float32, donated): {bandwidth / 1e9:.1f} GB/s")
    return peaks, bandwidth


def section_moe(s):
    batch, length, d, h, E = s["moe"]
    print(f"\n## 2. MoE layer vs equal-FLOP dense FFN ({batch} x {length} tokens, d={d}, "
          f"h={h}, E={E}, top-2, policy {keras.config.dtype_policy().name})", flush=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, length, d)),
                    keras.config.dtype_policy().compute_dtype)

    def moe(capacity_factor, impl):
        return MoEFeedForward(num_experts=E, intermediate_dim=h, activation="gelu",
                              top_k=2, capacity_factor=capacity_factor,
                              dropless_impl=impl)

    variants = {
        "dense": make_step(FeedForward(intermediate_dim=2 * h, activation="gelu"), x),
        "slots cf1.25": make_step(moe(1.25, "auto"), x),
        "dropless ragged": make_step(moe(None, "ragged"), x),
    }
    compile_all(variants)
    print("| variant / dense FFN h=2·h | ms | dense ms | ratio (median of pairs) "
          "| this machine's CPU suite |")
    print("|---|---:|---:|---:|---|")
    cpu = {"slots cf1.25": "1.48 / 1.52 at E=16 / 32 (moe_layer.py)",
           "dropless ragged": "ragged 2.1x slower than slots (ragged_dropless.py)"}
    for name in ("slots cf1.25", "dropless ragged"):
        num, den, ratios = time_pair(variants[name], variants["dense"], s["reps"])
        print(f"| {name} | {statistics.median(num):.2f} | {statistics.median(den):.2f} "
              f"| {statistics.median(ratios):.2f} | {cpu[name]} |", flush=True)


def family_config(family, scale, dtype, length):
    config = get_preset_config(FAMILIES[family][scale])
    config["dtype"] = dtype
    config["max_sequence_length"] = max(length, 16)
    return config


def section_training(s, families, hardware):
    batch, length = s["train"]
    print(f"\n## 3. training step ({'~100M' if s['scale'] else 'tiny'} presets, batch {batch} "
          f"x {length}, {s['dtype']}, Adam) vs the step-time model on {hardware.name}",
          flush=True)
    runners = []
    for family in families:
        t0 = time.perf_counter()
        runner = Runner(family, family_config(family, s["scale"], s["dtype"], length),
                        batch, length)
        runner.run()
        runner.plan = predict_step_time(runner.config, "batch=1", batch, length, hardware,
                                        dtype=s["dtype"], optimizer="adamw",
                                        expert_dim_name=None)
        runners.append(runner)
        print(f"  built {family} in {time.perf_counter() - t0:.1f} s", flush=True)
    for r in range(s["rounds"]):
        for runner in runners[r % len(runners):] + runners[: r % len(runners)]:
            runner.times.append(runner.run())
    peak = hardware.peak("bfloat16")
    print("| family | activated | step ms | predicted ms | measured / predicted | tokens/s "
          "| MFU (bf16 peak) | predicted MFU | largest predicted part |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    steps = {}
    for x in runners:
        t = statistics.median(x.times)
        steps[x.family] = x.times
        part, seconds = max(x.plan.parts.items(), key=lambda kv: kv[1])
        print(f"| {x.family} | {x.counts['activated'] / 1e6:.1f}M | {t * 1e3:.1f} "
              f"| {x.plan.step_seconds * 1e3:.1f} | {t / x.plan.step_seconds:.2f} "
              f"| {x.tokens / t:,.0f} | {x.flops_per_step() / t / peak:.1%} "
              f"| {x.plan.mfu:.1%} | {part} {seconds / x.plan.step_seconds:.0%} |", flush=True)
    if "glam" in steps:
        glam = next(x for x in runners if x.family == "glam")
        for x in runners:
            if x.family.startswith("brainformer"):
                ratio = statistics.median(a / g for a, g in zip(x.times, glam.times))
                print(f"- {x.family} / glam step time: measured {ratio:.2f}, predicted "
                      f"{x.plan.step_seconds / glam.plan.step_seconds:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="small shapes for a CPU (tens of seconds): the smoke test")
    parser.add_argument("--hardware", default=None, choices=HARDWARE_NAMES,
                        help="step-time model entry (default: detected; cpu-here under --cpu)")
    parser.add_argument("--families", nargs="+", default=list(DEFAULT_FAMILIES),
                        choices=list(FAMILIES))
    parser.add_argument("--skip", nargs="*", default=[],
                        choices=["peak", "moe", "training", "generation"])
    args = parser.parse_args()
    s = SETTINGS["cpu" if args.cpu else "gpu"]
    start = time.time()
    print(f"keras {keras.__version__}, jax {jax.__version__}, devices {jax.devices()}")
    if args.cpu:
        families = [f for f in args.families if f in ("brainformer1", "glam")] or args.families
    else:
        families = args.families
    name = args.hardware or ("cpu-here" if args.cpu else detect_hardware())
    if name is None:
        raise SystemExit(f"error: unknown device {jax.devices()[0].device_kind!r}; pass "
                         f"--hardware (one of {', '.join(HARDWARE_NAMES)}) or --cpu.")
    hardware = HARDWARE[name]
    if "peak" not in args.skip:
        peaks, bandwidth = section_peak(s)
        if name == "cpu-here":  # calibrate the CPU entry on the same moment's figures
            hardware = dataclasses.replace(hardware, matmul_flops=peaks,
                                           memory_bandwidth=bandwidth)
        else:
            print(f"measured / published ({hardware.name}): bf16 peak "
                  f"{peaks['bfloat16'] / hardware.peak('bfloat16'):.2f}, float32 "
                  f"{peaks['float32'] / hardware.peak('float32'):.2f}, bandwidth "
                  f"{bandwidth / hardware.memory_bandwidth:.2f}")
    keras.config.set_dtype_policy(s["dtype"])
    if "moe" not in args.skip:
        section_moe(s)
    keras.config.set_dtype_policy("float32")  # the presets carry their own dtype
    if "training" not in args.skip:
        section_training(s, families, hardware)
    if "generation" not in args.skip:
        print("\n## 4. cached generation (generation.py)", flush=True)
        generation.main(s["generation"])
    print(f"\nwhole run {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""Training throughput per model family: step time, tokens/s, MFU, compile time.

For each family of the zoo (Brainformer block 1 and 2, GLaM top-2, GLaM with
expert choice, Primer, dense) this builds a `BrainformerCausalLM`, compiles it
like `fit` does (`lm.compile(optimizer=Adam)`: the CausalLM's default sparse
cross-entropy loss and accuracy metric, the MoE layers' auxiliary losses and
routing statistics) and jits Keras's own JAX train step
`lm.train_step(state, data)` with the state donated, as `fit` does. It then
reports, on the JAX backend:

* trace and compile time of that step (`jax.jit(...).lower()` and
  `.compile()` timed explicitly, per family);
* the steady step time (median over rounds; in each round the families run in
  a rotating order, so load on a shared machine hits all alike; the float32
  2048³ matmul peak of `machine_peak.py` is measured right before each
  family's steps);
* tokens/s, and MFU = 6 · activated parameters · tokens/s / peak, with the
  project's activated-parameter count (`count_parameters`: embedding counted
  once since it is tied and also the output projection; `k` experts per token
  for top-k, the capacity factor's worth for expert choice). Attention's
  `T²` FLOPs are not in `6·N` (the usual convention). MFU is computed per
  step against the peak measured just before it; the median is reported,
  and also the MFU against the best peak seen in the run (the machine's
  least-loaded moment in the run, a stricter denominator);
* with `--breakdown`, the forward-only loss and the forward+backward (no
  optimizer) of the same model and batch, timed in the same rounds.

Scales:

* `tiny`: the `*_tiny` presets as shipped (vocabulary 8192, sequences of 256).
* `small`: the `*_small` presets as shipped (byte-level, batch 16 x 128): the
  scale where the blocks, not the output layer, take the step's time (the
  breakdown's "output layer" column: the tied projection and loss, forward
  and backward, alone).
* `100m`: the families' ~100M presets (`brainformer1_100m`,
  `brainformer2_100m`, `glam_100m_32e`, `glam_ec_100m_32e`, `dense_100m`,
  `primer_100m`) trimmed to fit a small CPU (see `TRIM_100M`): a third of
  the depth, a 32000-entry vocabulary (the paper's convention) instead of
  256000, 4 experts per MoE layer instead of 32 (the activated parameters do
  not depend on the number of experts), and short sequences. Widths, layouts,
  routers and capacity factors are the presets' own.

    python benchmarks/training_throughput.py                 # both scales
    python benchmarks/training_throughput.py --scale tiny
    python benchmarks/training_throughput.py --scale small --breakdown
    python benchmarks/training_throughput.py --quick         # smoke run (tiny, 3 families)
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import gc  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from machine_peak import matmul_gflops  # noqa: E402

from keras_brainformer.models import BrainformerBackbone  # noqa: E402
from keras_brainformer.models import BrainformerCausalLM  # noqa: E402
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config  # noqa: E402
from keras_brainformer.zoo.parameter_count import count_parameters  # noqa: E402

# family: (tiny preset, ~100M preset); the small tier is `<family>_small`.
FAMILIES = {
    "brainformer1": ("brainformer1_tiny", "brainformer1_100m"),
    "brainformer2": ("brainformer2_tiny", "brainformer2_100m"),
    "glam": ("glam_tiny", "glam_100m_32e"),
    "glam_ec": ("glam_ec_tiny", "glam_ec_100m_32e"),
    "primer": ("primer_tiny", "primer_100m"),
    "dense": ("dense_tiny", "dense_100m"),
}
SCALES = ("tiny", "small", "100m")

# The ~100M presets trimmed for a 2-core CPU with ~20 GB shared memory:
# a third of the depth (Brainformer 1 of 3 blocks, GLaM 2 of 6 two-layer
# blocks, dense / Primer 4 of 12 layers), vocabulary 32000, 4 experts.
TRIM_100M = {
    "num_layers": {"brainformer1": 1, "brainformer2": 1, "glam": 2, "glam_ec": 2,
                   "primer": 4, "dense": 4},
    "vocabulary_size": 32000,
    "num_experts": 4,
}

# scale: (batch, sequence length)
SHAPES = {"tiny": (8, 256), "small": (16, 128), "100m": (2, 256)}
QUICK_SHAPES = {"tiny": (2, 64), "small": (2, 64), "100m": (1, 64)}


def _set_experts(obj, num_experts):
    if isinstance(obj, dict):
        if "num_experts" in obj:
            obj["num_experts"] = num_experts
        for value in obj.values():
            _set_experts(value, num_experts)
    elif isinstance(obj, list):
        for value in obj:
            _set_experts(value, num_experts)


def family_config(family, scale, length):
    tiny_name, big_name = FAMILIES[family]
    if scale == "tiny":
        config = get_preset_config(tiny_name)
    elif scale == "small":
        config = get_preset_config(f"{family}_small")
    else:
        config = get_preset_config(big_name)
        config["num_layers"] = TRIM_100M["num_layers"][family]
        config["vocabulary_size"] = TRIM_100M["vocabulary_size"]
        _set_experts(config["blocks"], TRIM_100M["num_experts"])
    config["max_sequence_length"] = max(length, 16)
    return config


class Runner:
    """One family's compiled train step and its (donated) state."""

    def __init__(self, family, config, batch, length, breakdown=False):
        self.family = family
        self.config = config
        self.counts = count_parameters(config)
        self.tokens = batch * length
        keras.utils.set_random_seed(0)
        backbone = BrainformerBackbone(**config)
        self.lm = BrainformerCausalLM(backbone, preprocessor=None)
        self.lm.compile(optimizer=keras.optimizers.Adam(1e-4))
        rng = np.random.default_rng(0)
        ids = rng.integers(0, config["vocabulary_size"], (batch, length + 1))
        x = {
            "token_ids": ids[:, :-1].astype("int32"),
            "padding_mask": np.ones((batch, length), "int32"),
        }
        y = ids[:, 1:].astype("int32")
        self.data = (x, y, None)
        # What `fit`/`train_on_batch` do before their first step (private
        # Keras 3 JAX-trainer helpers; keras 3.15).
        self.lm._symbolic_build(data_batch=self.data)
        self.state = self.lm._get_jax_state(
            trainable_variables=True,
            non_trainable_variables=True,
            optimizer_variables=True,
            metrics_variables=True,
        )
        self.real_params = sum(int(np.prod(v.shape)) for v in self.lm.weights)
        jitted = jax.jit(self.lm.train_step, donate_argnums=0)
        t0 = time.perf_counter()
        lowered = jitted.lower(self.state, self.data)
        self.trace_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.step = lowered.compile()
        self.compile_s = time.perf_counter() - t0
        self.first_step_s = self.run()
        self.times = []
        self.mfus = []
        self.parts = {}
        if breakdown:
            self._build_breakdown()

    def _build_breakdown(self):
        """Jitted forward-only loss and forward+backward (no optimizer) of the
        same model and data, to split the step time."""
        lm = self.lm
        x, y, _ = self.data

        def forward(tv, ntv, ov, mv):
            loss, aux = lm.compute_loss_and_updates(
                tv, ntv, mv, x, y, None, training=True, optimizer_variables=ov)
            return loss, aux[2]

        def forward_backward(tv, ntv, ov, mv):
            (loss, aux), grads = jax.value_and_grad(
                lm.compute_loss_and_updates, has_aux=True
            )(tv, ntv, mv, x, y, None, training=True, optimizer_variables=ov)
            return loss, grads, aux[2]

        # The vocabulary's part: the tied output projection and the loss,
        # forward and backward, on hidden states of the step's shape.
        # Of the embedding's shape (the train step donates, deletes, the
        # model's own buffers; the values do not change the time).
        embeddings = jax.random.normal(
            jax.random.PRNGKey(1), tuple(lm.backbone.token_embedding.embeddings.shape)
        )
        hidden = jax.random.normal(
            jax.random.PRNGKey(0), (*x["token_ids"].shape, embeddings.shape[1])
        )

        def output_loss(e, h):
            logits = jax.numpy.einsum("btd,vd->btv", h, e)
            return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(
                y, logits, from_logits=True))

        output_grad = jax.jit(jax.value_and_grad(output_loss, argnums=(0, 1)))

        def output_layer(*state):
            return output_grad(embeddings, hidden)

        self.part_fns = {"forward": jax.jit(forward),
                         "forward+backward": jax.jit(forward_backward),
                         "output layer": output_layer}
        for name in self.part_fns:
            self.parts[name] = []
            self.run_part(name)  # compile + warm up

    def run_part(self, name):
        t0 = time.perf_counter()
        jax.block_until_ready(self.part_fns[name](*self.state))
        return time.perf_counter() - t0

    def run(self):
        t0 = time.perf_counter()
        logs, self.state = self.step(self.state, self.data)
        jax.block_until_ready((logs, self.state))
        self.loss = float(logs["loss"])
        return time.perf_counter() - t0

    def flops_per_step(self):
        return 6 * self.counts["activated"] * self.tokens


def run_scale(scale, families, batch, length, rounds, steps, peak_n, peak_reps,
              breakdown=False):
    print(f"\n== scale {scale}: batch {batch} x {length} tokens, {rounds} rounds x "
          f"{steps} steps ==", flush=True)
    runners = []
    for family in families:
        config = family_config(family, scale, length)
        runner = Runner(family, config, batch, length, breakdown=breakdown)
        print(f"  {family:<13s} activated {runner.counts['activated'] / 1e6:8.2f}M, "
              f"total {runner.counts['total'] / 1e6:8.2f}M (built {runner.real_params / 1e6:.2f}M "
              f"weights); trace {runner.trace_s:5.1f} s, compile {runner.compile_s:5.1f} s, "
              f"first step {runner.first_step_s:6.3f} s, loss {runner.loss:.3f}", flush=True)
        runners.append(runner)
    for runner in runners:  # warm up
        runner.run()
    peaks = []
    for r in range(rounds):
        order = runners[r % len(runners):] + runners[: r % len(runners)]
        line = []
        for runner in order:
            # The peak is measured right before each family's steps, so each
            # step's MFU is paired with the load of the same moment.
            peak = matmul_gflops(peak_n, peak_reps) * 1e9
            peaks.append(peak)
            for _ in range(steps):
                t = runner.run()
                runner.times.append(t)
                runner.mfus.append(runner.flops_per_step() / t / peak)
                for name in runner.parts:
                    runner.parts[name].append(runner.run_part(name))
            line.append(f"{runner.family} {runner.times[-1] * 1e3:.0f} ms "
                        f"(peak {peak / 1e9:.0f})")
        print(f"  round {r + 1}/{rounds}: " + ", ".join(line), flush=True)
    return runners, peaks


def paired_ratio(num, den, steps):
    """Median of per-round ratios of the two families' per-round median times."""
    ratios = []
    for i in range(0, len(num.times), steps):
        ratios.append(statistics.median(num.times[i:i + steps])
                      / statistics.median(den.times[i:i + steps]))
    return statistics.median(ratios)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run (< 60 s)")
    parser.add_argument("--scale", choices=[*SCALES, "both"], default=None,
                        help="default both (tiny and 100m; quick: tiny)")
    parser.add_argument("--families", nargs="+", default=list(FAMILIES),
                        choices=list(FAMILIES))
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default tiny 7, 100m 4; quick 2)")
    parser.add_argument("--breakdown", action="store_true",
                        help="also time the forward and forward+backward alone")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps per family per round (default tiny 3, 100m 1)")
    args = parser.parse_args()

    scale_arg = args.scale or ("tiny" if args.quick else "both")
    scales = ["tiny", "100m"] if scale_arg == "both" else [scale_arg]
    families = args.families
    if args.quick:
        families = [f for f in families if f in ("brainformer1", "glam", "dense")] or families
    shapes = QUICK_SHAPES if args.quick else SHAPES
    peak_n, peak_reps = (1024, 3) if args.quick else (2048, 3)

    print(f"keras {keras.__version__}, jax {jax.__version__}, devices {jax.devices()}, "
          f"{os.cpu_count()} CPUs; loadavg at start "
          f"{tuple(round(x, 2) for x in os.getloadavg())}", flush=True)
    start = time.time()
    tables = []
    for scale in scales:
        batch, length = shapes[scale]
        rounds = args.rounds or (2 if args.quick else {"tiny": 7, "small": 7, "100m": 4}[scale])
        steps = args.steps or (1 if args.quick else {"tiny": 3, "small": 3, "100m": 1}[scale])
        runners, peaks = run_scale(scale, families, batch, length, rounds, steps,
                                   peak_n, peak_reps, breakdown=args.breakdown)
        peak = statistics.median(peaks)
        lines = [
            f"### scale `{scale}`: batch {batch} x {length} = {batch * length} tokens/step, "
            f"median of {rounds} rounds x {steps} steps; float32 {peak_n}³ matmul peak "
            f"{peak / 1e9:.1f} GFLOP/s (median of {len(peaks)} measurements, range "
            f"{min(peaks) / 1e9:.0f}-{max(peaks) / 1e9:.0f})",
            "",
            "| family | activated params | total params | step ms (median) | step ms (min) "
            "| tokens/s | GFLOP/s (6·N·tok/s) | MFU (paired peak) | MFU (best peak) | trace s "
            "| compile s | first step s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        results = {}
        for runner in runners:
            t = statistics.median(runner.times)
            mfu = statistics.median(runner.mfus)
            results[runner.family] = (runner, t, mfu)
            lines.append(
                f"| {runner.family} | {runner.counts['activated'] / 1e6:.2f}M "
                f"| {runner.counts['total'] / 1e6:.2f}M | {t * 1e3:.1f} "
                f"| {min(runner.times) * 1e3:.1f} | {runner.tokens / t:,.0f} "
                f"| {runner.flops_per_step() / t / 1e9:.1f} | {mfu:.1%} "
                f"| {runner.flops_per_step() / t / max(peaks):.1%} "
                f"| {runner.trace_s:.1f} | {runner.compile_s:.1f} "
                f"| {runner.first_step_s:.2f} |"
            )
        lines.append("")
        if args.breakdown:
            lines += [
                "| family | forward ms | forward+backward ms | train step ms "
                "| optimizer + rest ms (step - fwd+bwd) | fwd+bwd MFU (median peak) "
                "| output layer fwd+bwd ms (share of the step) |",
                "|---|---:|---:|---:|---:|---:|---:|",
            ]
            for runner, t, _ in results.values():
                fwd = statistics.median(runner.parts["forward"])
                fb = statistics.median(runner.parts["forward+backward"])
                out = statistics.median(runner.parts["output layer"])
                lines.append(
                    f"| {runner.family} | {fwd * 1e3:.1f} | {fb * 1e3:.1f} | {t * 1e3:.1f} "
                    f"| {(t - fb) * 1e3:.1f} | {runner.flops_per_step() / fb / peak:.1%} "
                    f"| {out * 1e3:.1f} ({out / t:.0%}) |")
            lines.append("")
        if scale in ("tiny", "small") and "glam" in results:
            for family in ("brainformer1", "brainformer2"):
                if family in results:
                    ratio = paired_ratio(results[family][0], results["glam"][0], steps)
                    lines.append(
                        f"- target: {scale} {family} step time <= {scale} glam step time: "
                        f"ratio {ratio:.2f} (median of per-round ratios) -> "
                        f"{'PASS' if ratio <= 1.0 else 'MISS'}")
        if scale == "100m":
            for family, goal in (("dense", 0.5), ("brainformer1", 0.4),
                                 ("brainformer2", 0.4)):
                if family in results:
                    mfu = results[family][2]
                    lines.append(
                        f"- target: {family} MFU >= {goal:.0%}: {mfu:.1%} -> "
                        f"{'PASS' if mfu >= goal else 'MISS'}")
        tables.append("\n".join(lines))
        del runners, results
        gc.collect()
        jax.clear_caches()
    print()
    print("\n\n".join(tables))
    print(f"\nloadavg at end {tuple(round(x, 2) for x in os.getloadavg())}; "
          f"whole run {(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()

"""The train step `model.fit` runs, compiled by XLA's TPU compiler for a TPU
slice this machine does not have.

    report = compile_train_step(get_preset_config("glam_tiny"), "batch=2,expert=2",
                                topology="v4:2x2x1", batch_size=4, sequence_length=128)
    report.peak_bytes, report.fits, report.optimal_seconds, report.collectives

What it does, in the order `keras-brainformer train --mesh` would:

1. `tpu_devices(topology)`: the devices of a Cloud TPU slice named like
   `v4:2x2x1`, `v5e:16x16` or `v5p:8x8x8`, from libtpu's topology
   description (`jax.experimental.topologies`); nothing runs on them.
2. `make_distribution(mesh, experts_on, fsdp, devices)`: the same
   `keras.distribution` as `train --mesh` (`BrainformerBackbone.get_layout_map`).
3. Under that distribution, `abstract_build` builds `BrainformerCausalLM`,
   compiles it with `compile_model` (the command line passes `train`'s own
   `compile_language_model`: Adafactor or AdamW with the paper's schedule,
   cross-entropy on logits, accuracy), builds the optimizer and does `fit`'s
   `_symbolic_build`, without allocating a weight.
4. `make_train_function()` (Keras' JAX trainer: `jax.jit(train_step,
   donate_argnums=0, out_shardings=<the variables' shardings>)`), whose jitted
   step is lowered with the state `fit` would pass (`_get_jax_state`) and a
   batch `({"token_ids", "padding_mask"}, targets)` laid out by
   `distribution.get_data_layout`, as `fit` distributes it. The step is the
   whole of `fit`'s: forward, MoE auxiliary losses, backward, the optimizer
   update and the metrics.
5. `.compile()`: XLA's TPU compiler. Its `memory_analysis()` (per chip),
   `cost_analysis()` (per chip: FLOPs, bytes accessed, `optimal_seconds`, the
   compiler's cost model's time) and the collectives of the partitioned
   program (`as_text()`) make the `TpuCompileReport`.

`optimal_seconds` is XLA's `HloCostAnalysis` total: a per-op roofline (each
op's time from its FLOPs and its bytes at the compiler's rates for the chip,
82-100 % of the published peaks in programs compiled here; collectives count
as HBM traffic, the interconnect is not modelled), summed over the ops with
no overlap. A custom call it cannot cost
adds -1 s (XLA's `HandleCustomCall` marks it "unknown" with -1): the TPU
compiler's memory-space assignment inserts `ConcatBitcast` custom calls when
it prefetches a large array in slices, so most real steps come back negative.
`TpuCompileReport.estimated_seconds` adds those -1 s back (a `ConcatBitcast`
joins slices already in place: zero cost) and is None when the program holds
a custom call not known to be costed; `roofline_seconds` is the whole
program's roofline from its FLOPs and bytes accessed. Both are the
compiler's model, not a measured time (docs/tpu.md).

Needs `libtpu` (`pip install -e ".[tpu]"`, or `pip install "jax[tpu]==<the
installed jax version>"`); without it `LibtpuMissing` (an `OSError`) names
that command.
"""

import dataclasses
import importlib.util
import inspect
import json
import os
import re
import time

import jax
import keras
import numpy as np

from keras_brainformer.distribution.abstract_build import abstract_build
from keras_brainformer.distribution.abstract_build import peak_rss_bytes
from keras_brainformer.distribution.hardware import get_hardware
from keras_brainformer.distribution.memory_plan import format_bytes
from keras_brainformer.distribution.memory_plan import plan_memory
from keras_brainformer.distribution.mesh import distribution_scope
from keras_brainformer.distribution.mesh import expert_axis
from keras_brainformer.distribution.mesh import make_distribution
from keras_brainformer.distribution.mesh import mesh_size
from keras_brainformer.distribution.mesh import parse_mesh_spec
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_causal_lm import BrainformerCausalLM
from keras_brainformer.zoo.parameter_count import count_parameters

INSTALL_HINT = (
    'pip install -e ".[tpu]" (from a checkout), or '
    'pip install "jax[tpu]=={version}" (the installed jax version)'
)
# Cloud TPU generation -> (this package's hardware name, libtpu's chip
# configuration, the device kind libtpu reports). v4 and v5p chips have two
# TensorCores that JAX shows as one device ("megacore"); v5e has one.
GENERATIONS = {
    "v4": ("tpu-v4", "megacore", 3),
    "v5p": ("tpu-v5p", "megacore", 3),
    "v5e": ("tpu-v5e", "default", 2),
}
_TOPOLOGY = re.compile(r"^(v4|v5p|v5e):(\d+(?:x\d+)*)$")
COLLECTIVES = (
    "all-to-all", "ragged-all-to-all", "all-reduce", "all-gather", "reduce-scatter",
    "collective-permute", "collective-broadcast",
)
# Custom calls XLA's cost analysis cannot time: each adds -1 s to
# `optimal_seconds` (`flops` is not lowered by it). ConcatBitcast: with
# libtpu 0.0.42.1, glam_tiny on v4:2x2x1 `batch=2,expert=2`, 4 x 128 tokens,
# has one and gives -0.999064; the same step compiled with
# `xla_tpu_sliced_prefetch_max_slices=0` has none and gives +0.000940.
UNCOSTED_CUSTOM_CALLS = ("ConcatBitcast",)
# Custom calls seen in programs with a positive `optimal_seconds` (17 of them
# in glam_tiny's step; at -1 s each the total could not be positive). The
# AsyncCollective pair: the MoE layer's step on v5e:4x4 (d=2048, E=64,
# 262K tokens, benchmarks/tpu_moe_layer.py) holds one of each and gives
# +0.09545 s compiled without sliced prefetch; with it, 7 ConcatBitcasts and
# -6.90485 s (+7: 0.09515 s).
COSTED_CUSTOM_CALLS = (
    "AssumeGatherIndicesInBound", "GatherScatterIndicesBitpacked",
    "AsyncCollectiveStart", "AsyncCollectiveDone",
)
_ELEMENT_BYTES = {
    "pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}


class LibtpuMissing(OSError):
    """libtpu (XLA's TPU compiler) is not installed; the message says how to
    install it. An `OSError`: the environment lacks it, the input is fine."""


def parse_topology(name):
    """`"v4:2x2x1"` -> `("v4", (2, 2, 1))`; `"v5e:16x16"` -> `("v5e", (16, 16))`.

    Names follow Cloud TPU's slice topologies: `v4` and `v5p` take three
    dimensions (`v4:8x8x8` is 512 chips), `v5e` two (`v5e:16x16`, 256 chips).

    Example:
    >>> parse_topology("v4:2x2x1")
    ('v4', (2, 2, 1))
    """
    match = _TOPOLOGY.match(name.strip()) if isinstance(name, str) else None
    if not match:
        raise ValueError(
            f"Invalid TPU topology {name!r}: expected a Cloud TPU slice such as "
            f"v4:2x2x1, v4:8x8x8, v5e:16x16 or v5p:4x4x4 (generations: "
            f"{', '.join(GENERATIONS)})."
        )
    generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
    wanted = GENERATIONS[generation][2]
    if len(dims) != wanted or min(dims) < 1:
        raise ValueError(
            f"Invalid TPU topology {name!r}: {generation} slices have {wanted} "
            f"positive dimensions (e.g. {'v5e:16x16' if wanted == 2 else generation + ':4x4x4'})."
        )
    return generation, dims


def topology_hardware(name):
    """The `Hardware` entry (peak, HBM) of a topology's chips."""
    return get_hardware(GENERATIONS[parse_topology(name)[0]][0])


def check_libtpu():
    """Raises `LibtpuMissing` unless libtpu is importable."""
    if importlib.util.find_spec("libtpu") is None:
        raise LibtpuMissing(
            "compiling for TPU needs libtpu (XLA's TPU compiler, ~700 MB), which is not "
            "installed: " + INSTALL_HINT.format(version=jax.__version__)
        )


def tpu_devices(topology):
    """The devices of the TPU slice `topology` (e.g. `"v4:2x2x1"`: 4 chips),
    described by libtpu; they can carry shardings and compiled programs but run
    nothing here."""
    generation, dims = parse_topology(topology)
    check_libtpu()
    # libtpu lets one process at a time load it (a lock file in /tmp): a second
    # `compile`, or a test worker, would fail with "Internal error when
    # accessing libtpu multi-process lockfile". Describing a topology opens no
    # TPU chip, so sharing is safe here; a value already set is kept.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Lazy: this module of JAX loads libtpu; only TPU compilation needs it.
    from jax.experimental import topologies

    shape3 = dims + (1,) * (3 - len(dims))
    # A Cloud TPU host holds 2x2x1 chips (v4, v5p, multi-host v5e slices).
    host_bounds = tuple(min(2, d) for d in shape3[:2]) + (1,)
    name = f"{generation}:{'x'.join(map(str, dims))}"
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=name, chip_config_name=GENERATIONS[generation][1],
        chips_per_host_bounds=host_bounds, num_slices=1,
    )
    return list(description.devices)


@dataclasses.dataclass
class TpuCompileReport:
    """What XLA's TPU compiler says of one train step, per chip.

    Attributes:
        preset, mesh, topology, chips, device_kind, batch_size,
        sequence_length, dtype, optimizer, fsdp, experts_on: what was compiled.
        memory: `memory_analysis()` fields in bytes (`argument`, `output`,
            `alias`, `temp`, `generated_code`, `peak`).
        hbm_bytes: one chip's memory (`hardware.py`).
        flops, bytes_accessed, optimal_seconds: `cost_analysis()` of the
            per-chip program, as the compiler returns them (`optimal_seconds`
            is -1 s per uncosted custom call: see `estimated_seconds`).
        memory_bandwidth: one chip's HBM bytes/s (`hardware.py`), for
            `roofline_seconds`.
        collectives: `{kind: {"count", "bytes"}}` in the compiled program
            (each op as written once in its text; bytes are its result's).
        activated_parameters: for MFU (`6 · activated · tokens`).
        plan_total: `plan_memory`'s total for the same step (bytes), for comparison.
        plan_tpu_total: the same with `target="tpu"` (the activation terms
            and phases of XLA's TPU programs; 0 when not computed).
        plan_tpu_arguments, plan_tpu_written: that plan's parts which XLA
            reports apart: the step's arguments (`MemoryPlan.argument_bytes`,
            against `memory["argument"]`) and the optimizer state it writes
            without reading (`MemoryPlan.written_state`, against
            `memory["output"] - memory["alias"]`).
        build_seconds, lower_seconds, compile_seconds: wall time of the
            abstract build, the lowering (tracing) and XLA's compilation.
        build_rss_increase: growth of this process's peak RSS over the
            abstract build (bytes).
        peak_rss: this process's peak RSS at the end (bytes).
        compiler_error: the compiler's out-of-memory message when it refused
            the program (then `memory["peak"]` is the HBM it said it needed,
            and there is no cost or collective); else "".
        custom_calls: `{target: count}` of the program's custom calls (the
            uncosted ones make `optimal_seconds` negative).
    """

    preset: str
    mesh: dict
    topology: str
    chips: int
    device_kind: str
    batch_size: int
    sequence_length: int
    dtype: str
    optimizer: str
    fsdp: bool
    experts_on: str
    memory: dict
    hbm_bytes: int
    peak_flops: float
    flops: float
    bytes_accessed: float
    optimal_seconds: float
    collectives: dict
    activated_parameters: int
    total_parameters: int
    plan_total: int
    build_seconds: float
    lower_seconds: float
    compile_seconds: float
    build_rss_increase: int
    peak_rss: int
    compiler_error: str = ""
    custom_calls: dict = dataclasses.field(default_factory=dict)
    memory_bandwidth: float = 0.0
    plan_tpu_total: int = 0
    plan_tpu_arguments: int = 0
    plan_tpu_written: int = 0

    @property
    def peak_bytes(self):
        return self.memory["peak"]

    @property
    def fits(self):
        return self.peak_bytes <= self.hbm_bytes

    @property
    def tokens(self):
        return self.batch_size * self.sequence_length

    @property
    def uncosted_custom_calls(self):
        """How many custom calls the cost model counted as -1 s
        (`UNCOSTED_CUSTOM_CALLS`)."""
        return sum(self.custom_calls.get(t, 0) for t in UNCOSTED_CUSTOM_CALLS)

    @property
    def unknown_custom_calls(self):
        """Custom-call targets not known to be costed or uncosted: with any,
        the -1 s they may add cannot be told apart, and there is no
        `estimated_seconds`."""
        known = UNCOSTED_CUSTOM_CALLS + COSTED_CUSTOM_CALLS
        return sorted(t for t in self.custom_calls if t not in known)

    @property
    def estimated_seconds(self):
        """The compiler's cost model's step time (`cost_model_seconds`), or
        None (also when the compiler refused the program)."""
        if self.compiler_error:
            return None
        return cost_model_seconds(self.optimal_seconds, self.custom_calls)

    @property
    def has_optimal_seconds(self):
        """Whether the compiler's `optimal_seconds` is a time as returned
        (positive: no uncosted custom call); see `estimated_seconds`."""
        return self.optimal_seconds > 0

    @property
    def roofline_seconds(self):
        """`max(flops / peak, bytes accessed / HBM bandwidth)` of one chip's
        program: the compiler's FLOPs and bytes at the published peaks
        (`hardware.py`), as if every op overlapped perfectly; no
        interconnect time. A lower bound of the cost model's kind, not a
        measurement. None without cost figures."""
        if self.flops <= 0 or not self.memory_bandwidth or not self.peak_flops:
            return None
        return max(self.flops / self.peak_flops, self.bytes_accessed / self.memory_bandwidth)

    @property
    def steps_per_second(self):
        """`1 / estimated_seconds` (the cost model's steps/s), or None."""
        seconds = self.estimated_seconds
        return 1.0 / seconds if seconds else None

    @property
    def tokens_per_second(self):
        seconds = self.estimated_seconds
        return self.tokens / seconds if seconds else None

    @property
    def mfu(self):
        """`6 · activated parameters · tokens / (estimated_seconds · chips ·
        peak)`: the cost model's MFU."""
        seconds = self.estimated_seconds
        if not seconds:
            return None
        model_flops = 6 * self.activated_parameters * self.tokens
        return model_flops / (seconds * self.chips * self.peak_flops)

    @property
    def plan_over_peak(self):
        return self.plan_total / self.peak_bytes if self.peak_bytes else None

    @property
    def plan_tpu_over_peak(self):
        if not (self.plan_tpu_total and self.peak_bytes):
            return None
        return self.plan_tpu_total / self.peak_bytes

    def to_dict(self):
        out = dataclasses.asdict(self)
        out.update(
            peak_bytes=self.peak_bytes, fits=self.fits, steps_per_second=self.steps_per_second,
            tokens_per_second=self.tokens_per_second, mfu=self.mfu,
            plan_over_peak=self.plan_over_peak, plan_tpu_over_peak=self.plan_tpu_over_peak,
            estimated_seconds=self.estimated_seconds,
            uncosted_custom_calls=self.uncosted_custom_calls,
            unknown_custom_calls=self.unknown_custom_calls,
            roofline_seconds=self.roofline_seconds,
        )
        return out

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)

    def _time_lines(self):
        """The cost model's times, each labelled for what it is."""
        if self.compiler_error:
            return []
        lines = []
        n = self.uncosted_custom_calls
        raw = f"optimal_seconds {self.optimal_seconds:.6g}"
        if n:
            raw += (f" as returned: includes -1 s for each of the program's ConcatBitcast "
                    f"custom calls ({n}), which the cost model cannot time")
        lines.append(raw)
        seconds = self.estimated_seconds
        if seconds:
            lines.append(
                f"XLA cost-model step time {seconds * 1e3:.3f} ms (sum of per-op rooflines, no "
                f"overlap, collectives at HBM speed, no interconnect; not measured) -> steps/s "
                f"{self.steps_per_second:.2f}, tokens/s {self.tokens_per_second:,.0f}, MFU "
                f"{self.mfu:.1%} (6 x {self.activated_parameters:,} activated parameters x "
                f"tokens, {self.peak_flops / 1e12:g} TFLOP/s a chip)"
            )
        else:
            why = (f"custom calls of unknown cost: {', '.join(self.unknown_custom_calls)}"
                   if self.unknown_custom_calls else "not positive")
            lines.append(f"XLA cost-model step time: no estimate ({why})")
        roofline = self.roofline_seconds
        if roofline:
            lines.append(
                f"roofline {roofline * 1e3:.3f} ms (max of FLOPs / {self.peak_flops / 1e12:g} "
                f"TFLOP/s and bytes accessed / {self.memory_bandwidth / 1e9:g} GB/s; a lower "
                f"bound, no interconnect)"
            )
        return lines

    def _plan_parts_line(self):
        """The TPU plan part by part against the compiler's split of its peak."""
        m = self.memory
        plan_working = self.plan_tpu_total - self.plan_tpu_arguments - self.plan_tpu_written
        parts = (
            ("arguments", self.plan_tpu_arguments, m["argument"]),
            ("outputs not aliased", self.plan_tpu_written, m["output"] - m["alias"]),
            ("working memory", plan_working, m["peak_beyond_arguments_outputs"]),
        )
        return "  plan / compiler by part: " + ", ".join(
            f"{name} {format_bytes(planned)} / {format_bytes(compiled)}"
            for name, planned, compiled in parts
        )

    def table(self):
        gib = 2**30
        m = self.memory
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        margin = self.hbm_bytes - self.peak_bytes
        lines = [
            f"compiled for {self.topology} ({self.chips} x {self.device_kind}), mesh {mesh}"
            f"{' --fsdp' if self.fsdp else ''}, experts on {self.experts_on}, global batch "
            f"{self.batch_size} x {self.sequence_length} tokens, dtype {self.dtype}, "
            f"optimizer {self.optimizer}",
            "the train step of model.fit (Keras' JAX trainer: forward, MoE auxiliary losses, "
            "backward, optimizer update, metrics)",
            f"{'per chip':<34}{'bytes':>18}{'':>12}",
            f"{'peak memory':<34}{m['peak']:>18,}{m['peak'] / gib:>10.2f} GiB",
            f"{'  arguments (weights, state, batch)':<34}{m['argument']:>18,}"
            f"{m['argument'] / gib:>10.2f} GiB",
            f"{'  working memory':<34}{m['peak_beyond_arguments_outputs']:>18,}"
            f"{m['peak_beyond_arguments_outputs'] / gib:>10.2f} GiB  (peak - arguments - "
            f"outputs not aliased; reported temp {m['temp']:,})",
            f"{'  outputs (aliased)':<34}{m['output']:>18,}{m['output'] / gib:>10.2f} GiB"
            f"  ({m['alias']:,} aliased)",
            f"{'HBM of one chip':<34}{self.hbm_bytes:>18,}{self.hbm_bytes / gib:>10.2f} GiB",
            f"{'plan (keras-brainformer plan)':<34}{self.plan_total:>18,}"
            f"{self.plan_total / gib:>10.2f} GiB  (plan / compiler peak "
            f"{self.plan_over_peak:.2f})",
        ]
        if self.plan_tpu_total:
            lines.append(
                f"{'plan for TPU (target tpu)':<34}{self.plan_tpu_total:>18,}"
                f"{self.plan_tpu_total / gib:>10.2f} GiB  (plan / compiler peak "
                f"{self.plan_tpu_over_peak:.2f})"
            )
            lines.append(self._plan_parts_line())
        lines += [
            f"fits: {'yes' if self.fits else 'NO'}, "
            f"{abs(margin) / gib:.2f} GiB {'to spare' if margin >= 0 else 'too much'}",
        ]
        if self.compiler_error:
            lines.append(f"the TPU compiler refused the program: {self.compiler_error}")
        lines += [
            "",
            f"FLOPs per chip {self.flops:.4g}, bytes accessed {self.bytes_accessed:.4g}",
        ]
        lines += self._time_lines()
        lines.append("")
        lines.append(f"{'collective':<22}{'count':>7}{'bytes':>18}")
        if not self.collectives:
            lines.append("(none)")
        for kind, entry in sorted(self.collectives.items()):
            lines.append(f"{kind:<22}{entry['count']:>7}{entry['bytes']:>18,}")
        lines.append("")
        lines.append(
            f"times: abstract build {self.build_seconds:.1f} s (peak RSS +"
            f"{self.build_rss_increase / 2**20:.0f} MiB), lowering {self.lower_seconds:.1f} s, "
            f"TPU compilation {self.compile_seconds:.1f} s; peak RSS "
            f"{self.peak_rss / gib:.2f} GiB"
        )
        return "\n".join(lines)


def default_compile_model(lm, optimizer):
    """Compiles `lm` as a plain Keras user would (`optimizer` by name,
    cross-entropy on logits, accuracy) and builds the optimizer; the command
    line passes `train`'s own `compile_language_model` instead."""
    lm.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )
    lm.optimizer.build(lm.trainable_variables)


def compile_train_step(
    config, mesh, topology, batch_size=None, sequence_length=None, optimizer="adafactor",
    dtype="float32", fsdp=False, experts_on=None, compile_model=None, preset="",
    verbose=False,
):
    """Builds `BrainformerCausalLM(config)` without allocating, lowers the train
    step `fit` runs on `mesh` over the TPU slice `topology` and compiles it.

    Args:
        config: a `BrainformerBackbone` config dict.
        mesh: a mesh spec (`"batch=2,expert=2"`) or parsed dict; its size must
            equal the slice's chip count.
        topology: a Cloud TPU slice (`parse_topology`).
        batch_size: global batch (default: one sequence per batch shard).
        sequence_length: tokens per sequence (default: the preset's maximum).
        optimizer: `"adafactor"` or `"adamw"`, passed to `compile_model`.
        dtype: `"float32"`, `"bfloat16"` or `"mixed_bfloat16"` (the model's
            dtype policy).
        fsdp, experts_on: as `make_distribution`.
        compile_model: `compile_model(lm, optimizer)` compiles the task and
            builds its optimizer (default `default_compile_model`).
        preset: a name for the report.
        verbose: print each phase as it ends.

    Returns:
        A `TpuCompileReport`.
    """
    sizes = parse_mesh_spec(mesh) if isinstance(mesh, str) else dict(mesh)
    devices = tpu_devices(topology)
    if mesh_size(sizes) != len(devices):
        raise ValueError(
            f"The mesh {sizes} has {mesh_size(sizes)} devices but the TPU slice "
            f"{topology} has {len(devices)} chips; make the product of the mesh sizes "
            f"{len(devices)}."
        )
    if batch_size is None:
        batch_size = sizes["batch"]
    if sequence_length is None:
        sequence_length = config.get("max_sequence_length", 2048)
    axis = expert_axis(sizes, experts_on, fsdp)
    # The analytic plan first: it also refuses, naming the weight, a split that
    # does not divide (before anything is built).
    plan = plan_memory(
        config, sizes, batch_size, sequence_length, dtype=dtype, optimizer=optimizer,
        fsdp=fsdp, expert_dim_name=axis,
    )
    plan_tpu = plan_memory(
        config, sizes, batch_size, sequence_length, dtype=dtype, optimizer=optimizer,
        fsdp=fsdp, expert_dim_name=axis, target="tpu",
    )
    hardware = topology_hardware(topology)
    distribution = make_distribution(sizes, experts_on=experts_on, fsdp=fsdp, devices=devices)
    compile_model = compile_model or default_compile_model
    token_shape = (batch_size, sequence_length)

    with distribution_scope(distribution):
        data = _batch_structs(distribution, token_shape)

        def build():
            backbone = BrainformerBackbone.from_config({**config, "dtype": dtype})
            lm = BrainformerCausalLM(backbone, preprocessor=None)
            compile_model(lm, optimizer)
            # What `fit` does before its first step: build the compiled loss and
            # metrics from one batch's shapes.
            lm._symbolic_build(data_batch=data)
            return lm

        rss_before = peak_rss_bytes()
        start = time.perf_counter()
        lm = abstract_build(build)
        build_seconds = time.perf_counter() - start
        build_rss = peak_rss_bytes() - rss_before
        if verbose:
            print(f"built without allocating in {build_seconds:.1f} s", flush=True)

        lm.make_train_function()
        step = _jitted_train_step(lm)
        state = lm._get_jax_state(
            trainable_variables=True, non_trainable_variables=True,
            optimizer_variables=True, metrics_variables=True,
        )
        start = time.perf_counter()
        lowered = step.lower(state, data)
        lower_seconds = time.perf_counter() - start
        if verbose:
            print(f"lowered in {lower_seconds:.1f} s; compiling for {topology}", flush=True)
    start = time.perf_counter()
    compiler_error = ""
    try:
        compiled = lowered.compile()
    except Exception as error:  # XLA's error type is not public: match its text
        used = _out_of_memory(str(error))
        if used is None:
            raise
        compiled, compiler_error = None, str(error).strip().splitlines()[0][:500]
    compile_seconds = time.perf_counter() - start

    if compiled is None:
        memory = {name: 0 for name in ("argument", "output", "alias", "temp",
                                       "generated_code", "peak_beyond_arguments_outputs")}
        memory["peak"] = used
        cost, found, calls = {}, {}, {}
    else:
        memory = _memory(compiled.memory_analysis())
        cost = _cost(compiled.cost_analysis())
        text = compiled.as_text()
        found = collectives(text)
        calls = custom_calls(text)
    counts = count_parameters(config)
    return TpuCompileReport(
        preset=preset, mesh=sizes, topology=topology, chips=len(devices),
        device_kind=devices[0].device_kind, batch_size=batch_size,
        sequence_length=sequence_length, dtype=dtype, optimizer=optimizer, fsdp=fsdp,
        experts_on=axis or "replicated", memory=memory, hbm_bytes=hardware.memory_bytes,
        peak_flops=hardware.peak("bfloat16"), memory_bandwidth=hardware.memory_bandwidth,
        flops=cost.get("flops", 0.0),
        bytes_accessed=cost.get("bytes accessed", 0.0),
        optimal_seconds=cost.get("optimal_seconds", 0.0),
        collectives=found, custom_calls=calls, compiler_error=compiler_error,
        activated_parameters=counts["activated"], total_parameters=counts["total"],
        plan_total=plan.total, plan_tpu_total=plan_tpu.total,
        plan_tpu_arguments=plan_tpu.argument_bytes, plan_tpu_written=plan_tpu.written_state,
        build_seconds=build_seconds,
        lower_seconds=lower_seconds, compile_seconds=compile_seconds, build_rss_increase=build_rss,
        peak_rss=peak_rss_bytes(),
    )


def _batch_structs(distribution, token_shape):
    """One batch as `fit` feeds it (`({"token_ids", "padding_mask"}, targets)`,
    int32 `[B, T]`), each laid out by `distribution.get_data_layout` as Keras'
    JAX trainer distributes its input."""
    sharding = distribution.get_data_layout(token_shape).backend_layout

    def struct():
        return jax.ShapeDtypeStruct(token_shape, np.int32, sharding=sharding)

    return ({"token_ids": struct(), "padding_mask": struct()}, struct())


def _jitted_train_step(lm):
    """The jitted step inside Keras' `train_function` (`make_train_function`
    wraps `jit(train_step, donate_argnums=0, out_shardings=...)` in an
    iterator loop; with `steps_per_execution=1` the loop is one call)."""
    if lm.steps_per_execution != 1:
        raise ValueError("compile the model with steps_per_execution=1")
    step = inspect.getclosurevars(lm.train_function).nonlocals.get("step_function")
    if step is None or not hasattr(step, "lower"):
        raise RuntimeError(
            "Keras' JAX trainer changed: its train_function no longer wraps a jitted "
            "step named `step_function` (keras/src/backend/jax/trainer.py)."
        )
    return step


def _memory(analysis):
    names = ("argument", "output", "alias", "temp", "generated_code")
    memory = {name: int(getattr(analysis, f"{name}_size_in_bytes", 0)) for name in names}
    peak = getattr(analysis, "peak_memory_in_bytes", None)
    # Without a peak from the compiler: what is live at once at most.
    live = memory["argument"] + memory["output"] - memory["alias"]
    memory["peak"] = int(peak) if peak else live + memory["temp"]
    # libtpu reports `temp_size_in_bytes` 0 (seen with libtpu 0.0.42.1); what
    # the peak holds beyond the arguments and the outputs not written over
    # them is the working memory.
    memory["peak_beyond_arguments_outputs"] = max(0, memory["peak"] - live)
    return memory


_USED = re.compile(
    r"(?:Used ([0-9.]+)([KMGT]) of [0-9.]+[KMGT] hbm"
    r"|required for HLO temporaries \(([0-9.]+)([KMGT])\) exceeds available HBM)"
)


def _out_of_memory(message):
    """The bytes XLA said it needed when it refused a program for want of HBM,
    else None: `Used 40.12G of 31.25G hbm`, or (libtpu 0.0.42.1) `the total
    memory required for HLO temporaries (40.38G) exceeds available HBM
    (30.75G)`, which counts the temporaries only (a lower bound of the peak).

    Example:
    >>> _out_of_memory("RESOURCE_EXHAUSTED: ... required for HLO temporaries (1.5G) "
    ...                "exceeds available HBM (30.75G).") == int(1.5 * 2**30)
    True
    """
    match = _USED.search(message)
    if "RESOURCE_EXHAUSTED" not in message or not match:
        return None
    number, unit = (match.group(1), match.group(2)) if match.group(1) else match.group(3, 4)
    return int(float(number) * 1024 ** " KMGT".index(unit))


def cost_model_seconds(optimal_seconds, calls):
    """The time of XLA's cost model: `optimal_seconds` with the -1 s of each
    uncosted custom call (`UNCOSTED_CUSTOM_CALLS`; `calls` is `{target:
    count}`) taken back out: the sum of the per-op rooflines of every other
    op (a `ConcatBitcast` joins prefetched slices in place: no cost of its
    own). None where a custom call of unknown costing is present or the sum
    is not positive. A model of one chip's time (no overlap between ops,
    collectives at HBM speed, no interconnect), not a measurement.

    Example:
    >>> round(cost_model_seconds(-0.999064, {"ConcatBitcast": 1}), 6)
    0.000936
    >>> cost_model_seconds(-0.5, {"SomeKernel": 1}) is None
    True
    """
    known = UNCOSTED_CUSTOM_CALLS + COSTED_CUSTOM_CALLS
    if any(target not in known for target in calls):
        return None
    seconds = optimal_seconds + sum(calls.get(t, 0) for t in UNCOSTED_CUSTOM_CALLS)
    return seconds if seconds > 0 else None


def _cost(analysis):
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
    return {key: float(value) for key, value in (analysis or {}).items()
            if isinstance(value, (int, float))}


_OP = re.compile(
    r"^\s*(?:ROOT\s+)?%[\w.-]+\s*=\s*(.*?)\s("
    + "|".join(COLLECTIVES) + r")(-start|-done)?\("
)
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def collectives(hlo_text):
    """`{kind: {"count", "bytes"}}` of the collectives in compiled HLO text.

    An asynchronous pair (`all-gather-start` / `-done`) counts once, with the
    bytes of its `-done` result; a synchronous op with its result's bytes.
    Ops inside a loop body count once, not once per iteration.

    Example:
    >>> collectives("%a = bf16[4,8]{1,0} all-to-all(bf16[4,8]{1,0} %x)")
    {'all-to-all': {'count': 1, 'bytes': 64}}
    """
    found = {}
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if not match or match.group(3) == "-start":
            continue
        shape, kind = match.group(1), match.group(2)
        entry = found.setdefault(kind, {"count": 0, "bytes": 0})
        entry["count"] += 1
        entry["bytes"] += _shape_bytes(shape)
    return found


_CUSTOM_CALL = re.compile(r'custom_call_target="([^"]+)"')


def custom_calls(hlo_text):
    """`{target: count}` of the custom calls in compiled HLO text."""
    found = {}
    for target in _CUSTOM_CALL.findall(hlo_text):
        found[target] = found.get(target, 0) + 1
    return found


def _shape_bytes(shape):
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        size = _ELEMENT_BYTES.get(dtype, 4)
        for dim in filter(None, dims.split(",")):
            size *= int(dim)
        total += size
    return total

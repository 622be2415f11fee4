"""Predicted time of one training step of a Brainformer on a device mesh: a
roofline per sublayer plus the collectives its layout implies.

`predict_step_time(config, mesh, batch_size, sequence_length, hardware, ...)`
returns a `StepTimePlan`. Like the memory planner it reads the config only:
every matmul's shape is the per-device shape of a weight from
`shard_weights` (the analytic weight model of `zoo/weight_specs.py` under the
layout map), every MoE tensor's from `moe_dispatch_geometry` (the router's
own `compute_capacity`), so an 8B plan takes milliseconds.

**Compute.** One step is a list of `Term`s, each in one part (`PARTS`):
attention, dense FFN, MoE router, MoE dispatch/combine, MoE expert matmuls,
norms and residuals, embedding and output layer, optimizer update. A term's
time is its roofline, `max(flops / matmul peak, bytes / memory bandwidth)`,
per device:

- a matmul `[m, k] @ [k, n]` (times `count`: heads, experts) costs
  `3 · 2·m·k·n` FLOPs for forward + backward (the forward product, the
  input gradient and the weight gradient) and moves `3 · (m·k + k·n + m·n)`
  elements (each of the three products reads two operands and writes one);
- an elementwise op (norms, activations, softmax, gathers, the optimizer
  update) moves a stated number of bytes and is memory-bound;
- the peak is the hardware's for the compute dtype (the router's matmul is
  float32 under every policy).

The expert matmuls have `m = G_local · C` rows per expert: the capacity
padding (`C` slots per expert and group, `capacity_factor` included) is
paid in full, and with few rows per expert the term turns memory-bound
(the weights are read for few rows).

**Communication**, with ring algorithms on the axis' devices (`n` of them,
`B` the link bandwidth, `α` the per-step latency): all-reduce of `S` bytes
`2·(n-1)/n · S / B + 2·(n-1)·α`; all-gather, reduce-scatter (`S` the full
size) and all-to-all (`S` the local buffer) `(n-1)/n · S / B + (n-1)·α`.
Keras' `ModelParallel` splits the input batch along `batch` only, so the
devices of the `expert` and `model` axes hold the same tokens. Then:

- experts on the `expert` axis: the dispatched tokens are a local slice; the
  expert outputs are all-gathered over the `expert` axis (forward combine)
  and so are the dispatched inputs' gradients (backward): 2 all-gathers;
- experts on the `batch` axis (GShard): 4 all-to-alls of the local
  dispatched buffer (dispatch and combine, forward and backward);
- gradients of a weight not split along `batch` are all-reduced over it;
  with fsdp, a weight split along `batch` is all-gathered twice (forward,
  backward) and its gradient reduce-scattered;
- a `model` axis: 2 all-reduces of the activations per attention, dense FFN,
  MoE (expert hidden split) and the embedding / output layer.

Compute and communication add up (no overlap); `overlapped_seconds` is the
other extreme, `max` of the two. MFU is `6 · activated parameters · tokens`
(`count_parameters`, attention's `T²` left out, as in
`benchmarks/training_throughput.py`) over step time · chips · peak.
docs/performance_model.md checks the model against measured step times
here and against the paper's steps/s.

Example:
>>> from keras_brainformer.models.brainformer.brainformer_presets import (
...     get_preset_config)
>>> plan = predict_step_time(get_preset_config("glam_tiny"), "batch=1",
...     batch_size=8, sequence_length=256, hardware="h100")
>>> plan.communication_seconds
0.0
>>> 0 < plan.mfu < 1
True
"""

import collections
import dataclasses
import math

from keras_brainformer.distribution.hardware import Hardware
from keras_brainformer.distribution.hardware import get_hardware
from keras_brainformer.distribution.memory_plan import axis_sizes
from keras_brainformer.distribution.memory_plan import dispatched_tensor_axes
from keras_brainformer.distribution.memory_plan import moe_dispatch_geometry
from keras_brainformer.distribution.memory_plan import shard_weights
from keras_brainformer.distribution.mesh import MESH_AXES
from keras_brainformer.layers.activations import is_gated
from keras_brainformer.models.brainformer.block_spec import config_block_specs
from keras_brainformer.zoo.parameter_count import count_parameters
from keras_brainformer.zoo.weight_specs import DTYPE_BYTES
from keras_brainformer.zoo.weight_specs import DTYPE_POLICIES
from keras_brainformer.zoo.weight_specs import compute_dtype
from keras_brainformer.zoo.weight_specs import variable_dtype

PARTS = (
    "attention",
    "dense ffn",
    "moe router",
    "moe dispatch/combine",
    "moe experts",
    "norms and residuals",
    "embedding and output",
    "optimizer update",
    "experts all-gather / all-to-all",
    "gradient all-reduce",
    "fsdp all-gather / reduce-scatter",
    "tensor-parallel all-reduce",
)
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all")
# Bytes an elementwise op moves per element of its output, forward + backward:
# forward reads x, writes y; backward reads dy and x, writes dx.
ELEMENTWISE_PASSES = 5
# Optimizer update, element reads + writes per trainable weight entry (Keras):
# AdamW reads p, g, m, v and writes p, m, v; Adafactor reads p, g, forms g²,
# its row / column means, the velocity, the update and its RMS, writes p, v.
OPTIMIZER_PASSES = {"adamw": 7, "adafactor": 10}
_F32 = 4


@dataclasses.dataclass(frozen=True)
class Term:
    """One cost of a step on one device.

    Attributes:
        part: one of `PARTS`.
        name: what it is (e.g. `"block_0/0_attention q"`).
        flops: matmul FLOPs (0 for elementwise ops and collectives).
        bytes: bytes moved to and from memory, or over links (collectives).
        dtype: compute dtype whose matmul peak applies.
        collective: None, or one of `COLLECTIVES`.
        axis: the mesh axis of a collective.
        group: devices in the collective.
    """

    part: str
    name: str
    flops: float = 0.0
    bytes: float = 0.0
    dtype: str = "float32"
    collective: str = None
    axis: str = None
    group: int = 1


def matmul_term(part, name, m, k, n, element_bytes, dtype, count=1):
    """Forward + backward of `count` products `[m, k] @ [k, n]`: `3·2·m·k·n`
    FLOPs and `3·(m·k + k·n + m·n)` elements moved, each.

    Example:
    >>> t = matmul_term("dense ffn", "w_in", 4, 8, 16, 2, "bfloat16")
    >>> t.flops == 2 * 4 * 8 * 16 * 3, t.bytes == 3 * (32 + 128 + 64) * 2
    (True, True)
    """
    return Term(
        part, name,
        flops=3 * count * 2 * m * k * n,
        bytes=3 * count * (m * k + k * n + m * n) * element_bytes,
        dtype=dtype,
    )


def elementwise_term(part, name, nbytes):
    """A memory-bound op moving `nbytes` bytes (forward + backward)."""
    return Term(part, name, bytes=nbytes)


def collective_seconds(kind, nbytes, group, bandwidth, latency):
    """Ring-algorithm time of one collective over `group` devices (see the
    module docstring); 0 on one device.

    Example:
    >>> collective_seconds("all-reduce", 1e9, 1, 1e11, 1e-6)
    0.0
    >>> round(collective_seconds("all-reduce", 1e9, 4, 1e11, 0.0), 6)
    0.015
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"Unknown collective {kind!r}. Allowed values: {COLLECTIVES}.")
    if group <= 1 or nbytes <= 0:
        return 0.0
    fraction = (group - 1) / group
    if kind == "all-reduce":
        return 2 * fraction * nbytes / bandwidth + 2 * (group - 1) * latency
    return fraction * nbytes / bandwidth + (group - 1) * latency


def axis_bandwidth(hardware, sizes, axis):
    """Link bandwidth a collective on mesh axis `axis` gets: the devices are
    numbered with the last mesh axis fastest, so an axis whose ring spans more
    than one node (`chips_per_node`) runs at the network bandwidth."""
    if hardware.chips_per_node is None or hardware.network_bandwidth is None:
        return hardware.link_bandwidth
    names = list(sizes)
    stride = math.prod(sizes[name] for name in names[names.index(axis) + 1:])
    span = stride * sizes[axis]
    if span <= hardware.chips_per_node:
        return hardware.link_bandwidth
    return hardware.network_bandwidth


def term_seconds(term, hardware, sizes):
    """Seconds of one `Term` on `hardware` (roofline or collective)."""
    if term.collective is not None:
        return collective_seconds(
            term.collective, term.bytes, term.group,
            axis_bandwidth(hardware, sizes, term.axis), hardware.collective_latency_s,
        )
    compute = term.flops / hardware.peak(term.dtype) if term.flops else 0.0
    return max(compute, term.bytes / hardware.memory_bandwidth)


def _collective(part, name, kind, nbytes, axis, sizes):
    group = sizes.get(axis, 1) if axis is not None else 1
    return Term(part, name, bytes=nbytes, collective=kind, axis=axis, group=group)


def step_terms(config, mesh, batch_size, sequence_length, dtype="float32",
               optimizer="adafactor", fsdp=False, expert_dim_name="expert"):
    """Every `Term` of one training step on one device (see the module
    docstring). `expert_dim_name` is the axis the expert banks are split
    along (`mesh.expert_axis`), None to replicate them."""
    sizes = axis_sizes(mesh)
    names = tuple(sizes)
    nb = sizes["batch"]
    nm = sizes.get("model", 1)
    cdt = compute_dtype(dtype)
    a = DTYPE_BYTES[cdt]
    vb = DTYPE_BYTES[variable_dtype(dtype)]
    B, T = batch_size, sequence_length
    b = B // nb
    N = b * T
    d = config["hidden_dim"]
    used = shard_weights(config, sizes, False, dtype, expert_dim_name=expert_dim_name)
    stored = shard_weights(config, sizes, fsdp, dtype, expert_dim_name=expert_dim_name)
    tensor_axes = dispatched_tensor_axes(names, "batch", "model", expert_dim_name, fsdp)
    terms = []

    def tensor_parallel(name, nbytes, count=2):
        if nm > 1:
            for i in range(count):
                terms.append(_collective(
                    "tensor-parallel all-reduce", f"{name} ({i + 1}/{count})",
                    "all-reduce", nbytes, "model", sizes))

    norm_bytes = (ELEMENTWISE_PASSES + 3) * N * d * a  # norm + residual add
    for i, spec in enumerate(config_block_specs(config)):
        for j, sub in enumerate(spec.sublayers):
            prefix = f"block_{i}/{j}_{sub.kind}"
            terms.append(elementwise_term("norms and residuals", f"{prefix}_norm", norm_bytes))
            if sub.kind == "attention":
                _, H, hd = used[f"{prefix}/w_query"].local_shape
                Hkv = used[f"{prefix}/w_key"].local_shape[1]
                terms.append(matmul_term("attention", f"{prefix} q", N, d, H * hd, a, cdt))
                terms.append(matmul_term("attention", f"{prefix} k,v", N, d, Hkv * hd, a, cdt,
                                         count=2))
                terms.append(matmul_term("attention", f"{prefix} output", N, H * hd, d, a, cdt))
                terms.append(matmul_term("attention", f"{prefix} scores q·k", T, hd, T, a, cdt,
                                         count=b * H))
                terms.append(matmul_term("attention", f"{prefix} probs·v", T, T, hd, a, cdt,
                                         count=b * H))
                # float32 scores, softmax, probabilities and their cast, fwd + bwd.
                terms.append(elementwise_term(
                    "attention", f"{prefix} softmax", b * H * T * T * (5 * _F32 + a)))
                rope = N * (H + Hkv) * hd * a * ELEMENTWISE_PASSES
                conv = 3 * N * H * hd * a * ELEMENTWISE_PASSES if sub.depthwise_conv_kernel else 0
                terms.append(elementwise_term("attention", f"{prefix} rope, conv", rope + conv))
                tensor_parallel(f"{prefix}", N * d * a)
            elif sub.kind == "ffn":
                _, h = used[f"{prefix}/w_in"].local_shape
                gated = is_gated(sub.activation)
                terms.append(matmul_term("dense ffn", f"{prefix} in", N, d, h, a, cdt,
                                         count=2 if gated else 1))
                terms.append(matmul_term("dense ffn", f"{prefix} out", N, h, d, a, cdt))
                terms.append(elementwise_term(
                    "dense ffn", f"{prefix} activation", (8 if gated else 5) * N * h * a))
                tensor_parallel(f"{prefix}", N * d * a)
            else:
                geometry = moe_dispatch_geometry(sub, B, T, sizes, tensor_axes)
                E, E_local = geometry.experts, geometry.experts_local
                rows = geometry.groups_local * geometry.capacity  # per expert
                slots = E_local * rows
                # Router: float32 logits on the local tokens; softmax, top-k
                # or top-C, the slot table and the losses: ~10 float32 passes.
                terms.append(matmul_term("moe router", f"{prefix} logits", N, d, E, _F32,
                                         "float32"))
                terms.append(elementwise_term(
                    "moe router", f"{prefix} softmax, top-k, slots", 10 * N * E * _F32))
                # Gather into [E, G, C, d] (and its scatter-add backward);
                # combine: gate-weighted float32 segment-sum, and backward.
                terms.append(elementwise_term(
                    "moe dispatch/combine", f"{prefix} dispatch", 4 * slots * d * a))
                terms.append(elementwise_term(
                    "moe dispatch/combine", f"{prefix} combine",
                    2 * slots * d * (a + _F32) + 2 * N * d * _F32))
                _, _, h = used[f"{prefix}/experts/w_in"].local_shape
                gated = is_gated(sub.activation)
                terms.append(matmul_term("moe experts", f"{prefix} in ({E_local}x{rows} rows)",
                                         rows, d, h, a, cdt,
                                         count=E_local * (2 if gated else 1)))
                terms.append(matmul_term("moe experts", f"{prefix} out", rows, h, d, a, cdt,
                                         count=E_local))
                terms.append(elementwise_term(
                    "moe experts", f"{prefix} activation", (8 if gated else 5) * slots * h * a))
                expert_axis = tensor_axes[0]
                part = "experts all-gather / all-to-all"
                if expert_axis == "batch":
                    for what in ("dispatch", "combine", "dispatch grad", "combine grad"):
                        terms.append(_collective(part, f"{prefix} {what}", "all-to-all",
                                                 slots * d * a, "batch", sizes))
                elif expert_axis is not None:
                    full = E * geometry.groups_local * geometry.capacity * d * a
                    for what in ("outputs", "input grads"):
                        terms.append(_collective(part, f"{prefix} {what}", "all-gather",
                                                 full, expert_axis, sizes))
                if used[f"{prefix}/experts/w_in"].axes[2] == "model":
                    tensor_parallel(f"{prefix}", slots * d * a)
                if sub.shared_expert_intermediate_dim is not None:
                    # Qwen-MoE's shared expert: a dense FFN on every local
                    # token, and its sigmoid gate.
                    _, hs = used[f"{prefix}/shared_expert/w_in"].local_shape
                    terms.append(matmul_term("moe experts", f"{prefix} shared expert in",
                                             N, d, hs, a, cdt, count=2 if gated else 1))
                    terms.append(matmul_term("moe experts", f"{prefix} shared expert out",
                                             N, hs, d, a, cdt))
                    terms.append(matmul_term("moe experts", f"{prefix} shared expert gate",
                                             N, d, 1, a, cdt))
                    terms.append(elementwise_term(
                        "moe experts", f"{prefix} shared expert activation, gating",
                        (8 if gated else 5) * N * hs * a + 4 * N * d * a))
                    if used[f"{prefix}/shared_expert/w_in"].axes[1] == "model":
                        tensor_parallel(f"{prefix} shared expert", N * d * a)
    terms.append(elementwise_term("norms and residuals", "final_norm",
                                  ELEMENTWISE_PASSES * N * d * a))
    V, _ = used["token_embedding/embeddings"].local_shape
    # Lookup (and its dense float32 gradient buffer), output projection,
    # cross-entropy: logits, float32 copy, log-softmax, targets, backward.
    terms.append(elementwise_term("embedding and output", "lookup",
                                  ELEMENTWISE_PASSES * N * d * a + V * d * _F32))
    terms.append(matmul_term("embedding and output", "logits", N, d, V, a, cdt))
    terms.append(elementwise_term("embedding and output", "softmax cross-entropy",
                                  N * V * (2 * a + 5 * _F32)))
    tensor_parallel("embedding and output", N * d * a)

    trainable = [s for s in stored.values() if s.trainable]
    local = sum(math.prod(s.local_shape) for s in trainable)
    terms.append(elementwise_term("optimizer update", optimizer,
                                  OPTIMIZER_PASSES[optimizer] * local * vb))
    if cdt != variable_dtype(dtype):
        # Each device casts its own shard: under fsdp XLA casts the stored
        # shard and all-gathers it in the compute dtype (`dense_8b` on 512 v4
        # chips gathers 6.68 GB of bf16 and 0.23 GB of float32 a chip; the
        # fsdp all-gather terms below move `a` bytes an element). The
        # gradient's cast is counted at the same, stored size.
        terms.append(elementwise_term("optimizer update", "bf16 weight and gradient casts",
                                      local * (vb + a) * 2))
    if nb > 1:
        replicated = 0
        for s in trainable:
            n = math.prod(s.local_shape)
            if "batch" in s.axes:  # fsdp-split: gathered to use, gradient scattered
                if "batch" not in used[s.path].axes:
                    for what in ("forward", "backward"):
                        terms.append(_collective(
                            "fsdp all-gather / reduce-scatter", f"{s.path} {what}",
                            "all-gather", n * nb * a, "batch", sizes))
                    terms.append(_collective(
                        "fsdp all-gather / reduce-scatter", f"{s.path} gradient",
                        "reduce-scatter", n * nb * vb, "batch", sizes))
            else:
                replicated += n * vb
        terms.append(_collective("gradient all-reduce", "weights replicated over batch",
                                 "all-reduce", replicated, "batch", sizes))
    return terms


@dataclasses.dataclass
class StepTimePlan:
    """Predicted time of one training step (seconds, per device = per step).

    Attributes:
        hardware: the `Hardware` entry.
        mesh: mesh axis sizes; `chips` their product.
        batch_size, sequence_length, dtype, optimizer, fsdp, experts_on: as
            planned.
        terms: every `Term`, with `seconds` (same order) its time.
        parts: part -> seconds (only parts that cost something).
        compute_seconds, communication_seconds: the two sums.
        model_flops: `6 · activated parameters · tokens` of the whole step.
        executed_flops: matmul FLOPs one device executes.
    """

    hardware: Hardware
    mesh: dict
    chips: int
    batch_size: int
    sequence_length: int
    dtype: str
    optimizer: str
    fsdp: bool
    experts_on: str
    terms: list = dataclasses.field(repr=False)
    seconds: list = dataclasses.field(repr=False)
    parts: dict = dataclasses.field(default_factory=dict)
    compute_seconds: float = 0.0
    communication_seconds: float = 0.0
    model_flops: float = 0.0
    executed_flops: float = 0.0

    @property
    def step_seconds(self):
        """Compute + communication (no overlap)."""
        return self.compute_seconds + self.communication_seconds

    @property
    def overlapped_seconds(self):
        """The other extreme: communication fully hidden behind compute."""
        return max(self.compute_seconds, self.communication_seconds)

    @property
    def steps_per_second(self):
        return 1.0 / self.step_seconds

    @property
    def tokens_per_second(self):
        return self.batch_size * self.sequence_length / self.step_seconds

    @property
    def peak(self):
        """Matmul FLOP/s of one chip in the compute dtype."""
        return self.hardware.peak(compute_dtype(self.dtype))

    @property
    def mfu(self):
        """Model FLOP utilisation: `model_flops` / (step · chips · peak)."""
        return self.model_flops / (self.step_seconds * self.chips * self.peak)

    def part_bounds(self):
        """part -> `"compute"`, `"memory"` or `"network"`: what limits most of
        the part's time."""
        bounds = {}
        for part in self.parts:
            by = collections.Counter()
            for term, seconds in zip(self.terms, self.seconds):
                if term.part != part:
                    continue
                if term.collective is not None:
                    by["network"] += seconds
                elif term.flops / self.hardware.peak(term.dtype) >= seconds:
                    by["compute"] += seconds
                else:
                    by["memory"] += seconds
            bounds[part] = by.most_common(1)[0][0]
        return bounds

    def to_dict(self):
        """The JSON view (`plan --json`)."""
        bounds = self.part_bounds()
        return {
            "hardware": self.hardware.name,
            "mesh": dict(self.mesh),
            "chips": self.chips,
            "batch_size": self.batch_size,
            "sequence_length": self.sequence_length,
            "dtype": self.dtype,
            "optimizer": self.optimizer,
            "fsdp": self.fsdp,
            "experts_on": self.experts_on,
            "step_seconds": self.step_seconds,
            "compute_seconds": self.compute_seconds,
            "communication_seconds": self.communication_seconds,
            "overlapped_seconds": self.overlapped_seconds,
            "steps_per_second": self.steps_per_second,
            "tokens_per_second": self.tokens_per_second,
            "model_flops": self.model_flops,
            "mfu": self.mfu,
            "parts": {
                part: {"seconds": s, "share": s / self.step_seconds, "bound": bounds[part]}
                for part, s in self.parts.items()
            },
        }

    def table(self):
        """A human-readable table: one row per part, then the totals."""
        hw = self.hardware
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        cdt = compute_dtype(self.dtype)
        lines = [
            f"step time on {self.chips} x {hw.name} ({self.peak / 1e12:g} TFLOP/s {cdt}, "
            f"{hw.memory_bandwidth / 1e9:g} GB/s memory, {hw.link_bandwidth / 1e9:g} GB/s "
            f"links), mesh {mesh}, experts on {self.experts_on or 'replicated'}, global batch "
            f"{self.batch_size} x {self.sequence_length} tokens, dtype {self.dtype}, "
            f"optimizer {self.optimizer}, fsdp {'on' if self.fsdp else 'off'}",
            f"{'part (per device)':<36}{'ms':>12}{'share':>8}  bound",
        ]
        bounds = self.part_bounds()
        for part, seconds in self.parts.items():
            lines.append(f"{part:<36}{seconds * 1e3:>12.3f}{seconds / self.step_seconds:>8.1%}"
                         f"  {bounds[part]}")
        lines += [
            f"{'step time':<36}{self.step_seconds * 1e3:>12.3f}  (compute "
            f"{self.compute_seconds * 1e3:.3f} + communication "
            f"{self.communication_seconds * 1e3:.3f} ms; fully overlapped "
            f"{self.overlapped_seconds * 1e3:.3f} ms)",
            f"steps/s {self.steps_per_second:.4g}, tokens/s {self.tokens_per_second:,.0f}, "
            f"MFU {self.mfu:.1%} (6 x activated parameters x tokens)",
        ]
        return "\n".join(lines)


def predict_step_time(config, mesh, batch_size, sequence_length, hardware,
                      chips=None, dtype="float32", optimizer="adafactor", fsdp=False,
                      expert_dim_name="expert"):
    """Predicted time of one training step of `config` on `mesh`.

    Args:
        config: `BrainformerBackbone` config dict.
        mesh: dict of mesh axis sizes or a spec string (`"batch=16,expert=4"`).
        batch_size: global batch, divisible by the batch axis.
        sequence_length: tokens per sequence.
        hardware: a `HARDWARE` name (`"tpu-v4"`, `"h100"`, ...) or a
            `Hardware`.
        chips: number of chips; must equal the mesh's size (default: it).
        dtype: dtype policy (`"mixed_bfloat16"` computes in bf16).
        optimizer: `"adafactor"` or `"adamw"`.
        fsdp: weights also split along `batch` (gathered when used).
        expert_dim_name: the axis of the expert banks (`mesh.expert_axis`);
            None replicates them.

    Returns:
        A `StepTimePlan`.
    """
    if dtype not in DTYPE_POLICIES:
        raise ValueError(f"Unknown `dtype`={dtype!r}. Allowed values: {DTYPE_POLICIES}.")
    if optimizer not in OPTIMIZER_PASSES:
        raise ValueError(
            f"Unknown `optimizer`={optimizer!r}. Allowed values: {tuple(OPTIMIZER_PASSES)}."
        )
    if not isinstance(hardware, Hardware):
        hardware = get_hardware(hardware)
    sizes = axis_sizes(mesh)
    unknown = set(sizes) - set(MESH_AXES)
    if unknown or "batch" not in sizes:
        raise ValueError(f"The mesh {sizes} must have a batch axis and only axes {MESH_AXES}.")
    devices = math.prod(sizes.values())
    if chips is not None and (
        isinstance(chips, bool) or not isinstance(chips, int) or chips < 1
    ):
        raise ValueError(
            f"`chips` (--chips) must be an int of at least 1, the mesh size ({devices} "
            f"for this mesh). Received: {chips!r}."
        )
    if chips is not None and chips != devices:
        mesh_text = ",".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(
            f"--chips {chips} does not match the mesh {mesh_text}, which has {devices} "
            f"devices: give a mesh whose sizes multiply to {chips}, or --chips {devices}."
        )
    if (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
            or batch_size % sizes["batch"]):
        raise ValueError(
            f"`batch_size`={batch_size!r} must be a positive int divisible by the "
            f"batch axis size {sizes['batch']}."
        )
    terms = step_terms(config, sizes, batch_size, sequence_length, dtype, optimizer, fsdp,
                       expert_dim_name)
    seconds = [term_seconds(t, hardware, sizes) for t in terms]
    parts = collections.OrderedDict((p, 0.0) for p in PARTS)
    for term, s in zip(terms, seconds):
        parts[term.part] += s
    compute = sum(s for t, s in zip(terms, seconds) if t.collective is None)
    activated = count_parameters(config)["activated"]
    return StepTimePlan(
        hardware=hardware,
        mesh=sizes,
        chips=devices,
        batch_size=batch_size,
        sequence_length=sequence_length,
        dtype=dtype,
        optimizer=optimizer,
        fsdp=fsdp,
        experts_on=expert_dim_name,
        terms=terms,
        seconds=seconds,
        parts=collections.OrderedDict((p, s) for p, s in parts.items() if s > 0),
        compute_seconds=compute,
        communication_seconds=sum(seconds) - compute,
        model_flops=6 * activated * batch_size * sequence_length,
        executed_flops=sum(t.flops for t in terms),
    )

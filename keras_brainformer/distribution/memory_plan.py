"""Per-device memory of training a Brainformer on a device mesh, from the config
alone (nothing is allocated, no `DeviceMesh` is built).

`plan_memory(config, mesh, batch_size, sequence_length, ...)` returns a
`MemoryPlan` with, per device, in bytes:

- **parameters**: every weight of `weight_specs(config)` sharded by the
  layout rules of `layout_map.py` (`WEIGHT_RULES` resolved for the mesh by
  `resolve_axes`): a dimension split along a mesh axis of size `n` holds
  `dim / n` entries per device. Exact (the test compares it with the shards
  of a model built under `keras.distribution.ModelParallel`).
- **gradients**: one per trainable weight, sharded like it, in the
  variable dtype (float32 under `mixed_bfloat16`).
- **optimizer state**, as Keras 3 allocates it:
  - `adamw`: `momentum` and `velocity` per trainable weight, created from the
    weight (`add_variable_from_reference`), so sharded like it: 2x params.
  - `adafactor`: Keras' Adafactor is **not** memory-light. Per trainable
    weight of rank >= 2 it keeps the factored second moments `r`
    (`shape[:-1]`) and `c` (`shape[:-2] + shape[-1:]`), created by
    `add_variable` *without a layout*, so replicated on every device, and a
    full-size `velocity` created from the weight (sharded like it). Rank < 2
    weights get two float32 scalars instead of `r` and `c`. So about 1x
    params plus the replicated factors, which for `[E, d, h]` expert banks
    are `E·d + E·h` entries per bank on every device.
  - both: the `iterations` counter and the learning rate (12 bytes).
- **activations** of one training step: an *estimate* (see
  `activation_bytes`) of the tensors the forward pass saves for the backward
  pass, for the local batch `batch_size / mesh["batch"]`, plus the logits
  and loss tensors, in the compute dtype (bfloat16 under `bfloat16` and
  `mixed_bfloat16`). docs/memory_planning.md compares it with XLA's compiled
  memory analysis of a real train step.

The total adds all four; it is conservative (all gradients and all saved
activations are counted as alive at once) and ignores XLA's own working
buffers, fragmentation and collectives' buffers, so keep a margin.

Example:
>>> from keras_brainformer.models.brainformer.brainformer_presets import (
...     get_preset_config)
>>> plan = plan_memory(get_preset_config("glam_tiny"), {"batch": 2},
...                    batch_size=8, sequence_length=128)
>>> plan.gradients == 4 * plan.num_parameters
True
>>> plan.fits(16 * 2**30)
True
"""

import collections
import dataclasses
import math
import re

from keras_brainformer.distribution.mesh import parse_mesh_spec
from keras_brainformer.errors import TrainingError
from keras_brainformer.layers.activations import is_gated
from keras_brainformer.layers.causal_self_attention import resolve_head_dim
from keras_brainformer.layers.routers import compute_capacity
from keras_brainformer.models.brainformer.block_spec import config_block_specs
from keras_brainformer.models.brainformer.brainformer_layout_map import FSDP_TENSOR_RULES
from keras_brainformer.models.brainformer.brainformer_layout_map import TENSOR_RULES
from keras_brainformer.models.brainformer.brainformer_layout_map import WEIGHT_RULES
from keras_brainformer.models.brainformer.brainformer_layout_map import match_rule
from keras_brainformer.models.brainformer.brainformer_layout_map import resolve_axes
from keras_brainformer.zoo.weight_specs import DTYPE_BYTES
from keras_brainformer.zoo.weight_specs import DTYPE_POLICIES
from keras_brainformer.zoo.weight_specs import compute_dtype
from keras_brainformer.zoo.weight_specs import weight_specs

OPTIMIZERS = ("adafactor", "adamw")
# What the activation estimate models: "default" is the step as XLA compiles
# it on CPU (checked there, docs/memory_planning.md); "tpu" is XLA's TPU
# compiler, which fuses the norms' float32 copies and the cross-entropy's
# float32 copies of the logits away (checked against compiled programs,
# docs/performance_model.md "Plan vs XLA's TPU compiler").
TARGETS = ("default", "tpu")
_TEMPLATES = {name: template for name, _, template in WEIGHT_RULES}
_TENSOR_TEMPLATES = {name: template for name, _, template in TENSOR_RULES + FSDP_TENSOR_RULES}
# `iterations` (int64 on TensorFlow, int32 on JAX: count 8) + learning rate.
_OPTIMIZER_SCALARS = 8 + 4
# Adafactor's optimizer-state group that the step writes without reading.
WRITTEN_VELOCITY = "velocity, rank >= 2 (written, not read)"
_UNITS = {
    "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text):
    """Parses a memory size: `"16GB"` (10^9 bytes), `"16GiB"` (2^30),
    `"512MB"`, `"1.5TiB"`, or a plain number of bytes.

    Example:
    >>> parse_bytes("16GiB") == 16 * 2**30, parse_bytes("16 GB")
    (True, 16000000000)
    """
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else None
    if not match or (unit or "b") not in _UNITS:
        raise ValueError(
            f"Invalid memory size {text!r}: expected a number and a unit among "
            "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers "
            "of 1024), for example '16GB'."
        )
    return int(float(match.group(1)) * _UNITS[unit or "b"])


def format_bytes(n):
    """`n` bytes in GiB (or MiB / KiB below one GiB), one decimal."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size * 1000 / 1024:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


@dataclasses.dataclass
class WeightShard:
    """One weight on one device: its rule (kind), mesh axes and local shape."""

    path: str
    kind: str
    shape: tuple
    axes: tuple
    local_shape: tuple
    trainable: bool
    dtype: str

    @property
    def local_bytes(self):
        return math.prod(self.local_shape) * DTYPE_BYTES[self.dtype]


@dataclasses.dataclass
class MemoryPlan:
    """Per-device memory of one training configuration (all sizes in bytes).

    Attributes:
        mesh: mesh axis sizes, e.g. `{"batch": 16, "expert": 16}`.
        batch_size: global batch; `local_batch` is its share per batch shard.
        sequence_length, dtype, optimizer, fsdp: as planned.
        num_parameters: trainable parameters of the whole model.
        parameters: weight bytes per device (trainable and router statistics).
        gradients: gradient bytes per device.
        optimizer_state: optimizer variable bytes per device.
        activations: estimated activation bytes of one step per device.
        parameter_breakdown: weight kind (a `WEIGHT_RULES` name) -> bytes.
        optimizer_breakdown: optimizer variable group -> bytes.
        activation_breakdown: activation group -> bytes.
        shards: path -> `WeightShard`.
        target: the compiler the activation estimate models (`TARGETS`).
    """

    mesh: dict
    batch_size: int
    local_batch: int
    sequence_length: int
    dtype: str
    optimizer: str
    fsdp: bool
    num_parameters: int
    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    parameter_breakdown: dict
    optimizer_breakdown: dict
    activation_breakdown: dict
    shards: dict = dataclasses.field(repr=False)
    target: str = "default"

    @property
    def written_state(self):
        """Optimizer state the step writes without reading it: Adafactor's
        `velocity` of each weight of rank >= 2, which Keras recomputes from
        the factors `r` and `c` (a rank < 2 weight's velocity is read and
        updated); 0 for `adamw`. The compiled step takes none of it as an
        argument: these are its outputs not aliased to an argument
        (`memory_analysis()`'s `output - alias`)."""
        return self.optimizer_breakdown.get(WRITTEN_VELOCITY, 0)

    @property
    def argument_bytes(self):
        """What the compiled step takes as arguments: the parameters and
        the optimizer state it reads (`memory_analysis()`'s `argument`,
        less the batch). Within 2.6 MB of 11 compiled TPU
        programs' (tests/test_memory_plan.py)."""
        return self.parameters + self.optimizer_state - self.written_state

    @property
    def total(self):
        """Parameters + gradients + optimizer state + activations.

        With `target="tpu"`, XLA's TPU schedule is modelled instead of
        counting everything as alive at once: the forward pass's saved
        activations are freed during the backward pass while each weight's
        gradient is used by its optimizer update and freed, and Adafactor's
        `velocity` of rank >= 2 weights (written, never read, so not an
        argument of the step) is only written at the end. The peak is then the larger of the two
        phases: `argument_bytes` + max(activations, gradients +
        `written_state`)."""
        if self.target != "tpu":
            return self.parameters + self.gradients + self.optimizer_state + self.activations
        return self.argument_bytes + max(self.activations, self.gradients + self.written_state)

    def fits(self, device_memory):
        """Whether `total` fits in `device_memory` (bytes, or a string such
        as `"16GB"`)."""
        if isinstance(device_memory, str):
            device_memory = parse_bytes(device_memory)
        return self.total <= device_memory

    def verdict(self, device_memory):
        """`"fits: yes, 11.2 GiB of 14.9 GiB"` or `"does not fit: ..."`."""
        if isinstance(device_memory, str):
            device_memory = parse_bytes(device_memory)
        used, cap = format_bytes(self.total), format_bytes(device_memory)
        if self.fits(device_memory):
            return f"fits: yes, {used} of {cap} per device"
        return f"does not fit: {used} needed, {cap} per device"

    def table(self, device_memory=None):
        """A human-readable per-device table (and the verdict when
        `device_memory` is given)."""
        mesh = ",".join(f"{k}={v}" for k, v in self.mesh.items())
        lines = [
            f"mesh {mesh} ({math.prod(self.mesh.values())} devices), global batch "
            f"{self.batch_size} ({self.local_batch} per batch shard) x "
            f"{self.sequence_length} tokens, dtype {self.dtype}, optimizer "
            f"{self.optimizer}, fsdp {'on' if self.fsdp else 'off'}"
            + (", activations and peak as XLA's TPU compiler schedules them"
               if self.target == "tpu" else ""),
            f"{'per device':<42}{'bytes':>16}",
        ]

        def row(name, n, indent=0):
            lines.append(f"{' ' * indent + name:<42}{n:>16,}    {format_bytes(n):>10}")

        row(f"parameters ({self.num_parameters:,} in the model)", self.parameters)
        for kind, n in self.parameter_breakdown.items():
            row(kind, n, 2)
        row("gradients", self.gradients)
        row(f"optimizer state ({self.optimizer})", self.optimizer_state)
        for kind, n in self.optimizer_breakdown.items():
            row(kind, n, 2)
        row("activations (estimate)", self.activations)
        for kind, n in self.activation_breakdown.items():
            row(kind, n, 2)
        row("total (peak of two phases)"
            if self.target == "tpu" else "total", self.total)
        if device_memory is not None:
            lines.append(self.verdict(device_memory))
        return "\n".join(lines)


def axis_sizes(mesh):
    """Mesh axis sizes from a dict or a spec string (`"batch=2,expert=4"`),
    checked: a non-empty dict of positive ints."""
    if isinstance(mesh, str):
        mesh = parse_mesh_spec(mesh)
    if not isinstance(mesh, dict) or not mesh:
        raise TypeError(
            f"`mesh` must be a dict of axis sizes like {{'batch': 16, 'expert': 16}} "
            f"or a spec string 'batch=16,expert=16'. Received: {mesh!r}"
        )
    for name, size in mesh.items():
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"Mesh axis {name!r} must have a positive int size. Received: {size!r}"
            )
    return dict(mesh)


def _local_shape(path, shape, axes, sizes):
    local = []
    for index, (dim, axis) in enumerate(zip(shape, axes)):
        if axis is None:
            local.append(dim)
            continue
        if dim % sizes[axis]:
            raise ValueError(
                f"Weight {path!r} {tuple(shape)} cannot be split evenly: dimension "
                f"{index} (size {dim}) is split along mesh axis {axis!r} of size "
                f"{sizes[axis]}. Choose a mesh whose axis sizes divide it."
            )
        local.append(dim // sizes[axis])
    return tuple(local)


def shard_weights(config, mesh, fsdp=False, dtype=None, batch_dim_name="batch",
                  model_dim_name="model", expert_dim_name="expert"):
    """Every backbone weight's layout and per-device shape on `mesh`.

    Args:
        config: backbone config dict.
        mesh: dict of mesh axis sizes (`parse_mesh_spec`'s output) or a spec
            string such as `"batch=16,expert=16"`.
        fsdp: also split weights along the batch axis (see `get_layout_map`).
        dtype: dtype policy name overriding the config's.
        batch_dim_name, model_dim_name, expert_dim_name: mesh axis names, as
            in `get_layout_map`.

    Returns:
        `OrderedDict` path -> `WeightShard`. Raises a `ValueError` naming the
        weight, the dimension and the axis when a split is uneven.

    Example:
    >>> from keras_brainformer.models.brainformer.brainformer_presets import (
    ...     get_preset_config)
    >>> shards = shard_weights(get_preset_config("brainformer1_8b"),
    ...                        "batch=16,expert=16")
    >>> shards["block_0/1_moe/experts/w_in"].local_shape
    (4, 4096, 16384)
    """
    sizes = axis_sizes(mesh)
    names = tuple(sizes)
    shards = collections.OrderedDict()
    for path, spec in weight_specs(config, dtype=dtype).items():
        rules = match_rule(path)
        if len(rules) > 1:
            raise ValueError(f"Weight {path!r} matches several layout rules: {rules}.")
        kind = rules[0] if rules else "unmatched"
        template = _TEMPLATES.get(kind, (None,) * len(spec.shape))
        axes = resolve_axes(
            template, names, batch_dim_name, model_dim_name, expert_dim_name, fsdp
        )
        shards[path] = WeightShard(
            path=path,
            kind=kind,
            shape=spec.shape,
            axes=axes,
            local_shape=_local_shape(path, spec.shape, axes, sizes),
            trainable=spec.trainable,
            dtype=spec.dtype,
        )
    return shards


def optimizer_state_bytes(shards, optimizer):
    """Per-device bytes of Keras' optimizer variables, by group.

    Args:
        shards: from `shard_weights`.
        optimizer: `"adafactor"` or `"adamw"` (see the module docstring for
            what Keras allocates).

    Returns:
        dict group name -> bytes.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown `optimizer`={optimizer!r}. Allowed values: {OPTIMIZERS}.")
    groups = collections.OrderedDict()
    trainable = [s for s in shards.values() if s.trainable]
    if optimizer == "adamw":
        groups["momentum (sharded like weights)"] = sum(s.local_bytes for s in trainable)
        groups["velocity (sharded like weights)"] = sum(s.local_bytes for s in trainable)
    else:
        # Keras recomputes a rank >= 2 weight's velocity from `r` and `c`
        # (written, never read: an output of the step, not an argument); a
        # rank < 2 weight's is read and updated.
        groups[WRITTEN_VELOCITY] = sum(s.local_bytes for s in trainable if len(s.shape) >= 2)
        groups["velocity, rank < 2 (read and updated)"] = sum(
            s.local_bytes for s in trainable if len(s.shape) < 2
        )
        factors = 0
        for s in trainable:
            if len(s.shape) < 2:
                factors += 2 * 4  # two float32 scalar placeholders
                continue
            r = math.prod(s.shape[:-1])
            c = math.prod(s.shape[:-2]) * s.shape[-1]
            factors += (r + c) * DTYPE_BYTES[s.dtype]
        groups["factors r, c (replicated)"] = factors
    groups["iterations, learning rate"] = _OPTIMIZER_SCALARS
    return groups


def _split(dim, axis, sizes):
    return dim if axis is None else dim // sizes[axis]


MoEGeometry = collections.namedtuple(
    "MoEGeometry", "experts experts_local groups groups_local group_size capacity"
)


def dispatched_tensor_axes(mesh_axes, batch_dim_name="batch", model_dim_name="model",
                           expert_dim_name="expert", fsdp=False):
    """Mesh axes of the dispatched `[E, G, C, d]` MoE tensor (the
    `moe_dispatched` tensor rule of the layout map) on a mesh with axes
    `mesh_axes`: `(expert, batch, None, None)`, or `(batch, None, None,
    None)` when the experts live on the batch axis (GShard).

    Example:
    >>> dispatched_tensor_axes(("batch", "expert"))
    ('expert', 'batch', None, None)
    >>> dispatched_tensor_axes(("batch",), expert_dim_name="batch")
    ('batch', None, None, None)
    """
    return resolve_axes(
        _TENSOR_TEMPLATES["moe_dispatched"], tuple(mesh_axes), batch_dim_name,
        model_dim_name, expert_dim_name, fsdp,
    )


def moe_dispatch_geometry(sub, batch_size, sequence_length, sizes, tensor_axes):
    """The dispatched `[E, G, C, d]` tensor of MoE sublayer `sub` in training:
    `E` experts, `G = B·T / S` routing groups of `S` tokens (`group_size`,
    default one sequence), `C` slots per expert and group (the router's
    training capacity), and the per-device `E_local`, `G_local` under the
    `moe_dispatched` tensor layout `tensor_axes` (resolved for the mesh).

    Returns:
        `MoEGeometry(experts, experts_local, groups, groups_local,
        group_size, capacity)`. Raises a `ValueError` when the groups do not
        divide the tokens or cannot be split along the mesh.
    """
    B, T, E = batch_size, sequence_length, sub.num_experts
    S = sub.group_size or T
    if (B * T) % S:
        raise ValueError(
            f"batch_size * sequence_length = {B} * {T} is not divisible "
            f"by the MoE `group_size`={S}."
        )
    G = B * T // S
    slots = sub.top_k if sub.router == "top_k" else 1
    C = compute_capacity(slots * S, S, sub.capacity_factor, E)
    if tensor_axes[1] is not None and G % sizes[tensor_axes[1]]:
        raise ValueError(
            f"The {G} MoE routing groups (batch_size * sequence_length / "
            f"group_size) cannot be split evenly along mesh axis "
            f"{tensor_axes[1]!r} of size {sizes[tensor_axes[1]]}."
        )
    E_local = _split(E, tensor_axes[0], sizes)
    return MoEGeometry(E, E_local, G, _split(G, tensor_axes[1], sizes), S, C)


def activation_bytes(config, mesh, batch_size, sequence_length, dtype="float32",
                     fsdp=False, batch_dim_name="batch", model_dim_name="model",
                     expert_dim_name="expert", shards=None, target="default"):
    """Estimated per-device activation bytes of one training step, by group.

    The local batch is `b = batch_size / mesh[batch]`, `N = b · T` tokens;
    `a` is the compute dtype's size (2 for `bfloat16` / `mixed_bfloat16`),
    `f = 4` (float32). Heads, hidden units and the vocabulary are divided by
    the `model` axis size, experts by the `expert` axis size, wherever the
    layout rules split them. Counted, as tensors the forward pass keeps for
    the backward pass:

    - each norm: `N·d·(2a + f)` (input, float32 normalised copy, output);
    - attention: `3·N·(H + Hkv)·hd·a` (q, rotated q and context per query
      head, k, v and rotated k per key/value head) plus
      `b·H·T²·(2f + a)` (float32 scores and probabilities, their cast);
      Primer's convolution adds `6·N·H·hd·a`;
    - dense FFN: `2·N·h·a` (pre- and post-activation), `4·N·h·a` gated;
    - MoE: the router (`3·N·E·f`, plus `N·d·f` for the float32 input when
      `a = 2`), the dispatched tokens and expert outputs `[E, G, C, d]`
      (`2·E·G·C·d·a`, split by the `moe_dispatched` tensor layout,
      `(expert, batch, None, None)`), the experts' hidden activations
      (`2` or `4` `·E·G·C·h·a`), the float32 combine (`2·E·G·C·d·f`) and its
      output (`N·d·(f + a)`), with `G` groups of `S` tokens (`group_size`,
      default one sequence) and `C` the router's training capacity; a
      shared expert (`shared_expert_intermediate_dim`) adds a dense FFN's
      hidden activations on every token and `2·N·d·a` for its gating;
    - the embedding output `N·d·a` and the logits and loss `b·T·V·(a + 3f)`
      (logits, their float32 copy, log-softmax, one-hot targets);
    - under `mixed_bfloat16`, the bfloat16 copies of the weights that the
      matmuls use (`params / 2`), and with `fsdp`, two sublayers' weights
      gathered across the batch axis at a time (prefetch).

    With `target="tpu"` (XLA's TPU compiler, which fuses elementwise work
    into the matmuls and the cross-entropy), three terms differ, each as
    the buffers of compiled TPU programs show (docs/performance_model.md):

    - each norm keeps only its compute-dtype input: `N·d·a`, with `d`
      split along `model` under fsdp, whose layout gives the residual
      stream `(batch, None, model)` (the `embedding_output` tensor rule;
      `dense_8b`'s compiled program keeps `bf16[1,1024,512]` norm inputs
      on 8 `model` shards of `d = 4096`), and so is the embedding output;
    - attention keeps the float32 probabilities and one compute-dtype copy
      per score: `b·H·T²·(f + a)`;
    - the logits are kept once in the compute dtype plus a one-byte mask
      per two entries: `b·T·V·(a + 1/2)` (measured 2.5 bytes per logit
      entry under `mixed_bfloat16` by compiling two vocabulary sizes);
    - a dense FFN keeps half its hidden tensors (`N·h·a`, `2·N·h·a`
      gated), and so do the experts; the MoE layer keeps the dispatched
      tokens and expert outputs (`2·E·G·C·d·a`) but no float32 combine,
      and the router no float32 copy of its input.

    One term is kept on TPU though no TPU program holds it: the bfloat16
    weight copies (XLA fuses each cast into the matmul or gather that reads
    the weight). `MemoryPlan.total` lets the forward pass's activations use
    the space of the outputs written at the end (`written_state`); how much
    of it XLA uses depends on what fits: `brainformer1_100m`'s logits fill
    the embedding's velocity shard (d = 1024), `dense_100m`'s do not
    (d = 768), and it uses 233 of its 591 MiB. The copies' `params / 2`
    stand in for the rest: without them the plan is 12 % under XLA's peak
    for four of the six 100M families (docs/performance_model.md, "The plan
    part by part").

    Not counted: XLA's working buffers, the gradient of the activations
    in flight during the backward pass (about one sublayer's worth), and
    rematerialisation (which lowers the real figure).

    Args:
        config, mesh, batch_size, sequence_length, dtype, fsdp, *_dim_name:
            as in `plan_memory`.
        shards: `shard_weights(...)`'s result, if already computed.
        target: `"default"` or `"tpu"` (see above).

    Returns:
        dict group name -> bytes.
    """

    if target not in TARGETS:
        raise ValueError(f"Unknown `target`={target!r}. Allowed values: {TARGETS}.")
    tpu = target == "tpu"
    sizes = axis_sizes(mesh)
    names = tuple(sizes)
    shards = shards or shard_weights(
        config, sizes, fsdp, dtype, batch_dim_name, model_dim_name, expert_dim_name
    )
    a = DTYPE_BYTES[compute_dtype(dtype)]
    f = 4
    B, T = batch_size, sequence_length
    b = B // sizes[batch_dim_name]
    N = b * T
    d, V = config["hidden_dim"], config["vocabulary_size"]

    def axes(kind):
        return resolve_axes(
            _TEMPLATES[kind], names, batch_dim_name, model_dim_name, expert_dim_name, fsdp
        )

    groups = collections.OrderedDict(
        (k, 0) for k in ("norms", "attention", "attention scores", "dense ffn", "moe router",
                         "moe dispatched tokens", "moe experts", "embedding and logits")
    )
    # The residual stream [b, T, d]: under fsdp its layout splits `d` along
    # `model` (FSDP_TENSOR_RULES). Only the TPU target models that split; the
    # default target stays the estimate checked on CPU.
    residual_axis = (
        resolve_axes(_TENSOR_TEMPLATES["embedding_output"], names, batch_dim_name,
                     model_dim_name, expert_dim_name, fsdp)[2]
        if tpu and fsdp else None
    )
    d_residual = _split(d, residual_axis, sizes)
    norm = N * d_residual * a if tpu else N * d * (2 * a + f)
    groups["norms"] += norm  # final norm
    heads_axis = axes("attention_qkv")[1]
    ffn_axis = axes("ffn_in")[1]
    expert_axes = axes("expert_in")
    tensor_axes = dispatched_tensor_axes(
        names, batch_dim_name, model_dim_name, expert_dim_name, fsdp
    )
    for spec in config_block_specs(config):
        for sub in spec.sublayers:
            groups["norms"] += norm
            if sub.kind == "attention":
                hd = resolve_head_dim(d, sub.num_heads, sub.head_dim)
                H = _split(sub.num_heads, heads_axis, sizes)
                Hkv = _split(sub.kv_heads, heads_axis, sizes)
                # q, rotated q, context per query head; k, v, rotated k per
                # key/value head (grouped-query attention shares them).
                per_token = 3 * H + 3 * Hkv + (6 * H if sub.depthwise_conv_kernel else 0)
                groups["attention"] += per_token * N * hd * a
                groups["attention scores"] += b * H * T * T * ((f + a) if tpu else (2 * f + a))
            elif sub.kind == "ffn":
                h = _split(sub.intermediate_dim, ffn_axis, sizes)
                per_token = 4 if is_gated(sub.activation) else 2
                groups["dense ffn"] += (per_token // 2 if tpu else per_token) * N * h * a
            else:
                E = sub.num_experts
                _, E_local, _, G_local, _, C = moe_dispatch_geometry(
                    sub, B, T, sizes, tensor_axes
                )
                slots_local = E_local * G_local * C
                h = _split(sub.intermediate_dim, expert_axes[2], sizes)
                router = 3 * N * E * f + (N * d * f if a < f and not tpu else 0)
                groups["moe router"] += router
                groups["moe dispatched tokens"] += 2 * slots_local * d * a + (
                    0 if tpu else 2 * slots_local * d * f + N * d * (f + a)
                )
                hidden_tensors = 4 if is_gated(sub.activation) else 2
                groups["moe experts"] += (
                    hidden_tensors // 2 if tpu else hidden_tensors
                ) * slots_local * h * a
                if sub.shared_expert_intermediate_dim is not None:
                    # The shared expert, a dense FFN on every token (split
                    # like one), plus its gate and gated output.
                    hs = _split(sub.shared_expert_intermediate_dim, ffn_axis, sizes)
                    groups["moe experts"] += hidden_tensors * N * hs * a + 2 * N * d * a
    vocab_axis = axes("embedding")[0]
    logits = b * T * _split(V, vocab_axis, sizes)
    logits_bytes = logits * a + logits // 2 if tpu else logits * (a + 3 * f)
    groups["embedding and logits"] = N * d_residual * a + logits_bytes
    trainable = [s for s in shards.values() if s.trainable]
    if dtype == "mixed_bfloat16":
        groups["bfloat16 weight copies"] = sum(math.prod(s.local_shape) * 2 for s in trainable)
    if fsdp and sizes[batch_dim_name] > 1:
        per_sublayer = collections.defaultdict(int)
        for s in trainable:
            # The weight as used: sharded as without fsdp (expert / model
            # splits stay; only the fsdp split is gathered).
            template = _TEMPLATES.get(s.kind, (None,) * len(s.shape))
            used_axes = resolve_axes(
                template, names, batch_dim_name, model_dim_name, expert_dim_name, False
            )
            gathered = [_split(dim, axis, sizes) for dim, axis in zip(s.shape, used_axes)]
            key = s.path.rsplit("/", 1)[0].split("/experts")[0].split("/router")[0]
            key = key.split("/shared_expert")[0]
            per_sublayer[key] += math.prod(gathered) * a
        groups["fsdp gathered weights (2 sublayers)"] = 2 * max(per_sublayer.values())
    return collections.OrderedDict((k, n) for k, n in groups.items() if n)


def _check_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    return value


def plan_memory(config, mesh, batch_size, sequence_length, dtype="float32",
                optimizer="adafactor", fsdp=False, batch_dim_name="batch",
                model_dim_name="model", expert_dim_name="expert", target="default"):
    """Per-device memory of training the backbone of `config` on `mesh`.

    Allocates nothing and builds no mesh: a 256-device plan runs on a laptop.
    See the module docstring for what each figure counts.

    Args:
        config: `BrainformerBackbone` config dict (a preset's
            `get_preset_config(name)`).
        mesh: dict of mesh axis sizes (`parse_mesh_spec("batch=16,expert=16")`)
            or the spec string itself.
        batch_size: global batch size; must be divisible by the batch axis.
        sequence_length: tokens per sequence.
        dtype: `"float32"`, `"bfloat16"` or `"mixed_bfloat16"` (float32
            weights, bfloat16 activations).
        optimizer: `"adafactor"` or `"adamw"` (Keras' own).
        fsdp: also split weights along the batch axis (`get_layout_map`).
        batch_dim_name, model_dim_name, expert_dim_name: mesh axis names.
        target: `"default"` (the activation estimate checked on CPU) or
            `"tpu"` (XLA's TPU compiler; see `activation_bytes`).

    Returns:
        A `MemoryPlan`.

    Example:
    >>> from keras_brainformer.models.brainformer.brainformer_presets import (
    ...     get_preset_config)
    >>> plan = plan_memory(get_preset_config("brainformer1_8b"),
    ...     "batch=16,expert=16", batch_size=256, sequence_length=1024,
    ...     dtype="mixed_bfloat16", optimizer="adamw")
    >>> plan.num_parameters > 150e9, plan.fits("16GB")
    (True, False)
    """
    if dtype not in DTYPE_POLICIES:
        raise ValueError(f"Unknown `dtype`={dtype!r}. Allowed values: {DTYPE_POLICIES}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"Unknown `optimizer`={optimizer!r}. Allowed values: {OPTIMIZERS}.")
    if not isinstance(fsdp, bool):
        raise TypeError(f"`fsdp` must be a bool. Received: fsdp={fsdp!r}")
    sizes = axis_sizes(mesh)
    if batch_dim_name not in sizes:
        raise ValueError(
            f"The mesh {sizes} has no batch axis {batch_dim_name!r} (the input "
            "batch is split along it)."
        )
    _check_int("batch_size", batch_size)
    _check_int("sequence_length", sequence_length)
    if batch_size % sizes[batch_dim_name]:
        raise ValueError(
            f"`batch_size`={batch_size} must be divisible by the mesh's "
            f"{batch_dim_name!r} axis size {sizes[batch_dim_name]}."
        )
    shards = shard_weights(
        config, sizes, fsdp, dtype, batch_dim_name, model_dim_name, expert_dim_name
    )
    breakdown = collections.OrderedDict()
    for s in shards.values():
        breakdown[s.kind] = breakdown.get(s.kind, 0) + s.local_bytes
    trainable_bytes = sum(s.local_bytes for s in shards.values() if s.trainable)
    optimizer_groups = optimizer_state_bytes(shards, optimizer)
    activations = activation_bytes(
        config, sizes, batch_size, sequence_length, dtype, fsdp,
        batch_dim_name, model_dim_name, expert_dim_name, shards=shards, target=target,
    )
    return MemoryPlan(
        mesh=sizes,
        batch_size=batch_size,
        local_batch=batch_size // sizes[batch_dim_name],
        sequence_length=sequence_length,
        dtype=dtype,
        optimizer=optimizer,
        fsdp=fsdp,
        num_parameters=sum(math.prod(s.shape) for s in shards.values() if s.trainable),
        parameters=sum(s.local_bytes for s in shards.values()),
        gradients=trainable_bytes,
        optimizer_state=sum(optimizer_groups.values()),
        activations=sum(activations.values()),
        parameter_breakdown=breakdown,
        optimizer_breakdown=optimizer_groups,
        activation_breakdown=activations,
        shards=shards,
        target=target,
    )


def weight_bytes(config, dtype=None):
    """Bytes of every weight of `BrainformerBackbone(**config)` in one
    process (no mesh): what building the model allocates.

    Example:
    >>> from keras_brainformer.models.brainformer.brainformer_presets import (
    ...     get_preset_config)
    >>> round(weight_bytes(get_preset_config("glam_8b_64e")) / 1e9)
    575
    """
    return sum(s.local_bytes for s in shard_weights(config, {"batch": 1}, dtype=dtype).values())


def available_memory_bytes():
    """Memory this machine can still give (Linux `MemAvailable`), or None
    where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_memory_available(needed, subject, purpose, advice):
    """Refuses, before anything is allocated or written, work that needs more
    memory than this machine can still give, instead of letting the kernel
    kill the process (exit 137, no message). The one check that `train`,
    `convert`, `upcycle`, `generate` and `checksum` run.

    Raises a `TrainingError` (one line: `"{subject} needs about X GB of
    memory {purpose}, more than the Y GB available. {advice}"`) when `needed`
    bytes exceed `available_memory_bytes()`; does nothing where that is
    unknown.
    """
    available = available_memory_bytes()
    if available is None or needed <= available:
        return
    raise TrainingError(
        f"{subject} needs about {needed / 1e9:.1f} GB of memory {purpose}, more than "
        f"the {available / 1e9:.1f} GB available. {advice}"
    )

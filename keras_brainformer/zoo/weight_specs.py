"""Every variable of a `BrainformerBackbone`, computed from its config alone:
the family's one analytic weight model.

`weight_specs(config)` lists the backbone's weights (`backbone.weights`: the
trainable projections, embeddings and norms, and the routers' non-trainable
statistics) with their exact Keras paths, shapes, trainability and variable
dtypes, without building the model or allocating anything, so it works for
an 8B preset as fast as for a tiny one. `weight_shapes(config)` is the
`{path: shape}` view of it. `count_parameters` (`parameter_count.py`) sums it,
the memory planner (`distribution/memory_plan.py`) and the step-time model
(`distribution/step_time.py`) shard it with the layout rules of
`brainformer_layout_map.py`, and a test checks it against a built backbone's
`weights`, so a change to a layer's `build()` fails there first.

Not listed (they are variables but not weights): the dropout / router jitter
`SeedGenerator` states, two `uint32` numbers each.

Paths, with `d` the model width, `V` the vocabulary, `H` heads, `hd` the head
width, `K` Primer's conv width, `h` a hidden width, `E` experts, and `i`, `j`
the block and sublayer indices:

| path                                         | shape        |
|----------------------------------------------|--------------|
| `token_embedding/embeddings`                 | `[V, d]`     |
| `token_embedding/reverse_embeddings` (untied) | `[d, V]`    |
| `block_i/j_<kind>_norm/scale` (rms)          | `[d]`        |
| `block_i/j_<kind>_norm/gamma`, `beta` (layer) | `[d]`       |
| `block_i/j_attention/w_query`                | `[d, H, hd]` |
| `block_i/j_attention/w_key|w_value`          | `[d, Hkv, hd]` |
| `block_i/j_attention/w_output`               | `[H, hd, d]` |
| `block_i/j_attention/conv_query|key|value`   | `[K, H, hd]` |
| `block_i/j_attention/b_query` (`b_key|b_value`) | `[H, hd]` (`[Hkv, hd]`) |
| `block_i/j_attention/query_norm|key_norm`    | `[hd]` |
| `block_i/j_ffn/w_in`, `w_gate` (gated)       | `[d, h]`     |
| `block_i/j_ffn/w_out`                        | `[h, d]`     |
| `block_i/j_moe/router/kernel`                | `[d, E]`     |
| `block_i/j_moe/router/dropped_fraction`, `load_cv`, `router_entropy` | `[]` |
| `block_i/j_moe/router/expert_load`           | `[E]`        |
| `block_i/j_moe/experts/w_in`, `w_gate` (gated) | `[E, d, h]` |
| `block_i/j_moe/experts/w_out`                | `[E, h, d]`  |
| `block_i/j_moe/shared_expert_gate` (shared expert) | `[d, 1]` |
| `block_i/j_moe/shared_expert/w_in`, `w_gate` (gated) | `[d, hs]` |
| `block_i/j_moe/shared_expert/w_out`          | `[hs, d]`    |
| `final_norm/scale` (or `gamma`, `beta`)      | `[d]`        |

The router weights follow the policy's variable dtype like every weight (float32 under
`mixed_bfloat16`; the router computes in float32 inside `call`); its statistics are non-trainable.
"""

import collections
import dataclasses
import math

from keras_brainformer.layers.activations import is_gated
from keras_brainformer.layers.causal_self_attention import resolve_head_dim
from keras_brainformer.models.brainformer.block_spec import config_block_specs

DTYPE_POLICIES = ("float32", "bfloat16", "mixed_bfloat16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int32": 4, "int64": 8}
_VARIABLE_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "mixed_bfloat16": "float32"}
_COMPUTE_DTYPE = {"float32": "float32", "bfloat16": "bfloat16", "mixed_bfloat16": "bfloat16"}
_ROUTER_STATISTICS = (
    ("dropped_fraction", ()),
    ("expert_load", None),
    ("load_cv", ()),
    ("router_entropy", ()),
)


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One backbone variable.

    Attributes:
        path: the Keras variable path (`variable.path`).
        shape: tuple of ints.
        trainable: bool.
        dtype: the variable dtype (`"float32"` or `"bfloat16"`).
    """

    path: str
    shape: tuple
    trainable: bool = True
    dtype: str = "float32"

    @property
    def size(self):
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def nbytes(self):
        """Bytes of the whole (unsharded) variable."""
        return self.size * DTYPE_BYTES[self.dtype]


def policy_name(dtype):
    """The dtype policy name of a config's `dtype` entry (a name, a
    serialised `DTypePolicy` dict, a policy object, or None for float32)."""
    if dtype is None:
        return "float32"
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name")
    elif not isinstance(dtype, str):
        dtype = getattr(dtype, "name", dtype)
    if dtype not in DTYPE_POLICIES:
        raise ValueError(
            f"Unsupported `dtype`={dtype!r}. Allowed values: {DTYPE_POLICIES}."
        )
    return dtype


def variable_dtype(policy):
    """The dtype Keras stores weights in under dtype policy `policy`."""
    return _VARIABLE_DTYPE[policy_name(policy)]


def compute_dtype(policy):
    """The dtype layers compute in under dtype policy `policy`."""
    return _COMPUTE_DTYPE[policy_name(policy)]


def _norm_specs(prefix, norm, d, dtype):
    names = ("scale",) if norm == "rms" else ("gamma", "beta")
    return [WeightSpec(f"{prefix}/{name}", (d,), True, dtype) for name in names]


def _ffn_specs(prefix, d, hidden, activation, dtype, experts=None):
    lead = () if experts is None else (experts,)
    names = ("w_in", "w_gate") if is_gated(activation) else ("w_in",)
    specs = [WeightSpec(f"{prefix}/{n}", lead + (d, hidden), True, dtype) for n in names]
    specs.append(WeightSpec(f"{prefix}/w_out", lead + (hidden, d), True, dtype))
    return specs


def sublayer_weight_specs(prefix, sub, d, dtype="float32"):
    """The weights of one sublayer (its norm excluded) under `prefix`, as
    `WeightSpec`s in build order."""
    if sub.kind == "attention":
        H, hd = sub.num_heads, resolve_head_dim(d, sub.num_heads, sub.head_dim)
        heads = {"query": H, "key": sub.kv_heads, "value": sub.kv_heads}
        specs = [
            WeightSpec(f"{prefix}/w_{name}", (d, heads[name], hd), True, dtype)
            for name in ("query", "key", "value")
        ]
        specs.append(WeightSpec(f"{prefix}/w_output", (H, hd, d), True, dtype))
        if sub.depthwise_conv_kernel:
            specs += [
                WeightSpec(
                    f"{prefix}/conv_{name}", (sub.depthwise_conv_kernel, H, hd), True, dtype
                )
                for name in ("query", "key", "value")
            ]
        if sub.qkv_bias:
            specs += [
                WeightSpec(f"{prefix}/b_{name}", (heads[name], hd), True, dtype)
                for name in ("query", "key", "value")
            ]
        if sub.qk_norm:
            specs += [
                WeightSpec(f"{prefix}/{name}_norm", (hd,), True, dtype)
                for name in ("query", "key")
            ]
        return specs
    if sub.kind == "ffn":
        return _ffn_specs(prefix, d, sub.intermediate_dim, sub.activation, dtype)
    E = sub.num_experts
    specs = []
    if sub.shared_expert_intermediate_dim is not None:
        # The MoE layer's own weight comes before its sublayers' in `weights`.
        specs.append(WeightSpec(f"{prefix}/shared_expert_gate", (d, 1), True, dtype))
    specs.append(WeightSpec(f"{prefix}/router/kernel", (d, E), True, dtype))
    specs += [
        WeightSpec(f"{prefix}/router/{name}", (E,) if shape is None else shape, False, dtype)
        for name, shape in _ROUTER_STATISTICS
    ]
    specs += _ffn_specs(
        f"{prefix}/experts", d, sub.intermediate_dim, sub.activation, dtype, experts=E
    )
    if sub.shared_expert_intermediate_dim is not None:
        specs += _ffn_specs(
            f"{prefix}/shared_expert", d, sub.shared_expert_intermediate_dim, sub.activation, dtype
        )
    return specs


def weight_specs(config, dtype=None):
    """Every weight of the `BrainformerBackbone` built from `config`, in
    `backbone.weights` order, without allocating anything.

    Args:
        config: the backbone's config dict (`backbone.get_config()`, a
            preset's `config.json` `"config"` entry, or constructor kwargs).
        dtype: dtype policy name (`"float32"`, `"bfloat16"`,
            `"mixed_bfloat16"`) overriding the config's `dtype`; it sets the
            variables' dtype (float32 under `mixed_bfloat16`).

    Returns:
        `OrderedDict` path -> `WeightSpec`.

    Example:
    >>> from keras_brainformer.models import dense_transformer_layer
    >>> specs = weight_specs({"vocabulary_size": 100, "hidden_dim": 8,
    ...     "blocks": dense_transformer_layer(2, 16).to_dict(), "num_layers": 1})
    >>> specs["block_0/0_attention/w_query"].shape
    (8, 2, 4)
    >>> sum(s.size for s in specs.values() if s.trainable)  # count_parameters' total
    1336
    """
    d = config["hidden_dim"]
    vocabulary = config["vocabulary_size"]
    norm = config.get("norm", "rms")
    if norm not in ("rms", "layer"):
        raise ValueError(f"Unknown `norm`={norm!r}. Allowed values: ('rms', 'layer').")
    var_dtype = variable_dtype(config.get("dtype") if dtype is None else dtype)
    specs = [WeightSpec("token_embedding/embeddings", (vocabulary, d), True, var_dtype)]
    if not config.get("tie_embeddings", True):
        specs.append(
            WeightSpec("token_embedding/reverse_embeddings", (d, vocabulary), True, var_dtype)
        )
    for i, spec in enumerate(config_block_specs(config)):
        for j, sub in enumerate(spec.sublayers):
            name = f"block_{i}/{j}_{sub.kind}"
            specs += _norm_specs(f"{name}_norm", norm, d, var_dtype)
            specs += sublayer_weight_specs(name, sub, d, var_dtype)
    specs += _norm_specs("final_norm", norm, d, var_dtype)
    return collections.OrderedDict((s.path, s) for s in specs)


def weight_shapes(config):
    """`{path: shape}` of every backbone weight (see `weight_specs`).

    Equals `{v.path: tuple(v.shape) for v in backbone.weights}` for
    `backbone = BrainformerBackbone(**config)`, without building it.

    Example:
    >>> from keras_brainformer.models.brainformer.brainformer_presets import (
    ...     get_preset_config)
    >>> shapes = weight_shapes(get_preset_config("brainformer1_8b"))
    >>> shapes["block_0/1_moe/experts/w_in"]
    (64, 4096, 16384)
    """
    return collections.OrderedDict(
        (path, spec.shape) for path, spec in weight_specs(config).items()
    )

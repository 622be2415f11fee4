"""Sharding rules for every Brainformer weight, as a `keras.distribution.LayoutMap`.

Weights (paths as Keras names them, shapes with `d` the model width, `V` the
vocabulary, `H` heads, `hd` head width, `h` a hidden width, `E` experts):

| weight (path suffix)                  | shape        | axes                     |
|---------------------------------------|--------------|--------------------------|
| `token_embedding/embeddings`          | `[V, d]`     | `(model, fsdp)`          |
| `token_embedding/reverse_embeddings`  | `[d, V]`     | `(fsdp, model)`          |
| `<i>_attention/w_query|key|value`     | `[d, H, hd]` | `(fsdp, model, None)`    |
| `<i>_attention/w_output`              | `[H, hd, d]` | `(model, None, fsdp)`    |
| `<i>_attention/conv_query|key|value`  | `[K, H, hd]` | `(None, model, None)`    |
| `<i>_attention/b_query|key|value`     | `[H, hd]`    | `(model, None)`          |
| `<i>_attention/query_norm|key_norm`   | `[hd]`       | replicated               |
| `<i>_ffn/w_in|w_gate`                 | `[d, h]`     | `(fsdp, model)`          |
| `<i>_ffn/w_out`                       | `[h, d]`     | `(model, fsdp)`          |
| `<i>_moe/experts/w_in|w_gate`         | `[E, d, h]`  | `(expert, fsdp, model)`  |
| `<i>_moe/experts/w_out`               | `[E, h, d]`  | `(expert, model, fsdp)`  |
| `<i>_moe/router/kernel`               | `[d, E]`     | replicated               |
| `<i>_moe/shared_expert/w_in|w_gate`   | `[d, h]`     | `(fsdp, model)`          |
| `<i>_moe/shared_expert/w_out`         | `[h, d]`     | `(model, fsdp)`          |
| `<i>_moe/shared_expert_gate`          | `[d, 1]`     | replicated               |
| router statistics, norm scales        | small        | replicated               |

The shared expert of a Qwen-MoE style MoE sublayer (`shared_expert_intermediate_dim`)
is a dense FFN and is split like one; its sigmoid gate is replicated.

`model` is Megatron-style tensor parallelism (heads and hidden units split, one
all-reduce after each attention / FFN), `expert` splits the expert banks
(each device holds `E / n` whole experts), and `fsdp` is the batch axis when
`fsdp=True` (ZeRO-3 style: weights are also split over the data replicas and
gathered when used) or None. An axis the mesh lacks becomes None (replicated),
and one mesh axis is never used twice in one layout.

Two intermediate tensors are constrained too, by the MoE layer (see
`MoEFeedForward`): the dispatched expert inputs and the expert outputs, both
`[E, G, C, d]`, get `(expert, batch, None, None)` — or `(expert, None, None,
None)` when experts live on the batch axis, the GShard layout — so that XLA
moves *tokens* to the devices holding their experts (all-to-all) rather than
gathering expert weights.

With `fsdp=True` one more: the token embedding's output (`[B, T, d]`, and the
logits `[B, T, V]` of its reversed call, which share the path) gets
`(batch, None, model)`. Without it the table's fsdp split of `d` over the
batch axis reaches the hidden states, and XLA partitions the whole step along
`d`: each device computes every sequence of the global batch (at 1B on 64 TPU
v4 chips the compiled step needed 28.5 GiB a chip instead of 8.0;
docs/performance_model.md).
"""

import re

import keras

# (name, pattern, axes template) — templates use "batch", "model", "expert",
# "fsdp" as placeholders resolved per mesh. Patterns are anchored by
# `re.fullmatch` (Keras LayoutMap semantics) and match the variable path.
_PREFIX = r"(?:.*/)?"
_SUBLAYER = _PREFIX + r"block_\d+/\d+_"
WEIGHT_RULES = (
    ("embedding", _PREFIX + r"token_embedding/embeddings", ("model", "fsdp")),
    ("reverse_embedding", _PREFIX + r"token_embedding/reverse_embeddings", ("fsdp", "model")),
    ("attention_qkv", _SUBLAYER + r"attention/w_(?:query|key|value)", ("fsdp", "model", None)),
    ("attention_output", _SUBLAYER + r"attention/w_output", ("model", None, "fsdp")),
    ("attention_conv", _SUBLAYER + r"attention/conv_(?:query|key|value)", (None, "model", None)),
    ("attention_bias", _SUBLAYER + r"attention/b_(?:query|key|value)", ("model", None)),
    ("attention_qk_norm", _SUBLAYER + r"attention/(?:query|key)_norm", (None,)),
    ("ffn_in", _SUBLAYER + r"ffn/w_(?:in|gate)", ("fsdp", "model")),
    ("ffn_out", _SUBLAYER + r"ffn/w_out", ("model", "fsdp")),
    ("expert_in", _SUBLAYER + r"moe/experts/w_(?:in|gate)", ("expert", "fsdp", "model")),
    ("expert_out", _SUBLAYER + r"moe/experts/w_out", ("expert", "model", "fsdp")),
    ("router", _SUBLAYER + r"moe/router/kernel", (None, None)),
    ("shared_expert_in", _SUBLAYER + r"moe/shared_expert/w_(?:in|gate)", ("fsdp", "model")),
    ("shared_expert_out", _SUBLAYER + r"moe/shared_expert/w_out", ("model", "fsdp")),
    ("shared_expert_gate", _SUBLAYER + r"moe/shared_expert_gate", (None, None)),
    ("router_statistics", _SUBLAYER + r"moe/router/(?:dropped_fraction|load_cv|router_entropy)",
     ()),
    ("router_expert_load", _SUBLAYER + r"moe/router/expert_load", (None,)),
    ("norm", _PREFIX + r"(?:block_\d+/\d+_\w+_norm|final_norm)/(?:scale|gamma|beta)", (None,)),
    # LoRA adapters (`enable_lora`) and int8 scales (`quantize("int8")`, whose
    # int8 kernels keep their float kernels' names and rules). Per-expert
    # adapters and scales live with their experts; the rest is small and
    # replicated.
    ("expert_lora", _SUBLAYER + r"moe/experts/w_(?:in|gate|out)_lora_[ab]", ("expert", None, None)),
    ("expert_int8_scale", _SUBLAYER + r"moe/experts/w_(?:in|gate|out)_scale",
     ("expert", None, None)),
    ("lora", _SUBLAYER + r"(?:attention/w_(?:query|key|value|output)"
     r"|(?:ffn|moe/shared_expert)/w_(?:in|gate|out))_lora_[ab]", (None, None)),
    ("int8_scale", _SUBLAYER + r"(?:attention/w_(?:query|key|value|output)"
     r"|(?:ffn|moe/shared_expert)/w_(?:in|gate|out))_scale", (None, None)),
    ("embedding_int8_scale", _PREFIX + r"token_embedding/(?:reverse_)?embeddings_scale", (None,)),
)
# Intermediate tensors (looked up by `distribution.get_tensor_layout(path)`).
TENSOR_RULES = (
    ("moe_dispatched", _SUBLAYER + r"moe/(?:dispatched|expert_outputs)",
     ("expert", "batch", None, None)),
)
# Added only with fsdp (the module docstring says why).
FSDP_TENSOR_RULES = (
    ("embedding_output", _PREFIX + r"token_embedding/output", ("batch", None, "model")),
)


def resolve_axes(template, mesh_axes, batch_dim_name, model_dim_name, expert_dim_name, fsdp):
    """Turns an axes template into mesh axis names (None where the mesh lacks
    the axis or where the axis is already used earlier in the layout)."""
    names = {
        "batch": batch_dim_name,
        "model": model_dim_name,
        "expert": expert_dim_name,
        "fsdp": batch_dim_name if fsdp else None,
    }
    used = set()
    axes = []
    for slot in template:
        name = names.get(slot) if slot is not None else None
        if name is None or name not in mesh_axes or name in used:
            axes.append(None)
            continue
        used.add(name)
        axes.append(name)
    return tuple(axes)


def match_rule(path, rules=WEIGHT_RULES):
    """Names of the rules whose pattern fully matches `path` (ideally one)."""
    return [name for name, pattern, _ in rules if re.fullmatch(pattern, path)]


def _check_names(device_mesh, **names):
    axes = tuple(device_mesh.axis_names)
    for field, name in names.items():
        if name is not None and not isinstance(name, str):
            raise TypeError(f"`{field}` must be a str or None. Received: {name!r}")
    batch = names["batch_dim_name"]
    if batch not in axes:
        raise ValueError(
            f"`batch_dim_name`={batch!r} is not an axis of the device mesh "
            f"(axes: {axes}); the input batch is split along it."
        )
    return axes


def get_layout_map(
    device_mesh,
    batch_dim_name="batch",
    model_dim_name="model",
    expert_dim_name="expert",
    fsdp=False,
):
    """A `keras.distribution.LayoutMap` for every Brainformer weight.

    Args:
        device_mesh: a `keras.distribution.DeviceMesh`.
        batch_dim_name: mesh axis the input batch is split along (must exist).
        model_dim_name: mesh axis for tensor parallelism (heads, hidden units,
            vocabulary); ignored (replicated) if the mesh lacks it.
        expert_dim_name: mesh axis the expert banks are split along. It may
            be the batch axis itself (GShard: every device holds different
            tokens and different experts); ignored if the mesh lacks it.
        fsdp: also split weights along the batch axis (ZeRO-3 style).

    Returns:
        A `LayoutMap` with one key per rule in `WEIGHT_RULES` and
        `TENSOR_RULES` (see the module docstring for the table).

    Example:
    >>> import keras
    >>> mesh = keras.distribution.DeviceMesh(
    ...     (1, 1), ("batch", "expert"), keras.distribution.list_devices()[:1])
    >>> layout_map = get_layout_map(mesh)
    >>> layout_map["block_0/1_moe/experts/w_in"].axes
    ('expert', None, None)
    """
    if not isinstance(device_mesh, keras.distribution.DeviceMesh):
        raise TypeError(
            "`device_mesh` must be a keras.distribution.DeviceMesh. "
            f"Received: {type(device_mesh).__name__}"
        )
    if not isinstance(fsdp, bool):
        raise TypeError(f"`fsdp` must be a bool. Received: fsdp={fsdp!r}")
    axes = _check_names(
        device_mesh,
        batch_dim_name=batch_dim_name,
        model_dim_name=model_dim_name,
        expert_dim_name=expert_dim_name,
    )
    layout_map = keras.distribution.LayoutMap(device_mesh)
    rules = WEIGHT_RULES + TENSOR_RULES + (FSDP_TENSOR_RULES if fsdp else ())
    for _, pattern, template in rules:
        layout_map[pattern] = resolve_axes(
            template, axes, batch_dim_name, model_dim_name, expert_dim_name, fsdp
        )
    return layout_map


def check_divisible(weight_shapes, layout_map):
    """Raises a `ValueError` naming every weight whose sharded dimensions are
    not divisible by their mesh axis sizes (XLA needs even shards).

    Args:
        weight_shapes: dict path -> shape (for example
            `{v.path: v.shape for v in backbone.weights}`, or the analytic
            `weight_shapes(config)` that allocates nothing).
        layout_map: from `get_layout_map`.
    """
    mesh = layout_map.device_mesh
    sizes = dict(zip(mesh.axis_names, mesh.shape))
    problems = []
    for path, shape in weight_shapes.items():
        layout = layout_map[path]
        if layout is None:
            continue
        for dim, axis in zip(shape, layout.axes):
            if axis is not None and dim % sizes[axis]:
                problems.append(
                    f"{path} {tuple(shape)}: dimension {dim} is split along "
                    f"{axis!r} of size {sizes[axis]}"
                )
    if problems:
        raise ValueError(
            "These weights cannot be split evenly on the mesh "
            f"{dict(sizes)}:\n  " + "\n  ".join(problems)
        )

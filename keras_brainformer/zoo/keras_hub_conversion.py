"""keras-hub's MoE families as Brainformer backbones, weights copied exactly.

keras-hub's `MixtralBackbone`, `QwenMoeBackbone` and `Qwen3MoeBackbone` are
decoder stacks whose layer is "attention, then an MoE (or dense) SwiGLU FFN",
pre-norm with RMS norms: a Brainformer block of two sublayers. This module
turns their config into block specs and backbone arguments
(`brainformer_config_from_keras_hub`) and copies every weight across
(`backbone_from_keras_hub`, `causal_lm_from_keras_hub`), path by path: each keras-hub weight is used
exactly once and each Brainformer weight is written exactly once, or the
conversion fails naming the weight. Options a Brainformer cannot compute
exactly are refused by name, never approximated.

What maps to what (per decoder layer `i`, sublayer 0 attention, 1 the FFN):

| keras-hub                                          | Brainformer                         |
|----------------------------------------------------|-------------------------------------|
| `self_attention/query|key|value/kernel` (`bias`)   | `0_attention/w_query|...` (`b_...`) |
| `self_attention/attention_output/kernel`           | `0_attention/w_output`              |
| `self_attention/query|key_dense_layernorm/scale`   | `0_attention/query|key_norm`        |
| `self_attention_layernorm`, `feedforward_layernorm`| `0_attention_norm`, `1_moe_norm`    |
| `*_sparse_moe_block/sparse_feedforward_gate_dense` | `1_moe/router/kernel`               |
| experts `gate` / `intermediate` / `output` dense   | `1_moe/experts/w_gate|w_in|w_out`   |
| Qwen's fused experts `gate_dense [E, d, 2h]`       | split: first half gate, second `w_in` |
| `*_moe_mlp/feedforward_*_dense` (dense layers)     | `1_ffn/w_gate|w_in|w_out`           |

Sliding windows follow the config (`sliding_window` for Mixtral,
`use_sliding_window_attention` / `sliding_window_size` for Qwen-MoE,
`sliding_window_size` for Qwen3-MoE). keras-hub 0.32 itself applies the
Qwen families' window only outside its fused-attention path: Qwen-MoE's on
CPU, Qwen3-MoE's on TensorFlow (its JAX path, and GPU/TPU, ignore it), so
for sequences longer than the window the converted model computes what the
config says, which is what keras-hub computes there.

The routing is dropless top-k (`capacity_factor=None`): every token reaches
its `k` experts, as in keras-hub, but only those experts are computed. The
training-time auxiliary loss is ours (GShard's load balance loss, pooled,
with keras-hub's coefficient), not keras-hub's formula: logits, generation
and gradients of the language-model loss are unaffected.
"""

import numbers
import re

import keras
import keras_hub
import numpy as np

from keras_brainformer.models.brainformer.block_spec import AttentionSpec
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.block_spec import FeedForwardSpec
from keras_brainformer.models.brainformer.block_spec import MoESpec
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_causal_lm import BrainformerCausalLM
from keras_brainformer.upstream_private import load_preset_json

# keras-hub backbone class name -> family name.
KERAS_HUB_FAMILIES = {
    "MixtralBackbone": "mixtral",
    "QwenMoeBackbone": "qwen_moe",
    "Qwen3MoeBackbone": "qwen3_moe",
}
# Name prefixes of the family's MoE block and dense MLP layers (Keras may
# append `_<n>` to auto-generated names).
_MOE_BLOCK = {
    "mixtral": "mixtral_sparse_moe_block",
    "qwen_moe": "qwen_sparse_moe_block",
    "qwen3_moe": "qwen3_sparse_moe_block",
}
_DENSE_MLP = {"qwen_moe": "qwen_moe_mlp", "qwen3_moe": "qwen3_moe_mlp"}
# Used when the caller gives no `max_sequence_length` (keras-hub's families
# have none: RoPE positions are unbounded).
DEFAULT_MAX_SEQUENCE_LENGTH = 32768


def keras_hub_family(backbone):
    """The family name of a keras-hub backbone instance, or a `TypeError`."""
    for class_name, family in KERAS_HUB_FAMILIES.items():
        if isinstance(backbone, getattr(keras_hub.models, class_name)):
            return family
    raise TypeError(
        "Expected a keras-hub backbone of one of the classes "
        f"{tuple(KERAS_HUB_FAMILIES)}. Received: {type(backbone).__name__}"
    )


def keras_hub_preset_config(preset):
    """`(class_name, config)` of the backbone in keras-hub preset `preset`
    (a keras-hub or zoo preset name, a handle or a folder), from its
    `config.json` alone: no weights are read or downloaded, nothing is built.
    Raises what keras-hub raises for a preset it cannot find."""
    data = load_preset_json(preset)
    return data.get("class_name"), data.get("config") or {}


def _refuse(family, option, value, allowed):
    raise ValueError(
        f"Cannot convert this {family} model exactly: its `{option}`={value!r}; "
        f"the conversion supports {allowed}."
    )


def _whole(family, option, value):
    """`value` as an int when it is a whole number (configs may hold 1e6)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        _refuse(family, option, value, "a whole number")
    return int(value)


def _sparse_layers(family, config, weight_paths=None):
    """Which decoder layers hold an MoE block: read from the model's weight
    paths when given, else keras-hub 0.32's rule from the config. (Its
    `QwenMoeBackbone` builds every decoder with `layer_index=0`, so
    `decoder_sparse_step` and `mlp_only_layers` act on layer 0's index for
    all layers; `Qwen3MoeBackbone` passes each layer's own index.)"""
    num_layers = config["num_layers"]
    if weight_paths is not None:
        return [
            any(re.match(rf"transformer_layer_{i}/{_MOE_BLOCK[family]}(?:_\d+)?/", p)
                for p in weight_paths)
            for i in range(num_layers)
        ]
    if family == "mixtral":
        return [True] * num_layers
    mlp_only = config.get("mlp_only_layers") or []
    step = config.get("decoder_sparse_step", 1)
    indices = [0] * num_layers if family == "qwen_moe" else range(num_layers)
    return [
        i not in mlp_only and config["num_experts"] > 0 and (i + 1) % step == 0
        for i in indices
    ]


def brainformer_config_from_keras_hub(config, family, max_sequence_length=None,
                                      weight_paths=None):
    """`BrainformerBackbone` arguments computing the same function as the
    keras-hub backbone of `family` built from `config`.

    Args:
        config: the keras-hub backbone's `get_config()` (or a preset's
            `config.json` `"config"` entry).
        family: `"mixtral"`, `"qwen_moe"` or `"qwen3_moe"`.
        max_sequence_length: the longest input the converted model accepts
            (default `DEFAULT_MAX_SEQUENCE_LENGTH`).
        weight_paths: the keras-hub model's weight paths, if at hand: which
            layers are MoE layers is then read from them.

    Returns:
        A dict of `BrainformerBackbone` keyword arguments.

    Example:
    >>> kwargs = brainformer_config_from_keras_hub({"vocabulary_size": 100,
    ...     "num_layers": 2, "num_query_heads": 4, "num_key_value_heads": 2,
    ...     "hidden_dim": 16, "intermediate_dim": 8, "num_experts": 4,
    ...     "top_k": 2, "sliding_window": 512}, "mixtral")
    >>> kwargs["blocks"].sublayers[0].num_key_value_heads, kwargs["num_layers"]
    (2, 2)
    """
    if family not in _MOE_BLOCK:
        raise ValueError(
            f"Unknown keras-hub family {family!r}. Allowed values: {tuple(_MOE_BLOCK)}."
        )
    if config.get("dropout", 0):
        _refuse(family, "dropout", config["dropout"], "dropout=0 (inference and fine-tuning "
                "without dropout; keras-hub also drops attention probabilities)")
    heads, kv_heads = config["num_query_heads"], config["num_key_value_heads"]
    d = config["hidden_dim"]
    head_dim = config.get("head_dim") or d // heads
    if family == "mixtral":
        window = config.get("sliding_window")
    elif family == "qwen_moe":
        window = config.get("use_sliding_window_attention") and config["sliding_window_size"]
        window = window or None
    else:
        window = config.get("sliding_window_size") or None
    attention = AttentionSpec(
        num_heads=heads,
        head_dim=head_dim,
        num_key_value_heads=kv_heads,
        sliding_window=window,
        qkv_bias=family == "qwen_moe",
        qk_norm=family == "qwen3_moe",
    )
    if family == "mixtral":
        moe_width = config["intermediate_dim"]
        normalize, aux = True, config.get("router_aux_loss_coef", 0.02)
        if config.get("router_jitter_noise", 0.0):
            _refuse(family, "router_jitter_noise", config["router_jitter_noise"], "0.0")
    else:
        moe_width = config["moe_intermediate_dim"]
        normalize = bool(config.get("norm_top_k_prob", False))
        aux = config.get("router_aux_loss_coefficient", 0.001)
    moe_fields = {}
    if family == "qwen_moe":
        moe_fields["shared_expert_intermediate_dim"] = config["shared_expert_intermediate_dim"]
    specs = []
    for sparse in _sparse_layers(family, config, weight_paths):
        if sparse:
            ffn = MoESpec(
                num_experts=config["num_experts"],
                intermediate_dim=moe_width,
                activation="gated_silu",
                top_k=config["top_k"],
                capacity_factor=None,
                eval_capacity_factor="same",
                normalize_gates=normalize,
                load_balance_loss_weight=float(aux),
                load_balance_loss_mode="pooled",
                z_loss_weight=0.0,
                **moe_fields,
            )
        else:
            ffn = FeedForwardSpec(
                intermediate_dim=config["intermediate_dim"], activation="gated_silu"
            )
        specs.append(BlockSpec([attention, ffn]))
    if all(spec == specs[0] for spec in specs):
        blocks, num_layers = specs[0], len(specs)
    else:
        blocks, num_layers = specs, None
    dtype = config.get("dtype")
    if isinstance(dtype, dict):
        dtype = dtype.get("config", {}).get("name")
    return {
        "vocabulary_size": config["vocabulary_size"],
        "hidden_dim": d,
        "blocks": blocks,
        "num_layers": num_layers,
        "max_sequence_length": max_sequence_length or DEFAULT_MAX_SEQUENCE_LENGTH,
        "norm": "rms",
        "layer_norm_epsilon": float(config.get("layer_norm_epsilon", 1e-6)),
        "rope_max_wavelength": _whole(
            family, "rope_max_wavelength", config.get("rope_max_wavelength", 10000)
        ),
        "rope_scaling_factor": float(config.get("rope_scaling_factor", 1.0)),
        "tie_embeddings": bool(config.get("tie_word_embeddings", False)),
        "dtype": dtype,
    }


def _source_patterns(family, layer, sparse):
    """Brainformer path suffix -> (keras-hub path regex, part) for layer
    `layer`; `part` is None (the whole weight), or 0 / 1 for the first /
    second half of the last axis (Qwen's fused expert gate and up)."""
    decoder = rf"transformer_layer_{layer}/"
    at = decoder + "self_attention/"
    ours = f"block_{layer}/"
    table = {
        "0_attention_norm/scale": (decoder + "self_attention_layernorm/scale", None),
        "0_attention/w_query": (at + "query/kernel", None),
        "0_attention/w_key": (at + "key/kernel", None),
        "0_attention/w_value": (at + "value/kernel", None),
        "0_attention/w_output": (at + "attention_output/kernel", None),
    }
    if family == "qwen_moe":
        for name in ("query", "key", "value"):
            table[f"0_attention/b_{name}"] = (at + f"{name}/bias", None)
    if family == "qwen3_moe":
        for name in ("query", "key"):
            table[f"0_attention/{name}_norm"] = (at + f"{name}_dense_layernorm/scale", None)
    kind = "moe" if sparse else "ffn"
    table[f"1_{kind}_norm/scale"] = (decoder + "feedforward_layernorm/scale", None)
    if sparse:
        block = rf"transformer_layer_{layer}/{_MOE_BLOCK[family]}(?:_\d+)?/"
        experts = block + "experts/expert_feedforward_"
        table["1_moe/router/kernel"] = (block + "sparse_feedforward_gate_dense/kernel", None)
        table["1_moe/experts/w_out"] = (experts + "output_dense", None)
        if family == "mixtral":
            table["1_moe/experts/w_gate"] = (experts + "gate_dense", None)
            table["1_moe/experts/w_in"] = (experts + "intermediate_dense", None)
        else:
            table["1_moe/experts/w_gate"] = (experts + "gate_dense", 0)
            table["1_moe/experts/w_in"] = (experts + "gate_dense", 1)
        if family == "qwen_moe":
            shared = block + "shared_expert_dense/feedforward_"
            table["1_moe/shared_expert/w_gate"] = (shared + "gate_dense/kernel", None)
            table["1_moe/shared_expert/w_in"] = (shared + "intermediate_dense/kernel", None)
            table["1_moe/shared_expert/w_out"] = (shared + "output_dense/kernel", None)
            table["1_moe/shared_expert_gate"] = (block + "shared_expert_gate_dense/kernel", None)
    else:
        mlp = rf"transformer_layer_{layer}/{_DENSE_MLP[family]}(?:_\d+)?/feedforward_"
        table["1_ffn/w_gate"] = (mlp + "gate_dense/kernel", None)
        table["1_ffn/w_in"] = (mlp + "intermediate_dense/kernel", None)
        table["1_ffn/w_out"] = (mlp + "output_dense/kernel", None)
    return {ours + suffix: source for suffix, source in table.items()}


def weight_sources(family, config, weight_paths=None):
    """Every trainable Brainformer weight path of the converted model ->
    `(keras-hub path regex, part)` (see `_source_patterns`)."""
    sources = {
        "token_embedding/embeddings": ("token_embedding/embeddings", None),
        "final_norm/scale": ("sequence_output_layernorm/scale", None),
    }
    if not config.get("tie_word_embeddings", False):
        sources["token_embedding/reverse_embeddings"] = ("token_embedding/reverse_embeddings", None)
    for layer, sparse in enumerate(_sparse_layers(family, config, weight_paths)):
        sources.update(_source_patterns(family, layer, sparse))
    return sources


def copy_keras_hub_weights(source, target, family):
    """Copies every weight of keras-hub backbone `source` into the converted
    Brainformer backbone `target`. Raises a `ValueError` naming the weight
    when one is missing, matched twice, left unused or shaped otherwise;
    nothing is assigned unless every weight checks out (checked on shapes
    first, then copied one weight at a time, so a large model is never held
    twice more in host memory)."""
    config = source.get_config()
    theirs = {v.path: v for v in source.weights}
    sources = weight_sources(family, config, list(theirs))
    plan, used = [], set()
    for variable in target.weights:
        if not variable.trainable:
            continue  # router statistics: recomputed by every call
        if variable.path not in sources:
            raise ValueError(
                f"The converted model has a weight {variable.path!r} with no keras-hub "
                "counterpart (is the target built from brainformer_config_from_keras_hub?)."
            )
        pattern, part = sources[variable.path]
        matches = [path for path in theirs if re.fullmatch(pattern, path)]
        if len(matches) != 1:
            raise ValueError(
                f"Weight {variable.path!r} should come from one keras-hub weight matching "
                f"{pattern!r}; found {matches or 'none'} among {len(theirs)} weights."
            )
        shape = tuple(theirs[matches[0]].shape)
        if part is not None:
            shape = shape[:-1] + (shape[-1] // 2,)
        if shape != tuple(variable.shape):
            raise ValueError(
                f"Weight {variable.path!r} {tuple(variable.shape)} cannot take keras-hub's "
                f"{matches[0]!r} (giving {shape})."
            )
        plan.append((variable, theirs[matches[0]], part))
        used.add(matches[0])
    unused = sorted(set(theirs) - used)
    if unused:
        raise ValueError(
            f"The keras-hub model has weights the conversion does not use: {unused}. "
            "A model with extra weights (a LoRA-enabled or quantized model, or a newer "
            "keras-hub layout) cannot be converted exactly."
        )
    for variable, source_variable, part in plan:
        value = keras.ops.convert_to_numpy(source_variable.value)
        if part is not None:
            value = np.split(value, 2, axis=-1)[part]
        variable.assign(value)


def backbone_from_keras_hub(backbone, max_sequence_length=None):
    """The Brainformer form of a keras-hub `MixtralBackbone`,
    `QwenMoeBackbone` or `Qwen3MoeBackbone`: the same function (logits
    equal within float32 rounding, dropless routing), its weights copied
    exactly; options it cannot compute exactly are refused by name.

    Args:
        backbone: the keras-hub backbone (built, with its weights).
        max_sequence_length: the longest input the converted model
            accepts (default 32768).

    Returns:
        A `BrainformerBackbone`.

    Example:
    ```python
    import keras_hub
    from keras_brainformer.zoo.keras_hub_conversion import backbone_from_keras_hub
    mixtral = keras_hub.models.MixtralBackbone(
        vocabulary_size=64, num_layers=2, num_query_heads=4,
        num_key_value_heads=2, hidden_dim=16, intermediate_dim=32,
        num_experts=4)
    backbone = backbone_from_keras_hub(mixtral)
    ```
    """
    family = keras_hub_family(backbone)
    config = backbone.get_config()
    paths = [v.path for v in backbone.weights]
    target = BrainformerBackbone(
        **brainformer_config_from_keras_hub(config, family, max_sequence_length, paths)
    )
    copy_keras_hub_weights(backbone, target, family)
    return target


def causal_lm_from_keras_hub(causal_lm, max_sequence_length=None):
    """The Brainformer form of a keras-hub `MixtralCausalLM`,
    `QwenMoeCausalLM` or `Qwen3MoeCausalLM`: its backbone converted by
    `backbone_from_keras_hub` (same logits, weights copied) and its
    preprocessor (keras-hub's tokenizer) kept as it is, so
    `generate("text")` returns what keras-hub's greedy `generate` does.

    Args:
        causal_lm: the keras-hub task (with or without a preprocessor).
        max_sequence_length: passed to `backbone_from_keras_hub`.

    Returns:
        A `BrainformerCausalLM`.
    """
    backbone = backbone_from_keras_hub(causal_lm.backbone, max_sequence_length)
    return BrainformerCausalLM(backbone=backbone, preprocessor=causal_lm.preprocessor)

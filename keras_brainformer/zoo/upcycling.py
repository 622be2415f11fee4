"""Sparse upcycling: a trained dense model becomes an MoE model that starts
from what the dense one learned (Komatsuzaki et al., ICLR 2023,
arXiv 2212.05055).

The target is a block layout over the *same sequence of sublayers* as the
source: attention stays attention, and each dense FFN either stays a dense
FFN or becomes an MoE sublayer. Every weight of the target that has a
counterpart in the source is copied (token embedding, attention, every
norm, dense FFNs kept dense, the final norm); the experts of each MoE
sublayer start as copies of the dense FFN they replace (optionally with small
multiplicative noise); only the routers are new.

**Routers start small and random, not at zero.** With renormalised top-k
gates (`k >= 2`) the output of an MoE sublayer whose experts are identical is
the dense FFN's output whatever the router says (`Σ g_i · FFN(x) = FFN(x)` when
`Σ g_i = 1`), so any router gives an exact start. At zero, though, every
token's router probabilities tie, every token goes to the same first `k`
experts, the task loss gives the router no gradient (identical experts: the
output does not depend on the gates), and the other experts never train.
A small random router (`N(0, 0.1/d)` truncated at two standard deviations,
the scale of `Router`'s default initializer, seeded) spreads tokens over all
experts from the first step, so the copies receive different gradients and
diverge. `router_init="zeros"` is kept for experiments.

**What is exact at step 0.** Dropless top-k with renormalised gates: the
logits equal the dense model's to float tolerance, in training and at
inference. Top-k with a capacity factor: exact at inference with the zoo's
default causal inference routing (dropless); in training (and with
`inference_routing="as_trained"`) a token that loses its slots gets a smaller
or zero MoE output. Top-1 without renormalisation (Switch) scales the FFN by
its gate. Expert choice gives a token the sum of the softmax scores of the
experts that took it (about `n / E` for a near-uniform router, `n` the number
of experts that took it, `capacity_factor` on average), so copied experts
alone would shrink the FFN's contribution by about `capacity_factor / E`;
`expert_choice_scale="compensate"` (default) multiplies the copied experts'
output projection by `E / round(capacity_factor)`, which makes the causal
inference routing exact for a zero router and close to it for a small one
(the held-out losses are in docs/upcycling.md).

What cannot be matched is an error naming the sublayer: a different number
of sublayers, an attention where the source has an FFN (or the reverse), a
different width, head layout or activation, a different model width,
vocabulary, norm or tied embedding. Nothing is re-initialised silently.

See `upcycle` for an example and docs/upcycling.md for the study.
"""

import json
import pathlib

import keras
import numpy as np

from keras_brainformer.errors import PresetError
from keras_brainformer.layers.causal_self_attention import resolve_head_dim
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.block_spec import MoESpec
from keras_brainformer.models.brainformer.block_spec import config_block_specs
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_causal_lm import BrainformerCausalLM
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.models.brainformer.brainformer_presets import read_backbone_config
from keras_brainformer.upstream_private import sublayers
from keras_brainformer.utils.preset_integrity import CONFIG_FILE
from keras_brainformer.utils.preset_loading import resolve_preset
from keras_brainformer.zoo.preset_writing import write_task_preset

ROUTER_INITS = ("small_random", "zeros")
EXPERT_CHOICE_SCALES = ("compensate", "none")
# Backbone fields the target must share with the source (the blocks aside).
SHARED_FIELDS = (
    "vocabulary_size",
    "hidden_dim",
    "norm",
    "layer_norm_epsilon",
    "rope_max_wavelength",
    "rope_scaling_factor",
    "tie_embeddings",
)
# The upcycled router kernel's scale, variance 0.1 / d: Switch's scale 0.1
# (`Router`'s default before issue 33; the upcycling evidence used it).
ROUTER_INIT_VARIANCE = 0.1


def target_block_specs(target, source_config):
    """The target's list of block specs (one per block), from `target`:
    a `BlockSpec` (or its dict / JSON text), repeated to cover the source's
    sublayers; a list of them (one per block); a backbone config dict (with
    `blocks` and `num_layers`); or a zoo preset name or preset folder.

    Raises `ValueError` when the target's backbone fields (model width,
    vocabulary, norm, rotary wavelength, tied embedding) differ from the
    source's, or when a repeated block does not divide the source's
    sublayers.
    """
    if isinstance(target, str):
        target = _load_target_text(target)
    if isinstance(target, dict) and "blocks" in target:
        target = with_current_names(target, "BrainformerBackbone", "the upcycling target")
        for field in SHARED_FIELDS:
            if field in target and target[field] != source_config[field]:
                raise ValueError(
                    f"The target's `{field}`={target[field]!r} differs from the dense "
                    f"model's {source_config[field]!r}; upcycling keeps every shared "
                    "weight, so the two must agree."
                )
        target_blocks, num_layers = target["blocks"], target.get("num_layers")
        if isinstance(target_blocks, (list, tuple)):
            return [BlockSpec.from_dict(b) for b in target_blocks]
        spec = BlockSpec.from_dict(target_blocks)
        if num_layers is not None:
            return [spec] * int(num_layers)
        target = spec
    if isinstance(target, (list, tuple)):
        return [BlockSpec.from_dict(b) for b in target]
    spec = BlockSpec.from_dict(target)
    total = sum(len(s.sublayers) for s in config_block_specs(source_config))
    per_block = len(spec.sublayers)
    if total % per_block:
        raise ValueError(
            f"The target block has {per_block} sublayers, which does not divide the "
            f"dense model's {total} sublayers; give a block whose length divides "
            f"{total}, or a list of blocks."
        )
    return [spec] * (total // per_block)


def _load_target_text(text):
    """A target given as text: JSON (inline), a JSON file, a zoo preset name or
    a preset folder (its `config.json`)."""
    stripped = text.strip()
    if stripped.startswith(("{", "[")):
        try:
            return json.loads(stripped)
        except json.JSONDecodeError as error:
            raise ValueError(f"The target is not valid JSON: {error}") from None
    if text in backbone_presets:
        return dict(backbone_presets[text]["config"])
    path = pathlib.Path(str(resolve_preset(text)))
    if path.is_dir():
        config_path = path / CONFIG_FILE
        if not config_path.exists():
            raise PresetError(f"{path}: no {CONFIG_FILE} in this folder.")
        return read_backbone_config(path)
    if path.is_file():
        try:
            with open(path) as f:
                return json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not valid JSON: {error}") from None
    raise ValueError(
        f"Unknown target {text!r}: not JSON, a JSON file, a zoo preset name nor a "
        "preset folder."
    )


def _positions(specs):
    """`[(block, index, spec)]` of every sublayer, in order."""
    return [(b, i, sub) for b, spec in enumerate(specs) for i, sub in enumerate(spec.sublayers)]


def _where(block, index, sub):
    return f"block_{block} sublayer {index} ({sub.kind})"


def _check_pair(source, target, d):
    """Raises `ValueError` naming both sublayers when `target` cannot start
    from `source`."""
    (sb, si, s), (tb, ti, t) = source, target
    where = f"target {_where(tb, ti, t)} <- dense {_where(sb, si, s)}"
    if s.kind == "attention" or t.kind == "attention":
        if s.kind != t.kind:
            raise ValueError(
                f"{where}: no counterpart (attention only maps to attention; the "
                "target must keep the dense model's order of attention and FFN "
                "sublayers)."
            )
        for field, a, b in (
            ("num_heads", s.num_heads, t.num_heads),
            ("head_dim", resolve_head_dim(d, s.num_heads, s.head_dim),
             resolve_head_dim(d, t.num_heads, t.head_dim)),
            ("depthwise_conv_kernel", s.depthwise_conv_kernel, t.depthwise_conv_kernel),
            ("num_key_value_heads", s.kv_heads, t.kv_heads),
            ("sliding_window", s.sliding_window, t.sliding_window),
            ("qkv_bias", s.qkv_bias, t.qkv_bias),
            ("qk_norm", s.qk_norm, t.qk_norm),
        ):
            if a != b:
                raise ValueError(f"{where}: `{field}` differs ({b!r} vs dense {a!r}).")
        return
    if s.kind == "moe" and t.kind != "moe":
        raise ValueError(f"{where}: an MoE sublayer cannot become a dense FFN.")
    for field in ("intermediate_dim", "activation"):
        a, b = getattr(s, field), getattr(t, field)
        if a != b:
            raise ValueError(
                f"{where}: `{field}` differs ({b!r} vs dense {a!r}); the experts start "
                "from the dense FFN's weights, so width and activation must match."
            )
    if s.kind == "moe" and s.num_experts != t.num_experts:
        raise ValueError(
            f"{where}: `num_experts` differs ({t.num_experts} vs {s.num_experts})."
        )


def _check_source(backbone):
    for layer in sublayers(backbone):
        if getattr(layer, "lora_enabled", False):
            raise ValueError(
                f"Layer {layer.name!r} of the dense model has LoRA adapters enabled; "
                "upcycle the model without them (reload it from its preset)."
            )
        if getattr(layer, "quantization_mode", None):
            raise ValueError(
                f"Layer {layer.name!r} of the dense model is quantized "
                f"({layer.quantization_mode}); upcycle the float model."
            )


def _check_something_is_upcycled(source_positions, target_positions):
    """Raises `ValueError` when no dense FFN of the source becomes an MoE
    sublayer: the result would be a copy of the source, not an upcycled
    model (for example an MoE preset given as its own target)."""
    kinds = [s.kind for _, _, s in source_positions]
    if any(s.kind == "ffn" and t.kind == "moe"
           for (_, _, s), (_, _, t) in zip(source_positions, target_positions)):
        return
    moe = kinds.count("moe")
    already = f"; its {moe} MoE sublayers would only be copied" if moe else ""
    if "ffn" not in kinds:
        raise ValueError(
            f"The source model has no dense FFN sublayer to upcycle (it is an MoE model "
            f"with {moe} MoE sublayers already). Upcycling starts "
            "MoE experts from a trained dense FFN: give a model with dense FFNs."
        )
    raise ValueError(
        f"The target turns none of the source's {kinds.count('ffn')} dense FFN sublayers "
        f"into an MoE sublayer, so the result would be a copy of the source{already}. "
        "Give a target in which at least one dense FFN becomes an MoE sublayer (for example "
        "`glam_target`, or a block spec with `\"kind\": \"moe\"` where the source has an FFN)."
    )


def _copy_layer(source, target, where):
    if len(source.weights) != len(target.weights):
        raise ValueError(f"{where}: the two layers hold different weights.")
    for s, t in zip(source.weights, target.weights):
        if tuple(s.shape) != tuple(t.shape):
            raise ValueError(
                f"{where}: weight {t.path} has shape {tuple(t.shape)}, the dense "
                f"model's {s.path} {tuple(s.shape)}."
            )
        t.assign(s.value)


def _copy_ffn_into_experts(ffn, moe, spec, rng, expert_noise, router_init, scale):
    bank = moe.experts
    for name in ("w_in", "w_gate", "w_out"):
        if not hasattr(ffn, name):
            continue
        kernel = np.asarray(keras.ops.convert_to_numpy(getattr(ffn, name)))
        experts = np.repeat(kernel[None], spec.num_experts, axis=0)
        if expert_noise:
            experts = experts * (1.0 + expert_noise * rng.standard_normal(experts.shape))
        if name == "w_out":
            experts = experts * scale
        getattr(bank, name).assign(experts.astype(kernel.dtype))
    kernel = moe.router.kernel
    if router_init == "zeros":
        value = np.zeros(kernel.shape)
    else:
        std = np.sqrt(ROUTER_INIT_VARIANCE / kernel.shape[0])
        value = np.clip(rng.standard_normal(kernel.shape), -2.0, 2.0) * std
    kernel.assign(value.astype(keras.backend.standardize_dtype(kernel.dtype)))


def _expert_scale(spec, expert_choice_scale):
    if spec.router != "expert_choice" or expert_choice_scale == "none":
        return 1.0
    factor = spec.capacity_factor
    if spec.eval_capacity_factor not in ("same", None):
        factor = spec.eval_capacity_factor
    k = int(min(spec.num_experts, max(1, np.floor(factor + 0.5))))
    return spec.num_experts / k


def upcycle(
    model,
    target,
    expert_noise=0.0,
    router_init="small_random",
    expert_choice_scale="compensate",
    seed=0,
):
    """Turns a trained dense model into an MoE model that keeps its weights.

    Args:
        model: a `BrainformerCausalLM` (its preprocessor is carried over) or a
            `BrainformerBackbone`, float weights, no LoRA.
        target: the MoE layout (see `target_block_specs`): a `BlockSpec`
            repeated over the source's sublayers (for example GLaM's
            `[attention, MoE, attention, FFN]` over a dense `[attention, FFN]`
            stack), a list of block specs, a backbone config, or a zoo preset
            name or folder with the same widths.
        expert_noise: standard deviation of multiplicative Gaussian noise on
            each copied expert weight (`w · (1 + σ ε)`); 0 (default) keeps the
            copies identical, and the start exact.
        router_init: `"small_random"` (default, `N(0, 0.1/d)` truncated at
            2σ: spreads tokens over the experts from step one) or `"zeros"`
            (every token ties, see the module docstring).
        expert_choice_scale: `"compensate"` (default) scales the copied
            experts' output projection of expert-choice sublayers by
            `E / round(capacity_factor)`; `"none"` copies them as they are.
        seed: int, seeds the router initialisation and the expert noise.

    Returns:
        A model of the same kind as `model` (a `BrainformerCausalLM` with the
        same preprocessor, or a `BrainformerBackbone`).

    Raises:
        ValueError: a sublayer of the target has no counterpart of the same
            kind, width, heads or activation in the source (the message names
            it), the backbones differ in width, vocabulary or norm, or no
            dense FFN of the source becomes an MoE sublayer (an MoE source
            given its own layout would only be copied).

    Example:
    >>> import numpy as np
    >>> from keras_brainformer.models.brainformer.block_spec import (
    ...     AttentionSpec, BlockSpec, FeedForwardSpec, MoESpec)
    >>> from keras_brainformer.models import BrainformerBackbone
    >>> dense = BrainformerBackbone(
    ...     vocabulary_size=64, hidden_dim=16, num_layers=2,
    ...     blocks=BlockSpec([AttentionSpec(num_heads=2),
    ...                       FeedForwardSpec(intermediate_dim=32)]))
    >>> glam = BlockSpec([AttentionSpec(num_heads=2),
    ...                   MoESpec(num_experts=4, intermediate_dim=32, top_k=2,
    ...                           capacity_factor=None),
    ...                   AttentionSpec(num_heads=2),
    ...                   FeedForwardSpec(intermediate_dim=32)])
    >>> moe = upcycle(dense, glam)
    >>> x = {"token_ids": np.arange(16).reshape(2, 8) % 64,
    ...      "padding_mask": np.ones((2, 8), "int32")}
    >>> bool(np.allclose(moe(x), dense(x), atol=1e-5))
    True
    """
    if router_init not in ROUTER_INITS:
        raise ValueError(f"`router_init` must be one of {ROUTER_INITS}. Received: {router_init!r}")
    if expert_choice_scale not in EXPERT_CHOICE_SCALES:
        raise ValueError(
            f"`expert_choice_scale` must be one of {EXPERT_CHOICE_SCALES}. "
            f"Received: {expert_choice_scale!r}"
        )
    if not isinstance(expert_noise, (int, float)) or expert_noise < 0:
        raise ValueError(f"`expert_noise` must be a float >= 0. Received: {expert_noise!r}")
    if isinstance(model, BrainformerCausalLM):
        lm, source = model, model.backbone
    elif isinstance(model, BrainformerBackbone):
        lm, source = None, model
    else:
        raise TypeError(
            "`model` must be a BrainformerCausalLM or a BrainformerBackbone. "
            f"Received: {type(model).__name__}"
        )
    _check_source(source)
    config = source.get_config()
    specs = target_block_specs(target, config)
    source_positions = _positions(source.block_specs)
    target_positions = _positions(specs)
    if len(source_positions) != len(target_positions):
        raise ValueError(
            f"The target has {len(target_positions)} sublayers in {len(specs)} blocks, "
            f"the dense model {len(source_positions)} in {source.num_layers} blocks; "
            "upcycling maps sublayer to sublayer, so the counts must be equal."
        )
    d = config["hidden_dim"]
    for s, t in zip(source_positions, target_positions):
        _check_pair(s, t, d)
    _check_something_is_upcycled(source_positions, target_positions)

    # === The target, with the source's backbone fields ===
    upcycled = BrainformerBackbone(**upcycled_config(config, specs))

    # === Copy what has a counterpart ===
    rng = np.random.default_rng(seed)
    _copy_layer(source.token_embedding, upcycled.token_embedding, "token_embedding")
    _copy_layer(source.final_norm, upcycled.final_norm, "final_norm")
    for (sb, si, s), (tb, ti, t) in zip(source_positions, target_positions):
        where = f"target {_where(tb, ti, t)}"
        source_block = source.transformer_blocks[sb]
        target_block = upcycled.transformer_blocks[tb]
        _copy_layer(source_block.norms[si], target_block.norms[ti], f"{where} norm")
        source_layer = source_block.sublayers[si]
        target_layer = target_block.sublayers[ti]
        if s.kind == "ffn" and t.kind == "moe":
            _copy_ffn_into_experts(
                source_layer,
                target_layer,
                t,
                rng,
                expert_noise,
                router_init,
                _expert_scale(t, expert_choice_scale),
            )
        else:
            _copy_layer(source_layer, target_layer, where)
    if lm is None:
        return upcycled
    return BrainformerCausalLM(upcycled, preprocessor=lm.preprocessor)


def upcycled_config(source_config, specs):
    """The backbone config of the upcycled model: the source's backbone
    fields with `specs` (one `BlockSpec` per block) as its blocks. Builds
    nothing (`upcycle` builds it; the CLI sizes its memory first)."""
    source_config = with_current_names(source_config, "BrainformerBackbone", "the dense model")
    target_config = {
        key: value for key, value in source_config.items() if key not in ("name", "trainable")
    }
    if all(spec == specs[0] for spec in specs):
        target_config.update(blocks=specs[0].to_dict(), num_layers=len(specs))
    else:
        target_config.update(blocks=[s.to_dict() for s in specs], num_layers=None)
    return target_config


def glam_target(source_config, num_experts, top_k=2, capacity_factor=None, **moe_fields):
    """GLaM's layout over a dense `[attention, FFN]` stack: the FFN of every
    other layer (the first, third, ...) becomes an MoE with the dense FFN's
    width and activation; a list of block specs for `upcycle`.

    Args:
        source_config: the dense backbone's config (`backbone.get_config()`).
        num_experts: experts per MoE sublayer.
        top_k, capacity_factor: top-k routing (None = dropless, exact at step 0).
        **moe_fields: other `MoESpec` fields (`router="expert_choice"`, ...).
    """
    return every_nth_ffn_target(
        source_config, 2, num_experts, top_k=top_k, capacity_factor=capacity_factor, **moe_fields
    )


def every_nth_ffn_target(source_config, every, num_experts, offset=0, **moe_fields):
    """The source's blocks with every `every`-th dense FFN (counting from
    `offset`, over the whole stack) replaced by an MoE of the same width and
    activation; a list of block specs for `upcycle`."""
    specs, count = [], 0
    for spec in config_block_specs(source_config):
        sublayers = []
        for sub in spec.sublayers:
            if sub.kind == "ffn":
                if count % every == offset % every:
                    sub = MoESpec(
                        num_experts=num_experts,
                        intermediate_dim=sub.intermediate_dim,
                        activation=sub.activation,
                        **moe_fields,
                    )
                count += 1
            sublayers.append(sub)
        specs.append(BlockSpec(sublayers))
    return specs


def save_upcycled_preset(lm, directory, source, target, settings=None, overwrite=False):
    """Writes `lm` (an upcycled `BrainformerCausalLM`) as a preset folder
    `directory` that `from_preset`, `train --preset` and `generate` accept
    (`preset_writing.write_task_preset`: all or nothing, checksummed);
    `metadata.json` records the source, the target and the settings.

    Raises `ValueError` if `directory` exists and is not empty, unless
    `overwrite`.
    """
    metadata = {
        "description": f"{source} upcycled to an MoE model (sparse upcycling: the "
        "experts of each MoE sublayer that replaces a dense FFN start from that FFN; every "
        "other weight is copied). Not trained after upcycling.",
        "family": "upcycled",
        "base_preset": str(source),
        "paper": None,
        "upcycling": {"source": str(source), "target": _json_safe(target), **(settings or {})},
    }
    return write_task_preset(lm, directory, metadata, overwrite)


def _json_safe(target):
    if isinstance(target, BlockSpec):
        return target.to_dict()
    if isinstance(target, (list, tuple)):
        return [_json_safe(t) for t in target]
    return target

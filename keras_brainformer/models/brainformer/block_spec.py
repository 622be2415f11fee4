"""Block specs: plain, JSON-serialisable descriptions of a Brainformer block.

A block is an ordered sequence of sublayers, each an `AttentionSpec`, a
`FeedForwardSpec` (dense FFN) or a `MoESpec`, each with its own widths. The
model width is a property of the backbone, not of the block.

Example:
>>> spec = BlockSpec([
...     AttentionSpec(num_heads=4),
...     MoESpec(num_experts=8, intermediate_dim=64, router="expert_choice",
...             capacity_factor=1.0),
...     FeedForwardSpec(intermediate_dim=96, activation="gated_gelu"),
... ])
>>> BlockSpec.from_json(spec.to_json()) == spec
True
"""

import dataclasses
import json
from typing import ClassVar
from typing import Optional
from typing import Union

from keras_brainformer.layers.activations import canonical_activation
from keras_brainformer.layers.causal_self_attention import check_depthwise_conv_kernel
from keras_brainformer.layers.causal_self_attention import check_key_value_heads
from keras_brainformer.layers.dropless_blocks import DROPLESS_IMPLS
from keras_brainformer.layers.moe_feed_forward import DISPATCH_MODES
from keras_brainformer.layers.moe_feed_forward import MOE_DEFAULTS
from keras_brainformer.layers.moe_feed_forward import ROUTER_OPTION_NAMES
from keras_brainformer.layers.moe_feed_forward import router_arguments
from keras_brainformer.layers.renamed_arguments import RENAMED_AFTER_0_1
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.layers.routers import INFERENCE_ROUTING
from keras_brainformer.layers.routers import LOAD_BALANCE_MODES
from keras_brainformer.layers.routers import ROUTERS
from keras_brainformer.layers.validation import check_capacity_factor
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.layers.validation import check_non_negative_float
from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.layers.validation import check_positive_int
from keras_brainformer.layers.validation import check_rate

ROUTER_KINDS = tuple(ROUTERS)


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """Causal self-attention sublayer.

    Args:
        num_heads: number of heads.
        head_dim: width of each head; None for `model_dim // num_heads`.
        depthwise_conv_kernel: width of Primer's causal depthwise convolution
            after the Q/K/V projections (multi-dconv-head attention); 0 (the
            default, and the value assumed by dicts without the key) is off,
            Primer uses 3.
        num_key_value_heads: grouped-query attention's key/value heads (a
            divisor of `num_heads`); None (the default) for one per query
            head.
        sliding_window: attend to the last `sliding_window` positions only
            (Mixtral); None (the default) for the whole prefix.
        qkv_bias: biases on the Q, K and V projections (Qwen-MoE).
        qk_norm: per-head RMS norm of queries and keys before RoPE (Qwen3),
            with the backbone's `layer_norm_epsilon`.

    Dicts without the later keys (every field after `head_dim`) get their
    defaults, which are the layer of before.
    """

    num_heads: int = 8
    head_dim: Optional[int] = None
    depthwise_conv_kernel: int = 0
    num_key_value_heads: Optional[int] = None
    sliding_window: Optional[int] = None
    qkv_bias: bool = False
    qk_norm: bool = False
    kind: ClassVar[str] = "attention"
    # Fields written to a dict only when set (see `sublayer_to_dict`).
    omitted_when_default: ClassVar[tuple] = (
        "num_key_value_heads", "sliding_window", "qkv_bias", "qk_norm"
    )

    def __post_init__(self):
        check_positive_int("num_heads", self.num_heads)
        check_optional_positive_int("head_dim", self.head_dim)
        object.__setattr__(
            self,
            "depthwise_conv_kernel",
            check_depthwise_conv_kernel(self.depthwise_conv_kernel),
        )
        check_key_value_heads(
            self.num_heads, self.num_key_value_heads, self.depthwise_conv_kernel
        )
        check_optional_positive_int("sliding_window", self.sliding_window)
        for field in ("qkv_bias", "qk_norm"):
            if not isinstance(getattr(self, field), bool):
                raise TypeError(
                    f"`{field}` must be a bool. Received: {field}={getattr(self, field)!r}"
                )
        if self.head_dim is not None and self.head_dim % 2:
            raise ValueError(
                "`head_dim` must be even (rotary position embeddings). "
                f"Received: head_dim={self.head_dim}"
            )

    @property
    def kv_heads(self):
        """Key/value heads: `num_key_value_heads`, or `num_heads`."""
        return self.num_key_value_heads or self.num_heads

    def layer_kwargs(self):
        """Arguments for `CausalSelfAttention` (the backbone adds the rotary
        settings and the norm epsilon)."""
        return {
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "depthwise_conv_kernel": self.depthwise_conv_kernel,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "use_qkv_bias": self.qkv_bias,
            "qk_norm": self.qk_norm,
        }


@dataclasses.dataclass(frozen=True)
class FeedForwardSpec:
    """Dense FFN sublayer.

    Args:
        intermediate_dim: hidden width.
        activation: see `keras_brainformer.layers.activations.ACTIVATIONS`.
    """

    intermediate_dim: int
    activation: str = "gelu"
    kind: ClassVar[str] = "ffn"

    def __post_init__(self):
        check_positive_int("intermediate_dim", self.intermediate_dim)
        object.__setattr__(self, "activation", canonical_activation(self.activation))


@dataclasses.dataclass(frozen=True)
class MoESpec:
    """Mixture-of-Experts FFN sublayer: the flat config of `MoEFeedForward`
    (its router's options included; the block sets `kernel_initializer`,
    `dtype` and `name`), with the layer's defaults (`MOE_DEFAULTS`, the
    table its signature uses, so a spec and a directly built layer never
    disagree).

    Args:
        num_experts: number of experts.
        intermediate_dim: hidden width of each expert.
        activation: expert activation.
        router: `"top_k"` (token choice) or `"expert_choice"`.
        top_k: experts per token (top-k only; for expert choice it stays
            at its default).
        capacity_factor: training capacity factor; None = dropless (top-k
            only). Left unset, the router's default: 1.25 for top-k
            (`TopKRouter`), 2.0 for expert choice (`ExpertChoiceRouter`).
        eval_capacity_factor: inference capacity factor; `"same"` copies
            `capacity_factor`.
        load_balance_loss_weight: None for the router's default (0.01 for
            top-k, 0 for expert choice).
        load_balance_loss_mode: `"per_group"` (GShard) or `"pooled"`.
        z_loss_weight: router z-loss coefficient.
        group_size: routing group size; None = one group per sequence.
        jitter: multiplicative router input noise in training.
        batch_prioritized: top-k only, rank tokens by router confidence.
        normalize_gates: top-k only, renormalise the `top_k` gates (None:
            for top_k > 1).
        inference_routing: `"causal"` or `"as_trained"` (see
            `keras_brainformer.layers.routers`).
        dispatch: `"index"` (sparse) or `"one_hot"` (the test reference).
        dropless_impl: dropless expert computation, `"auto"`, `"blocks"`,
            `"ragged"` (JAX) or `"slots"`.
        dropless_block_size: rows per block of the blocks path; None = by
            the measured rule.
        shared_expert_intermediate_dim: hidden width of Qwen-MoE's shared expert
            (a dense FFN with `activation` that every token goes through,
            scaled by a sigmoid gate); None (the default, and the value
            assumed by dicts without the key) for none. Left out of
            `sublayer_to_dict` when None, so configs without it are unchanged.
    """

    num_experts: int
    intermediate_dim: int
    activation: str = MOE_DEFAULTS["activation"]
    router: str = MOE_DEFAULTS["router"]
    top_k: int = MOE_DEFAULTS["top_k"]
    capacity_factor: Union[float, str, None] = MOE_DEFAULTS["capacity_factor"]
    eval_capacity_factor: Union[float, str, None] = MOE_DEFAULTS["eval_capacity_factor"]
    load_balance_loss_weight: Optional[float] = MOE_DEFAULTS["load_balance_loss_weight"]
    z_loss_weight: float = MOE_DEFAULTS["z_loss_weight"]
    group_size: Optional[int] = MOE_DEFAULTS["group_size"]
    jitter: float = MOE_DEFAULTS["jitter"]
    batch_prioritized: bool = MOE_DEFAULTS["batch_prioritized"]
    normalize_gates: Optional[bool] = MOE_DEFAULTS["normalize_gates"]
    inference_routing: str = MOE_DEFAULTS["inference_routing"]
    load_balance_loss_mode: str = MOE_DEFAULTS["load_balance_loss_mode"]
    dispatch: str = MOE_DEFAULTS["dispatch"]
    dropless_impl: str = MOE_DEFAULTS["dropless_impl"]
    dropless_block_size: Optional[int] = MOE_DEFAULTS["dropless_block_size"]
    shared_expert_intermediate_dim: Optional[int] = MOE_DEFAULTS["shared_expert_intermediate_dim"]
    kind: ClassVar[str] = "moe"
    omitted_when_default: ClassVar[tuple] = ("shared_expert_intermediate_dim",)

    def __post_init__(self):
        check_positive_int("num_experts", self.num_experts)
        check_positive_int("intermediate_dim", self.intermediate_dim)
        object.__setattr__(self, "activation", canonical_activation(self.activation))
        check_choice("router", self.router, ROUTER_KINDS)
        check_positive_int("top_k", self.top_k)
        if self.router == "top_k" and self.top_k > self.num_experts:
            raise ValueError(
                f"`top_k` must be <= num_experts={self.num_experts}. "
                f"Received: top_k={self.top_k}"
            )
        # The layer's rules: the top-k options refused for expert choice
        # unless unset, an unset capacity factor the router's default.
        arguments = router_arguments(
            self.router, {name: getattr(self, name) for name in ROUTER_OPTION_NAMES}
        )
        object.__setattr__(self, "capacity_factor", arguments["capacity_factor"])
        dropless_ok = self.router == "top_k"
        check_capacity_factor("capacity_factor", self.capacity_factor, dropless_ok)
        if self.eval_capacity_factor != "same":
            check_capacity_factor(
                "eval_capacity_factor", self.eval_capacity_factor, dropless_ok
            )
        if self.load_balance_loss_weight is not None:
            check_non_negative_float(
                "load_balance_loss_weight", self.load_balance_loss_weight
            )
        check_choice("load_balance_loss_mode", self.load_balance_loss_mode, LOAD_BALANCE_MODES)
        check_non_negative_float("z_loss_weight", self.z_loss_weight)
        check_optional_positive_int("group_size", self.group_size)
        check_rate("jitter", self.jitter)
        for field in ("batch_prioritized", "normalize_gates"):
            value = getattr(self, field)
            if not isinstance(value, bool) and not (field == "normalize_gates" and value is None):
                allowed = "a bool" if field == "batch_prioritized" else "a bool or None"
                raise TypeError(f"`{field}` must be {allowed}. Received: {field}={value!r}")
        check_choice("inference_routing", self.inference_routing, INFERENCE_ROUTING)
        check_choice("dispatch", self.dispatch, DISPATCH_MODES)
        check_choice("dropless_impl", self.dropless_impl, DROPLESS_IMPLS)
        check_optional_positive_int("dropless_block_size", self.dropless_block_size)
        check_optional_positive_int(
            "shared_expert_intermediate_dim", self.shared_expert_intermediate_dim
        )

    @property
    def experts_per_token(self):
        """Average experts per token: `top_k` for top-k, the capacity factor
        for expert choice (used by activated-parameter counts)."""
        return self.top_k if self.router == "top_k" else self.capacity_factor

    def layer_kwargs(self):
        """Arguments for `MoEFeedForward`: the spec's fields, as they are."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


SUBLAYER_SPECS = {cls.kind: cls for cls in (AttentionSpec, FeedForwardSpec, MoESpec)}


def sublayer_to_dict(spec):
    """`{"kind": ..., **fields}`, without the fields the spec class lists in
    `omitted_when_default` while they hold their default: the keras-hub
    families' options, added after the zoo's presets were written, so
    configs that do not use them stay byte-for-byte what they were (and
    load in versions of before)."""
    omitted = getattr(spec, "omitted_when_default", ())
    defaults = {f.name: f.default for f in dataclasses.fields(spec)}
    return {
        "kind": spec.kind,
        **{
            name: value
            for name, value in dataclasses.asdict(spec).items()
            if not (name in omitted and value == defaults[name])
        },
    }


def sublayer_from_dict(config, where="sublayer"):
    """Builds a sublayer spec from `{"kind": ..., **fields}`."""
    if isinstance(config, tuple(SUBLAYER_SPECS.values())):
        return config
    if not isinstance(config, dict):
        raise TypeError(
            f"`{where}` must be a dict or a sublayer spec. Received: {config!r}"
        )
    config = dict(config)
    kind = config.pop("kind", None)
    if kind not in SUBLAYER_SPECS:
        raise ValueError(
            f"Unknown `{where}.kind`={kind!r}. Allowed values: {tuple(SUBLAYER_SPECS)}."
        )
    cls = SUBLAYER_SPECS[kind]
    if kind in RENAMED_AFTER_0_1:  # block specs written by 0.1 (`hidden_dim`, `k`)
        config = with_current_names(config, kind, where=f"`{where}` of kind {kind!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - fields)
    if unknown:
        raise ValueError(
            f"Unknown field(s) {unknown} in `{where}` of kind {kind!r}. "
            f"Allowed fields: {sorted(fields)}."
        )
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise type(e)(f"In `{where}` ({kind}): {e}") from None


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """An ordered, non-empty sequence of sublayer specs.

    Each sublayer is wrapped pre-norm residual: `x + sublayer(norm(x))`.
    Accepts spec objects or their dicts (`{"kind": "moe", ...}`).
    """

    sublayers: tuple

    def __post_init__(self):
        if isinstance(self.sublayers, (str, bytes, dict)) or not hasattr(
            self.sublayers, "__iter__"
        ):
            raise TypeError(
                "`sublayers` must be a list of sublayer specs. "
                f"Received: sublayers={self.sublayers!r}"
            )
        sublayers = tuple(
            sublayer_from_dict(s, where=f"sublayers[{i}]")
            for i, s in enumerate(self.sublayers)
        )
        if not sublayers:
            raise ValueError(
                "`sublayers` must hold at least one sublayer. Received: []"
            )
        object.__setattr__(self, "sublayers", sublayers)

    def to_dict(self):
        return {"sublayers": [sublayer_to_dict(s) for s in self.sublayers]}

    @classmethod
    def from_dict(cls, config):
        if isinstance(config, cls):
            return config
        if not isinstance(config, dict) or set(config) != {"sublayers"}:
            raise ValueError(
                "A block spec dict must have exactly one key, 'sublayers'. "
                f"Received: {config!r}"
            )
        return cls(config["sublayers"])

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), **kwargs)

    @classmethod
    def from_json(cls, text):
        return cls.from_dict(json.loads(text))

    def count(self, kind):
        """Number of sublayers of `kind` (`attention`, `ffn` or `moe`)."""
        return sum(s.kind == kind for s in self.sublayers)


def dense_transformer_layer(num_heads, intermediate_dim, activation="gelu", head_dim=None):
    """A standard Transformer decoder layer: attention then dense FFN."""
    return BlockSpec(
        [
            AttentionSpec(num_heads=num_heads, head_dim=head_dim),
            FeedForwardSpec(intermediate_dim=intermediate_dim, activation=activation),
        ]
    )


# GLaM's MoE settings in praxis' GLaM configs (the expert-choice paper's §3.4
# describes them): top-2 gating, capacity factor 2, load-balance loss 0.01.
GLAM_CAPACITY_FACTOR = 2.0
GLAM_LOAD_BALANCE_LOSS_WEIGHT = 0.01


def glam_layer_pair(
    num_heads,
    intermediate_dim,
    num_experts,
    router="top_k",
    capacity_factor=GLAM_CAPACITY_FACTOR,
    head_dim=None,
    expert_activation="gelu",
    ffn_activation="gated_gelu",
    **moe_kwargs,
):
    """GLaM's repeating unit: two decoder layers, the first with its FFN
    replaced by the MoE (attention, MoE, attention, dense FFN).

    The one GLaM recipe: every `glam_*` preset is built from it. The experts
    are plain two-matrix GELU FFNs and the dense FFN is gated GELU: the GLaM
    paper puts the gated linear unit "in the non-MoE Transformer feed-forward
    sub-layers", and praxis' GLaM (`layers/glam.py`) sets gated GELU on the
    dense FFN only (docs/moe_layers.md#initialisation).

    Args:
        num_heads: attention heads of both attention sublayers.
        intermediate_dim: hidden width of each expert and of the dense FFN.
        num_experts: experts of the MoE sublayer.
        router: `"top_k"` (GLaM: top-2 with a load-balance loss of
            `GLAM_LOAD_BALANCE_LOSS_WEIGHT`) or `"expert_choice"`.
        capacity_factor: the MoE's training capacity factor.
        head_dim: per-head width (None: model width / heads).
        expert_activation: the experts' activation.
        ffn_activation: the dense FFN's activation.
        **moe_kwargs: any other `MoESpec` field (they override the top-2
            defaults, e.g. `top_k=1`).

    Example:
    >>> spec = glam_layer_pair(num_heads=4, intermediate_dim=64, num_experts=8)
    >>> [s.kind for s in spec.sublayers], spec.sublayers[1].activation
    (['attention', 'moe', 'attention', 'ffn'], 'gelu')
    """
    if "activation" in moe_kwargs:
        raise TypeError(
            "glam_layer_pair() takes `expert_activation` and `ffn_activation`; 0.1.0's "
            "`activation`, which set both, is gone. "
            f"Received: activation={moe_kwargs['activation']!r}"
        )
    moe = {"router": router, "capacity_factor": capacity_factor}
    if router == "top_k":
        moe.update(top_k=2, load_balance_loss_weight=GLAM_LOAD_BALANCE_LOSS_WEIGHT)
    moe.update(moe_kwargs)
    return BlockSpec(
        [
            AttentionSpec(num_heads=num_heads, head_dim=head_dim),
            MoESpec(
                num_experts=num_experts,
                intermediate_dim=intermediate_dim,
                activation=expert_activation,
                **moe,
            ),
            AttentionSpec(num_heads=num_heads, head_dim=head_dim),
            FeedForwardSpec(intermediate_dim=intermediate_dim, activation=ffn_activation),
        ]
    )


def current_backbone_config(config, where="BrainformerBackbone"):
    """A copy of backbone constructor kwargs `config` in today's form: 0.1's
    argument names translated (`layers/renamed_arguments.py`), in the
    backbone's arguments and in every sublayer of `blocks`, each block
    written as its spec's `to_dict()`. Configs of 0.1 and of today compare
    equal this way (a training run's recorded config, a preset folder).
    Nothing is built; a bad block raises as `BlockSpec` does."""
    config = with_current_names(config, "BrainformerBackbone", where)
    blocks = config.get("blocks")
    if isinstance(blocks, (BlockSpec, dict)):
        config["blocks"] = BlockSpec.from_dict(blocks).to_dict()
    elif isinstance(blocks, (list, tuple)):
        config["blocks"] = [BlockSpec.from_dict(b).to_dict() for b in blocks]
    return config


def config_block_specs(config):
    """The list of block specs of backbone config `config` (its `blocks` and
    `num_layers`; a 0.1 config's `num_blocks` and sublayer keys translated).
    For the tools that read a config without building it (counts, weight
    specs, the memory plan, the step-time model)."""
    config = with_current_names(config, "BrainformerBackbone")
    return resolve_block_specs(config["blocks"], config.get("num_layers"))


def resolve_block_specs(blocks, num_layers):
    """Turns `blocks` (one spec, or a list of specs, or their dicts) and
    `num_layers` into the list of block specs of the stack."""
    if isinstance(blocks, (BlockSpec, dict)):
        spec = BlockSpec.from_dict(blocks)
        count = 1 if num_layers is None else check_positive_int("num_layers", num_layers)
        return [spec] * count
    if not isinstance(blocks, (list, tuple)) or not blocks:
        raise ValueError(
            "`blocks` must be a BlockSpec, its dict, or a non-empty list of "
            f"them. Received: blocks={blocks!r}"
        )
    specs = [BlockSpec.from_dict(b) for b in blocks]
    if num_layers is not None and num_layers != len(specs):
        raise ValueError(
            f"`num_layers`={num_layers!r} must be None or equal to the number "
            f"of block specs given ({len(specs)})."
        )
    return specs

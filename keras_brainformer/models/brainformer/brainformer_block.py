"""The Brainformer block: a heterogeneous stack of pre-norm residual sublayers."""

import keras
from keras import ops

from keras_brainformer.layers.causal_self_attention import CausalSelfAttention
from keras_brainformer.layers.causal_self_attention import check_rope_scaling_factor
from keras_brainformer.layers.feed_forward import FeedForward
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.moe_feed_forward import MoEFeedForward
from keras_brainformer.layers.normalization import NORMS
from keras_brainformer.layers.normalization import make_norm
from keras_brainformer.layers.renamed_arguments import refuse_old_names
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.layers.validation import check_non_negative_float
from keras_brainformer.layers.validation import check_positive_int
from keras_brainformer.layers.validation import check_rate
from keras_brainformer.models.brainformer.block_spec import BlockSpec


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerBlock(keras.layers.Layer):
    """A block built from a `BlockSpec`: for each sublayer in order,
    `x = x + dropout(sublayer(norm(x)))`.

    Args:
        spec: a `BlockSpec` (or its dict form).
        norm: `"rms"` (RMSNorm, as GLaM) or `"layer"` (LayerNorm).
        layer_norm_epsilon: float.
        dropout: residual dropout rate (the paper trains without dropout).
        rope_max_wavelength: RoPE wavelength of the attention sublayers.
        rope_scaling_factor: their linear RoPE scaling (>= 1; 1 is off).
        kernel_initializer: initializer of every projection and expert.

    Call arguments:
        x: `[B, T, d]`.
        padding_mask: optional `[B, T]` (keys mask for attention; padding
            tokens are not routed by MoE sublayers); `[B, L]` over the whole
            cache when a cache is given.
        cache: optional list, one cache per attention sublayer in order,
            each shaped `layer.cache_shape(B, L)` (`[B, 2, L, Hkv, hd]` keys
            and values; more with Primer's depthwise conv); then
            `(x, new_caches)` is returned. Cached decoding always uses the
            MoE sublayers' causal routing (dropless token choice), so it
            equals a full forward pass at inference in the default
            `inference_routing="causal"` (see docs/moe_layers.md).
        cache_update_index: position of `x`'s first token when caching.

    Example:
    >>> import numpy as np
    >>> from keras_brainformer.models.brainformer.block_spec import (
    ...     AttentionSpec, BlockSpec, MoESpec)
    >>> spec = BlockSpec([AttentionSpec(num_heads=2),
    ...                   MoESpec(num_experts=4, intermediate_dim=32)])
    >>> tuple(BrainformerBlock(spec)(np.ones((2, 8, 16), "float32")).shape)
    (2, 8, 16)
    """

    def __init__(
        self,
        spec,
        norm="rms",
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        refuse_old_names(kwargs, "BrainformerBlock")
        super().__init__(**kwargs)
        self.spec = BlockSpec.from_dict(spec)
        self.norm = check_choice("norm", norm, NORMS)
        self.layer_norm_epsilon = check_non_negative_float("layer_norm_epsilon", layer_norm_epsilon)
        self.dropout = check_rate("dropout", dropout)
        self.rope_max_wavelength = check_positive_int(
            "rope_max_wavelength", rope_max_wavelength
        )
        self.rope_scaling_factor = check_rope_scaling_factor(rope_scaling_factor)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.norms, self.sublayers = [], []
        for i, sub in enumerate(self.spec.sublayers):
            name = f"{i}_{sub.kind}"
            self.norms.append(
                make_norm(norm, layer_norm_epsilon, f"{name}_norm", dtype=self.dtype_policy)
            )
            self.sublayers.append(self._make_sublayer(sub, name))
        self.residual_dropout = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def _make_sublayer(self, sub, name):
        common = dict(
            kernel_initializer=clone_initializer(self.kernel_initializer),
            dtype=self.dtype_policy,
            name=name,
        )
        if sub.kind == "attention":
            return CausalSelfAttention(
                **sub.layer_kwargs(),
                rope_max_wavelength=self.rope_max_wavelength,
                rope_scaling_factor=self.rope_scaling_factor,
                layer_norm_epsilon=self.layer_norm_epsilon,
                **common,
            )
        if sub.kind == "ffn":
            return FeedForward(sub.intermediate_dim, activation=sub.activation, **common)
        return MoEFeedForward(**sub.layer_kwargs(), **common)

    def build(self, input_shape):
        for norm, sublayer in zip(self.norms, self.sublayers):
            norm.build(input_shape)
            sublayer.build(input_shape)

    @property
    def attention_layers(self):
        return [s for s in self.sublayers if isinstance(s, CausalSelfAttention)]

    @property
    def moe_layers(self):
        return [s for s in self.sublayers if isinstance(s, MoEFeedForward)]

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=False,
    ):
        new_cache = []
        moe_mask = padding_mask
        if cache is not None and padding_mask is not None:
            # Attention masks keys over the whole cache ([B, cache_length]);
            # MoE sublayers only route the tokens of `x`.
            moe_mask = ops.slice(
                padding_mask,
                (0, cache_update_index),
                (ops.shape(x)[0], ops.shape(x)[1]),
            )
        for norm, sublayer in zip(self.norms, self.sublayers):
            h = norm(x)
            if isinstance(sublayer, CausalSelfAttention):
                if cache is not None:
                    h, layer_cache = sublayer(
                        h,
                        padding_mask=padding_mask,
                        cache=cache[len(new_cache)],
                        cache_update_index=cache_update_index,
                        training=training,
                    )
                    new_cache.append(layer_cache)
                else:
                    h = sublayer(h, padding_mask=padding_mask, training=training)
            elif isinstance(sublayer, MoEFeedForward):
                # Cached decoding always routes causally: a step's tokens
                # must not be routed by what comes after them.
                h = sublayer(
                    h,
                    padding_mask=moe_mask,
                    training=training,
                    causal=True if cache is not None else None,
                )
            else:
                h = sublayer(h)
            x = x + self.residual_dropout(h, training=training)
        if cache is not None:
            return x, new_cache
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "spec": self.spec.to_dict(),
                "norm": self.norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        """Also reads configs written by 0.1 (its argument names, see
        `layers/renamed_arguments.py`)."""
        return super().from_config(with_current_names(config, "BrainformerBlock", cls.__name__))

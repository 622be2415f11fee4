"""Causal multi-head self-attention with rotary positions and a KV cache."""

import keras
from keras import ops
from keras_hub.layers import RotaryEmbedding

from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.token_matmul import token_matmul
from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.layers.validation import check_positive_int
from keras_brainformer.layers.validation import check_rate


def resolve_head_dim(model_dim, num_heads, head_dim=None):
    """The head width: `head_dim`, or `model_dim // num_heads`. Rotary
    embeddings rotate pairs of features, so it must be even."""
    if head_dim is None:
        if model_dim % num_heads:
            raise ValueError(
                f"`num_heads`={num_heads} must divide the model dim "
                f"{model_dim} when `head_dim` is None; set `head_dim` to "
                "decouple them."
            )
        head_dim = model_dim // num_heads
    if head_dim % 2:
        raise ValueError(
            f"The head dim must be even for rotary position embeddings; got "
            f"{head_dim} (`head_dim`={head_dim}, or model dim {model_dim} / "
            f"`num_heads`={num_heads})."
        )
    return head_dim


@keras.saving.register_keras_serializable(package="keras_brainformer")
class CausalSelfAttention(keras.layers.Layer):
    """Decoder self-attention: rotary position embeddings (RoPE) on queries and
    keys, softmax in float32, no biases.

    Positions: we use RoPE (as Llama, Mistral, Gemma) rather than GLaM's T5
    relative position bias: it has no parameters, extrapolates gracefully and
    makes cached decoding a matter of offsetting positions.

    Args:
        num_heads: int, number of attention heads.
        head_dim: int or None. Width of each head. None means
            `model_dim // num_heads` (then `num_heads` must divide the model
            dim). Set it explicitly to decouple heads from the model width
            (the paper searches 12/16/20 heads at model dim 1024).
        rotary_max_wavelength: int, RoPE base wavelength.
        dropout: float, dropout on attention probabilities.
        kernel_initializer: initializer of the projections.

    Call arguments:
        x: `[B, T, d]`.
        padding_mask: optional `[B, T]` (or `[B, cache_length]` when a cache is
            given), nonzero for real tokens; padding keys are not attended to.
        cache: optional `[B, 2, cache_length, num_heads, head_dim]` keys and
            values. When given, `x` holds the tokens at positions
            `cache_update_index ...`, their keys/values are written into the
            cache, and `(output, new_cache)` is returned.
        cache_update_index: int or scalar tensor, where `x` starts.

    Example:
    >>> import numpy as np
    >>> attn = CausalSelfAttention(num_heads=4)
    >>> tuple(attn(np.ones((2, 6, 32), "float32")).shape)
    (2, 6, 32)
    """

    def __init__(
        self,
        num_heads,
        head_dim=None,
        rotary_max_wavelength=10000,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.head_dim = check_optional_positive_int("head_dim", head_dim)
        if self.head_dim is not None:
            resolve_head_dim(None, self.num_heads, self.head_dim)
        self.rotary_max_wavelength = check_positive_int(
            "rotary_max_wavelength", rotary_max_wavelength
        )
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.rotary = RotaryEmbedding(
            max_wavelength=rotary_max_wavelength, dtype=self.dtype_policy
        )
        self.dropout_layer = keras.layers.Dropout(dropout, dtype=self.dtype_policy)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self._head_dim = resolve_head_dim(model_dim, self.num_heads, self.head_dim)
        H, k = self.num_heads, self._head_dim
        for name in ("query", "key", "value"):
            setattr(
                self,
                f"w_{name}",
                self.add_weight(
                    name=f"w_{name}",
                    shape=(model_dim, H, k),
                    initializer=clone_initializer(self.kernel_initializer),
                ),
            )
        self.w_output = self.add_weight(
            name="w_output",
            shape=(H, k, model_dim),
            initializer=clone_initializer(self.kernel_initializer),
        )

    def call(
        self,
        x,
        padding_mask=None,
        cache=None,
        cache_update_index=None,
        training=False,
    ):
        start = 0 if cache is None else cache_update_index
        if cache is not None and cache_update_index is None:
            raise ValueError("`cache_update_index` is required with `cache`.")
        q = token_matmul(x, self.w_query)
        k = token_matmul(x, self.w_key)
        v = token_matmul(x, self.w_value)
        q = self.rotary(q, start_index=start)
        k = self.rotary(k, start_index=start)
        if cache is not None:
            zero = ops.zeros((), "int32")
            index = ops.cast(cache_update_index, "int32")
            starts = (zero, index, zero, zero)
            keys = ops.slice_update(cache[:, 0], starts, ops.cast(k, cache.dtype))
            values = ops.slice_update(cache[:, 1], starts, ops.cast(v, cache.dtype))
            cache = ops.stack((keys, values), axis=1)
            k, v = ops.cast(keys, q.dtype), ops.cast(values, q.dtype)

        # [B, H, T_query, T_key], in float32.
        scores = ops.einsum("bqhk,bshk->bhqs", q, k)
        scores = ops.cast(scores, "float32") / ops.sqrt(
            ops.cast(self._head_dim, "float32")
        )
        query_pos = ops.arange(ops.shape(q)[1], dtype="int32") + ops.cast(start, "int32")
        key_pos = ops.arange(ops.shape(k)[1], dtype="int32")
        allowed = query_pos[:, None] >= key_pos[None, :]  # [Tq, Tk]
        allowed = allowed[None, None, :, :]
        if padding_mask is not None:
            keys_ok = ops.cast(padding_mask, "bool")[:, None, None, :]
            allowed = ops.logical_and(allowed, keys_ok)
        scores = ops.where(allowed, scores, -1e9)
        probs = ops.softmax(scores, axis=-1)
        probs = self.dropout_layer(probs, training=training)
        out = ops.einsum("bhqs,bshk->bqhk", ops.cast(probs, v.dtype), v)
        out = token_matmul(out, self.w_output, in_dims=2)
        if cache is not None:
            return out, cache
        return out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "head_dim": self.head_dim,
                "rotary_max_wavelength": self.rotary_max_wavelength,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
            }
        )
        return config

"""Causal multi-head self-attention with rotary positions and a KV cache,
optionally with Primer's multi-dconv-head attention (a causal depthwise
convolution after the Q, K and V projections), and the variants of the
Mixtral / Qwen-MoE / Qwen3-MoE families: grouped-query attention, a sliding
window, linear RoPE scaling, Q/K/V biases and per-head Q/K RMS norms."""

import functools
import math
import numbers

import keras
import numpy as np
from keras import ops

from keras_brainformer.layers.adaptable_kernels import AdaptableKernels
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.renamed_arguments import refuse_old_names
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.layers.rotary import apply_rotary
from keras_brainformer.layers.validation import check_non_negative_float
from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.layers.validation import check_positive_int
from keras_brainformer.layers.validation import check_rate


def check_depthwise_conv_kernel(value):
    """`depthwise_conv_kernel` must be an int >= 0 (0 turns the conv off)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            "`depthwise_conv_kernel` must be an integer >= 0 (0 = off; Primer "
            f"uses 3). Received: depthwise_conv_kernel={value!r}"
        )
    if value < 0:
        raise ValueError(
            "`depthwise_conv_kernel` must be an integer >= 0 (0 = off; Primer "
            f"uses 3). Received: depthwise_conv_kernel={value!r}"
        )
    return int(value)


@keras.saving.register_keras_serializable(package="keras_brainformer")
class NearIdentityCausalConv(keras.initializers.RandomUniform):
    """Initializer of causal depthwise-conv taps shaped `[kernel, ...]`: the
    tap on the current token (the last one, index `kernel - 1`) is 1 and
    every tap gets uniform noise in `[-noise, noise]`, so the convolution
    starts close to the identity (the attention starts as plain attention)
    while the taps on earlier tokens are not all equal.

    Example:
    >>> import numpy as np
    >>> w = np.asarray(NearIdentityCausalConv(noise=0.0)((3, 2)))
    >>> w.tolist()
    [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """

    def __init__(self, noise=0.02, seed=None):
        self.noise = float(noise)
        super().__init__(minval=-self.noise, maxval=self.noise, seed=seed)

    def __call__(self, shape, dtype=None):
        values = super().__call__(shape, dtype=dtype)
        identity = ops.one_hot(shape[0] - 1, shape[0], dtype=values.dtype)
        return values + ops.reshape(identity, (shape[0],) + (1,) * (len(shape) - 1))

    def get_config(self):
        return {"noise": self.noise, "seed": super().get_config()["seed"]}


def causal_depthwise_conv(window, kernel, length):
    """Causal depthwise convolution along axis 2 of `window`, no bias.

    Args:
        window: `[B, C, length + K - 1, ...]`: the `K - 1` inputs before the
            first output position (zeros at the start of a sequence), then
            the `length` inputs of the output positions.
        kernel: `[C, K, ...]` taps; `kernel[:, K - 1]` weighs the current
            position, `kernel[:, K - 1 - j]` the one `j` steps earlier.
        length: number of output positions.

    Returns:
        `[B, C, length, ...]` with
        `out[t] = sum_j kernel[K - 1 - j] * in[t - j]`.
    """
    taps = kernel.shape[1]
    out = None
    for i in range(taps):
        term = window[:, :, i : i + length] * ops.expand_dims(kernel[:, i], 1)
        out = term if out is None else out + term
    return out


def attention_core(q, k, v, allowed, head_dim, dropout=0.0, seed=None):
    """Softmax attention, the reference: `q [B, Tq, H, k]`, `k`, `v`
    `[B, Tk, Hkv, k]` with `Hkv` dividing `H` (grouped-query attention:
    query head `h` reads key/value head `h // (H / Hkv)`, keras-hub's
    `ops.repeat` order, without copying the keys and values), `allowed` a
    boolean mask broadcasting to `[B, 1, Tq, Tk]` (the same for every head);
    scores (divided by `sqrt(head_dim)`) and softmax in float32,
    probabilities dropped out at rate `dropout` (with `seed`, a
    `SeedGenerator`). Returns `[B, Tq, H, k]`."""
    heads, kv_heads = q.shape[2], k.shape[2]
    if kv_heads != heads:
        groups = heads // kv_heads
        q = ops.reshape(q, (ops.shape(q)[0], ops.shape(q)[1], kv_heads, groups, q.shape[-1]))
        scores = ops.cast(ops.einsum("bqhgk,bshk->bhgqs", q, k), "float32")
        allowed = ops.expand_dims(allowed, 2)
    else:
        scores = ops.cast(ops.einsum("bqhk,bshk->bhqs", q, k), "float32")
    scores = scores / ops.sqrt(ops.cast(head_dim, "float32"))
    probs = ops.softmax(ops.where(allowed, scores, -1e9), axis=-1)
    if dropout > 0:
        probs = keras.random.dropout(probs, dropout, seed=seed)
    probs = ops.cast(probs, v.dtype)
    if kv_heads != heads:
        out = ops.einsum("bhgqs,bshk->bqhgk", probs, v)
        return ops.reshape(out, (ops.shape(out)[0], ops.shape(out)[1], heads, v.shape[-1]))
    return ops.einsum("bhqs,bshk->bqhk", probs, v)


def keras_attention_core(q, k, v, allowed, head_dim):
    """`attention_core` through `keras.ops.dot_product_attention`, which
    dispatches to fused (cuDNN / flash / TPU) kernels where the backend has
    them; grouped-query keys and values are repeated to the query heads
    first. Equal to `attention_core` (tests/test_attention.py)."""
    batch, heads = ops.shape(q)[0], q.shape[2]
    if k.shape[2] != heads:
        k = ops.repeat(k, heads // k.shape[2], axis=2)
        v = ops.repeat(v, heads // v.shape[2], axis=2)
    mask = ops.broadcast_to(allowed, (batch, heads, ops.shape(q)[1], ops.shape(k)[1]))
    return ops.dot_product_attention(q, k, v, mask=mask, scale=1.0 / float(head_dim) ** 0.5)


def check_key_value_heads(num_heads, num_key_value_heads, depthwise_conv_kernel=0):
    """`num_key_value_heads` is None (one per query head) or a positive int
    dividing `num_heads`; Primer's convolution needs one per query head.
    Returns the number of key/value heads."""
    check_optional_positive_int("num_key_value_heads", num_key_value_heads)
    if num_key_value_heads is None:
        return num_heads
    if num_heads % num_key_value_heads:
        raise ValueError(
            f"`num_key_value_heads` must divide `num_heads`={num_heads} "
            "(each key/value head serves a group of query heads). Received: "
            f"num_key_value_heads={num_key_value_heads}"
        )
    if depthwise_conv_kernel and num_key_value_heads != num_heads:
        raise ValueError(
            "`num_key_value_heads` must be None or equal `num_heads` with "
            f"Primer's `depthwise_conv_kernel`={depthwise_conv_kernel} (its "
            "cache keeps every head's raw projections). Received: "
            f"num_key_value_heads={num_key_value_heads}, num_heads={num_heads}"
        )
    return num_key_value_heads


def check_rope_scaling_factor(value):
    """Linear RoPE scaling: a float >= 1 (positions are divided by it)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or value < 1
    ):
        raise ValueError(
            "`rope_scaling_factor` must be a number >= 1 (1 = no scaling; "
            f"positions are divided by it). Received: rope_scaling_factor={value!r}"
        )
    return float(value)


def uses_keras_attention():
    """Whether attention runs through `keras.ops.dot_product_attention`: on
    GPU and TPU, where it reaches fused kernels; on CPU our einsum core is
    kept, measured 1.14-1.20x faster there (`benchmarks/keras_primitives.py`,
    docs/architecture.md).

    The devices are those the computation is laid out on: the active
    `keras.distribution`'s mesh when there is one, else this process's. So
    a step lowered for a TPU slice from a CPU process (`keras-brainformer
    compile`, whose mesh holds TPU devices) takes the attention a TPU runs.
    """
    distribution = keras.distribution.distribution()
    if distribution is not None:
        devices = list(np.ravel(distribution.device_mesh.devices))
    else:
        devices = _process_devices()
    return bool(devices) and not str(devices[0]).lower().startswith("cpu")


@functools.cache
def _process_devices():
    return tuple(keras.distribution.list_devices())


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
class CausalSelfAttention(AdaptableKernels, keras.layers.Layer):
    """Decoder self-attention: rotary position embeddings (RoPE) on queries and
    keys, softmax in float32, no biases.

    Positions: we use RoPE (as Llama, Mistral, Gemma) rather than GLaM's T5
    relative position bias: it has no parameters, extrapolates gracefully and
    makes cached decoding a matter of offsetting positions.

    Multi-dconv-head attention (Primer, So et al. 2021): with
    `depthwise_conv_kernel=K > 0`, each of the Q, K and V projections is
    followed by a causal depthwise convolution of width K over the sequence,
    one filter per (head, head channel), no bias:
    `q'[t] = sum_{j<K} conv_query[K-1-j] * q[t-j]` (zeros before the first
    token), and RoPE is applied to the convolved queries and keys. The taps
    start near the identity (`NearIdentityCausalConv`: current-token tap 1,
    noise of 0.02 on every tap). Padding tokens (`padding_mask` 0) have their
    projections zeroed before the convolution, so they never leak into real
    tokens: a left-padded sequence gives the outputs of the unpadded one.

    Args:
        num_heads: int, number of attention heads.
        head_dim: int or None. Width of each head. None means
            `model_dim // num_heads` (then `num_heads` must divide the model
            dim). Set it explicitly to decouple heads from the model width
            (the paper searches 12/16/20 heads at model dim 1024).
        rope_max_wavelength: int, RoPE base wavelength.
        dropout: float, dropout on attention probabilities.
        kernel_initializer: initializer of the projections.
        depthwise_conv_kernel: int >= 0, width of Primer's causal depthwise
            convolution after the Q/K/V projections; 0 (default) turns it
            off, Primer uses 3. Adds weights `conv_query`, `conv_key`,
            `conv_value`, each `[K, num_heads, head_dim]`.
        num_key_value_heads: int or None. Grouped-query attention (Mixtral,
            Qwen): this many key/value heads, each shared by
            `num_heads / num_key_value_heads` query heads (query head `h`
            reads key/value head `h // groups`); the key/value projections
            and the cache shrink to it. None: one per query head.
        sliding_window: int or None. Each query attends to the last
            `sliding_window` positions only (itself included: position `i`
            sees `j` with `i - sliding_window < j <= i`), Mistral/Mixtral's
            sliding-window attention. None: the whole prefix.
        rope_scaling_factor: float >= 1, linear RoPE scaling (position
            interpolation): rotary frequencies divided by it, keras-hub's
            `RotaryEmbedding(scaling_factor=...)`.
        use_qkv_bias: bool, add a bias to the Q, K and V projections (Qwen,
            Qwen-MoE). Biases `b_query [H, hd]`, `b_key`, `b_value`
            `[Hkv, hd]`, zeros at init.
        qk_norm: bool, RMS-normalise each head's query and key over the
            head dim before RoPE, with learned scales `query_norm`,
            `key_norm` `[hd]` (Qwen3).
        layer_norm_epsilon: float, epsilon of the Q/K norms.
        lora_rank: int or None. Builds the layer with LoRA adapters of this
            rank on the Q, K, V and output projections.
        lora_alpha: LoRA scale numerator (default `lora_rank`).

    The Q, K, V and output projections take LoRA adapters
    (`enable_lora(rank)`) and int8 quantization (`quantize("int8")`), see
    `layers/adaptable_kernels.py`; the Primer convolution taps stay float.
    The layer holds no sublayers (RoPE is a function, dropout a seeded op), so
    `Model.quantize` reaches it.

    Call arguments:
        x: `[B, T, d]`.
        padding_mask: optional `[B, T]` (or `[B, cache_length]` when a cache is
            given), nonzero for real tokens; padding keys are not attended to.
        cache: optional cache shaped `cache_shape(B, cache_length)`. When
            given, `x` holds the tokens at positions `cache_update_index ...`,
            their entries are written into the cache, and
            `(output, new_cache)` is returned. Layout: without the conv (and
            with `depthwise_conv_kernel=1`, which needs no history) it is
            `[B, 2, cache_length, num_key_value_heads, head_dim]`: keys
            (after the Q/K norm and RoPE) and values. With `depthwise_conv_kernel=K >= 2` it is
            `[B, 5, cache_length + K - 1, num_heads, head_dim]`: channels
            0, 1 = keys (convolved, after RoPE) and values (convolved),
            channels 2, 3, 4 = the raw (pre-conv) query, key and value
            projections; the entries of position `p` live at index
            `p + K - 1` in every channel, and the first `K - 1` indices stay
            zero (the conv's causal zero padding). A zero-filled cache is a
            valid empty cache.
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
        rope_max_wavelength=10000,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        depthwise_conv_kernel=0,
        num_key_value_heads=None,
        sliding_window=None,
        rope_scaling_factor=1.0,
        use_qkv_bias=False,
        qk_norm=False,
        layer_norm_epsilon=1e-6,
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        refuse_old_names(kwargs, "CausalSelfAttention")
        super().__init__(**kwargs)
        self._init_adaptable(lora_rank, lora_alpha)
        self.depthwise_conv_kernel = check_depthwise_conv_kernel(
            depthwise_conv_kernel
        )
        self.num_heads = check_positive_int("num_heads", num_heads)
        self.num_key_value_heads = num_key_value_heads
        self._kv_heads = check_key_value_heads(
            self.num_heads, num_key_value_heads, self.depthwise_conv_kernel
        )
        self.sliding_window = check_optional_positive_int("sliding_window", sliding_window)
        self.rope_scaling_factor = check_rope_scaling_factor(rope_scaling_factor)
        for field, value in (("use_qkv_bias", use_qkv_bias), ("qk_norm", qk_norm)):
            if not isinstance(value, bool):
                raise TypeError(f"`{field}` must be a bool. Received: {field}={value!r}")
        self.use_qkv_bias = use_qkv_bias
        self.qk_norm = qk_norm
        self.layer_norm_epsilon = check_non_negative_float("layer_norm_epsilon", layer_norm_epsilon)
        self.head_dim = check_optional_positive_int("head_dim", head_dim)
        if self.head_dim is not None:
            resolve_head_dim(None, self.num_heads, self.head_dim)
        self.rope_max_wavelength = check_positive_int(
            "rope_max_wavelength", rope_max_wavelength
        )
        self.dropout = check_rate("dropout", dropout)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        if self.dropout > 0:
            self.seed_generator = keras.random.SeedGenerator()

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self._head_dim = resolve_head_dim(model_dim, self.num_heads, self.head_dim)
        H, k = self.num_heads, self._head_dim
        heads = {"query": H, "key": self._kv_heads, "value": self._kv_heads}
        for name in ("query", "key", "value"):
            self._add_kernel(
                f"w_{name}",
                (model_dim, heads[name], k),
                clone_initializer(self.kernel_initializer),
            )
        self._add_kernel(
            "w_output",
            (H, k, model_dim),
            clone_initializer(self.kernel_initializer),
            in_dims=2,
        )
        if self.depthwise_conv_kernel:
            for name in ("query", "key", "value"):
                setattr(
                    self,
                    f"conv_{name}",
                    self.add_weight(
                        name=f"conv_{name}",
                        shape=(self.depthwise_conv_kernel, H, k),
                        # A fresh initializer (and seed) per weight.
                        initializer=NearIdentityCausalConv(),
                    ),
                )
        if self.use_qkv_bias:
            for name in ("query", "key", "value"):
                setattr(
                    self,
                    f"b_{name}",
                    self.add_weight(name=f"b_{name}", shape=(heads[name], k), initializer="zeros"),
                )
        if self.qk_norm:
            for name in ("query", "key"):
                setattr(
                    self,
                    f"{name}_norm",
                    self.add_weight(name=f"{name}_norm", shape=(k,), initializer="ones"),
                )
        self._build_lora()

    @property
    def _cache_offset(self):
        """Cache index of position 0: the `K - 1` zero slots in front."""
        return max(self.depthwise_conv_kernel - 1, 0)

    def cache_shape(self, batch_size, max_length):
        """The shape of this layer's cache for `max_length` positions.

        `(batch_size, 2, max_length, num_key_value_heads, head_dim)` without
        the conv (or with `depthwise_conv_kernel=1`);
        `(batch_size, 5, max_length + K - 1, num_heads, head_dim)` with
        `depthwise_conv_kernel=K >= 2` (see the class docstring). The head
        dim comes from `head_dim`, or, when that is None, from the model dim
        seen at build time, so the layer must then be built first.

        Example:
        >>> CausalSelfAttention(4, head_dim=8, depthwise_conv_kernel=3
        ...     ).cache_shape(2, 16)
        (2, 5, 18, 4, 8)
        """
        head_dim = self.head_dim or getattr(self, "_head_dim", None)
        if head_dim is None:
            raise ValueError(
                f"`cache_shape` of layer {self.name!r} needs the head dim: set "
                "`head_dim` or build the layer first (head_dim = model dim / "
                "num_heads)."
            )
        if self._cache_offset:
            return (
                batch_size,
                5,
                max_length + self._cache_offset,
                self.num_heads,
                head_dim,
            )
        return (batch_size, 2, max_length, self._kv_heads, head_dim)

    def _qkv(self, name, x):
        """Projection `name` of `x` to `[B, T, heads, hd]`, its bias added."""
        out = self._project(f"w_{name}", x)
        if self.use_qkv_bias:
            out = out + ops.cast(getattr(self, f"b_{name}"), out.dtype)
        return out

    def _head_norm(self, name, x):
        """Per-head RMS norm of `x [B, T, heads, hd]` in float32 (Qwen3)."""
        scale = ops.cast(getattr(self, f"{name}_norm"), "float32")
        out = ops.rms_normalization(
            ops.cast(x, "float32"), scale=scale, axis=-1, epsilon=self.layer_norm_epsilon
        )
        return ops.cast(out, x.dtype)

    def _convolve(self, q, k, v, padding_mask, cache, cache_update_index):
        """Primer's causal depthwise conv of the raw projections `[B, T, H,
        hd]`. Returns the convolved `(q, k, v)` and the raw projections
        stacked `[B, 3, T, H, hd]` (to be cached)."""
        length = q.shape[1] if q.shape[1] is not None else ops.shape(q)[1]
        if padding_mask is not None:
            if cache is not None:
                padding_mask = ops.slice(
                    padding_mask,
                    (0, cache_update_index),
                    (ops.shape(q)[0], length),
                )
            keep = ops.cast(padding_mask, q.dtype)[:, :, None, None]
            q, k, v = q * keep, k * keep, v * keep
        raw = ops.stack((q, k, v), axis=1)
        history = self._cache_offset
        if not history:
            window = raw
        elif cache is None:
            window = ops.pad(raw, ((0, 0), (0, 0), (history, 0), (0, 0), (0, 0)))
        else:
            # Indices cache_update_index .. + K - 2 hold the raw projections of
            # the K - 1 positions before x (zeros before position 0).
            zero = ops.zeros((), "int32")
            previous = ops.slice(
                cache,
                (zero, zero + 2, cache_update_index, zero, zero),
                (ops.shape(q)[0], 3, history, self.num_heads, self._head_dim),
            )
            window = ops.concatenate((ops.cast(previous, raw.dtype), raw), axis=2)
        # `.value`: TensorFlow's `tf.stack` does not accept Keras variables.
        kernel = ops.stack(
            [
                ops.cast(w.value, raw.dtype)
                for w in (self.conv_query, self.conv_key, self.conv_value)
            ]
        )
        out = causal_depthwise_conv(window, kernel, length)
        return out[:, 0], out[:, 1], out[:, 2], raw

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
        if cache is not None:
            channels = 5 if self._cache_offset else 2
            if cache.shape[1] is not None and cache.shape[1] != channels:
                raise ValueError(
                    f"Layer {self.name!r} (depthwise_conv_kernel="
                    f"{self.depthwise_conv_kernel}) expects a cache with "
                    f"{channels} entries on axis 1, shaped by `cache_shape("
                    f"batch_size, max_length)`. Received: cache.shape="
                    f"{tuple(cache.shape)}"
                )
            cache_update_index = ops.cast(cache_update_index, "int32")
        q = self._qkv("query", x)
        k = self._qkv("key", x)
        v = self._qkv("value", x)
        raw = None
        if self.depthwise_conv_kernel:
            q, k, v, raw = self._convolve(
                q, k, v, padding_mask, cache, cache_update_index
            )
        if self.qk_norm:
            q, k = self._head_norm("query", q), self._head_norm("key", k)
        rotary = (self.rope_max_wavelength, self.compute_dtype, self.rope_scaling_factor)
        q = apply_rotary(q, start, *rotary)
        k = apply_rotary(k, start, *rotary)
        if cache is not None:
            entries = [k, v]
            if self._cache_offset:
                entries += [raw[:, 0], raw[:, 1], raw[:, 2]]
            entries = ops.cast(ops.stack(entries, axis=1), cache.dtype)
            zero = ops.zeros((), "int32")
            offset = self._cache_offset
            starts = (zero, zero, cache_update_index + offset, zero, zero)
            cache = ops.slice_update(cache, starts, entries)
            k = ops.cast(cache[:, 0, offset:], q.dtype)
            v = ops.cast(cache[:, 1, offset:], q.dtype)

        query_pos = ops.arange(ops.shape(q)[1], dtype="int32") + ops.cast(start, "int32")
        key_pos = ops.arange(ops.shape(k)[1], dtype="int32")
        allowed = query_pos[:, None] >= key_pos[None, :]  # [Tq, Tk]
        if self.sliding_window is not None:
            recent = query_pos[:, None] - key_pos[None, :] < self.sliding_window
            allowed = ops.logical_and(allowed, recent)
        allowed = allowed[None, None, :, :]
        if padding_mask is not None:
            keys_ok = ops.cast(padding_mask, "bool")[:, None, None, :]
            allowed = ops.logical_and(allowed, keys_ok)
        head_dim = self._head_dim
        if training and self.dropout > 0:  # Keras' op has no attention dropout
            out = attention_core(
                q, k, v, allowed, head_dim, dropout=self.dropout, seed=self.seed_generator
            )
        elif uses_keras_attention():
            out = keras_attention_core(q, k, v, allowed, head_dim)
        else:
            out = attention_core(q, k, v, allowed, head_dim)
        out = self._project("w_output", out)
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
                "rope_max_wavelength": self.rope_max_wavelength,
                "dropout": self.dropout,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "depthwise_conv_kernel": self.depthwise_conv_kernel,
                "num_key_value_heads": self.num_key_value_heads,
                "sliding_window": self.sliding_window,
                "rope_scaling_factor": self.rope_scaling_factor,
                "use_qkv_bias": self.use_qkv_bias,
                "qk_norm": self.qk_norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                **self._adaptable_config(),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        """Also reads configs written by 0.1 (its argument names, see
        `layers/renamed_arguments.py`)."""
        return super().from_config(with_current_names(config, "CausalSelfAttention", cls.__name__))

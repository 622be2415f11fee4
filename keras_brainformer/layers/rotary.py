"""Rotary position embedding (RoPE) as a function, not a layer.

The maths is keras-hub's `RotaryEmbedding` (rotate-half layout, linear
scaling: its default `rope_type`), which a test checks exactly. It is a function so that
`CausalSelfAttention` holds no sublayers: Keras' `Model.quantize` only visits
leaf layers, and the attention projections must be quantizable.
"""

from keras import ops


def apply_rotary(x, start_index=0, max_wavelength=10000, compute_dtype=None, scaling_factor=1.0):
    """Rotates `x` `[batch, length, ..., head_dim]` by its positions.

    Args:
        x: tensor with positions on axis 1 and an even feature size last.
        start_index: position of `x[:, 0]` (the cache index when decoding).
        max_wavelength: the longest wavelength of the sinusoids.
        compute_dtype: dtype of the cos/sin tables (default: `x.dtype`).
        scaling_factor: linear position scaling (position interpolation):
            the frequencies are divided by it; 1 is plain RoPE.

    Returns:
        A tensor shaped like `x`.

    Example:
    >>> import numpy as np
    >>> x = np.ones((1, 3, 2, 4), "float32")
    >>> y = apply_rotary(x)
    >>> tuple(y.shape), bool(np.allclose(np.asarray(y)[:, 0], 1.0))
    ((1, 3, 2, 4), True)
    """
    dim = x.shape[-1]
    if dim is None or dim % 2:
        raise ValueError(
            f"Rotary embedding needs an even head dim. Received: head_dim={dim}"
        )
    length = ops.shape(x)[1]
    positions = ops.arange(length, dtype="float32") + ops.cast(start_index, "float32")
    inverse_freq = ops.power(
        ops.cast(max_wavelength, "float32"),
        -ops.arange(0, dim, 2, dtype="float32") / float(dim),
    )
    if scaling_factor != 1:
        inverse_freq = inverse_freq / ops.cast(scaling_factor, "float32")
    freq = ops.einsum("i,j->ij", positions, inverse_freq)  # [T, dim/2]
    embedding = ops.concatenate((freq, freq), axis=-1)  # [T, dim]
    embedding = ops.reshape(
        embedding, (1, length) + (1,) * (len(x.shape) - 3) + (dim,)
    )
    dtype = compute_dtype or x.dtype
    cos = ops.cast(ops.cos(embedding), dtype)
    sin = ops.cast(ops.sin(embedding), dtype)
    x1, x2 = ops.split(x, 2, axis=-1)
    # Stack + reshape rather than concatenate (keras-hub's workaround for an
    # XLA bug on JAX).
    rotated = ops.reshape(ops.stack((-x2, x1), axis=-2), ops.shape(x))
    return x * cos + rotated * sin

"""`token_matmul`: apply a weight to every token as one 2-D matmul.

XLA on CPU runs `[B, T, d] @ [d, h]` (and its weight gradient, which contracts
two axes) markedly slower than the same product on flattened `[B·T, d]`
tokens (1.45x measured in benchmarks/moe_layer.py), so layers flatten first.
"""

import math

from keras import ops


def token_matmul(x, kernel, in_dims=1):
    """Contracts the last `in_dims` axes of `x` with the first `in_dims` axes
    of `kernel`, as one 2-D matmul over all tokens.

    Args:
        x: `[..., *kernel.shape[:in_dims]]`.
        kernel: `[*in_shape, *out_shape]`.
        in_dims: how many leading kernel axes are contracted.

    Returns:
        `[..., *out_shape]`.

    Example:
    >>> import numpy as np
    >>> x, w = np.ones((2, 3, 4), "float32"), np.ones((4, 5, 6), "float32")
    >>> tuple(token_matmul(x, w).shape)
    (2, 3, 5, 6)
    """
    kernel_shape = tuple(kernel.shape)
    in_shape, out_shape = kernel_shape[:in_dims], kernel_shape[in_dims:]
    lead = ops.shape(x)[: len(x.shape) - in_dims]
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    y = ops.matmul(ops.reshape(x, (-1, n_in)), ops.reshape(kernel, (n_in, n_out)))
    return ops.reshape(y, (*lead, *out_shape))

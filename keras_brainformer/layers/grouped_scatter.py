"""Scatter-add batched over routing groups.

Routing and combining sum values into per-group tables (`[G, N] -> [G, M]`).
Written as one `segment_sum` over flattened groups (the portable keras.ops
path), the group structure is invisible to XLA's SPMD partitioner, which then
replicates the whole table on every device and all-gathers the tokens. On
JAX, a `vmap` of `segment_sum` keeps the group axis a batch axis of the
scatter, so groups split across devices stay local; tests check both paths
agree.
"""

import keras
from keras import ops


def portable_segment_sum_per_group(values, index, num_segments):
    """`out[g, m] = sum of values[g, n] over n with index[g, n] == m`.

    Args:
        values: `[G, N]` or `[G, N, d]`.
        index: int `[G, N]`, each in `[0, num_segments)`.
        num_segments: int, `M`.

    Returns:
        `[G, M]` or `[G, M, d]`, the dtype of `values`.
    """
    shape = ops.shape(values)
    G, N = shape[0], shape[1]
    offset = ops.arange(G, dtype=index.dtype)[:, None] * num_segments
    out = ops.segment_sum(
        ops.reshape(values, (G * N,) + tuple(shape[2:])),
        ops.reshape(index + offset, (-1,)),
        num_segments=G * num_segments,
    )
    return ops.reshape(out, (G, num_segments) + tuple(shape[2:]))


def segment_sum_per_group(values, index, num_segments):
    """Per-group scatter-add (see `portable_segment_sum_per_group`), with a
    JAX path (`vmap` of `jax.ops.segment_sum`) that XLA partitions on `G`.

    Example:
    >>> import numpy as np
    >>> out = segment_sum_per_group(np.array([[1., 2., 3.]]),
    ...                             np.array([[0, 2, 0]]), 3)
    >>> np.asarray(out).tolist()
    [[4.0, 0.0, 2.0]]
    """
    if keras.config.backend() == "jax":
        import jax  # the JAX fast path: jax is imported on its backend only

        values = ops.convert_to_tensor(values)
        index = ops.convert_to_tensor(index)
        return jax.vmap(
            lambda v, i: jax.ops.segment_sum(v, i, num_segments=num_segments)
        )(values, index)
    return portable_segment_sum_per_group(values, index, num_segments)

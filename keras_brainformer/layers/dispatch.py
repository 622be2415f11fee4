"""Moving tokens to expert slots and back.

`dispatch` / `combine` are the default, index-based path: a gather of
`E·G·C` token rows into expert-major `[E, G, C, d]` and a segment-sum of the
weighted expert outputs, linear in the number of slots.
`one_hot_dispatch_mask` and `one_hot_dispatch` / `one_hot_combine` are the
classic GShard formulation with a `[G, S, E, C]` mask and two einsums
(quadratic cost); they are kept as the reference the index path is tested
against.
"""

from keras import ops

from keras_brainformer.layers.grouped_scatter import segment_sum_per_group


def _expert_major(table):
    """`[G, E, C, ...]` -> `[E, G, C, ...]`, the order experts consume."""
    rank = len(ops.shape(table))
    return ops.transpose(table, (1, 0) + tuple(range(2, rank)))


def _group_slot_index(slot_token, group_size):
    """Each slot's token index *within its group*, `[G, E*C]` (0 for empty
    slots), and whether the slot is filled, `[G, E, C]`."""
    G, E, C = ops.shape(slot_token)
    filled = slot_token < group_size
    index = ops.where(filled, slot_token, 0)
    return ops.reshape(index, (G, E * C)), filled


def dispatch(x, slot_token):
    """Gathers tokens into expert slots, expert-major.

    Args:
        x: `[G, S, d]` tokens.
        slot_token: int `[G, E, C]`, token index per slot (`S` = empty).

    Returns:
        `[E, G, C, d]`; empty slots are zeros. Expert-major so that each
        expert's `G·C` slots are contiguous and the expert matmuls are plain
        batched matmuls over `E`.

    The gather is batched over groups (`take_along_axis` on the token axis),
    so a partitioner that splits `G` across devices keeps it local; the
    transpose to expert-major is then where tokens travel to the devices of
    their experts (an all-to-all when `E` is split on the same axis).
    """
    G, S, d = ops.shape(x)
    E, C = ops.shape(slot_token)[1], ops.shape(slot_token)[2]
    index, filled = _group_slot_index(slot_token, S)
    # Empty slots read token 0 and are zeroed by the mask (a concatenated zero
    # row would be simpler, but the gradient of a concat fed by a gather
    # makes TensorFlow's XLA bridge crash).
    rows = ops.take_along_axis(x, index[..., None], axis=1)  # [G, E*C, d]
    rows = ops.reshape(rows, (G, E, C, d)) * ops.cast(filled, x.dtype)[..., None]
    return _expert_major(rows)


def combine(expert_out, slot_token, slot_gate, group_size):
    """Sums gate-weighted expert outputs back onto their tokens.

    Args:
        expert_out: `[E, G, C, d]`, as produced from `dispatch`'s output.
        slot_token: int `[G, E, C]`.
        slot_gate: float `[G, E, C]`.
        group_size: int, `S`.

    Returns:
        float32 `[G, S, d]`; a token no expert served gets zeros.
    """
    E, G, C, d = ops.shape(expert_out)
    index, filled = _group_slot_index(slot_token, group_size)
    gate = ops.where(filled, ops.cast(slot_gate, "float32"), 0.0)  # [G, E, C]
    weighted = ops.transpose(ops.cast(expert_out, "float32"), (1, 0, 2, 3))
    weighted = ops.reshape(weighted * gate[..., None], (G, E * C, d))
    return segment_sum_per_group(weighted, index, group_size)


def one_hot_dispatch_mask(instructions, group_size):
    """The `[G, S, E, C]` 0/1 dispatch mask and gate-weighted combine tensor.

    Built from the per-token choices for token-choice routers (independently
    of the slot table), and from the slot table for expert choice.
    """
    C = instructions.capacity
    if instructions.token_expert is not None:
        E = ops.shape(instructions.slot_token)[1]
        keep = ops.cast(instructions.token_keep, "float32")  # [G, S, k]
        expert = ops.one_hot(instructions.token_expert, E, dtype="float32")
        slot = ops.one_hot(
            ops.minimum(instructions.token_position, C - 1), C, dtype="float32"
        )
        per_choice = expert[..., :, None] * slot[..., None, :] * keep[..., None, None]
        mask = ops.sum(per_choice, axis=2)  # [G, S, E, C]
        gates = ops.sum(
            per_choice * instructions.token_gate[..., None, None], axis=2
        )
        return mask, gates
    token = ops.one_hot(instructions.slot_token, group_size + 1, dtype="float32")
    mask = ops.transpose(token[..., :group_size], (0, 3, 1, 2))  # [G, S, E, C]
    gates = mask * instructions.slot_gate[:, None, :, :]
    return mask, gates


def one_hot_dispatch(x, mask):
    """Reference dispatch: `einsum("gsec,gsd->egcd")`."""
    return ops.einsum("gsec,gsd->egcd", ops.cast(mask, x.dtype), x)


def one_hot_combine(expert_out, gates):
    """Reference combine: `einsum("gsec,egcd->gsd")`, in float32."""
    return ops.einsum(
        "gsec,egcd->gsd", ops.cast(gates, "float32"), ops.cast(expert_out, "float32")
    )


def gather_rows(values, index, inverse):
    """`out[m] = values[index[m]]` (zeros where `index[m] < 0`), whose gradient
    is a gather too: `d_values[n] = Σ_j upstream[inverse[n, j]]`.

    Args:
        values: `[N, d]`.
        index: int `[M]`, a row of `values` per output row, or -1.
        inverse: int `[N, J]`, every `m` with `index[m] == n` (each exactly
            once), padded with -1.

    Returns:
        `[M, d]`.

    The block-sparse dropless path (`layers/dropless_blocks.py`) moves rows
    by permutations known both ways, so neither direction needs the
    scatter-add that autodiff makes of a gather (slow on XLA CPU).

    Example:
    >>> import numpy as np
    >>> out = gather_rows(np.array([[1.], [2.]]), np.array([1, -1, 0, 1]),
    ...                   np.array([[2, -1], [0, 3]]))
    >>> np.asarray(out)[:, 0].tolist()
    [2.0, 0.0, 1.0, 2.0]
    """

    @ops.custom_gradient
    def gather(values):
        def grad_fn(*args, upstream=None):
            if upstream is None:
                (upstream,) = args
            parts = _masked_take(upstream, inverse)  # [N, J, d]
            return ops.sum(parts, axis=1)

        return _masked_take(values, index), grad_fn

    return gather(values)


def _masked_take(values, index):
    valid = index >= 0
    rows = ops.take(values, ops.where(valid, index, 0), axis=0)
    return rows * ops.cast(valid, rows.dtype)[..., None]

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


def _expert_major(table):
    """`[G, E, C]` slot table -> `[E, G, C]`, the order experts consume."""
    return ops.transpose(table, (1, 0, 2))


def _flat_slot_index(slot_token, group_size):
    """Row of each slot's token in the flattened `[G*S, d]` tokens, in
    expert-major order `[E, G, C]`, and whether the slot is filled."""
    G = ops.shape(slot_token)[0]
    group_offset = ops.arange(G, dtype="int32")[:, None, None] * group_size
    filled = slot_token < group_size
    index = ops.where(filled, group_offset + slot_token, 0)
    return _expert_major(index), _expert_major(filled)


def dispatch(x, slot_token):
    """Gathers tokens into expert slots, expert-major.

    Args:
        x: `[G, S, d]` tokens.
        slot_token: int `[G, E, C]`, token index per slot (`S` = empty).

    Returns:
        `[E, G, C, d]`; empty slots are zeros. Expert-major so that each
        expert's `G·C` slots are contiguous and the expert matmuls are plain
        batched matmuls over `E`.
    """
    G, S, d = ops.shape(x)
    E, C = ops.shape(slot_token)[1], ops.shape(slot_token)[2]
    index, filled = _flat_slot_index(slot_token, S)
    # Empty slots read row 0 and are zeroed by the mask (a concatenated zero
    # row would be simpler, but the gradient of a concat fed by a gather
    # makes TensorFlow's XLA bridge crash).
    rows = ops.take(ops.reshape(x, (G * S, d)), ops.reshape(index, (-1,)), axis=0)
    rows = ops.reshape(rows, (E, G, C, d))
    return rows * ops.cast(filled, x.dtype)[..., None]


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
    S = group_size
    index, filled = _flat_slot_index(slot_token, S)
    gate = ops.where(filled, _expert_major(ops.cast(slot_gate, "float32")), 0.0)
    weighted = ops.cast(expert_out, "float32") * gate[..., None]
    out = ops.segment_sum(
        ops.reshape(weighted, (E * G * C, d)),
        ops.reshape(index, (-1,)),
        num_segments=G * S,
    )
    return ops.reshape(out, (G, S, d))


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

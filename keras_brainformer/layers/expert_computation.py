"""How an MoE layer computes its routed experts' output: one chooser and
four paths behind one signature.

`choose_expert_path` is the only place that decides; `routed_output` runs
the chosen path. Every path takes the tokens `[G, S, d]`, the router's
`RoutingInstructions` and the `ExpertBank`, and returns the gate-weighted
sum of each token's experts' outputs in float32 (shaped `[G, S, d]` or
`[G·S, d]`; the caller reshapes). They agree to rounding
(`tests/test_dropless_paths.py`, `tests/test_moe_feed_forward.py`):

- `"one_hot"`: GShard's one-hot einsum dispatch and combine (`[G, S, E, C]`
  masks), for `dispatch="one_hot"`: the test reference only.
- `"slots"`: index gather into `[E, G, C, d]` expert slots (`dispatch.py`),
  one batched matmul per weight, segment-sum back. Every router and
  capacity; the only path for capacity dropping and expert-parallel layouts.
- `"blocks"`: dropless token choice on about `T·k + E·b` rows in blocks
  (`dropless_blocks.py`; the JAX and TensorFlow loops in
  `dropless_blocks_jax.py` and `dropless_blocks_tf.py`), for
  `dropless_impl="blocks"`, or `"auto"` where its cost model pays.
- `"ragged"`: dropless token choice as grouped matmuls
  (`jax.lax.ragged_dot`, `ragged_experts.py`), for `dropless_impl="ragged"`,
  or `"auto"` on JAX with a TPU default backend; plain float banks only.

A token meets only the experts it was routed to on every path but the
reference.
"""

import keras

import keras_brainformer.layers.dispatch as dispatch_lib
import keras_brainformer.layers.dropless_blocks as dropless_blocks
import keras_brainformer.layers.ragged_experts as ragged_experts

EXPERT_PATHS = ("one_hot", "slots", "blocks", "ragged")


def choose_expert_path(
    routing, group_size, num_tokens, bank, dispatch="index", dropless_impl="auto",
    expert_parallel=False, block_size=None,
):
    """The path (one of `EXPERT_PATHS`) an MoE call computes its experts on.

    Args:
        routing: the call's `RoutingInstructions`.
        group_size: `S`, tokens per routing group.
        num_tokens: `G·S` when static (an int), else None.
        bank: the `ExpertBank`.
        dispatch: the layer's `dispatch` (`"index"` or `"one_hot"`).
        dropless_impl: the layer's `dropless_impl`.
        expert_parallel: whether the active distribution splits the
            dispatched tensors along experts.
        block_size: `block_size(k)`, the blocks path's rows per block for a
            routing of `k` choices per token (used by `"auto"`'s cost model).

    The dropless paths (`"blocks"`, `"ragged"`) need dropless token choice
    (every choice fits: `C = S`), the index dispatch and no expert-parallel
    layout; `"ragged"` also a plain float bank, `"blocks"` a static number of
    tokens. Anything else computes on `"slots"`.
    """
    if dispatch != "index":
        return "one_hot"
    if dropless_impl == "slots":
        return "slots"
    if routing.token_expert is None or routing.capacity < group_size:
        return "slots"
    if expert_parallel:
        return "slots"
    ragged = ragged_experts.bank_supports_ragged(bank)
    blocks = isinstance(num_tokens, int)
    if dropless_impl == "ragged":
        return "ragged" if ragged else "slots"
    if dropless_impl == "blocks":
        return "blocks" if blocks else "slots"
    if ragged and ragged_experts.ragged_is_default():
        return "ragged"
    if not blocks or keras.distribution.distribution() is not None:
        return "slots"
    k = keras.ops.shape(routing.token_expert)[-1]
    # The rule of inference's one-block-per-matmul cost model, for training
    # too: TensorFlow's runs of blocks were measured against other block
    # sizes, not against the slot path.
    if dropless_blocks.blocks_pay(num_tokens, k, bank.num_experts, block_size(k)):
        return "blocks"
    return "slots"


def routed_output(
    path, groups, routing, bank, block_size=None, training=False,
    constrain=lambda tensor, name: tensor,
):
    """Runs `path` (see the module docstring) on `groups` `[G, S, d]`.

    Args:
        path: one of `EXPERT_PATHS` (`choose_expert_path`'s choice).
        groups: `[G, S, d]` tokens.
        routing: the router's `RoutingInstructions`.
        bank: the `ExpertBank`.
        block_size: rows per block (the `"blocks"` path).
        training: whether this is a training step (`"blocks"` on
            TensorFlow multiplies runs of blocks then).
        constrain: `constrain(tensor, name)` lays out the slot paths'
            `"dispatched"` and `"expert_outputs"` tensors for the active
            distribution.

    Returns:
        float32, `[G, S, d]` or `[G·S, d]`.
    """
    S, d = keras.ops.shape(groups)[1], keras.ops.shape(groups)[2]
    if path == "blocks":
        return dropless_blocks.blocks_combine(groups, routing, bank, block_size, training)
    if path == "ragged":
        k = keras.ops.shape(routing.token_expert)[-1]
        return ragged_experts.ragged_experts_combine(
            keras.ops.reshape(groups, (-1, d)),
            keras.ops.reshape(routing.token_expert, (-1, k)),
            keras.ops.reshape(routing.token_gate, (-1, k)),
            keras.ops.reshape(routing.token_keep, (-1, k)),
            bank,
        )
    if path == "slots":
        expert_in = constrain(dispatch_lib.dispatch(groups, routing.slot_token), "dispatched")
        expert_out = constrain(bank(expert_in), "expert_outputs")  # [E, G, C, d]
        return dispatch_lib.combine(expert_out, routing.slot_token, routing.slot_gate, S)
    if path == "one_hot":
        mask, gates = dispatch_lib.one_hot_dispatch_mask(routing, S)
        expert_in = constrain(dispatch_lib.one_hot_dispatch(groups, mask), "dispatched")
        expert_out = constrain(bank(expert_in), "expert_outputs")
        return dispatch_lib.one_hot_combine(expert_out, gates)
    raise ValueError(f"`path` must be one of {EXPERT_PATHS}. Received: path={path!r}")

"""Dropless token-choice experts as block-sparse matmuls (every backend).

Dropless top-k routing (`capacity_factor=None`, and the causal inference
routing of every router) gives each expert `C = S` slots per group, so the
slot path of `MoEFeedForward` computes `E·S` expert rows per group for `k·S`
real choices: `E/k` times the useful work.

This module computes the same thing on about `T·k` rows, in `keras.ops` with
static shapes (Megablocks, Gale et al. 2022, arXiv 2211.15841):

1. **block routing** (`block_routing`): the `T·k` kept (token, expert)
   choices of all groups are laid out expert by expert, each expert's run
   padded to a multiple of `b` rows; expert `e` with `n_e` choices gets
   `ceil(n_e / b)` consecutive blocks of `b` rows. However the router
   decides, that is at most `num_blocks = floor((T·k + E·(b - 1)) / b)`
   blocks (and at most `T·k`): a static bound, so the layer compiles once.
   Both maps are kept: the row of each choice and the choice in each row
   (`routers.slot_choices`, the router's own integer scatter);
2. **dispatch**: the token rows are gathered into the `num_blocks · b` rows
   (empty rows are zeros) by `dispatch.gather_rows`, whose gradient is a
   gather through the inverse map (no scatter-add);
3. **experts** (`expert_blocks`): block `i` is multiplied by the weights of
   its expert. Portable path: `ExpertBank.call_blocks`, the weights (and
   LoRA adapters, int8 scales) gathered per block and one batched matmul
   per weight. JAX and TensorFlow fast paths (`jax_expert_blocks`,
   `tf_expert_blocks`, plain float banks, chosen by `fast_expert_blocks`):
   a grouped matmul as loops over each expert's own blocks, weights read in
   place, the unused trailing blocks skipped, with a custom gradient (on
   TensorFlow a training step multiplies runs of an expert's consecutive
   blocks, `chunk_rows`; inference one block at a time);
4. **combine**: each choice's row is gathered back (`gather_rows` again),
   weighted by its gate and summed over the token's `k` choices.

A token meets only the experts it chose; padding tokens (`token_keep`
False) take no row. Unused trailing blocks hold zero rows and are assigned
to the last expert; their gradient contribution is zero. Outputs, losses,
router statistics and gradients equal the slot path's
(`tests/test_dropless_paths.py`).
Inference is exactly causal on every backend: every matmul has the same `b`
rows, so a token's output does not depend on the other tokens' routing, to
the bit. TensorFlow's training step trades that for speed (runs of blocks
whose row counts follow the routing; outputs move by rounding, ~1e-8).

Cost: `num_blocks · b ≈ T·k + E·b` expert rows plus, per block, a read of
its expert's weights. Small blocks waste few rows, large blocks read weights
less often; `block_size` picks `b` by the cost model `n · (b +
BLOCK_COST_ROWS)` fitted to the sweeps of `benchmarks/dropless_blocks.py
--calibrate` (`TF_CHUNKED_BLOCK_COST_ROWS` instead for TensorFlow's training
step in runs of blocks, `block_cost_rows`), and `blocks_pay` decides
`dropless_impl="auto"` by the `BLOCK_COST_ROWS` model against the slot
path's `E · (T + BLOCK_COST_ROWS)`, for training and inference alike
(docs/moe_layers.md has the measurements).
"""

import keras
from keras import ops

from keras_brainformer.layers.dispatch import gather_rows
from keras_brainformer.layers.dropless_blocks_jax import jax_expert_blocks
from keras_brainformer.layers.dropless_blocks_tf import tf_expert_blocks
from keras_brainformer.layers.ragged_experts import bank_supports_ragged
from keras_brainformer.layers.routers import slot_choices

DROPLESS_IMPLS = ("auto", "blocks", "ragged", "slots")
# Candidate block sizes (rows per block).
BLOCK_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
# What one block costs beyond its rows (reading its expert's weights, the
# loop step, and the same again backwards), in expert rows: fitted to the
# block-size sweeps of `benchmarks/dropless_blocks.py --calibrate` on XLA CPU
# (E = 8, 32, 64 at 4096 tokens, k = 2: the model picks the measured best or
# a tie; and E = 64, k = 1, where b = 32 measured 3.0x a dense FFN, b = 64
# less, see benchmarks/README.md).
BLOCK_COST_ROWS = 48
# TensorFlow's training step multiplies an expert's consecutive blocks in runs
# of up to this many rows (`tf_expert_blocks(chunk_rows=...)`).
TF_CHUNK_ROWS = 256
# What one block costs beyond its rows on that chunked path: little, so small
# blocks (little padding) pay. Fitted to `--calibrate --backend tensorflow`
# (4096 tokens, k = 2, blocks/dense, 2026-12-01: E = 32 b8 1.50, b16 1.39,
# b32 1.44, b64 1.50, b128 1.68; E = 64 b8-b32 1.86-1.88, b64 2.03, b128
# 2.16; the model picks 32 and 16), benchmarks/README.md.
TF_CHUNKED_BLOCK_COST_ROWS = 4
# "auto" takes the block path when its modelled cost is below this share of
# the slot path's: a margin for what the model leaves out.
AUTO_MAX_COST_RATIO = 0.8


def num_blocks(num_choices, num_experts, block_size):
    """The static bound on blocks: `floor((T·k + E·(b - 1)) / b)`, at most
    `T·k` (a block holds at least one choice), at least 1.

    Example:
    >>> num_blocks(8192, 32, 64)  # 128 full blocks + up to 31 part-filled
    159
    """
    bound = (num_choices + num_experts * (block_size - 1)) // block_size
    return max(1, min(bound, num_choices))


def modelled_cost(num_choices, num_experts, block_size, cost_rows=BLOCK_COST_ROWS):
    """Cost of the block path in expert rows: `n · (b + cost_rows)` for the
    static bound of `n` blocks of `b` rows (`cost_rows`: what a block costs
    beyond its rows, `block_cost_rows`)."""
    return num_blocks(num_choices, num_experts, block_size) * (block_size + cost_rows)


def chunk_rows(bank, training):
    """The `chunk_rows` of `tf_expert_blocks` for a call of `bank`:
    `TF_CHUNK_ROWS` for a training step (`training` True) that takes
    TensorFlow's fast path, else None (one block per matmul: exactly
    causal; every other path is)."""
    if training is True and fast_expert_blocks(bank) is tf_expert_blocks:
        return TF_CHUNK_ROWS
    return None


def block_cost_rows(bank, training):
    """What one block costs beyond its rows for a call of `bank`:
    `TF_CHUNKED_BLOCK_COST_ROWS` on TensorFlow's chunked training path
    (`chunk_rows`), else `BLOCK_COST_ROWS`."""
    return BLOCK_COST_ROWS if chunk_rows(bank, training) is None else TF_CHUNKED_BLOCK_COST_ROWS


def slots_cost(num_tokens, num_experts):
    """Cost of the dropless slot path in the same units: `E` experts, each
    reading its weights once for its `T` slot rows, `E · (T + BLOCK_COST_ROWS)`."""
    return num_experts * (num_tokens + BLOCK_COST_ROWS)


def block_size(num_choices, num_experts, cost_rows=BLOCK_COST_ROWS):
    """The `b` of `BLOCK_SIZES` with the least `modelled_cost` (the smallest
    on ties).

    Example:
    >>> block_size(8192, 32), block_size(8192, 64), block_size(2, 8)
    (128, 64, 1)
    >>> block_size(8192, 32, TF_CHUNKED_BLOCK_COST_ROWS)
    32
    """
    return min(
        BLOCK_SIZES,
        key=lambda b: (modelled_cost(num_choices, num_experts, b, cost_rows), b),
    )


def blocks_pay(num_tokens, k, num_experts, block_size_=None):
    """Whether `dropless_impl="auto"` takes the block path: its modelled cost
    is below `AUTO_MAX_COST_RATIO` times the slot path's (`slots_cost`), for
    training and inference alike.

    Example:
    >>> blocks_pay(4096, 2, 8), blocks_pay(4096, 2, 2), blocks_pay(1, 2, 8)
    (True, False, True)
    """
    b = block_size_ or block_size(num_tokens * k, num_experts)
    cost = modelled_cost(num_tokens * k, num_experts, b)
    return cost < AUTO_MAX_COST_RATIO * slots_cost(num_tokens, num_experts)


def block_routing(token_expert, token_position, token_keep, num_experts, block_size_):
    """Lays the kept token choices of all groups out in expert blocks.

    Args:
        token_expert: int `[G, S, k]`, each choice's expert.
        token_position: int `[G, S, k]`, each kept choice's position in its
            expert's queue within the group (as routers give it: distinct
            per expert and group, below the group's count for that expert).
        token_keep: bool `[G, S, k]`, whether each choice is served.
        num_experts: int, `E`.
        block_size_: int, `b`.

    Returns:
        `(choice_row, row_choice, block_expert, blocks_per_expert)`: int32
        `[G·S·k]` the row of each choice (-1 if not kept; choice `c` is token
        `c // k`'s `(c % k)`-th), int32 `[n·b]` the choice in each row of the
        `n = num_blocks(G·S·k, E, b)` blocks (-1 for an empty row), int32
        `[n]` the expert of each block, and int32 `[E]` how many consecutive
        blocks each expert has (the blocks beyond their sum are unused).
    """
    G, S, k = ops.shape(token_expert)
    E, b = num_experts, block_size_
    n = num_blocks(G * S * k, E, b)
    expert = ops.cast(token_expert, "int32")
    keep = ops.cast(token_keep, "bool")
    # Choices per (group, expert), [G, E], by an integer scatter.
    group = ops.arange(G, dtype="int32")[:, None, None]
    counts = ops.reshape(
        ops.segment_sum(
            ops.reshape(ops.cast(keep, "int32"), (-1,)),
            ops.reshape(group * E + expert, (-1,)),
            num_segments=G * E,
        ),
        (G, E),
    )
    blocks = ops.cast((ops.sum(counts, axis=0) + (b - 1)) // b, "int32")  # [E]
    block_end = ops.cumsum(blocks)
    # First row of each (group, expert): the expert's first block, then the
    # earlier groups' choices of that expert.
    first_row = (block_end - blocks)[None, :] * b + ops.cumsum(counts, axis=0) - counts
    row = ops.take(ops.reshape(first_row, (-1,)), group * E + expert) + ops.cast(
        token_position, "int32"
    )
    choice_row = ops.reshape(ops.where(keep, row, -1), (-1,))
    row_choice = slot_choices(
        ops.reshape(row, (1, -1)), ops.reshape(keep, (1, -1)), n * b
    )[0]
    block_index = ops.arange(n, dtype="int32")[:, None]
    block_expert = ops.sum(ops.cast(block_end[None, :] <= block_index, "int32"), axis=1)
    block_expert = ops.minimum(block_expert, E - 1)
    return choice_row, row_choice, block_expert, blocks


def blocks_combine(groups, routing, bank, block_size_, training=False):
    """The block-sparse dropless expert computation of `MoEFeedForward`.

    Args:
        groups: `[G, S, d]` tokens.
        routing: the router's `RoutingInstructions` of a dropless token
            choice (`token_expert`, `token_position`, `token_gate`,
            `token_keep`, all `[G, S, k]`).
        bank: the `ExpertBank`.
        block_size_: int, `b`.
        training: whether this is a training step (TensorFlow's fast path
            then multiplies runs of blocks, `chunk_rows`).

    Returns:
        float32 `[G, S, d]`: `Σ_j keep·gate[t, j] · expert_{e[t, j]}(x[t])`.
    """
    G, S, d = ops.shape(groups)
    k = ops.shape(routing.token_expert)[-1]
    T, b = G * S, block_size_
    choice_row, row_choice, block_expert, blocks = block_routing(
        routing.token_expert,
        routing.token_position,
        routing.token_keep,
        bank.num_experts,
        b,
    )
    row_token = ops.where(row_choice >= 0, row_choice // k, -1)
    rows = gather_rows(
        ops.reshape(groups, (T, d)), row_token, ops.reshape(choice_row, (T, k))
    )  # [n·b, d]
    n = ops.shape(block_expert)[0]
    out = expert_blocks(
        bank, ops.reshape(rows, (n, b, d)), block_expert, blocks, chunk_rows(bank, training)
    )
    out = gather_rows(ops.reshape(out, (n * b, d)), choice_row, row_choice[:, None])
    gate = ops.where(routing.token_keep, ops.cast(routing.token_gate, "float32"), 0.0)
    out = ops.reshape(ops.cast(out, "float32"), (G, S, k, d))
    return ops.sum(out * gate[..., None], axis=2)


def expert_blocks(bank, x, block_expert, blocks_per_expert, chunk_rows_=None):
    """Applies expert `block_expert[i]` of `bank` to block `i` of `x`
    (`[n, b, d]` -> `[n, b, d]`); `chunk_rows_` goes to `tf_expert_blocks`.

    The portable path is `ExpertBank.call_blocks` (expert weights gathered
    per block, one batched matmul per weight over all `n` blocks; LoRA and
    int8 included). On JAX and TensorFlow, a plain float bank
    (`ragged_experts.bank_supports_ragged`) takes the backend's fast path
    instead (`fast_expert_blocks`: `jax_expert_blocks`, `tf_expert_blocks`):
    same values and gradients (tests check they agree).
    """
    fast = fast_expert_blocks(bank)
    if fast is tf_expert_blocks:
        return fast(bank, x, blocks_per_expert, chunk_rows_)
    if fast is not None:
        return fast(bank, x, blocks_per_expert)
    return bank.call_blocks(x, block_expert)


def fast_expert_blocks(bank):
    """The backend's fast path of `expert_blocks` for `bank`
    (`jax_expert_blocks` on JAX, `tf_expert_blocks` on TensorFlow), or None
    for the portable path: a quantized bank or one with LoRA adapters
    (`ragged_experts.bank_supports_ragged` is False), or another backend."""
    if not bank_supports_ragged(bank):
        return None
    return {"jax": jax_expert_blocks, "tensorflow": tf_expert_blocks}.get(
        keras.config.backend()
    )

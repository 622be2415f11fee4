"""Dropless token-choice experts as grouped matmuls (JAX only).

Dropless top-k routing (`capacity_factor=None`, and the causal inference
routing) gives every expert `C = S` slots per group, so the slot path of
`MoEFeedForward` (gather into `[E, G, C, d]`, batched expert matmuls,
segment-sum back) computes `E·S` rows per group although only `k·S` of them
are filled: `E/k` times the useful work (8x / 17x a dense FFN at E=16 / 32 in
`benchmarks/README.md`).

This module computes the same thing with no empty slots: the `T·k` token
choices are sorted by expert, each weight is applied with one
`jax.lax.ragged_dot` (a grouped matmul: rows `[o_e, o_e + n_e)` of the sorted
tokens times expert `e`'s matrix, `n_e` tokens chose `e`), and the outputs are
un-sorted and summed with their gates back onto the tokens. Every shape is
static (`T·k` rows whatever the routing), so it jits once; the per-expert
group sizes are data.

Where it pays depends on how XLA lowers `ragged_dot`. On TPU it is a native
grouped matmul. On XLA CPU (measured, `benchmarks/ragged_dropless.py`) and, in
upstream jaxlib 0.10.x, on NVIDIA GPUs (openxla/xla's ragged-dot rewriter
expands it into a zero-padded dense dot unless a cuDNN fusion is enabled and
supported) it materializes all `E` groups for all `T·k` rows: `k` times the
slot path's work. So `MoEFeedForward(dropless_impl="auto")` uses it on TPU
only (`RAGGED_AUTO_PLATFORMS`); `"ragged"` forces it anywhere on JAX.
Outputs, losses, router statistics and gradients equal the slot path's
(`tests/test_dropless_paths.py`, `tests/test_ragged_experts.py`).
"""

import keras
from keras import ops

from keras_brainformer.layers.activations import get_activation

# `jax.default_backend()` values on which "auto" picks the ragged path: those
# where `ragged_dot` is known to lower to a grouped matmul (see above). Add
# "gpu" once a GPU measurement shows the ragged step beating the slot step.
RAGGED_AUTO_PLATFORMS = ("tpu",)


def bank_supports_ragged(bank):
    """Whether `bank`'s plain float weights can be read directly.

    A quantized bank or one with LoRA adapters computes its experts
    differently from `w_in`/`w_gate`/`w_out` alone; those keep the slot path.
    """
    return getattr(bank, "quantization_mode", None) is None and not getattr(
        bank, "lora_enabled", False
    )


def ragged_is_default():
    """What `dropless_impl="auto"` picks: True on JAX when the default
    backend is in `RAGGED_AUTO_PLATFORMS` (TPU) and no `keras.distribution` is
    active (the slot path carries the expert-parallel layouts)."""
    if keras.config.backend() != "jax":
        return False
    import jax  # JAX only: reached on its backend

    if jax.default_backend() not in RAGGED_AUTO_PLATFORMS:
        return False
    return keras.distribution.distribution() is None


def ragged_experts_combine(tokens, token_expert, token_gate, token_keep, bank):
    """Applies each token's chosen experts and sums them with their gates.

    Args:
        tokens: `[T, d]` tokens, in the bank's compute dtype.
        token_expert: int `[T, k]`, the experts each token chose.
        token_gate: float `[T, k]`, their gates.
        token_keep: bool `[T, k]`, whether each choice is served (False for
            padding tokens); an unserved choice is computed but weighted 0.
        bank: a built `ExpertBank` (`w_in [E, d, h]`, `w_gate` when gated,
            `w_out [E, h, d]`) for which `bank_supports_ragged` holds.

    Returns:
        float32 `[T, d]`: `Σ_j keep·gate[t, j] · expert_{e[t, j]}(x[t])`.

    Example:
    >>> import numpy as np
    >>> from keras_brainformer.layers import ExpertBank
    >>> bank = ExpertBank(num_experts=4, intermediate_dim=8)
    >>> bank.build((4, None, None, 16))
    >>> if keras.config.backend() == "jax":  # JAX only
    ...     out = ragged_experts_combine(
    ...         np.ones((6, 16), "float32"), np.zeros((6, 2), "int32") + [0, 3],
    ...         np.full((6, 2), 0.5, "float32"), np.ones((6, 2), bool), bank)
    ...     print(tuple(out.shape))
    ... else:
    ...     print((6, 16))
    (6, 16)
    """
    # JAX's ragged_dot: this path exists on the JAX backend only.
    import jax
    import jax.numpy as jnp

    dtype = bank.compute_dtype
    num_experts = bank.num_experts
    activation, gated = get_activation(bank.activation)
    tokens = jnp.asarray(ops.convert_to_tensor(tokens, dtype=dtype))
    T, d = tokens.shape
    k = token_expert.shape[-1]

    expert = jnp.reshape(jnp.asarray(token_expert).astype("int32"), (T * k,))
    # Stable sort: choices of one expert stay in token order.
    order = jnp.argsort(expert, stable=True)  # sorted row -> choice
    inverse = jnp.zeros_like(order).at[order].set(
        jnp.arange(T * k, dtype=order.dtype)
    )  # choice -> sorted row (an integer permutation: no gradient flows here)
    group_sizes = jnp.bincount(expert, length=num_experts).astype("int32")
    rows = jnp.take(tokens, order // k, axis=0)  # [T·k, d], expert-sorted

    def weight(variable):
        return jnp.asarray(ops.cast(variable, dtype))

    hidden = jax.lax.ragged_dot(rows, weight(bank.w_in), group_sizes)
    if gated:
        gate_hidden = jax.lax.ragged_dot(rows, weight(bank.w_gate), group_sizes)
        hidden = activation(gate_hidden) * hidden
    else:
        hidden = activation(hidden)
    out = jax.lax.ragged_dot(
        jnp.asarray(hidden, dtype), weight(bank.w_out), group_sizes
    )  # [T·k, d]
    out = jnp.take(out, inverse, axis=0).astype("float32").reshape(T, k, d)
    gate = jnp.where(
        jnp.asarray(token_keep), jnp.asarray(token_gate).astype("float32"), 0.0
    )
    return jnp.sum(out * gate[..., None], axis=1)

"""The expert bank of an MoE layer: `FeedForward` with an expert axis."""

import keras

from keras_brainformer.layers.feed_forward import FeedForward


@keras.saving.register_keras_serializable(package="keras_brainformer")
class ExpertBank(FeedForward):
    """`E` FFN experts applied slot-wise to dispatched tokens:
    `FeedForward(intermediate_dim, ..., num_experts=E)` (see it), named for what
    `MoEFeedForward` holds and with `num_experts` first.

    Weights: `w_in [E, d, h]` (plus `w_gate [E, d, h]` for gated activations)
    and `w_out [E, h, d]`. Input and output are expert-major `[E, ..., d]`.

    Args:
        num_experts: int, `E`.
        intermediate_dim: int, `h`, each expert's hidden width.
        activation: str, see `keras_brainformer.layers.activations`.
        kernel_initializer: initializer of each expert's weights.
        lora_rank: int or None. Builds the bank with per-expert LoRA
            adapters of this rank (`A [E, d, r]`, `B [E, r, h]`).
        lora_alpha: LoRA scale numerator (default `lora_rank`).

    Example:
    >>> import numpy as np
    >>> bank = ExpertBank(num_experts=4, intermediate_dim=32)
    >>> tuple(bank(np.ones((4, 2, 3, 16), "float32")).shape)
    (4, 2, 3, 16)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        activation="gelu",
        kernel_initializer="glorot_uniform",
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        super().__init__(
            intermediate_dim, activation=activation, kernel_initializer=kernel_initializer,
            lora_rank=lora_rank, lora_alpha=lora_alpha, num_experts=num_experts, **kwargs,
        )

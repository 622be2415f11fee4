"""The expert bank: `E` independent FFNs stored as stacked weights."""

import keras
from keras import ops

from keras_brainformer.layers.activations import canonical_activation
from keras_brainformer.layers.activations import get_activation
from keras_brainformer.layers.adaptable_kernels import AdaptableKernels
from keras_brainformer.layers.initializers import expert_initializer
from keras_brainformer.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_brainformer")
class ExpertBank(AdaptableKernels, keras.layers.Layer):
    """`E` FFN experts applied slot-wise to dispatched tokens.

    Weights: `w_in [E, d, h]` (plus `w_gate [E, d, h]` for gated activations)
    and `w_out [E, h, d]`. Input and output are expert-major `[E, ..., d]`
    (the MoE layer passes `[E, G, C, d]`): expert `e` only sees the slots in
    row `e`, via one batched matmul per weight.

    Args:
        num_experts: int, `E`.
        hidden_dim: int, `h`, each expert's hidden width.
        activation: str, see `keras_brainformer.layers.activations`.
        kernel_initializer: initializer of the expert weights.
        lora_rank: int or None. Builds the bank with per-expert LoRA
            adapters of this rank (`A [E, d, r]`, `B [E, r, h]`).
        lora_alpha: LoRA scale numerator (default `lora_rank`).

    The expert kernels take LoRA adapters (`enable_lora(rank)`, one pair per
    expert) and int8 quantization (`quantize("int8")`, one scale per expert
    and output channel), see `layers/adaptable_kernels.py`.

    Example:
    >>> import numpy as np
    >>> bank = ExpertBank(num_experts=4, hidden_dim=32)
    >>> tuple(bank(np.ones((4, 2, 3, 16), "float32")).shape)
    (4, 2, 3, 16)
    """

    def __init__(
        self,
        num_experts,
        hidden_dim,
        activation="gelu",
        kernel_initializer="glorot_uniform",
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._init_adaptable(lora_rank, lora_alpha)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.activation = canonical_activation(activation)
        self._activation_fn, self._gated = get_activation(self.activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        E, h = self.num_experts, self.hidden_dim
        names = ("w_in", "w_gate") if self._gated else ("w_in",)
        # Fans from each expert's own [d, h] / [h, d], not from [E, d, h].
        for name in names:
            self._add_kernel(
                name,
                (E, model_dim, h),
                expert_initializer(self.kernel_initializer, E),
                batch_dims=1,
            )
        self._add_kernel(
            "w_out",
            (E, h, model_dim),
            expert_initializer(self.kernel_initializer, E),
            batch_dims=1,
        )
        self._build_lora()

    @property
    def activation_fn(self):
        """The activation function (the gate's, for a gated activation)."""
        return self._activation_fn

    @property
    def gated(self):
        """Whether the activation is gated (a `w_gate` kernel per expert)."""
        return self._gated

    def call(self, x):
        # x: [E, ..., d] -> [E, N, d]: one plain batched matmul per weight.
        shape = ops.shape(x)
        x = ops.reshape(x, (self.num_experts, -1, shape[-1]))
        return ops.reshape(self._ffn(x), shape)

    def call_blocks(self, x, block_expert):
        """Applies expert `block_expert[i]` to block `i` of `x`.

        Args:
            x: `[n, b, d]`, `n` blocks of `b` token rows.
            block_expert: int `[n]`, the expert of each block.

        Returns:
            `[n, b, d]`. Each expert's weights (and LoRA adapters, int8
            scales) are gathered per block, then one batched matmul per
            weight runs over the blocks (the block-sparse dropless path,
            `layers/dropless_blocks.py`).
        """
        return self._ffn(x, block_expert)

    def _ffn(self, x, batch_index=None):
        h = self._project("w_in", x, batch_index)
        if self._gated:
            h = self._activation_fn(self._project("w_gate", x, batch_index)) * h
        else:
            h = self._activation_fn(h)
        return self._project("w_out", h, batch_index)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "hidden_dim": self.hidden_dim,
                "activation": self.activation,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                **self._adaptable_config(),
            }
        )
        return config

"""The position-wise feed-forward sublayer: one dense FFN, or `E`
independent FFNs (experts) stored as stacked weights."""

import keras
from keras import ops

from keras_brainformer.layers.activations import canonical_activation
from keras_brainformer.layers.activations import get_activation
from keras_brainformer.layers.adaptable_kernels import AdaptableKernels
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.initializers import expert_initializer
from keras_brainformer.layers.renamed_arguments import refuse_old_names
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_brainformer")
class FeedForward(AdaptableKernels, keras.layers.Layer):
    """Dense FFN: `W_out · f(W_in · x)`, or `W_out · (f(W_gate · x) ⊙ W_in · x)`
    for gated activations. No biases (as in GLaM and T5).

    With `num_experts=E` it is `E` such FFNs (the experts of an MoE layer,
    `ExpertBank`): weights `w_in [E, d, h]` (plus `w_gate [E, d, h]`) and
    `w_out [E, h, d]`, each expert drawn with the fans of its own `[d, h]` /
    `[h, d]`. Inputs and outputs are then expert-major `[E, ..., d]` (the MoE
    layer passes `[E, G, C, d]`): expert `e` only sees the rows in row `e`,
    via one batched matmul per weight; `call_blocks` applies a chosen expert
    to each block of rows instead.

    Args:
        intermediate_dim: int. Width of the hidden layer (of each expert).
        activation: str. One of `relu`, `gelu`, `silu`/`swish`, `squared_relu`
            and their gated forms `gated_relu`, `gated_gelu`, `gated_silu`
            (aliases `reglu`, `geglu`, `swiglu`).
        kernel_initializer: initializer of the weight matrices (of each
            expert's).
        lora_rank: int or None. Builds the layer with LoRA adapters of this
            rank (see `enable_lora` and `layers/adaptable_kernels.py`; one
            pair per expert).
        lora_alpha: LoRA scale numerator (default `lora_rank`).
        num_experts: int or None (default): the number of experts `E`, or
            None for one dense FFN.
        **kwargs: standard layer arguments.

    The kernels take LoRA adapters (`enable_lora(rank)`) and int8
    quantization (`quantize("int8")`, one scale per expert and output
    channel), see `layers/adaptable_kernels.py`.

    Example:
    >>> import numpy as np
    >>> ffn = FeedForward(intermediate_dim=32, activation="gated_gelu")
    >>> tuple(ffn(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    >>> experts = FeedForward(intermediate_dim=32, num_experts=4)
    >>> tuple(experts(np.ones((4, 2, 3, 16), "float32")).shape)
    (4, 2, 3, 16)
    """

    def __init__(
        self,
        intermediate_dim,
        activation="gelu",
        kernel_initializer="glorot_uniform",
        lora_rank=None,
        lora_alpha=None,
        num_experts=None,
        **kwargs,
    ):
        refuse_old_names(kwargs, "FeedForward")
        super().__init__(**kwargs)
        self._init_adaptable(lora_rank, lora_alpha)
        self.intermediate_dim = check_positive_int("intermediate_dim", intermediate_dim)
        self.num_experts = (
            None if num_experts is None else check_positive_int("num_experts", num_experts)
        )
        self.activation = canonical_activation(activation)
        self._activation_fn, self._gated = get_activation(self.activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    @property
    def activation_fn(self):
        """The activation function (the gate's, for a gated activation)."""
        return self._activation_fn

    @property
    def gated(self):
        """Whether the activation is gated (a `w_gate` kernel)."""
        return self._gated

    def build(self, input_shape):
        model_dim, h, E = input_shape[-1], self.intermediate_dim, self.num_experts
        if E is None:
            shapes, batch_dims = ((model_dim, h), (h, model_dim)), 0
            initializer = lambda: clone_initializer(self.kernel_initializer)  # noqa: E731
        else:
            # Fans from each expert's own [d, h] / [h, d], not from [E, d, h].
            shapes, batch_dims = ((E, model_dim, h), (E, h, model_dim)), 1
            initializer = lambda: expert_initializer(self.kernel_initializer, E)  # noqa: E731
        names = ("w_in", "w_gate") if self._gated else ("w_in",)
        for name in names:
            self._add_kernel(name, shapes[0], initializer(), batch_dims=batch_dims)
        self._add_kernel("w_out", shapes[1], initializer(), batch_dims=batch_dims)
        self._build_lora()

    def call(self, x):
        if self.num_experts is None:
            return self._ffn(x)
        # x: [E, ..., d] -> [E, N, d]: one plain batched matmul per weight.
        shape = ops.shape(x)
        x = ops.reshape(x, (self.num_experts, -1, shape[-1]))
        return ops.reshape(self._ffn(x), shape)

    def call_blocks(self, x, block_expert):
        """Applies expert `block_expert[i]` to block `i` of `x` (experts only).

        Args:
            x: `[n, b, d]`, `n` blocks of `b` token rows.
            block_expert: int `[n]`, the expert of each block.

        Returns:
            `[n, b, d]`. Each expert's weights (and LoRA adapters, int8
            scales) are gathered per block, then one batched matmul per
            weight runs over the blocks (the block-sparse dropless path,
            `layers/dropless_blocks.py`).
        """
        if self.num_experts is None:
            raise ValueError("`call_blocks` needs experts (`num_experts`); this FFN is dense.")
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
                "intermediate_dim": self.intermediate_dim,
                "activation": self.activation,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                **self._adaptable_config(),
            }
        )
        if self.num_experts is not None:
            config["num_experts"] = self.num_experts
        return config

    @classmethod
    def from_config(cls, config):
        # Configs written by 0.1 say `hidden_dim` (layers/renamed_arguments.py).
        return super().from_config(with_current_names(config, "FeedForward", cls.__name__))

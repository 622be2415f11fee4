"""The dense (non-expert) position-wise feed-forward sublayer."""

import keras

from keras_brainformer.layers.activations import canonical_activation
from keras_brainformer.layers.activations import get_activation
from keras_brainformer.layers.adaptable_kernels import AdaptableKernels
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_brainformer")
class FeedForward(AdaptableKernels, keras.layers.Layer):
    """Dense FFN: `W_out · f(W_in · x)`, or `W_out · (f(W_gate · x) ⊙ W_in · x)`
    for gated activations. No biases (as in GLaM and T5).

    Args:
        hidden_dim: int. Width of the hidden layer.
        activation: str. One of `relu`, `gelu`, `silu`/`swish`, `squared_relu`
            and their gated forms `gated_relu`, `gated_gelu`, `gated_silu`
            (aliases `reglu`, `geglu`, `swiglu`).
        kernel_initializer: initializer of the weight matrices.
        lora_rank: int or None. Builds the layer with LoRA adapters of this
            rank (see `enable_lora` and `layers/adaptable_kernels.py`).
        lora_alpha: LoRA scale numerator (default `lora_rank`).
        **kwargs: standard layer arguments.

    The kernels take LoRA adapters (`enable_lora(rank)`) and int8
    quantization (`quantize("int8")`), see `layers/adaptable_kernels.py`.

    Example:
    >>> import numpy as np
    >>> ffn = FeedForward(hidden_dim=32, activation="gated_gelu")
    >>> tuple(ffn(np.ones((2, 5, 16), "float32")).shape)
    (2, 5, 16)
    """

    def __init__(
        self,
        hidden_dim,
        activation="gelu",
        kernel_initializer="glorot_uniform",
        lora_rank=None,
        lora_alpha=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._init_adaptable(lora_rank, lora_alpha)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.activation = canonical_activation(activation)
        self._activation_fn, self._gated = get_activation(self.activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        names = ("w_in", "w_gate") if self._gated else ("w_in",)
        for name in names:
            self._add_kernel(
                name,
                (model_dim, self.hidden_dim),
                clone_initializer(self.kernel_initializer),
            )
        self._add_kernel(
            "w_out",
            (self.hidden_dim, model_dim),
            clone_initializer(self.kernel_initializer),
        )
        self._build_lora()

    def call(self, x):
        h = self._project("w_in", x)
        if self._gated:
            h = self._activation_fn(self._project("w_gate", x)) * h
        else:
            h = self._activation_fn(h)
        return self._project("w_out", h)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "hidden_dim": self.hidden_dim,
                "activation": self.activation,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                **self._adaptable_config(),
            }
        )
        return config

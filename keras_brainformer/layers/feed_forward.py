"""The dense (non-expert) position-wise feed-forward sublayer."""

import keras

from keras_brainformer.layers.activations import canonical_activation
from keras_brainformer.layers.activations import get_activation
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.token_matmul import token_matmul
from keras_brainformer.layers.validation import check_positive_int


@keras.saving.register_keras_serializable(package="keras_brainformer")
class FeedForward(keras.layers.Layer):
    """Dense FFN: `W_out · f(W_in · x)`, or `W_out · (f(W_gate · x) ⊙ W_in · x)`
    for gated activations. No biases (as in GLaM and T5).

    Args:
        hidden_dim: int. Width of the hidden layer.
        activation: str. One of `relu`, `gelu`, `silu`/`swish`, `squared_relu`
            and their gated forms `gated_relu`, `gated_gelu`, `gated_silu`
            (aliases `reglu`, `geglu`, `swiglu`).
        kernel_initializer: initializer of the weight matrices.
        **kwargs: standard layer arguments.

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
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        self.activation = canonical_activation(activation)
        self._activation_fn, self._gated = get_activation(self.activation)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.w_in = self.add_weight(
            name="w_in",
            shape=(model_dim, self.hidden_dim),
            initializer=clone_initializer(self.kernel_initializer),
        )
        if self._gated:
            self.w_gate = self.add_weight(
                name="w_gate",
                shape=(model_dim, self.hidden_dim),
                initializer=clone_initializer(self.kernel_initializer),
            )
        self.w_out = self.add_weight(
            name="w_out",
            shape=(self.hidden_dim, model_dim),
            initializer=clone_initializer(self.kernel_initializer),
        )

    def call(self, x):
        h = token_matmul(x, self.w_in)
        if self._gated:
            h = self._activation_fn(token_matmul(x, self.w_gate)) * h
        else:
            h = self._activation_fn(h)
        return token_matmul(h, self.w_out)

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
            }
        )
        return config

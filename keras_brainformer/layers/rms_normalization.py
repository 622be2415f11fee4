"""Root-mean-square layer normalisation and the norm factory used by blocks."""

import keras
from keras import ops

from keras_brainformer.layers.validation import check_non_negative_float

NORMS = ("rms", "layer")


@keras.saving.register_keras_serializable(package="keras_brainformer")
class RMSNormalization(keras.layers.Layer):
    """RMSNorm (Zhang & Sennrich, 2019): `x / rms(x) * scale`, computed in float32.

    Used by GLaM and T5. No bias, no mean subtraction.

    Args:
        epsilon: float. Added to the mean square before the square root.
        **kwargs: standard layer arguments (`name`, `dtype`, ...).

    Example:
    >>> import numpy as np
    >>> norm = RMSNormalization()
    >>> tuple(norm(np.ones((2, 3, 4), "float32")).shape)
    (2, 3, 4)
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = check_non_negative_float("epsilon", epsilon)

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="ones"
        )

    def call(self, x):
        x32 = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        y = x32 * ops.rsqrt(mean_square + self.epsilon)
        y = y * ops.cast(self.scale, "float32")
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"epsilon": self.epsilon})
        return config


def make_norm(kind, epsilon, name, dtype=None):
    """Builds the normalisation layer named by `kind` (`"rms"` or `"layer"`)."""
    if kind == "rms":
        return RMSNormalization(epsilon=epsilon, name=name, dtype=dtype)
    if kind == "layer":
        return keras.layers.LayerNormalization(
            epsilon=epsilon, name=name, dtype=dtype
        )
    raise ValueError(f"Unknown `norm`={kind!r}. Allowed values: {NORMS}.")

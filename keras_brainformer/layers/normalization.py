"""The pre-norm layers of a block: Keras' RMSNorm or LayerNorm, by name.

RMSNorm (Zhang & Sennrich, 2019; GLaM, T5) is `keras.layers.RMSNormalization`:
it computes in float32 even under `mixed_bfloat16` and keeps its `scale`
variable float32, and matched the layer this package used to carry exactly
(max difference 0, same speed: `benchmarks/keras_primitives.py`,
docs/architecture.md). Files saved with that layer (registered as
`keras_brainformer>RMSNormalization`, one `scale` weight) load into Keras'.
"""

import keras

from keras_brainformer.layers.validation import check_non_negative_float

NORMS = ("rms", "layer")

# Saved configs naming the layer this package used to carry load into
# Keras' own (the same arguments, `epsilon`, and the same `scale` weight).
keras.saving.get_custom_objects()["keras_brainformer>RMSNormalization"] = (
    keras.layers.RMSNormalization
)


def make_norm(kind, epsilon, name, dtype=None):
    """The normalisation layer named by `kind`: `"rms"`
    (`keras.layers.RMSNormalization`) or `"layer"`
    (`keras.layers.LayerNormalization`), with `epsilon` (>= 0).

    Example:
    >>> import numpy as np
    >>> norm = make_norm("rms", 1e-6, "norm")
    >>> type(norm).__name__, tuple(norm(np.ones((2, 3, 4), "float32")).shape)
    ('RMSNormalization', (2, 3, 4))
    """
    epsilon = check_non_negative_float("layer_norm_epsilon", epsilon)
    if kind == "rms":
        return keras.layers.RMSNormalization(epsilon=epsilon, name=name, dtype=dtype)
    if kind == "layer":
        return keras.layers.LayerNormalization(epsilon=epsilon, name=name, dtype=dtype)
    raise ValueError(f"Unknown `norm`={kind!r}. Allowed values: {NORMS}.")

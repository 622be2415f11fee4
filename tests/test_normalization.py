"""The blocks' norms are Keras' own (`keras.layers.RMSNormalization`,
`LayerNormalization`), equal to the RMSNorm this package used to carry."""

import keras
import numpy as np
import pytest

from keras_brainformer.layers.normalization import make_norm


def reference_rms_norm(x, scale, epsilon):
    """The formula of the package's former RMSNorm, in float64."""
    x = np.asarray(x, "float64")
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + epsilon) * scale


def test_rms_norm_equals_the_reference():
    x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype("float32") * 3
    norm = make_norm("rms", 1e-5, "norm")
    norm.build(x.shape)
    scale = np.linspace(0.5, 2.0, 8).astype("float32")
    norm.scale.assign(scale)
    out = keras.ops.convert_to_numpy(norm(x))
    np.testing.assert_allclose(out, reference_rms_norm(x, scale, 1e-5), rtol=1e-5, atol=1e-6)
    assert type(make_norm("layer", 1e-5, "n")) is keras.layers.LayerNormalization


def test_rms_norm_under_mixed_bfloat16_keeps_a_float32_scale():
    x = np.random.default_rng(1).normal(size=(2, 4, 8)).astype("float32")
    norm = make_norm("rms", 1e-6, "norm", dtype="mixed_bfloat16")
    out = norm(keras.ops.cast(x, "bfloat16"))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(norm.scale.dtype) == "float32"
    # Computed in float32: within bfloat16's rounding of the output.
    x16 = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(x, "bfloat16"), "float32"))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")),
        reference_rms_norm(x16, 1.0, 1e-6),
        rtol=1e-2,
    )


def test_a_config_saved_with_the_former_layer_loads_into_keras_layer():
    saved = {
        "module": None,
        "class_name": "RMSNormalization",
        "config": {"name": "final_norm", "trainable": True, "dtype": "float32",
                   "epsilon": 1e-5},
        "registered_name": "keras_brainformer>RMSNormalization",
    }
    layer = keras.saving.deserialize_keras_object(saved)
    assert type(layer) is keras.layers.RMSNormalization
    assert layer.epsilon == 1e-5 and layer.name == "final_norm"


@pytest.mark.parametrize("epsilon", [-1.0, float("nan")])
def test_bad_epsilon_is_refused(epsilon):
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        make_norm("rms", epsilon, "norm")

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture(scope="session")
def tiny_backbone():
    """`tiny_backbone(name)`: the tiny preset's `BrainformerBackbone`, built
    once per test process (seeded) and shared by tests that only read it.
    A test that changes a shared backbone must restore it."""
    from keras_brainformer.models import BrainformerBackbone

    built = {}

    def get(name):
        if name not in built:
            keras.utils.set_random_seed(0)
            built[name] = BrainformerBackbone.from_preset(name)
        return built[name]

    return get

"""mixed_bfloat16 training of every tiny family stays finite for 200 steps and
learns, while every router computes its logits, probabilities and gates in
float32."""

import keras
import numpy as np
import pytest
from conftest import TINY_PRESETS
from keras import ops

from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config

STEPS, BATCH, LENGTH, VOCABULARY = 200, 4, 32, 256


def _data():
    # A learnable stream: each row counts up from its own start, modulo 97.
    starts = np.arange(STEPS * BATCH)[:, None] * 5
    tokens = ((starts + np.arange(LENGTH + 1)[None, :]) % 97 + 1).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((len(tokens), LENGTH), "int32")}
    return x, tokens[:, 1:]


@pytest.mark.slow
@pytest.mark.parametrize("family", TINY_PRESETS)
def test_mixed_bfloat16_family_trains_finite_with_float32_routers(family):
    config = dict(get_preset_config(family), vocabulary_size=VOCABULARY, dtype="mixed_bfloat16")
    keras.utils.set_random_seed(0)
    backbone = BrainformerBackbone(**config)
    lm = BrainformerCausalLM(backbone=backbone, preprocessor=None)
    lm.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = _data()
    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    lm.fit(x, y, batch_size=BATCH, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    assert len(losses) == STEPS
    assert np.all(np.isfinite(losses)), family
    # Keras logs the running mean: the mean over the last 50 steps is below
    # the first step's loss by a clear margin.
    first, last_50 = losses[0], (STEPS * losses[-1] - (STEPS - 50) * losses[-51]) / 50
    assert last_50 < 0.7 * first, (family, first, last_50)
    hidden = backbone({"token_ids": x["token_ids"][:2], "padding_mask": x["padding_mask"][:2]})
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"
    for weight in backbone.weights:
        assert np.all(np.isfinite(ops.convert_to_numpy(ops.cast(weight.value, "float32"))))
    for moe in backbone.moe_layers:
        assert moe.router.kernel.dtype == "float32"
        groups = ops.cast(ops.ones((2, LENGTH, backbone.hidden_dim)), "bfloat16")
        logits = moe.router.router_logits(groups)
        routing = moe.router(groups, training=True)
        assert keras.backend.standardize_dtype(logits.dtype) == "float32"
        assert keras.backend.standardize_dtype(routing.slot_gate.dtype) == "float32"

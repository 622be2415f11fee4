"""`tf.distribute.MirroredStrategy` over two logical CPU devices (TF backend).

Run by `tests/test_distribution.py` in a subprocess (logical devices must be
configured before TensorFlow initialises):

    KERAS_BACKEND=tensorflow python tests/mirrored_fit.py

Trains the tiny GLaM of `distributed_fit.py` for a few steps on one device
and then, from the same initial weights, under a MirroredStrategy over two
logical CPUs; prints `RESULT {json}` with both loss curves.
"""

import json
import os
import sys

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    cpu, [tf.config.LogicalDeviceConfiguration()] * 2
)

import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from distributed_fit import batches  # noqa: E402
from distributed_fit import model_config  # noqa: E402

from keras_brainformer.models import BrainformerCausalLM  # noqa: E402


def train(strategy, config, x, y, initial_weights=None):
    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    with strategy.scope():
        keras.utils.set_random_seed(0)
        lm = BrainformerCausalLM(
            backbone=BrainformerCausalLM.backbone_cls(**config), preprocessor=None
        )
        if initial_weights is not None:
            lm.set_weights(initial_weights)
        weights = lm.get_weights()
        lm.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    lm.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    per_step = [losses[0]] + [
        (i + 1) * losses[i] - i * losses[i - 1] for i in range(1, len(losses))
    ]
    return per_step, weights


def main():
    # Without the load-balancing loss: under MirroredStrategy each replica
    # computes it on its half batch (as GShard does per device), which is
    # not the full batch's value; everything else must match one device.
    config = model_config("glam", load_balance=False)
    x, y = batches(3, 8, 32, config["vocabulary_size"])
    single, weights = train(tf.distribute.get_strategy(), config, x, y)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    mirrored, _ = train(strategy, config, x, y, initial_weights=weights)
    print(
        "RESULT "
        + json.dumps(
            {
                "replicas": strategy.num_replicas_in_sync,
                "single": single,
                "mirrored": mirrored,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()

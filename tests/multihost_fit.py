"""One process of a two-process (multi-host) training run on 127.0.0.1.

`tests/test_distribution.py` starts two of these, each with its own simulated
CPU devices (`JAX_NUM_CPU_DEVICES=2`), the same coordinator address and
`--process-id 0` / `1`:

    JAX_NUM_CPU_DEVICES=2 KERAS_BACKEND=jax python tests/multihost_fit.py \\
        --coordinator 127.0.0.1:12345 --process-id 0 &
    JAX_NUM_CPU_DEVICES=2 KERAS_BACKEND=jax python tests/multihost_fit.py \\
        --coordinator 127.0.0.1:12345 --process-id 1

Each process joins the job with `keras.distribution.initialize`, builds a
tiny GLaM under a `batch=2,expert=2` mesh spanning the 4 devices of both
processes, and trains it from a `tf.data` pipeline that Keras shards per
process (`auto_shard_dataset`). It prints `RESULT {json}` with the per-step
losses (both processes must agree, and match the same model trained on one
device: the test compares) and the shard shapes it sees.
The same launch works on a TPU pod slice (one process per host); see
docs/distributed_training.md.
"""

import argparse
import json
import os
import sys


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, default=2)
    parser.add_argument("--mesh", default="batch=2,expert=2")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import jax

    # CPU devices of different processes talk through gloo collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    keras.distribution.initialize(
        job_addresses=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    import tensorflow as tf

    from keras_brainformer.distribution.mesh import make_distribution
    from keras_brainformer.models import BrainformerCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distributed_fit import batches
    from distributed_fit import model_config

    config = model_config("glam")
    global_batch = 8
    x, y = batches(args.steps, global_batch, 32, config["vocabulary_size"])
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch, drop_remainder=True)

    distribution = make_distribution(args.mesh)
    keras.utils.set_random_seed(0)
    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    with distribution.scope():
        lm = BrainformerCausalLM(
            backbone=BrainformerCausalLM.backbone_cls(**config), preprocessor=None
        )
        lm.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        lm.fit(dataset, epochs=1, verbose=0, callbacks=[Record()])
    per_step = [losses[0]] + [
        (i + 1) * losses[i] - i * losses[i - 1] for i in range(1, len(losses))
    ]
    expert = lm.backbone.moe_layers[0].experts.w_in
    result = {
        "process_id": args.process_id,
        "global_devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "losses": per_step,
        "expert_w_in_global": list(expert.shape),
        "expert_w_in_local": list(expert.value.addressable_shards[0].data.shape),
        "local_batch_rows": int(
            sum(1 for _ in distribution.distribute_dataset(dataset).unbatch())
        ),
        "global_rows": int(len(y)),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

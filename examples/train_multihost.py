"""Multi-host training: the same script on every host (JAX backend).

Each process joins the job with `keras.distribution.initialize`, the model is
created under a mesh spanning every process's devices, and Keras splits the
`tf.data` pipeline between processes (each reads its share of every global
batch). Run one copy per host:

    # two processes on one machine, 4 simulated CPU devices each:
    for i in 0 1; do
      JAX_NUM_CPU_DEVICES=4 KERAS_BACKEND=jax python examples/train_multihost.py \\
          --coordinator 127.0.0.1:1234 --num-processes 2 --process-id $i \\
          --mesh batch=2,expert=4 &
    done; wait

    # a TPU pod slice: the same command on every host (gcloud ... --worker=all),
    # no --coordinator: JAX finds the pod's coordinator itself.
    KERAS_BACKEND=jax python examples/train_multihost.py --mesh batch=16,expert=16 \\
        --preset brainformer1_1b ...

Process 0 prints the loss of every step; every process prints `RESULT` with
its losses so that a test can check they agree. See
docs/distributed_training.md.
"""

import argparse
import json


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", default=None, help="host:port of process 0")
    parser.add_argument("--num-processes", type=int, default=None)
    parser.add_argument("--process-id", type=int, default=None)
    parser.add_argument("--preset", default="glam_tiny")
    parser.add_argument("--mesh", default="batch=2,expert=4")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8, help="global batch")
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--max-corpus-bytes", type=int, default=300_000)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    args = parser.parse_args()

    import jax

    # CPU devices of different processes talk through gloo (no effect on
    # TPU/GPU; set before JAX starts its backend).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    # With no arguments (TPU pods, or KERAS_DISTRIBUTION_* variables set)
    # JAX discovers the job itself.
    keras.distribution.initialize(
        job_addresses=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
    )
    from keras_brainformer.distribution.mesh import make_distribution
    from keras_brainformer.models import BrainformerCausalLM
    from keras_brainformer.training.corpus import build_language_model_data
    from keras_brainformer.training.trainer import compile_language_model
    from keras_brainformer.training.trainer import load_tokenizer

    leader = jax.process_index() == 0
    data = build_language_model_data(
        load_tokenizer(args.preset),
        args.sequence_length,
        max_bytes=args.max_corpus_bytes,
        verbose=leader,
    )
    distribution = make_distribution(args.mesh)
    if leader:
        print(
            f"{jax.process_count()} processes, {jax.device_count()} devices "
            f"({jax.local_device_count()} here), mesh {args.mesh}"
        )
    keras.utils.set_random_seed(0)
    losses = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]))

    with distribution.scope():
        lm = BrainformerCausalLM.from_preset(args.preset, preprocessor=None)
        compile_language_model(
            lm, "adafactor", args.learning_rate, constant_steps=max(1, args.steps // 2)
        )
        lm.fit(
            data.train_dataset(args.batch_size, seed=0),
            steps_per_epoch=args.steps,
            epochs=1,
            verbose=2 if leader else 0,
            callbacks=[Record()],
        )
    print("RESULT " + json.dumps({"process": jax.process_index(), "losses": losses}),
          flush=True)


if __name__ == "__main__":
    main()

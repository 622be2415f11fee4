"""keras-hub's Mixtral vs its Brainformer conversion: training step time and
peak memory, same config, same data; and expert sharding under each layout map.

Step (JAX backend, CPU is fine): a tiny Mixtral-style backbone (2 layers,
d=128, 4 query / 2 key-value heads, expert width 256, 1024 tokens per step) is
built with keras-hub's `MixtralBackbone` for each `E` in {8, 64} and `k` in
{2, 8}, converted with `backbone_from_keras_hub`, and each variant's
training step — `value_and_grad` of the next-token cross-entropy (tied-off
output matrix, as Mixtral) w.r.t. every trainable weight, through
`stateless_call(training=True)` — is `jax.jit`-compiled once and timed in
rotating rounds (every variant once per round, so a neighbour's load hits all
alike; medians reported). Variants:

  keras-hub      every expert runs on every token (an einsum over all E)
  ours dropless  the converted model: routed tokens only (capacity None)
  ours cf 1.25   the same with capacity-factor routing (tokens may drop)

Peak memory is XLA's own figure for the compiled step
(`compiled.memory_analysis()`: temporaries plus arguments and outputs).

Layout (`--layout`, a separate run on 8 simulated CPU devices): bytes of
expert weights each device holds for Qwen3-MoE (keras-hub 0.32 gives Qwen's
families a `get_layout_map`, Mixtral none) under keras-hub's layout map on a
`(batch=1, model=8)` mesh vs ours on `(batch=1, expert=8)` and
`(batch=2, expert=4)`, from the variables' shardings after building under
each distribution.

Usage:
    python benchmarks/keras_hub_moe.py             # the table (minutes on 2 cores)
    python benchmarks/keras_hub_moe.py --quick     # smoke run
    python benchmarks/keras_hub_moe.py --layout    # expert sharding, 8 devices
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if "--layout" in sys.argv:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    )

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

from keras_brainformer.models import BrainformerBackbone  # noqa: E402
from keras_brainformer.models.brainformer.block_spec import BlockSpec  # noqa: E402
from keras_brainformer.zoo.keras_hub_conversion import backbone_from_keras_hub  # noqa: E402
from keras_brainformer.zoo.keras_hub_conversion import brainformer_config_from_keras_hub  # noqa: E402

VOCAB = 512


def mixtral_config(num_experts, k, d=128, hidden=256):
    return dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
                hidden_dim=d, intermediate_dim=hidden, num_experts=num_experts, top_k=k,
                sliding_window=None)


def variants(num_experts, k):
    keras.utils.set_random_seed(0)
    config = mixtral_config(num_experts, k)
    theirs = keras_hub.models.MixtralBackbone(**config)
    dropless = backbone_from_keras_hub(theirs)
    kwargs = brainformer_config_from_keras_hub(config, "mixtral")
    spec = kwargs["blocks"]
    attention, moe = spec.sublayers
    kwargs["blocks"] = BlockSpec([attention, dataclasses.replace(moe, capacity_factor=1.25)])
    capacity = BrainformerBackbone(**kwargs)
    return {"keras-hub": theirs, "ours dropless": dropless, "ours cf 1.25": capacity}


def train_step(backbone):
    """A jitted `(trainable, non_trainable, ids) -> (loss, grads)` and its
    arguments."""
    embedding = backbone.token_embedding

    def loss_fn(trainable, non_trainable, ids):
        inputs = {"token_ids": ids[:, :-1], "padding_mask": keras.ops.ones_like(ids[:, :-1])}
        hidden, _ = backbone.stateless_call(trainable, non_trainable, inputs, training=True)
        # The output matrix: reverse embeddings (untied, as Mixtral), by index.
        reverse = trainable[[v.path for v in backbone.trainable_variables].index(
            embedding.reverse_embeddings.path)]
        logits = keras.ops.matmul(hidden, reverse)
        return keras.ops.mean(keras.ops.sparse_categorical_crossentropy(
            ids[:, 1:], logits, from_logits=True))

    step = jax.jit(jax.value_and_grad(loss_fn))
    trainable = [v.value for v in backbone.trainable_variables]
    non_trainable = [v.value for v in backbone.non_trainable_variables]
    return step, trainable, non_trainable


def measure(num_experts, k, rounds, steps, batch, length):
    ids = np.random.default_rng(0).integers(0, VOCAB, size=(batch, length + 1)).astype("int32")
    built = {}
    for name, backbone in variants(num_experts, k).items():
        step, trainable, non_trainable = train_step(backbone)
        compiled = step.lower(trainable, non_trainable, ids).compile()
        memory = compiled.memory_analysis()
        peak = None
        if memory is not None:
            peak = (memory.temp_size_in_bytes + memory.argument_size_in_bytes
                    + memory.output_size_in_bytes)
        jax.block_until_ready(compiled(trainable, non_trainable, ids))
        built[name] = (compiled, trainable, non_trainable, peak)
    times = {name: [] for name in built}
    names = list(built)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            compiled, trainable, non_trainable, _ = built[name]
            for _ in range(steps):
                start = time.perf_counter()
                jax.block_until_ready(compiled(trainable, non_trainable, ids))
                times[name].append(time.perf_counter() - start)
        print(f"  E={num_experts} k={k}: round {r + 1}/{rounds}", flush=True)
    return {name: (statistics.median(times[name]), built[name][3]) for name in built}


def run_table(args):
    grid = [(8, 2)] if args.quick else [(8, 2), (8, 8), (64, 2), (64, 8)]
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    print(f"keras-hub {keras_hub.__version__}, jax {jax.__version__}, batch {args.batch} x "
          f"{args.length} tokens, rounds {rounds} x {steps} steps")
    rows = []
    for num_experts, k in grid:
        result = measure(num_experts, k, rounds, steps, args.batch, args.length)
        base_time, base_peak = result["keras-hub"]
        for name, (seconds, peak) in result.items():
            rows.append((num_experts, k, name, seconds, seconds / base_time,
                         peak, peak / base_peak if peak and base_peak else None))
    print("\n| E | k | variant | step (ms) | / keras-hub | peak memory (MiB) | / keras-hub |")
    print("|---|---|---|---|---|---|---|")
    for E, k, name, seconds, ratio, peak, peak_ratio in rows:
        peak_text = f"{peak / 2**20:.1f}" if peak else "n/a"
        peak_ratio_text = f"{peak_ratio:.2f}" if peak_ratio else "n/a"
        print(f"| {E} | {k} | {name} | {seconds * 1e3:.1f} | {ratio:.2f} | {peak_text} "
              f"| {peak_ratio_text} |")


def expert_bytes_per_device(backbone, pattern):
    """Bytes of the expert-bank variables held by device 0."""
    total = 0
    for variable in backbone.weights:
        if pattern in variable.path:
            shard = variable.value.addressable_shards[0].data
            total += shard.size * shard.dtype.itemsize
    return total


def run_layout(args):
    devices = keras.distribution.list_devices()
    assert len(devices) == 8, devices
    config = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=8, num_key_value_heads=8,
                  hidden_dim=128, intermediate_dim=256, moe_intermediate_dim=256,
                  num_experts=8, top_k=2)
    mesh = keras.distribution.DeviceMesh((1, 8), ("batch", "model"), devices)
    layout = keras_hub.models.Qwen3MoeBackbone.get_layout_map(mesh)
    with keras.distribution.ModelParallel(layout_map=layout, batch_dim_name="batch").scope():
        theirs = keras_hub.models.Qwen3MoeBackbone(**config)
    rows = [("keras-hub get_layout_map", "batch=1,model=8",
             expert_bytes_per_device(theirs, "/experts/"))]
    kwargs = brainformer_config_from_keras_hub(config, "qwen3_moe")
    for shape in ((1, 8), (2, 4)):
        mesh = keras.distribution.DeviceMesh(shape, ("batch", "expert"), devices)
        ours_layout = BrainformerBackbone.get_layout_map(mesh)
        with keras.distribution.ModelParallel(layout_map=ours_layout,
                                              batch_dim_name="batch").scope():
            ours = BrainformerBackbone(**kwargs)
        rows.append(("ours get_layout_map", f"batch={shape[0]},expert={shape[1]}",
                     expert_bytes_per_device(ours, "/experts/")))
    full = expert_bytes_per_device(BrainformerBackbone(**kwargs), "/experts/")
    print("\n| layout | mesh | expert weights on one device | share of all experts |")
    print("|---|---|---|---|")
    for name, mesh_text, held in rows:
        print(f"| {name} | {mesh_text} | {held / 2**20:.2f} MiB | {held / full:.3f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--layout", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    args = parser.parse_args()
    if args.layout:
        run_layout(args)
    else:
        run_table(args)


if __name__ == "__main__":
    main()

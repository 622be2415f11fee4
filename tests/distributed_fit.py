"""Runs a few `fit` steps of a tiny model on several meshes and prints JSON.

Used by `tests/test_distribution.py` in a subprocess started with
`JAX_NUM_CPU_DEVICES=8 KERAS_BACKEND=jax`, so that JAX sees 8 simulated
devices (the variable must be set before JAX starts):

    python tests/distributed_fit.py --model glam --meshes batch=8 batch=2,expert=4 batch=8@batch

(`MESH@AXIS` puts the expert banks on mesh axis AXIS, e.g. GShard's layout;
`MESH+fsdp` also splits the weights along the batch axis.)

For each mesh (and once without any distribution, the reference) it builds
the model under the distribution, trains `--steps` steps on fixed data with
AdamW, and records the per-step losses, the final weights' checksum, and the
local shard shape of every weight and of its optimizer slots. With fsdp it
also records the shapes `[B, T, x]` (B the global batch) in the compiled
train step: the tensors a device computes for the whole global batch.
"""

import argparse
import json
import re

import keras
import numpy as np

from keras_brainformer.distribution import tpu_compile
from keras_brainformer.distribution.mesh import make_distribution
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import glam_layer_pair
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config


def model_config(name, load_balance=True):
    if name == "brainformer":
        config = get_preset_config("brainformer1_tiny")
    elif name == "glam":
        # glam_tiny's layout (attention, top-2 MoE, attention, FFN) at d=64
        # with 4 heads, so that the heads split on a model axis of 2 or 4.
        config = get_preset_config("glam_tiny")
        config["hidden_dim"] = 64
        config["blocks"] = glam_layer_pair(4, 256, 8).to_dict()
    else:
        raise ValueError(f"unknown model {name!r}")
    config["vocabulary_size"] = 1024
    if not load_balance:
        for sub in config["blocks"]["sublayers"]:
            if sub["kind"] == "moe":
                sub["load_balance_loss_weight"] = 0.0
    return config


def batches(steps, batch_size, length, vocabulary):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, vocabulary, size=(steps * batch_size, length + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((steps * batch_size, length), "int32"),
    }
    return x, tokens[:, 1:].astype("int32")


def local_shape(variable):
    value = variable.value
    shards = getattr(value, "addressable_shards", None)
    return list(shards[0].data.shape) if shards else list(value.shape)


def spec_of(variable):
    sharding = getattr(variable.value, "sharding", None)
    spec = getattr(sharding, "spec", None)
    return [None if a is None else str(a) for a in spec] if spec is not None else None


def global_batch_shapes(lm, distribution, batch_size, length):
    """The distinct `[batch_size, length, x]` shapes in `fit`'s compiled step
    (per-device shapes: the partitioned program)."""
    lm.make_train_function()
    step = tpu_compile._jitted_train_step(lm)
    data = tpu_compile._batch_structs(distribution, (batch_size, length))
    state = lm._get_jax_state(
        trainable_variables=True, non_trainable_variables=True,
        optimizer_variables=True, metrics_variables=True,
    )
    text = step.lower(state, data).compile().as_text()
    found = re.findall(r"\w+\[%d,%d,(\d+)\]" % (batch_size, length), text)
    return sorted({int(x) for x in found})


def run(config, mesh, steps, batch_size, length, experts_on, lora=0, fsdp=False):
    distribution = (
        None if mesh == "none" else make_distribution(mesh, experts_on=experts_on, fsdp=fsdp)
    )
    keras.utils.set_random_seed(0)
    scope = distribution.scope() if distribution else _null()
    with scope:
        lm = BrainformerCausalLM(
            backbone=BrainformerCausalLM.backbone_cls(**config), preprocessor=None
        )
        if lora:
            # Adapters are created under the distribution: the layout map
            # places each expert's pair with its expert.
            lm.backbone.enable_lora(lora)
        lm.compile(
            optimizer=keras.optimizers.AdamW(learning_rate=1e-3),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        x, y = batches(steps, batch_size, length, config["vocabulary_size"])
        losses = []

        class Record(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                losses.append(float(logs["loss"]))

        lm.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0,
               callbacks=[Record()])
        # Keras logs the running mean of the loss; recover per-step losses.
        per_step = [losses[0]] + [
            (i + 1) * losses[i] - i * losses[i - 1] for i in range(1, len(losses))
        ]
        weights = {
            v.path: {
                "shape": list(v.shape),
                "local": local_shape(v),
                "spec": spec_of(v),
                "trainable": v.trainable,
            }
            for v in lm.backbone.weights
        }
        slots = {}
        for v in lm.optimizer.variables:
            slots[v.path] = {"shape": list(v.shape), "local": local_shape(v)}
        checksum = float(
            sum(np.abs(keras.ops.convert_to_numpy(v.value)).sum() for v in lm.backbone.weights)
        )
        result = {"losses": per_step, "weights": weights, "slots": slots, "checksum": checksum}
        if fsdp:
            result["global_batch_shapes"] = global_batch_shapes(
                lm, distribution, batch_size, length)
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="brainformer")
    parser.add_argument("--meshes", nargs="*", default=[])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--lora", type=int, default=0, help="enable LoRA of this rank")
    args = parser.parse_args()
    config = model_config(args.model)
    results = {"devices": len(keras.distribution.list_devices())}
    for key in ["none"] + args.meshes:
        # "batch=8@batch": the mesh, with the experts on the batch axis;
        # "batch=4,model=2+fsdp": the mesh with fsdp.
        spec, _, fsdp = key.partition("+")
        mesh, _, experts_on = spec.partition("@")
        results[key] = run(
            config, mesh, args.steps, args.batch_size, args.length, experts_on or None,
            lora=args.lora, fsdp=fsdp == "fsdp",
        )
    print("RESULT " + json.dumps(results))


if __name__ == "__main__":
    main()

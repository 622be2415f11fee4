"""Design your own Brainformer block, count it, train it, save and reload it.

    KERAS_BACKEND=jax python examples/custom_block.py

Builds a 6-sublayer block from JSON, prints total and activated parameters
(computed from the config, before building), trains two stacked blocks for
100 steps on the Python reference text (byte level) with `model.fit`, saves
the model as a `.keras` file and checks that the reloaded model gives the same
logits.
"""

import os
import tempfile

import keras
import numpy as np

from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.training.builtin_text import BYTE_VOCABULARY_SIZE
from keras_brainformer.training.builtin_text import byte_lm_arrays
from keras_brainformer.training.builtin_text import pydoc_text
from keras_brainformer.zoo import count_parameters

BLOCK_JSON = """
{"sublayers": [
  {"kind": "attention", "num_heads": 4},
  {"kind": "moe", "num_experts": 8, "intermediate_dim": 128, "router": "top_k", "top_k": 1,
   "capacity_factor": null, "activation": "squared_relu"},
  {"kind": "ffn", "intermediate_dim": 96, "activation": "swiglu"},
  {"kind": "attention", "num_heads": 2},
  {"kind": "moe", "num_experts": 8, "intermediate_dim": 64, "router": "top_k", "top_k": 2,
   "capacity_factor": 1.25, "z_loss_weight": 0.001},
  {"kind": "moe", "num_experts": 8, "intermediate_dim": 64, "router": "expert_choice",
   "capacity_factor": 2.0}
]}
"""


def main():
    keras.utils.set_random_seed(0)
    spec = BlockSpec.from_json(BLOCK_JSON)
    config = dict(
        vocabulary_size=BYTE_VOCABULARY_SIZE, hidden_dim=64, blocks=spec, num_layers=2
    )
    counts = count_parameters(config)
    print(f"before building: {counts['total']:,} parameters, {counts['activated']:,} activated")

    backbone = BrainformerBackbone(**config, max_sequence_length=64)
    lm = BrainformerCausalLM(backbone)
    lm.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    (x, y), (x_val, y_val) = byte_lm_arrays(pydoc_text(), sequence_length=64)
    lm.fit(x, y, batch_size=16, epochs=1, steps_per_epoch=100, validation_data=(x_val, y_val))

    sample = {k: v[:2] for k, v in x_val.items()}
    logits = keras.ops.convert_to_numpy(lm(sample))
    path = os.path.join(tempfile.mkdtemp(), "custom_block.keras")
    lm.save(path)
    reloaded = keras.saving.load_model(path)
    same = np.array_equal(keras.ops.convert_to_numpy(reloaded(sample)), logits)
    print(f"saved to {path}; reloaded logits identical: {same}")


if __name__ == "__main__":
    main()

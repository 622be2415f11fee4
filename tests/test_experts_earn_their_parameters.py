"""MoE learns more per step than a dense model of the same activated compute,
and more experts more than fewer (issue 33): the claim of Switch, GShard and
GLaM, at the smallest setting where it holds for every seed.

The setting: GLaM's block (attention, MoE of 8 experts top-2, attention,
gated-GELU FFN) at d=64, one block, byte-level text every Python has, batch
16 x 64 bytes, Adafactor at 0.01 (the command line's optimizer), 600 steps
(at 300 the validation loss of one seed does not yet separate them).
Against it, the same block with the MoE replaced by the FFN of equal FLOPs
(one plain-GELU FFN of twice an expert's width) and by 2 experts top-2
(equal activated compute, a quarter of the expert parameters). With every
layer but the MoE shared, the comparison isolates what the experts add;
Adafactor scales each update by the weight's RMS, so an expert that starts
small stays small, and this test fails on the initialisation before issue 33
(experts drawn with Keras' fans over the whole [E, d, h] kernel, sqrt(E)
too small): measured in docs/reproducing_the_paper.md#experts-at-equal-steps.
"""

import keras
import numpy as np
import pytest

from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec
from keras_brainformer.training.builtin_text import byte_lm_arrays
from keras_brainformer.training.builtin_text import pydoc_text
from keras_brainformer.training.trainer import compile_language_model

pytestmark = pytest.mark.slow

D, H, SEQUENCE, BATCH, STEPS, SEEDS = 64, 128, 64, 16, 600, (0, 1)
MARGIN = 0.01  # nats/byte


def _model(sublayer):
    attention = AttentionSpec(num_heads=4)
    block = BlockSpec([attention, sublayer, attention,
                       FeedForwardSpec(H, activation="gated_gelu")])
    backbone = BrainformerBackbone(vocabulary_size=256, hidden_dim=D, blocks=block,
                                   num_layers=1, max_sequence_length=SEQUENCE)
    return BrainformerCausalLM(backbone, preprocessor=None)


VARIANTS = {
    "8 experts": lambda: MoESpec(8, H, activation="gelu", router="top_k", top_k=2,
                                 capacity_factor=2.0),
    "2 experts": lambda: MoESpec(2, H, activation="gelu", router="top_k", top_k=2,
                                 capacity_factor=2.0),
    "dense": lambda: FeedForwardSpec(2 * H, activation="gelu"),
}


def _validation_loss(variant, seed, train, validation):
    keras.utils.set_random_seed(seed)
    lm = _model(VARIANTS[variant]())
    compile_language_model(lm, "adafactor", 0.01, constant_steps=10**9)
    rng = np.random.default_rng(seed)
    x, y = train
    for _ in range(STEPS // 100):  # batches drawn 100 steps at a time, as measured
        rows = rng.integers(0, len(y), size=100 * BATCH)
        lm.fit({k: v[rows] for k, v in x.items()}, y[rows], batch_size=BATCH, epochs=1,
               shuffle=False, verbose=0)
    return lm.evaluate(*validation, batch_size=64, verbose=0, return_dict=True)["loss"]


def test_experts_learn_more_per_step_than_dense_and_eight_more_than_two():
    train, (x_val, y_val) = byte_lm_arrays(pydoc_text()[:1_500_000], SEQUENCE, 0.05)
    validation = ({k: v[:256] for k, v in x_val.items()}, y_val[:256])
    loss = {v: np.array([_validation_loss(v, s, train, validation) for s in SEEDS])
            for v in VARIANTS}
    report = {v: np.round(loss[v], 4).tolist() for v in loss}
    # Every seed: 8 experts ahead of the equal-FLOP dense FFN and of 2
    # experts by more than MARGIN. Measured (seeds 0 / 1 / 2, validation
    # loss at step 600): 8 experts 1.516 / 1.500 / 1.516, dense 1.556 /
    # 1.591 / 1.556, 2 experts 1.565 / 1.628 / 1.595; with the old expert
    # initialisation 8 experts 1.563 / 1.596 / 1.542, behind dense in seeds
    # 0 and 1. (Before the router's default became GShard's 1/sqrt(d):
    # 8 experts 1.530 / 1.536 / 1.538, old initialisation 1.559 / 1.581 /
    # 1.551.)
    assert np.all(loss["dense"] - loss["8 experts"] > MARGIN), report
    assert np.all(loss["2 experts"] - loss["8 experts"] > MARGIN), report

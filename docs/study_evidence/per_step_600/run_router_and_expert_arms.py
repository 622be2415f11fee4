"""Issue 33, small tier, 600 steps: what closes glam_small's per-step gap to dense_small?

    python run_router_and_expert_arms.py r1 | gx | gx_r1

r1:    glam_small with the router kernel drawn like GShard's and GLaM's gate,
       VarianceScaling(1.0, "fan_in", "truncated_normal"), std 1/sqrt(d): the
       default since this arm (it was VarianceScaling(0.1, ...) when it ran,
       so the script sets it explicitly).
gx:    glam_small with gated-GELU experts of width 320 (equal activated FLOPs
       to plain-GELU experts of width 480, and the activation of dense_small's
       FFNs), the router at the old scale 0.1.
gx_r1: both.
gx and gx_r1 were stopped after seed 0 (the machine was needed elsewhere).
"""
import json
import pathlib
import shutil
import sys
import tempfile

import keras

from keras_brainformer.layers import routers
from keras_brainformer.training.compare import compare_families

HERE = pathlib.Path(__file__).parent
arm = sys.argv[1]
common = dict(steps=600, seeds=(0, 1, 2), eval_every=100, tokenizer="preset", sequence_length=128,
              batch_size=16, optimizer="adafactor", learning_rate=0.01, validation_batches=8)
scale = 1.0 if arm.endswith("r1") else 0.1
init = routers.Router.__init__


def router_at_scale(self, *args, kernel_initializer=None, **kwargs):
    kernel_initializer = kernel_initializer or keras.initializers.VarianceScaling(
        scale, "fan_in", "truncated_normal")
    init(self, *args, kernel_initializer=kernel_initializer, **kwargs)


routers.Router.__init__ = router_at_scale
family = "glam_small"
if arm.startswith("gx"):
    family = pathlib.Path(tempfile.mkdtemp()) / "glam_small_gx"
    shutil.copytree(HERE.parents[2] / "presets" / "glam_small", family)
    config = json.loads((family / "config.json").read_text())
    for sublayer in config["config"]["blocks"]["sublayers"]:
        if sublayer["kind"] == "moe":
            sublayer.update(activation="gated_gelu", intermediate_dim=320)
    (family / "config.json").write_text(json.dumps(config, indent=4))
    family = str(family)
out = {"r1": "router_1_over_sqrt_d", "gx": "gated_experts",
       "gx_r1": "gated_experts_router_1_over_sqrt_d"}[arm]
compare_families((family,), out=str(HERE / out), reference=None, **common)

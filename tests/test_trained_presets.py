"""The shipped trained presets load offline, still give the held-out loss
recorded when they were packaged, and generate text."""

import json
import math
import pathlib

import keras
import keras_hub
import pytest

from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.training.evaluation import heldout_loss
from keras_brainformer.utils.preset_loading import trained_presets

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAINED = trained_presets()


def test_trained_presets_ship_for_brainformer_glam_and_dense():
    assert {meta["family"] for meta in TRAINED.values()} >= {"brainformer1", "glam", "dense"}
    total = 0
    for name in TRAINED:
        size = sum(p.stat().st_size for p in (ROOT / "presets" / name).rglob("*") if p.is_file())
        assert size < 11e6, (name, size)
        total += size
    assert total < 30e6
    assert set(TRAINED) <= set(BrainformerBackbone.presets)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_preset_reproduces_its_recorded_heldout_loss(name):
    metadata = json.loads((ROOT / "presets" / name / "metadata.json").read_text())
    training, heldout = metadata["training"], metadata["heldout"]
    for key in ("command", "seed", "tokens_seen", "wall_clock_seconds", "validation_loss_causal"):
        assert key in training
    lm = BrainformerCausalLM.from_preset(name)
    text = (ROOT / heldout["file"]).read_text(encoding="utf-8")
    loss = heldout_loss(lm, text, heldout["sequence_length"], heldout["windows"])
    # A broken loader, tokenizer or routing moves this by far more than 2e-3.
    assert loss == pytest.approx(heldout["loss_causal"], abs=2e-3)
    assert loss < math.log(lm.backbone.vocabulary_size) - 3.0  # it learned something


@pytest.mark.parametrize("name", sorted(TRAINED))
def test_trained_preset_generates_from_a_prompt(name):
    lm = BrainformerCausalLM.from_preset(name)
    lm.compile(sampler=keras_hub.samplers.TopKSampler(k=5, seed=0))
    keras.utils.set_random_seed(0)
    text = lm.generate("def ", max_length=40)
    assert isinstance(text, str) and text.startswith("def ") and len(text) > 10

"""Preset folders that are incomplete or corrupted fail before anything is
built, with an error naming the file: missing files, a truncated or
bit-flipped weights file, an unreadable or malformed config.json, a trained
preset without its weights. Sound presets (trained ones, with recorded
checksums; architecture ones, without) still load."""

import json
import os
import shutil

import numpy as np
import pytest

from keras_brainformer.errors import PresetError
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.preset_integrity import record_checksums
from keras_brainformer.models.brainformer.preset_integrity import verify_preset
from keras_brainformer.models.brainformer.preset_loading import resolve_preset
from keras_brainformer.models.brainformer.preset_loading import trained_presets

TRAINED = "dense_tiny_stdlib"  # the smallest shipped trained preset (3.5 MB)


@pytest.fixture
def copy(tmp_path):
    target = tmp_path / "preset"
    shutil.copytree(resolve_preset(TRAINED), target)
    return target


@pytest.fixture
def built(monkeypatch):
    """Counts backbones constructed, to prove a refused preset built none."""
    calls = []
    original = BrainformerBackbone.__init__

    def spy(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BrainformerBackbone, "__init__", spy)
    return calls


def test_shipped_trained_presets_record_and_match_their_checksums():
    for name in trained_presets():
        folder = resolve_preset(name)
        with open(os.path.join(folder, "metadata.json")) as f:
            files = json.load(f)["files"]
        assert {"model.weights.h5", "config.json", "tokenizer.json"} <= set(files)
        verify_preset(folder)


def _refused(folder, match, built):
    with pytest.raises(PresetError, match=match):
        BrainformerCausalLM.from_preset(str(folder))
    assert not built, "a model was built from a refused preset"


def test_truncated_weights(copy, built):
    weights = copy / "model.weights.h5"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    _refused(copy, r"model\.weights\.h5: corrupted or truncated", built)


def test_bit_flipped_weights(copy, built):
    weights = copy / "model.weights.h5"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: h5py would load it silently
    weights.write_bytes(bytes(data))
    _refused(copy, r"model\.weights\.h5: corrupted or truncated", built)


@pytest.mark.parametrize("name", ["model.weights.h5", "tokenizer.json", "task.json"])
def test_missing_file(copy, built, name):
    (copy / name).unlink()
    _refused(copy, rf"{name.replace('.', '[.]')}: missing", built)


def test_trained_preset_without_weights_or_checksums_is_not_randomly_initialised(copy, built):
    metadata = json.loads((copy / "metadata.json").read_text())
    del metadata["files"]
    (copy / "metadata.json").write_text(json.dumps(metadata))
    (copy / "model.weights.h5").unlink()
    _refused(copy, r"model\.weights\.h5: missing, but metadata\.json records a training run",
             built)


@pytest.mark.parametrize(
    "text, match",
    [
        ("{ not json", r"config\.json: the backbone config is not readable JSON"),
        ('["a", "list"]', r"config\.json: expected a serialized Keras object"),
        ('{"config": {}}', r"config\.json: expected a serialized Keras object"),
    ],
)
def test_malformed_config(copy, built, text, match):
    (copy / "config.json").write_text(text)
    _refused(copy, match, built)


def test_config_edited_after_saving(copy, built):
    config = json.loads((copy / "config.json").read_text())
    config["config"]["hidden_dim"] += 2
    (copy / "config.json").write_text(json.dumps(config))
    _refused(copy, r"config\.json: corrupted or truncated", built)


def test_unreadable_weights_without_checksums_name_the_preset(copy):
    metadata = json.loads((copy / "metadata.json").read_text())
    del metadata["files"]
    (copy / "metadata.json").write_text(json.dumps(metadata))
    weights = copy / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(PresetError, match=str(copy)):
        BrainformerCausalLM.from_preset(str(copy))


def test_sound_presets_still_load(copy, tmp_path):
    lm = BrainformerCausalLM.from_preset(str(copy))
    reference = BrainformerCausalLM.from_preset(TRAINED)
    for a, b in zip(lm.backbone.weights, reference.backbone.weights):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value))
    # An architecture preset (no weights, no checksums) builds a random init.
    assert BrainformerBackbone.from_preset("glam_tiny").count_params() > 0
    # Re-recording after a deliberate edit makes the folder sound again.
    config = json.loads((copy / "config.json").read_text())
    config["config"]["name"] = "renamed"
    (copy / "config.json").write_text(json.dumps(config))
    record_checksums(copy)
    verify_preset(copy)

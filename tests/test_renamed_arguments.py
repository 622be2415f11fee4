"""Arguments renamed after 0.1 to keras-hub's names (`norm_epsilon` ->
`layer_norm_epsilon`, `rotary_max_wavelength` -> `rope_max_wavelength`,
`rotary_scaling_factor` -> `rope_scaling_factor`): configs, preset folders and
`.keras` files written by 0.1 keep loading, to the same model."""

import json

import numpy as np
import pytest
from conftest import rewrite_keras_config
from conftest import to_numpy

from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.layers.renamed_arguments import RENAMED_AFTER_0_1
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.models.brainformer.brainformer_presets import read_backbone_config
from keras_brainformer.preset_folders import PRESETS_ROOT

NEW = {"layer_norm_epsilon": 1e-5, "rope_max_wavelength": 5000, "rope_scaling_factor": 2.0}
OLD = {"norm_epsilon": 1e-5, "rotary_max_wavelength": 5000, "rotary_scaling_factor": 2.0}


def test_every_old_name_maps_to_a_new_one():
    assert with_current_names(OLD, "here") == NEW
    assert with_current_names(NEW, "here") == NEW
    assert set(RENAMED_AFTER_0_1) == set(OLD)


def test_both_names_at_once_is_one_clear_error():
    with pytest.raises(ValueError, match="BrainformerBackbone.*norm_epsilon.*layer_norm_epsilon"):
        BrainformerBackbone.from_config(
            {**get_preset_config("dense_tiny"), "norm_epsilon": 1e-5, "layer_norm_epsilon": 1e-6}
        )


def test_a_0_1_backbone_config_builds_the_same_model():
    config = get_preset_config("dense_tiny")
    new = BrainformerBackbone.from_config({**config, **NEW, "name": "b"})
    old = BrainformerBackbone.from_config({**config, **OLD, "name": "b"})
    assert old.get_config() == new.get_config()
    assert (old.layer_norm_epsilon, old.rope_max_wavelength, old.rope_scaling_factor) == (
        1e-5, 5000, 2.0,
    )
    assert not set(OLD) & set(new.get_config())


def test_a_0_1_attention_layer_config_loads():
    layer = CausalSelfAttention.from_config({"num_heads": 2, "head_dim": 4, **OLD})
    assert (layer.layer_norm_epsilon, layer.rope_max_wavelength, layer.rope_scaling_factor) == (
        1e-5, 5000, 2.0,
    )


def test_the_shipped_0_1_trained_preset_loads_with_its_old_names():
    """glam_tiny_stdlib's config.json was written by 0.1: it still says
    `norm_epsilon` (its checksums are recorded, so it is kept as written)."""
    with open(PRESETS_ROOT / "glam_tiny_stdlib" / "config.json") as f:
        raw = json.load(f)["config"]
    assert set(OLD) <= set(raw)
    config = read_backbone_config(PRESETS_ROOT / "glam_tiny_stdlib")
    assert config["layer_norm_epsilon"] == raw["norm_epsilon"]
    backbone = BrainformerBackbone.from_preset("glam_tiny_stdlib")
    assert backbone.layer_norm_epsilon == raw["norm_epsilon"]


def test_a_0_1_keras_file_loads(tmp_path):
    """A `.keras` archive whose config uses 0.1's names (the archive of today
    with its config rewritten to them) loads to the same logits."""
    import keras

    lm = BrainformerCausalLM(
        BrainformerBackbone(**{**get_preset_config("dense_tiny"), **NEW}), preprocessor=None
    )
    tokens = {"token_ids": np.array([[5, 6, 7, 8]], "int32"),
              "padding_mask": np.ones((1, 4), "int32")}
    expected = to_numpy(lm(tokens))
    path = tmp_path / "new.keras"
    lm.save(path)
    old_path = tmp_path / "old.keras"

    def with_0_1_names(text):
        for old, new in RENAMED_AFTER_0_1.items():
            text = text.replace(f'"{new}"', f'"{old}"')
        assert '"norm_epsilon"' in text and '"layer_norm_epsilon"' not in text
        return text

    rewrite_keras_config(path, old_path, with_0_1_names)
    loaded = keras.saving.load_model(old_path)
    assert loaded.backbone.rope_max_wavelength == 5000
    np.testing.assert_allclose(to_numpy(loaded(tokens)), expected, rtol=1e-6, atol=1e-6)

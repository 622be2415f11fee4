"""The zoo's presets: registration, loading by name and folder, round trips,
and causality of every family in the default (causal) inference routing."""

import json
import pathlib

import keras_hub
import numpy as np
import pytest
from conftest import TINY_PRESETS
from conftest import inference_call
from conftest import to_numpy

from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.zoo import count_parameters
from keras_brainformer.zoo.keras_hub_presets import KERAS_HUB_PRESET_FAMILIES
from keras_brainformer.zoo.preset_building import backbone_config_json
from keras_brainformer.zoo.preset_building import write_preset_directory
from keras_brainformer.zoo.preset_recipes import recipe_presets

PRESETS_DIR = pathlib.Path(__file__).resolve().parents[1] / "presets"
# The zoo's families; keras-hub's (architecture presets named after the
# originals, keras_hub_presets.py) have no CPU tiers.
FAMILIES = {
    entry["metadata"]["family"]
    for entry in backbone_presets.values()
    if entry["metadata"]["family"] not in KERAS_HUB_PRESET_FAMILIES
}


def test_every_family_has_a_tiny_preset():
    assert set(TINY_PRESETS) == {name for name in backbone_presets if name.endswith("_tiny")}
    assert {backbone_presets[name]["metadata"]["family"] for name in TINY_PRESETS} == FAMILIES
    assert len(FAMILIES) == 6


def test_presets_are_registered_with_keras_hub():
    listed = BrainformerBackbone.presets
    assert set(backbone_presets) <= set(listed)
    for name, entry in backbone_presets.items():
        metadata = listed[name]["metadata"]
        assert metadata["params"] == entry["metadata"]["params"]
        assert metadata["activated_params"] <= metadata["params"]
        assert metadata["description"]
    # Tasks list their backbone's presets too.
    assert set(backbone_presets) <= set(BrainformerCausalLM.presets)


RECIPES = recipe_presets()


def test_every_preset_folder_has_a_recipe_and_every_recipe_a_folder():
    """The folders are the registry; `python presets/build_presets.py` writes
    them from `zoo/preset_recipes.py`, and a stale or hand-made folder fails."""
    assert sorted(backbone_presets) == sorted(RECIPES)


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_preset_folders_match_their_recipes(name, tmp_path):
    """Each folder is what its recipe writes: the same config, the same
    metadata (counts included), the same files."""
    folder = PRESETS_DIR / name
    recipe = RECIPES[name]
    with open(folder / "config.json") as f:
        assert json.load(f) == json.loads(json.dumps(backbone_config_json(recipe["config"])))
    with open(folder / "metadata.json") as f:
        metadata = json.load(f)
    for key, value in recipe["metadata"].items():
        assert metadata[key] == json.loads(json.dumps(value)), key
    # The registry reads the folder back to the recipe's values.
    assert backbone_presets[name]["config"] == json.loads(json.dumps(recipe["config"]))
    assert backbone_presets[name]["metadata"] == json.loads(json.dumps(recipe["metadata"]))
    fresh = write_preset_directory(name, recipe, tmp_path / name)
    shipped = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert shipped == sorted(p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file())


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_loads_by_name(name, tiny_backbone):
    backbone = tiny_backbone(name)
    # Trainable weights only: routers also keep statistics variables.
    trainable = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    assert trainable == backbone_presets[name]["metadata"]["params"]
    assert count_parameters(backbone.get_config())["total"] == trainable


def test_causal_lm_from_preset_name_generates_text():
    lm = BrainformerCausalLM.from_preset("brainformer1_tiny")
    assert lm.preprocessor is not None
    lm.preprocessor.sequence_length = 16
    out = lm.generate("def ", max_length=16)
    assert isinstance(out, str) and out.startswith("def ")


def test_unknown_preset_name_is_a_clear_error():
    with pytest.raises(ValueError, match="no_such_preset|config.json"):
        BrainformerBackbone.from_preset("no_such_preset")


def test_folder_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        BrainformerBackbone.from_preset(str(tmp_path))


def test_save_to_preset_round_trip_through_generic_keras_hub_loader(tmp_path):
    lm = BrainformerCausalLM.from_preset("glam_ec_tiny")
    x = {
        "token_ids": np.random.default_rng(0).integers(0, 8192, (2, 16)).astype("int32"),
        "padding_mask": np.ones((2, 16), "int32"),
    }
    expected = to_numpy(lm(x))
    lm.save_to_preset(str(tmp_path / "saved"))
    metadata = json.loads((tmp_path / "saved" / "metadata.json").read_text())
    assert "CausalLM" in metadata["tasks"] and "TextClassifier" in metadata["tasks"]
    for loader in (BrainformerCausalLM, keras_hub.models.CausalLM):
        loaded = loader.from_preset(str(tmp_path / "saved"))
        assert isinstance(loaded, BrainformerCausalLM)
        np.testing.assert_array_equal(to_numpy(loaded(x)), expected)
        assert loaded.preprocessor is not None
    backbone = BrainformerBackbone.from_preset(str(tmp_path / "saved"))
    np.testing.assert_array_equal(
        to_numpy(backbone.token_embedding.embeddings),
        to_numpy(lm.backbone.token_embedding.embeddings),
    )


def _causality_gap(forward, tokens, t):
    """Largest logit change at positions <= t when every token after t changes
    (`forward`: `inference_call(lm)`, one compiled program on JAX)."""
    mask = np.ones_like(tokens)
    y = to_numpy(forward({"token_ids": tokens, "padding_mask": mask}))
    changed = tokens.copy()
    rng = np.random.default_rng(t)
    changed[:, t + 1 :] = rng.integers(4, 8192, changed[:, t + 1 :].shape)
    y2 = to_numpy(forward({"token_ids": changed, "padding_mask": mask}))
    return np.abs(y2[:, : t + 1] - y[:, : t + 1]).max(), np.abs(y2 - y).max()


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_every_family_is_causal_in_causal_mode(name, tiny_backbone):
    forward = inference_call(BrainformerCausalLM(tiny_backbone(name)))
    tokens = np.random.default_rng(1).integers(4, 8192, (2, 24)).astype("int32")
    for t in (0, 7, 16):
        before, anywhere = _causality_gap(forward, tokens, t)
        assert before == 0.0, (name, t)
        assert anywhere > 0.0  # the change is visible after t


@pytest.mark.parametrize("name", [n for n in TINY_PRESETS if "brainformer" in n or "_ec" in n])
def test_expert_choice_families_leak_in_as_trained_mode(name, tiny_backbone):
    # The same check fails without the causal routing: the test can fail.
    lm = BrainformerCausalLM(tiny_backbone(name))
    lm.set_inference_routing("as_trained")
    try:
        tokens = np.random.default_rng(1).integers(4, 8192, (2, 24)).astype("int32")
        forward = inference_call(lm)
        assert max(_causality_gap(forward, tokens, t)[0] for t in (0, 7, 16)) > 0.0
    finally:
        lm.set_inference_routing("causal")


def test_presets_resolve_inside_the_installed_package():
    """Preset folders ship inside the package (`keras_brainformer/presets/`,
    a link to `presets/` in a checkout, a copy in the wheel); every registered
    handle points there, never at the current directory or a cache."""
    import keras_brainformer
    from keras_brainformer.utils.preset_loading import PRESETS_ROOT

    package = pathlib.Path(keras_brainformer.__file__).resolve().parent
    assert PRESETS_ROOT == package / "presets"
    for name, entry in BrainformerBackbone.presets.items():
        handle = pathlib.Path(entry["kaggle_handle"])
        assert handle.parent == PRESETS_ROOT, name
        assert (handle / "config.json").exists(), name


def test_loading_a_preset_writes_nothing(tmp_path, monkeypatch):
    from keras_brainformer.utils.preset_loading import PRESETS_ROOT

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    before = {p: p.stat().st_mtime_ns for p in PRESETS_ROOT.rglob("*") if p.is_file()}
    BrainformerBackbone.from_preset("dense_tiny")
    BrainformerCausalLM.from_preset("dense_tiny_stdlib")
    after = {p: p.stat().st_mtime_ns for p in PRESETS_ROOT.rglob("*") if p.is_file()}
    assert after == before
    assert list(tmp_path.iterdir()) == []


def test_a_registered_preset_missing_from_the_installation_is_a_clear_error(
    tmp_path, monkeypatch
):
    from keras_brainformer.utils import preset_loading

    monkeypatch.setattr(preset_loading, "PRESETS_ROOT", tmp_path)
    with pytest.raises(preset_loading.PresetError, match="glam_tiny.*missing from this"):
        BrainformerBackbone.from_preset("glam_tiny")
    assert list(tmp_path.iterdir()) == []

"""Loading presets, configs and `.keras` files never runs code from the file.

Each crafted file below would execute `touch <canary>` if it were trusted;
every load must be refused with an error and the canary must not exist.
"""

import json
import os
import shutil

import keras
import pytest
from conftest import rewrite_keras_config

from keras_brainformer.errors import PresetError
from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.utils.preset_loading import resolve_preset


@pytest.fixture
def canary(tmp_path):
    path = tmp_path / "canary"
    yield str(path)
    assert not path.exists(), "code from a crafted file was executed"


def _lambda_config(canary):
    layer = keras.layers.Lambda(lambda x: (__import__("os").system(f"touch {canary}"), x)[1])
    return keras.saving.serialize_keras_object(layer)


def _import_configs(canary):
    return [
        {"module": "subprocess", "class_name": "Popen",
         "config": {"args": ["touch", canary]}},
        {"module": "os", "class_name": "system", "config": {"command": f"touch {canary}"}},
        {"module": "builtins", "class_name": "eval",
         "config": {"source": f"__import__('os').system('touch {canary}')"}},
    ]


def _preset_copy(tmp_path, name="glam_tiny"):
    target = tmp_path / "preset"
    shutil.copytree(resolve_preset(name), target)
    return target


def _write_config(folder, config):
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)


def _inject_tokenizer(folder, evil):
    """Replaces the tokenizer entry of the preset's preprocessor.json (a
    nested object Keras deserializes) by `evil`."""
    with open(folder / "preprocessor.json") as f:
        config = json.load(f)
    config["config"]["tokenizer"] = evil
    with open(folder / "preprocessor.json", "w") as f:
        json.dump(config, f)


def test_preset_naming_a_lambda_is_refused(tmp_path, canary):
    folder = _preset_copy(tmp_path)
    _inject_tokenizer(folder, _lambda_config(canary))
    with pytest.raises(ValueError, match="Lambda"):
        BrainformerCausalLM.from_preset(str(folder))


@pytest.mark.parametrize("index", range(3))
def test_preset_naming_an_arbitrary_import_is_refused(tmp_path, canary, index):
    folder = _preset_copy(tmp_path)
    _inject_tokenizer(folder, _import_configs(canary)[index])
    # Keras' TypeError, reported as one PresetError naming the folder.
    with pytest.raises(PresetError, match="could not be deserialized") as refused:
        BrainformerCausalLM.from_preset(str(folder))
    assert str(folder) in str(refused.value)


@pytest.mark.parametrize("index", range(3))
def test_block_spec_router_is_a_name_not_an_object(tmp_path, canary, index):
    folder = _preset_copy(tmp_path)
    with open(folder / "config.json") as f:
        config = json.load(f)
    moe = next(s for s in config["config"]["blocks"]["sublayers"] if s["kind"] == "moe")
    moe["router"] = _import_configs(canary)[index]
    _write_config(folder, config)
    with pytest.raises(ValueError, match="router"):
        BrainformerBackbone.from_preset(str(folder))


@pytest.mark.parametrize("index", range(3))
def test_router_config_naming_an_arbitrary_import_is_refused(canary, index):
    config = MoEFeedForward(4, 16).get_config()
    config["router"] = _import_configs(canary)[index]
    with pytest.raises((ValueError, TypeError)):
        MoEFeedForward.from_config(config)


def test_activation_string_is_a_name_not_code(tmp_path, canary):
    folder = _preset_copy(tmp_path)
    with open(folder / "config.json") as f:
        config = json.load(f)
    for sub in config["config"]["blocks"]["sublayers"]:
        if "activation" in sub:
            sub["activation"] = f"__import__('os').system('touch {canary}')"
    _write_config(folder, config)
    with pytest.raises(ValueError, match="activation"):
        BrainformerBackbone.from_preset(str(folder))


def test_keras_file_with_a_lambda_is_refused(tmp_path, canary):
    # A real model saved to .keras, then its config swapped for one that
    # wraps a lambda layer (what an attacker would ship).
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    good = tmp_path / "model.keras"
    model.save(good)
    bad = tmp_path / "crafted.keras"

    def with_a_lambda(text):
        config = json.loads(text)
        config["config"]["layers"][1] = dict(
            _lambda_config(canary), name="dense", inbound_nodes=
            config["config"]["layers"][1]["inbound_nodes"]
        )
        return json.dumps(config)

    rewrite_keras_config(good, bad, with_a_lambda)
    with pytest.raises(ValueError, match="(?i)lambda"):
        keras.saving.load_model(bad)
    assert os.path.exists(good)

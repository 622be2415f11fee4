"""Brainformer presets: the registry is the packaged preset folders.

Every folder of `keras_brainformer/presets/` (a link to the top-level
`presets/` in a checkout, a copy in the wheel) is a keras-hub preset:
`config.json` (the backbone), `metadata.json` (description, family, parameter
counts, the paper's figures). The folders are data; nothing is computed here.
The recipes that wrote them are tooling (`keras_brainformer.zoo.preset_recipes`,
run by `python presets/build_presets.py`, checked equal by a test).

`backbone_presets` holds the architecture presets (random initialisation, no
weights), keras-hub's registry shape plus the backbone's constructor kwargs:
`{name: {"metadata": ..., "kaggle_handle": <folder>, "config": ...}}`.
Trained presets (folders with weights and a `"training"` record) are listed by
`utils/preset_loading.trained_presets()`; both are registered with keras-hub by the
family's `__init__`.
"""

import copy
import json
import pathlib

from keras_brainformer.models.brainformer.block_spec import current_backbone_config
from keras_brainformer.preset_folders import PRESETS_ROOT
from keras_brainformer.preset_folders import preset_folder_metadata
from keras_brainformer.utils.preset_integrity import CONFIG_FILE

# Keys of a folder's `metadata.json` that record how it was written, not what
# the preset is.
_WRITING_KEYS = ("keras_brainformer_preset", "keras_version")
# Keys of `config.json`'s `"config"` that Keras adds to every layer config.
_LAYER_KEYS = ("name", "trainable")


def read_backbone_config(folder):
    """The backbone constructor kwargs a preset folder's `config.json` holds
    (Keras' `name` and `trainable` left out; 0.1's argument names translated,
    in the backbone's arguments and its blocks' sublayers, see
    `block_spec.current_backbone_config`). Nothing is built."""
    with open(pathlib.Path(folder) / CONFIG_FILE) as f:
        entry = json.load(f)
    config = entry.get("config", entry)
    config = {k: v for k, v in config.items() if k not in _LAYER_KEYS}
    return current_backbone_config(config, f"{pathlib.Path(folder) / CONFIG_FILE}")


def read_architecture_presets(root=PRESETS_ROOT):
    """`{name: {"metadata", "kaggle_handle", "config"}}` of the architecture
    presets among the preset folders under `root` (folders without a
    `"training"` record), by name."""
    presets = {}
    for name, metadata in preset_folder_metadata(root).items():
        if "training" in metadata:
            continue
        folder = root / name
        presets[name] = {
            "metadata": {k: v for k, v in metadata.items() if k not in _WRITING_KEYS},
            "kaggle_handle": str(folder),
            "config": read_backbone_config(folder),
        }
    return presets


backbone_presets = read_architecture_presets()


def get_preset_config(name):
    """A deep copy of architecture preset `name`'s backbone constructor kwargs."""
    if name not in backbone_presets:
        raise ValueError(
            f"Unknown preset {name!r}. Available: {sorted(backbone_presets)}."
        )
    return copy.deepcopy(backbone_presets[name]["config"])

"""Writing the zoo's architecture presets as keras-hub preset folders.

Used at build time by `presets/build_presets.py` (the folders are committed
under `presets/`, ship inside the wheel and are the family's registry) and by
tests that check the committed folders still match their recipes
(`preset_recipes.py`). Loading never writes: see
`utils/preset_loading.py`.
"""

import json
import pathlib
import shutil

import keras

from keras_brainformer.models.brainformer.brainformer_byte_tokenizer import BrainformerByteTokenizer
from keras_brainformer.models.brainformer.brainformer_causal_lm_preprocessor import (
    BrainformerCausalLMPreprocessor,
)
from keras_brainformer.models.brainformer.brainformer_tokenizer import BrainformerTokenizer
from keras_brainformer.utils.preset_integrity import CONFIG_FILE
from keras_brainformer.utils.preset_integrity import METADATA_FILE
from keras_brainformer.utils.preset_loading import TINY_PREPROCESSOR_SEQUENCE_LENGTH


def backbone_config_json(config):
    """The `config.json` dict keras-hub writes for a backbone with `config`."""
    return {
        "module": "keras_brainformer.models.brainformer.brainformer_backbone",
        "class_name": "BrainformerBackbone",
        "config": {"name": "brainformer_backbone", "trainable": True, **config},
        "registered_name": "keras_brainformer>BrainformerBackbone",
    }


def write_preset_directory(name, entry, directory):
    """Writes preset `name`'s folder into `directory`: `config.json` from
    `entry["config"]`, `metadata.json` from `entry["metadata"]` (a recipe of
    `preset_recipes.recipe_presets()`), and the tokenizer of a preset whose
    vocabulary is the shipped SentencePiece one or bytes. Files are written
    to a temporary folder first and moved in place, so a failure leaves
    nothing half-written."""
    directory = pathlib.Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    with open(staging / CONFIG_FILE, "w") as f:
        json.dump(backbone_config_json(entry["config"]), f, indent=4)
        f.write("\n")
    metadata = {
        "keras_brainformer_preset": name,
        "keras_version": keras.version(),
        **entry["metadata"],
    }
    # The CPU tiers carry their tokenizer: the shipped SentencePiece
    # vocabulary (tiny) or bytes (small); the paper's 256K one is unreleased.
    for tokenizer in (BrainformerTokenizer(), BrainformerByteTokenizer()):
        if entry["config"]["vocabulary_size"] == tokenizer.vocabulary_size():
            BrainformerCausalLMPreprocessor(
                tokenizer=tokenizer, sequence_length=TINY_PREPROCESSOR_SEQUENCE_LENGTH
            ).save_to_preset(str(staging))
    with open(staging / METADATA_FILE, "w") as f:
        json.dump(metadata, f, indent=4)
        f.write("\n")
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)
    return directory

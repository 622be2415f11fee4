"""Loading the zoo's presets by name: folders, registration and `from_preset`.

Every preset of `brainformer_presets.backbone_presets` is a keras-hub preset
folder: `config.json` (the backbone), `metadata.json` (description, parameter
counts, the paper's figures) and, for presets that use the shipped 8K
vocabulary, `tokenizer.json`, `preprocessor.json` and
`assets/tokenizer/vocabulary.spm`. The folders live in the repository's
`presets/` (rebuilt by `python presets/build_presets.py`); when the package is
installed without them, `preset_directory(name)` writes the folder into
`$KERAS_BRAINFORMER_HOME/presets` (default `~/.cache/keras_brainformer`) from
the registry on first use.

Trained presets (folders in `presets/` with weights and a training record in
their `metadata.json`) are registered by name too; they ship with the
repository, not with the installed package.

The names are registered with keras-hub, so `BrainformerBackbone.presets`
lists them and `from_preset("brainformer1_tiny")` resolves them like built-in
keras-hub presets. Architecture presets carry no weights: our classes'
`from_preset` (`zoo_presets`) then builds a random initialisation (with a log line) instead of
failing on a missing weights file. The generic
`keras_hub.models.CausalLM.from_preset(name, load_weights=False)` also works.
"""

import json
import os
import pathlib
import shutil

import keras
from absl import logging
from keras_hub.src.utils.preset_utils import register_presets

from keras_brainformer.models.brainformer.preset_integrity import PresetError
from keras_brainformer.models.brainformer.preset_integrity import verify_preset

CONFIG_FILE = "config.json"
METADATA_FILE = "metadata.json"
TOKENIZER_FILE = "tokenizer.json"
WEIGHTS_FILES = ("model.weights.h5", "model.weights.json")
TINY_PREPROCESSOR_SEQUENCE_LENGTH = 256

_REPOSITORY_PRESETS = pathlib.Path(__file__).resolve().parents[3] / "presets"


def _registry():
    from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets

    return backbone_presets


def cache_root():
    """Where presets missing from the repository are materialised."""
    home = os.environ.get("KERAS_BRAINFORMER_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache", "keras_brainformer"
    )
    return pathlib.Path(home) / "presets"


def _default_location(name):
    in_tree = _REPOSITORY_PRESETS / name
    if (in_tree / CONFIG_FILE).exists():
        return in_tree
    return cache_root() / name


def backbone_config_json(config):
    """The `config.json` dict keras-hub writes for a backbone with `config`."""
    return {
        "module": "keras_brainformer.models.brainformer.brainformer_backbone",
        "class_name": "BrainformerBackbone",
        "config": {"name": "brainformer_backbone", "trainable": True, **config},
        "registered_name": "keras_brainformer>BrainformerBackbone",
    }


def write_preset_directory(name, directory):
    """Writes preset `name`'s folder (config, metadata, tokenizer if the
    preset uses the shipped vocabulary) into `directory`. Files are written to
    a temporary folder first and moved in place, so a failure leaves nothing
    half-written."""
    from keras_brainformer.models.brainformer.brainformer_causal_lm_preprocessor import (
        BrainformerCausalLMPreprocessor,
    )
    from keras_brainformer.models.brainformer.brainformer_tokenizer import BrainformerTokenizer

    presets = _registry()
    if name not in presets:
        raise ValueError(f"Unknown preset {name!r}. Available presets: {sorted(presets)}.")
    entry = presets[name]
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
    tokenizer = BrainformerTokenizer()
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


def preset_directory(name):
    """The folder of preset `name`, materialised from the registry if needed."""
    directory = _default_location(name)
    if not (directory / CONFIG_FILE).exists():
        write_preset_directory(name, directory)
    return directory


def has_weights(directory):
    return any((pathlib.Path(directory) / f).exists() for f in WEIGHTS_FILES)


def _training_metadata(folder):
    """The metadata of `folder` if it is a trained preset (weights and a
    `"training"` record), else None."""
    metadata_path = pathlib.Path(folder) / METADATA_FILE
    if not metadata_path.exists() or not has_weights(folder):
        return None
    with open(metadata_path) as f:
        metadata = json.load(f)
    return metadata if "training" in metadata else None


def trained_presets():
    """Name → metadata of the trained presets in the repository's `presets/`:
    folders with weights whose `metadata.json` records a `"training"` (written
    by `presets/package_trained_preset.py`)."""
    found = {}
    for metadata_path in sorted(_REPOSITORY_PRESETS.glob("*/" + METADATA_FILE)):
        metadata = _training_metadata(metadata_path.parent)
        if metadata is not None:
            found[metadata_path.parent.name] = metadata
    return found


def resolve_preset(preset):
    """Maps a zoo preset name to its folder; other handles pass through."""
    if isinstance(preset, str):
        if preset in _registry():
            return str(preset_directory(preset))
        folder = _REPOSITORY_PRESETS / preset
        if "/" not in preset and _training_metadata(folder) is not None:
            return str(folder)
    return preset


def register_brainformer_presets(backbone_cls):
    """Registers every zoo preset with keras-hub (names → folders): the
    architecture presets and the trained ones found in `presets/`."""
    entries = {
        name: {"metadata": entry["metadata"], "kaggle_handle": str(_default_location(name))}
        for name, entry in _registry().items()
    }
    for name, metadata in trained_presets().items():
        entries[name] = {"metadata": metadata, "kaggle_handle": str(_REPOSITORY_PRESETS / name)}
    register_presets(entries, backbone_cls)


def zoo_presets(cls):
    """Class decorator: `cls.from_preset` also accepts zoo preset names and
    weightless architecture presets (then builds a random initialisation).

    A decorator rather than a mixin base, so that keras-hub still sees the
    class's real base (it lists a preset's tasks by `cls.__base__`).
    """

    def from_preset(klass, preset, *args, **kwargs):
        parent = super(cls, klass).from_preset
        preset = resolve_preset(preset)
        is_folder = isinstance(preset, str) and os.path.isdir(preset)
        if is_folder:
            # Missing, unreadable or corrupted files fail here, naming the
            # file, before any weight is created.
            verify_preset(preset)
            weights_requested = kwargs.get("load_weights", True)
            if "load_weights" in _parameters(parent) and weights_requested:
                if not has_weights(preset):
                    logging.info(
                        "Preset %s has no weights (architecture preset): "
                        "building a random initialisation.",
                        preset,
                    )
                    kwargs["load_weights"] = False
            if (
                "preprocessor" in _parameters(klass.__init__)
                and "preprocessor" not in kwargs
                and not (pathlib.Path(preset) / TOKENIZER_FILE).exists()
            ):
                kwargs["preprocessor"] = None
        try:
            return parent(preset, *args, **kwargs)
        except OSError as error:
            if not is_folder:
                raise
            raise PresetError(
                f"{preset}: a file of this preset could not be read ({error})."
            ) from None

    from_preset.__doc__ = (
        f"`{cls.__name__}` from a zoo preset name (see `BrainformerBackbone.presets`) "
        "or a preset folder; architecture presets without weights build a random "
        "initialisation. Other arguments as in keras-hub's `from_preset`."
    )
    cls.from_preset = classmethod(from_preset)
    return cls


def _parameters(function):
    import inspect

    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}

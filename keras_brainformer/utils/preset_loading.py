"""Loading the zoo's presets by name: folders, registration and `from_preset`.

Every preset folder (the registry, read by
`models/brainformer/brainformer_presets.py`) is a keras-hub preset folder:
`config.json` (the backbone), `metadata.json` (description, parameter counts,
the paper's figures) and, for presets that use the shipped 8K vocabulary,
`tokenizer.json`, `preprocessor.json` and `assets/tokenizer/vocabulary.spm`.
The folders are written at build time
(`python presets/build_presets.py`, see `zoo/preset_building.py`) into the
top-level `presets/` and ship inside the package as `keras_brainformer/presets/`
(a link to `presets/` in a checkout, a copy of it in the wheel). Loading only
reads that packaged folder: it never writes anything and never looks at the
current directory or a repository path.

Trained presets (packaged folders with weights and a training record in
their `metadata.json`) are registered by name too.

The names are registered with keras-hub, so `BrainformerBackbone.presets`
lists them and `from_preset("brainformer1_tiny")` resolves them like built-in
keras-hub presets. Architecture presets carry no weights: our classes'
`from_preset` (each class overrides it explicitly, calling `load_zoo_preset`)
then builds a random initialisation (with a log line) instead of failing on a
missing weights file. The generic
`keras_hub.models.CausalLM.from_preset(name, load_weights=False)` also works.
"""

import inspect
import json
import os
import pathlib
import warnings

from absl import logging

from keras_brainformer.errors import PresetError
from keras_brainformer.preset_folders import PRESETS_ROOT
from keras_brainformer.upstream_private import register_presets
from keras_brainformer.utils.preset_integrity import CONFIG_FILE
from keras_brainformer.utils.preset_integrity import METADATA_FILE
from keras_brainformer.utils.preset_integrity import WEIGHTS_FILES
from keras_brainformer.utils.preset_integrity import verify_preset

TOKENIZER_FILE = "tokenizer.json"
TINY_PREPROCESSOR_SEQUENCE_LENGTH = 256



# Names registered by `register_brainformer_presets` (the package's
# `__init__` passes the registry in, so this module never imports it).
_REGISTERED = set()


def preset_directory(name):
    """The packaged folder of zoo preset `name` (never written at load time).

    Raises `PresetError` if this installation lacks the folder: the package
    was built without its presets (rebuild the wheel from a checkout, or run
    `python presets/build_presets.py` in an editable checkout).
    """
    directory = PRESETS_ROOT / name
    if not (directory / CONFIG_FILE).exists():
        raise PresetError(
            f"Preset {name!r} is registered but its folder {directory} is missing from "
            "this installation of keras_brainformer (the package was built without "
            "its presets). Reinstall keras-brainformer, or in a checkout run "
            "`python presets/build_presets.py`."
        )
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
    """Name → metadata of the trained presets among the packaged folders:
    folders with weights whose `metadata.json` records a `"training"` (written
    by `presets/package_trained_preset.py`)."""
    found = {}
    for metadata_path in sorted(PRESETS_ROOT.glob("*/" + METADATA_FILE)):
        metadata = _training_metadata(metadata_path.parent)
        if metadata is not None:
            found[metadata_path.parent.name] = metadata
    return found


def resolve_preset(preset):
    """Maps a registered zoo preset name (architecture or trained) to its
    packaged folder; other handles pass through."""
    if isinstance(preset, str) and preset in _REGISTERED:
        return str(preset_directory(preset))
    return preset


def register_brainformer_presets(backbone_cls, presets):
    """Registers every zoo preset with keras-hub (names → packaged folders):
    the architecture presets of `presets` (the registry,
    `models/brainformer/brainformer_presets.backbone_presets`, read from the
    folders) and the trained ones among the packaged folders."""
    entries = {
        name: {"metadata": entry["metadata"], "kaggle_handle": str(PRESETS_ROOT / name)}
        for name, entry in presets.items()
    }
    for name, metadata in trained_presets().items():
        entries[name] = {"metadata": metadata, "kaggle_handle": str(PRESETS_ROOT / name)}
    _REGISTERED.update(entries)
    register_presets(entries, backbone_cls)


def load_zoo_preset(cls, parent_from_preset, preset, *args, **kwargs):
    """What every family class's explicit `from_preset` does: keras-hub's
    `from_preset` (`parent_from_preset`, the base class's, bound to `cls`)
    that also accepts zoo preset names and weightless architecture presets
    (then builds a random initialisation, with a log line).

    A preset folder is verified before anything is built (`verify_preset`);
    a folder that then fails to load raises one `PresetError` naming the file
    (`load_failure`), and Keras' warnings about unmatched weights are only
    re-issued when loading succeeds. A task loaded from a folder without a
    tokenizer comes without a preprocessor.
    """
    preset = resolve_preset(preset)
    is_folder = isinstance(preset, str) and os.path.isdir(preset)
    if not is_folder:
        return parent_from_preset(preset, *args, **kwargs)
    # Missing, unreadable or corrupted files fail here, naming the file,
    # before any weight is created.
    verify_preset(preset)
    weights_requested = kwargs.get("load_weights", True)
    if "load_weights" in _parameters(parent_from_preset) and weights_requested:
        if not has_weights(preset):
            logging.info(
                "Preset %s has no weights (architecture preset): "
                "building a random initialisation.",
                preset,
            )
            kwargs["load_weights"] = False
    if (
        "preprocessor" in _parameters(cls.__init__)
        and "preprocessor" not in kwargs
        and not (pathlib.Path(preset) / TOKENIZER_FILE).exists()
    ):
        kwargs["preprocessor"] = None
    # Keras warns about every group it cannot match before it fails on a
    # foreign weights file: held back, and re-issued only on success.
    with warnings.catch_warnings(record=True) as held:
        warnings.simplefilter("always")
        try:
            loaded = parent_from_preset(preset, *args, **kwargs)
        except PresetError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
            failure = load_failure(preset, error)
        else:
            failure = None
    if failure is not None:
        raise failure from None
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return loaded


def load_failure(folder, error):
    """The `PresetError` for a preset folder that passed `verify_preset` but
    failed to load (`error`): one line naming the file and the likely cause.

    h5py raises `OSError`, `RuntimeError` or `KeyError` for a damaged file;
    Keras a `ValueError` when the weights file holds other variables than
    the model built from `config.json` (weights saved from another
    configuration)."""
    folder = pathlib.Path(folder)
    weights = next((folder / f for f in WEIGHTS_FILES if (folder / f).exists()), None)
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    reason = " ".join(lines[:2]) or type(error).__name__
    if len(reason) > 300:
        reason = reason[:300] + "..."
    if weights is not None and "could not be loaded" in reason:
        return PresetError(
            f"{weights}: does not fit the model that {CONFIG_FILE} describes ({reason}); "
            "the weights were saved from a model of another configuration, or the file "
            f"was replaced. Use the weights file written with this {CONFIG_FILE}."
        )
    if weights is not None and isinstance(error, (OSError, RuntimeError, KeyError)):
        return PresetError(
            f"{weights}: unreadable, corrupted or truncated ({type(error).__name__}: "
            f"{reason}); download or copy the preset again."
        )
    return PresetError(
        f"{folder}: this preset could not be loaded ({type(error).__name__}: {reason})."
    )


def _parameters(function):

    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return {}

"""Checksums of a preset folder's files, recorded at save time and verified
before anything is loaded.

`record_checksums(folder)` writes `{"files": {name: sha256}}` into the
folder's `metadata.json` (every file except `metadata.json` itself,
recursively). `verify_preset(folder)` checks, before a model is built: that
`config.json` parses and names a Keras class, that every recorded file exists
with its recorded checksum, and that a folder whose metadata records a
training run has its weights. Every failure is a `PresetError` (a
`ValueError`) naming the file, so a truncated or corrupted download is never
half-loaded into a live model. Folders without recorded checksums (the
architecture presets, presets saved by other tools) are still checked for a
readable `config.json`; one that holds weights gets a `PresetWarning` naming
the folder and how to record them (nothing can tell a corrupted weights file
from a sound one there). A folder still named `*.partial` without checksums
is a preset whose writing was interrupted (every writer of the package
records the checksums, then renames the folder) and is refused.
"""

import hashlib
import json
import os
import pathlib
import warnings

from keras_brainformer.errors import PresetError
from keras_brainformer.errors import PresetWarning
from keras_brainformer.preset_folders import METADATA_FILE

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.weights.h5", "model.weights.json")
PARTIAL_SUFFIX = ".partial"
RECORD_COMMAND = "keras-brainformer checksum"


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder):
    folder = pathlib.Path(folder)
    return sorted(
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (METADATA_FILE, METADATA_FILE + PARTIAL_SUFFIX)
    )


def record_checksums(folder):
    """Adds the sha256 of every file of `folder` to its `metadata.json`
    (creating it if needed) and returns the mapping.

    Example:
    >>> import pathlib, tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "config.json").write_text('{"class_name": "X", "config": {}}')
    >>> sorted(record_checksums(folder))
    ['config.json']
    >>> verify_preset(folder)
    """
    folder = pathlib.Path(folder)
    metadata_path = folder / METADATA_FILE
    metadata = {}
    if metadata_path.exists():
        with open(metadata_path) as f:
            metadata = json.load(f)
    metadata["files"] = {name: _sha256(folder / name) for name in _files(folder)}
    staging = metadata_path.with_name(METADATA_FILE + ".partial")
    with open(staging, "w") as f:
        json.dump(metadata, f, indent=4)
        f.write("\n")
    os.replace(staging, metadata_path)  # atomic: the old metadata or the new one
    return metadata["files"]


def _load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PresetError(f"{path}: {what} is not readable JSON ({error}).") from None


def _recorded_files(folder):
    """The `{name: sha256}` recorded in `folder`'s metadata (empty if none)."""
    metadata_path = pathlib.Path(folder) / METADATA_FILE
    if not metadata_path.exists():
        return {}
    metadata = _load_json(metadata_path, "the preset metadata")
    recorded = metadata.get("files") if isinstance(metadata, dict) else None
    return recorded if isinstance(recorded, dict) else {}


def _check_not_partial(folder):
    if not folder.name.endswith(PARTIAL_SUFFIX) or _recorded_files(folder):
        return
    final = folder.with_name(folder.name[: -len(PARTIAL_SUFFIX)])
    advice = (
        f"the complete preset is {str(final)!r}"
        if (final / CONFIG_FILE).exists()
        else "write the preset again (rerun the command that wrote it)"
    )
    raise PresetError(
        f"{folder}: an incomplete preset, left by a write that was interrupted (the "
        f"writer records checksums and renames the folder to {final.name!r} when "
        f"complete, and this one has none); {advice}."
    )


def verify_preset(folder):
    """Raises `PresetError` naming the first missing or corrupted file of the
    preset `folder` (see the module docstring); returns None if it is sound.
    Warns (`PresetWarning`) when the folder holds weights but records no
    checksum for them."""
    folder = pathlib.Path(folder)
    _check_not_partial(folder)
    config_path = folder / CONFIG_FILE
    if not config_path.exists():
        raise PresetError(
            f"Preset folder {str(folder)!r} has no {CONFIG_FILE}: not a keras-hub preset "
            "(see docs/presets.md)."
        )
    config = _load_json(config_path, "the backbone config")
    if not isinstance(config, dict) or "class_name" not in config or "config" not in config:
        raise PresetError(
            f"{config_path}: expected a serialized Keras object with `class_name` and "
            f"`config`; found {type(config).__name__} with keys "
            f"{sorted(config) if isinstance(config, dict) else '-'}."
        )
    metadata_path = folder / METADATA_FILE
    metadata = {}
    if metadata_path.exists():
        metadata = _load_json(metadata_path, "the preset metadata")
    if not isinstance(metadata, dict):
        raise PresetError(
            f"{metadata_path}: expected a JSON object, found {type(metadata).__name__}."
        )
    recorded = _recorded_files(folder)
    for name, expected in sorted(recorded.items()):
        path = folder / name
        if not path.exists():
            raise PresetError(f"{path}: missing (the preset's metadata.json lists it).")
        actual = _sha256(path)
        if actual != expected:
            raise PresetError(
                f"{path}: corrupted or truncated (sha256 {actual[:12]}..., the preset's "
                f"metadata.json records {expected[:12]}...); download or copy it again."
            )
    if "training" in metadata and not any((folder / f).exists() for f in WEIGHTS_FILES):
        raise PresetError(
            f"{folder / WEIGHTS_FILES[0]}: missing, but {METADATA_FILE} records a training "
            "run; refusing to fall back to a random initialisation."
        )
    unchecked = [f for f in WEIGHTS_FILES if (folder / f).exists() and f not in recorded]
    if unchecked:
        warnings.warn(
            f"Preset folder {str(folder)!r} records no checksum for {unchecked[0]} (no "
            f"\"files\" in its {METADATA_FILE}): a corrupted or swapped weights file cannot "
            "be detected before loading. If you trust this folder, record them with "
            f"`{RECORD_COMMAND} {folder}`.",
            PresetWarning,
            stacklevel=3,
        )

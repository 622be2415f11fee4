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
readable `config.json`.
"""

import hashlib
import json
import pathlib

from keras_brainformer.errors import PresetError
from keras_brainformer.preset_folders import METADATA_FILE

CONFIG_FILE = "config.json"
WEIGHTS_FILES = ("model.weights.h5", "model.weights.json")


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
        if p.is_file() and p.name != METADATA_FILE
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
    with open(metadata_path, "w") as f:
        json.dump(metadata, f, indent=4)
        f.write("\n")
    return metadata["files"]


def _load_json(path, what):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PresetError(f"{path}: {what} is not readable JSON ({error}).") from None


def verify_preset(folder):
    """Raises `PresetError` naming the first missing or corrupted file of the
    preset `folder` (see the module docstring); returns None if it is sound."""
    folder = pathlib.Path(folder)
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
    if not metadata_path.exists():
        return
    metadata = _load_json(metadata_path, "the preset metadata")
    recorded = metadata.get("files") or {}
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

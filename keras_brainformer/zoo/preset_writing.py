"""Writing a task (model, preprocessor, tokenizer) as a preset folder that
`from_preset`, `train --preset` and `generate` accept, all or nothing."""

import json
import os
import pathlib
import shutil

from keras_brainformer.utils.preset_integrity import METADATA_FILE
from keras_brainformer.utils.preset_integrity import record_checksums
from keras_brainformer.zoo.parameter_count import count_parameters


def check_output_folder(directory, overwrite=False):
    """Raises `ValueError` if `directory` exists and is not an empty folder,
    unless `overwrite`."""
    directory = pathlib.Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        if not overwrite:
            raise ValueError(
                f"Output folder {str(directory)!r} exists and is not empty; use "
                "another folder or overwrite it."
            )


def write_task_preset(task, directory, metadata, overwrite=False):
    """Writes `task` (a keras-hub task whose backbone is a
    `BrainformerBackbone`) as the preset folder `directory`.

    The folder is written next to `directory` and renamed when complete (a
    failure leaves nothing half-written); `metadata.json` gets keras-hub's
    entries, then `metadata`, the parameter counts (`params`,
    `activated_params`) and the checksums of every file (verified by
    `from_preset`).

    Args:
        task: the task to save (`save_to_preset`).
        directory: the folder to write.
        metadata: dict of extra `metadata.json` entries (JSON-serialisable).
        overwrite: replace a non-empty `directory`.

    Returns:
        `directory` as a `pathlib.Path`.
    """
    directory = pathlib.Path(directory)
    check_output_folder(directory, overwrite)
    staging = directory.with_name(directory.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        task.save_to_preset(str(staging))
        metadata_path = staging / METADATA_FILE
        with open(metadata_path) as f:
            written = json.load(f)
        counts = count_parameters(task.backbone.get_config())
        written.update(
            {
                "keras_brainformer_preset": directory.name,
                **metadata,
                "params": counts["total"],
                "activated_params": counts["activated"],
            }
        )
        with open(metadata_path, "w") as f:
            json.dump(written, f, indent=4)
            f.write("\n")
        record_checksums(staging)
        if directory.exists():
            if directory.is_dir():
                shutil.rmtree(directory)
            else:
                os.remove(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return directory

"""Crash-safe epoch checkpoints: a killed write never replaces a good one.

Keras' `BackupAndRestore` overwrites `latest.weights.h5` in place and writes
the epoch counter in a second file afterwards, so a process killed between
the two (or during either) resumes from weights and an epoch counter that do
not belong together, or not at all. `AtomicBackupAndRestore` writes each
epoch's checkpoint (weights with the optimizer state, and the epoch) into
`epoch-NNNNNN.partial/`, flushes it to disk, and only then renames the folder
to `epoch-NNNNNN/` — a rename is atomic, so a folder without `.partial` is
always complete. Resuming loads the newest complete folder (falling back to
an older one if its weights cannot be read); the oldest complete folders
beyond `keep` are deleted after a new one is in place.
"""

import json
import os
import pathlib
import re
import shutil

import keras
from absl import logging

WEIGHTS_FILE = "checkpoint.weights.h5"
STATE_FILE = "state.json"
_COMPLETE = re.compile(r"^epoch-(\d{6})$")
STAGES = ("weights", "state", "rename")


def complete_checkpoints(backup_dir):
    """`[(epoch, folder)]` of the complete checkpoints in `backup_dir`,
    newest first (folders still named `.partial` are ignored)."""
    backup_dir = pathlib.Path(backup_dir)
    if not backup_dir.is_dir():
        return []
    found = []
    for child in backup_dir.iterdir():
        match = _COMPLETE.match(child.name)
        if match and child.is_dir():
            found.append((int(match.group(1)), child))
    return sorted(found, reverse=True)


def latest_epoch(backup_dir):
    """The epoch of the newest complete checkpoint, 0 if there is none."""
    checkpoints = complete_checkpoints(backup_dir)
    return checkpoints[0][0] if checkpoints else 0


def _fsync_tree(folder):
    for path in pathlib.Path(folder).iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


class AtomicBackupAndRestore(keras.callbacks.Callback):
    """Backs up weights, optimizer state and epoch at every epoch's end, and
    restores the newest complete backup when training starts.

    A drop-in for `keras.callbacks.BackupAndRestore(save_freq="epoch")` whose
    checkpoints survive a kill at any point (see the module docstring).

    Args:
        backup_dir: folder of the checkpoints.
        keep: complete checkpoints kept (at least 1; default 2).
        on_stage: optional `on_stage(epoch, stage)`, called after each stage
            of writing epoch `epoch`'s (1-based) checkpoint, `stage` in
            `STAGES` (`"weights"` written, `"state"` written, `"rename"`
            done): a hook for progress reporting, and for tests that kill
            the process part way through a checkpoint.

    Example:
    ```python
    model.fit(x, y, epochs=10, callbacks=[AtomicBackupAndRestore("run/backup")])
    # killed, then the same call again: continues after the last finished epoch
    ```
    """

    def __init__(self, backup_dir, keep=2, on_stage=None):
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be an int >= 1. Received: keep={keep!r}")
        if on_stage is not None and not callable(on_stage):
            raise TypeError(f"`on_stage` must be callable or None. Received: {on_stage!r}")
        self.backup_dir = pathlib.Path(backup_dir)
        self.keep = keep
        self.on_stage = on_stage or (lambda epoch, stage: None)
        self.restored_epoch = 0

    def on_train_begin(self, logs=None):
        self.restored_epoch = 0
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        for epoch, folder in complete_checkpoints(self.backup_dir):
            try:
                self.model.load_weights(str(folder / WEIGHTS_FILE))
                with open(folder / STATE_FILE) as f:
                    state = json.load(f)
            except (OSError, ValueError, KeyError) as error:
                logging.warning("Checkpoint %s is unreadable (%s); trying an older one.",
                                folder, error)
                continue
            self.restored_epoch = int(state["epoch"])
            self.model._initial_epoch = self.restored_epoch
            return

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        final = self.backup_dir / f"epoch-{done:06d}"
        partial = final.with_name(final.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
        self.model.save_weights(str(partial / WEIGHTS_FILE))
        self.on_stage(done, "weights")
        with open(partial / STATE_FILE, "w") as f:
            json.dump({"epoch": done}, f)
        self.on_stage(done, "state")
        _fsync_tree(partial)
        if final.exists():  # a rerun of an epoch already saved
            shutil.rmtree(final)
        os.rename(partial, final)
        self.on_stage(done, "rename")
        for _, old in complete_checkpoints(self.backup_dir)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.backup_dir.glob("epoch-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)

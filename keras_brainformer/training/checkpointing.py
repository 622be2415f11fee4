"""Crash-safe checkpoints at any step: a killed write never replaces a good one.

Keras' `BackupAndRestore` overwrites `latest.weights.h5` in place and writes
the epoch counter in a second file afterwards, so a process killed between
the two (or during either) resumes from weights and an epoch counter that do
not belong together, or not at all. `AtomicBackupAndRestore` writes each
checkpoint (weights with the optimizer state, and `state.json`: the optimizer
step and the epochs completed) into `step-NNNNNNNNN.partial/`, flushes it to
disk, and only then renames the folder to `step-NNNNNNNNN/` — a rename is
atomic, so a folder without `.partial` is always complete. Resuming loads the
newest complete folder (falling back to an older one if its weights cannot be
read); the oldest complete folders beyond `keep` are deleted after a new one
is in place.

A checkpoint is written at every epoch's end, and by `save()` at any step
(the trainer's Ctrl-C). An epoch cut short (`model.stop_training` set by a
time budget, say) is recorded as such: its state holds the exact step and
does not count the cut epoch as completed, so a caller that restarts the
data at `restored_step` (as `train_language_model` does) resumes exactly.
A plain `fit` restarts the cut epoch from its first batch, as Keras'
`BackupAndRestore` does.
"""

import errno
import json
import os
import pathlib
import re
import shutil

import keras
import numpy as np
from absl import logging

WEIGHTS_FILE = "checkpoint.weights.h5"
STATE_FILE = "state.json"
_COMPLETE = re.compile(r"^step-(\d{9})$")
STAGES = ("weights", "state", "rename")


def complete_checkpoints(backup_dir):
    """`[(step, folder)]` of the complete checkpoints in `backup_dir`,
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


def read_state(folder):
    """A checkpoint folder's state: `{"step": optimizer steps done,
    "epoch": epochs completed}`."""
    with open(pathlib.Path(folder) / STATE_FILE) as f:
        state = json.load(f)
    return {"step": int(state["step"]), "epoch": int(state["epoch"])}


def latest_state(backup_dir):
    """The state (see `read_state`) of the newest complete checkpoint whose
    state is readable, `{"step": 0, "epoch": 0}` if there is none."""
    for _, folder in complete_checkpoints(backup_dir):
        try:
            return read_state(folder)
        except (OSError, ValueError, KeyError):
            continue
    return {"step": 0, "epoch": 0}


def _fsync_tree(folder):
    for path in pathlib.Path(folder).iterdir():
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


class AtomicBackupAndRestore(keras.callbacks.Callback):
    """Backs up weights, optimizer state and epoch at every epoch's end, and
    restores the newest complete backup when training starts.

    A drop-in for `keras.callbacks.BackupAndRestore(save_freq="epoch")` whose
    checkpoints survive a kill at any point and record the exact step (see
    the module docstring). After `on_train_begin`, `restored_step` and
    `restored_epoch` say what was restored (0 if nothing).

    Args:
        backup_dir: folder of the checkpoints.
        keep: complete checkpoints kept (at least 1; default 2).
        on_stage: optional `on_stage(epoch, stage)`, called after each stage
            of writing a checkpoint during epoch `epoch` (1-based), `stage` in
            `STAGES` (`"weights"` written, `"state"` written, `"rename"`
            done): a hook for progress reporting, and for tests that kill
            the process part way through a checkpoint.
        restore_on_train_begin: restore the newest checkpoint when `fit`
            starts (default). A caller that restores once itself
            (`restore()`, then `fit` with the data started at
            `restored_step`, as `train_language_model` does) passes False.

    Example:
    ```python
    model.fit(x, y, epochs=10, callbacks=[AtomicBackupAndRestore("run/backup")])
    # killed, then the same call again: continues after the last finished epoch
    ```
    """

    def __init__(self, backup_dir, keep=2, on_stage=None, restore_on_train_begin=True):
        super().__init__()
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise ValueError(f"`keep` must be an int >= 1. Received: keep={keep!r}")
        if on_stage is not None and not callable(on_stage):
            raise TypeError(f"`on_stage` must be callable or None. Received: {on_stage!r}")
        self.backup_dir = pathlib.Path(backup_dir)
        self.keep = keep
        self.on_stage = on_stage or (lambda epoch, stage: None)
        self.restore_on_train_begin = bool(restore_on_train_begin)
        self.restored_epoch = 0
        self.restored_step = 0
        self._epoch_start_step = 0

    def _step(self):
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def restore(self):
        """Loads the newest readable complete checkpoint into the model (its
        optimizer built first) and returns its state, `{"step": 0, "epoch":
        0}` if there is none; also in `restored_step` / `restored_epoch`."""
        self.restored_epoch = self.restored_step = 0
        if self.model.optimizer is not None and not self.model.optimizer.built:
            self.model.optimizer.build(self.model.trainable_variables)
        for _, folder in complete_checkpoints(self.backup_dir):
            try:
                self.model.load_weights(str(folder / WEIGHTS_FILE))
                state = read_state(folder)
            except (OSError, ValueError, KeyError) as error:
                logging.warning("Checkpoint %s is unreadable (%s); trying an older one.",
                                folder, error)
                continue
            self.restored_epoch, self.restored_step = state["epoch"], state["step"]
            break
        return {"step": self.restored_step, "epoch": self.restored_epoch}

    def on_train_begin(self, logs=None):
        if self.restore_on_train_begin and self.restore()["step"]:
            self.model._initial_epoch = self.restored_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start_step = self._step()

    def on_epoch_end(self, epoch, logs=None):
        self.save(epoch)

    def _check_free_space(self):
        """Refuses to start a checkpoint the disk cannot hold: the HDF5
        writer does not always fail cleanly on a full disk (measured: a
        segfault), so the space is checked first, for the variables' bytes
        plus 5 % and 1 MB of headroom."""
        variables = list(self.model.variables)
        if self.model.optimizer is not None:
            variables += list(self.model.optimizer.variables)
        needed = sum(
            int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
            for v in variables
        )
        needed = int(needed * 1.05) + (1 << 20)
        free = shutil.disk_usage(self.backup_dir).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"No space left for a checkpoint of about {needed / 1e6:.1f} MB "
                f"({free / 1e6:.1f} MB free); the previous checkpoint is intact. Free some "
                "space and rerun the same command to resume",
                str(self.backup_dir),
            )

    def save(self, epoch):
        """Writes a checkpoint of the model now (in `fit`, between steps) and
        returns its folder.

        Args:
            epoch: the 0-based epoch in progress. The state counts it as
                completed only if it has run all of `fit`'s steps per epoch
                (else: `epoch` epochs completed, and the exact step).
        """
        if hasattr(self.model, "jax_state_sync"):
            self.model.jax_state_sync()  # JAX keeps the state apart during an epoch
        step = self._step()
        steps = self.params.get("steps") if self.params else None
        completed = steps is None or step - self._epoch_start_step >= steps
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        final = self.backup_dir / f"step-{step:09d}"
        partial = final.with_name(final.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        self._check_free_space()
        partial.mkdir()
        try:
            self.model.save_weights(str(partial / WEIGHTS_FILE))
            self.on_stage(epoch + 1, "weights")
            with open(partial / STATE_FILE, "w") as f:
                json.dump({"step": step, "epoch": epoch + 1 if completed else epoch}, f)
            self.on_stage(epoch + 1, "state")
            _fsync_tree(partial)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)  # the previous checkpoint stays
            raise
        if final.exists():  # a rerun of a step already saved
            shutil.rmtree(final)
        os.rename(partial, final)
        self.on_stage(epoch + 1, "rename")
        for _, old in complete_checkpoints(self.backup_dir)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.backup_dir.glob("step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

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

A full disk: the free space is checked before a checkpoint starts, and the
weights file is made in memory (`weights_to_h5_bytes`) and written by plain
Python, so a disk that fills *during* the write (another process) is an
`OSError` like any other: the partial folder is removed, the message says
which checkpoint is kept (if any), and the process exits normally. HDF5
writing straight to a full disk cannot be recovered from in the process
(measured: `__dealloc__` tracebacks, then a segfault at exit); that direct
path is only taken for a checkpoint too large to hold in memory (more than
a quarter of the memory available).
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

from keras_brainformer.distribution import memory_plan
from keras_brainformer.upstream_private import weights_to_h5_bytes

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


_CHUNK_BYTES = 1 << 24


def _write_file(path, data):
    """Writes `data` (bytes-like) to a new file `path` and flushes it to
    disk; an `OSError` (a full disk: ENOSPC) propagates cleanly."""
    view = memoryview(data).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        written = 0
        while written < len(view):
            written += os.write(fd, view[written : written + _CHUNK_BYTES])
        os.fsync(fd)
    finally:
        os.close(fd)


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
        self._last_saved = None  # (step, folder) of this object's latest save

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

    def _checkpoint_bytes(self):
        """About the size of a checkpoint: the variables' bytes plus 5 % and
        1 MB of headroom."""
        variables = list(self.model.variables)
        if self.model.optimizer is not None:
            variables += list(self.model.optimizer.variables)
        needed = sum(
            int(np.prod(v.shape)) * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
            for v in variables
        )
        return int(needed * 1.05) + (1 << 20)

    def _kept(self):
        """What a failed checkpoint leaves to resume from, in words."""
        kept = complete_checkpoints(self.backup_dir)
        if not kept:
            return (
                "no earlier checkpoint exists, so rerunning the same command starts "
                "again from step 0"
            )
        return (
            f"the checkpoint at step {kept[0][0]} ({kept[0][1].name}) is intact: free "
            "some space and rerun the same command to resume from it"
        )

    def _check_free_space(self, step, needed):
        """Refuses to start a checkpoint the disk cannot hold."""
        free = shutil.disk_usage(self.backup_dir).free
        if free < needed:
            raise OSError(
                errno.ENOSPC,
                f"No space left for the checkpoint at step {step} in {self.backup_dir} "
                f"(about {needed / 1e6:.1f} MB, {free / 1e6:.1f} MB free); nothing was "
                f"written, and {self._kept()}.",
            )

    def _write_weights(self, path, needed):
        available = memory_plan.available_memory_bytes()
        if available is not None and needed > available // 4:
            # Too large to hold a copy in memory: HDF5 writes it (the free
            # space was checked; a disk filled meanwhile is not recoverable).
            self.model.save_weights(str(path))
        else:
            _write_file(path, weights_to_h5_bytes(self.model))

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
        final = self.backup_dir / f"step-{step:09d}"
        if self._last_saved == (step, final) and final.is_dir():
            return final  # this step is saved already (an epoch's end, then a stop)
        steps = self.params.get("steps") if self.params else None
        completed = steps is None or step - self._epoch_start_step >= steps
        self.backup_dir.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(final.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        needed = self._checkpoint_bytes()
        self._check_free_space(step, needed)
        try:
            partial.mkdir()
            self._write_weights(partial / WEIGHTS_FILE, needed)
            self.on_stage(epoch + 1, "weights")
            state = {"step": step, "epoch": epoch + 1 if completed else epoch}
            _write_file(partial / STATE_FILE, json.dumps(state).encode("utf-8"))
            self.on_stage(epoch + 1, "state")
            _fsync_tree(partial)
        except OSError as error:
            shutil.rmtree(partial, ignore_errors=True)  # the previous checkpoint stays
            reason = error.strerror or str(error)
            raise OSError(
                error.errno,
                f"{reason} while writing the checkpoint at step {step} into "
                f"{self.backup_dir}; its partial folder is removed, and {self._kept()}.",
            ) from None
        if final.exists():  # a rerun of a step already saved
            shutil.rmtree(final)
        os.rename(partial, final)
        self._last_saved = (step, final)
        self.on_stage(epoch + 1, "rename")
        for _, old in complete_checkpoints(self.backup_dir)[self.keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.backup_dir.glob("step-*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        return final

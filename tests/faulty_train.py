"""`keras-brainformer ...` with faults that a test injects, so the package
itself never reads a fault switch (issue 16: test hooks live in tests).

    python tests/faulty_train.py '{"kill_at_epoch": 1}' train --preset ... --out ...

Faults (a JSON object, any of):
    kill_at_epoch: N — SIGKILL at the end of epoch N (1-based), after that
        epoch's checkpoint was written.
    nan_at_step: N — before optimizer step N (1-based), the first trainable
        weight is filled with NaN, so that step's loss is NaN.
    sigint_in_step: N — the process sends itself SIGINT (Ctrl-C) while
        optimizer step N (1-based) is in flight.
    stop_at_step: N — `stop_training` after optimizer step N, as a time
        budget does.
    kill_in_checkpoint: "N:STAGE" — SIGKILL after STAGE (weights, state or
        rename) of the checkpoint written in epoch N (1-based).
    signal_in_checkpoint: "N:STAGE:SIGNAME" — the process sends itself
        SIGNAME (SIGTERM, SIGINT) after STAGE of epoch N's checkpoint, i.e.
        while that checkpoint is being written.
    disk_full_at_step: K — the disk fills while the checkpoint of step K is
        written: the first 64 KB of its weights file are written, then every
        write into `step-K.partial/` fails with ENOSPC (as on a disk that
        another process filled).
    file_size_limit: BYTES — a real kernel limit (RLIMIT_FSIZE, SIGXFSZ
        ignored): writing a file past BYTES fails with EFBIG part way.
"""

import errno
import functools
import json
import os
import resource
import signal
import sys

import keras

from keras_brainformer import cli
from keras_brainformer.training import checkpointing
from keras_brainformer.training import trainer


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtEpoch(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            _kill()


class PoisonAtStep(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        done = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        if done + 1 == self.step:
            weight = self.model.trainable_weights[0]
            weight.assign(keras.ops.full(weight.shape, float("nan"), weight.dtype))


def _steps_done(model):
    if hasattr(model, "jax_state_sync"):
        model.jax_state_sync()
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class InStep(keras.callbacks.Callback):
    def __init__(self, step, action):
        super().__init__()
        self.step = step
        self.action = action

    def on_train_batch_begin(self, batch, logs=None):
        if _steps_done(self.model) + 1 == self.step:
            self.action(self.model)


class AfterStep(keras.callbacks.Callback):
    def __init__(self, step, action):
        super().__init__()
        self.step = step
        self.action = action

    def on_train_batch_end(self, batch, logs=None):
        if _steps_done(self.model) == self.step:
            self.action(self.model)


class DiskFillsDuring:
    """`os` for `checkpointing`, whose writes into `folder` fail with ENOSPC
    once `allowed` bytes are written there."""

    def __init__(self, folder, allowed=1 << 16):
        self.folder = folder
        self.allowed = allowed

    def write(self, fd, data):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = ""
        if self.folder in path:
            if self.allowed <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            data = memoryview(data)[: self.allowed]
            self.allowed -= len(data)
        return os.write(fd, data)

    def __getattr__(self, name):
        return getattr(os, name)


def main(faults, argv):
    extra = []
    if "kill_at_epoch" in faults:
        extra.append(KillAtEpoch(int(faults["kill_at_epoch"])))
    if "nan_at_step" in faults:
        extra.append(PoisonAtStep(int(faults["nan_at_step"])))
    if "sigint_in_step" in faults:
        extra.append(InStep(int(faults["sigint_in_step"]),
                               lambda model: os.kill(os.getpid(), signal.SIGINT)))
    if "stop_at_step" in faults:
        extra.append(AfterStep(int(faults["stop_at_step"]),
                               lambda model: setattr(model, "stop_training", True)))
    if "file_size_limit" in faults:
        limit = int(faults["file_size_limit"])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    if "disk_full_at_step" in faults:
        folder = f"step-{int(faults['disk_full_at_step']):09d}.partial"
        checkpointing.os = DiskFillsDuring(folder)
    if "kill_in_checkpoint" in faults or "signal_in_checkpoint" in faults:
        kill_at = faults.get("kill_in_checkpoint")
        signal_at = faults.get("signal_in_checkpoint", "::").rsplit(":", 1)

        def on_stage(epoch, stage):
            if f"{epoch}:{stage}" == kill_at:
                _kill()
            if f"{epoch}:{stage}" == signal_at[0]:
                os.kill(os.getpid(), getattr(signal, signal_at[1]))

        original = trainer.AtomicBackupAndRestore
        trainer.AtomicBackupAndRestore = functools.partial(original, on_stage=on_stage)
    trainer.train_language_model = functools.partial(
        trainer.train_language_model, extra_callbacks=extra
    )
    sys.argv = [sys.argv[0], *argv]
    return cli.main()  # as the program runs it (no argv: exits at once when interrupted)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1]), sys.argv[2:]))

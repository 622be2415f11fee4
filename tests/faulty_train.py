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
"""

import functools
import json
import os
import signal
import sys

import keras

from keras_brainformer import cli
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
    if "kill_in_checkpoint" in faults:
        wanted = faults["kill_in_checkpoint"]

        def on_stage(epoch, stage):
            if f"{epoch}:{stage}" == wanted:
                _kill()

        original = trainer.AtomicBackupAndRestore
        trainer.AtomicBackupAndRestore = functools.partial(original, on_stage=on_stage)
    trainer.train_language_model = functools.partial(
        trainer.train_language_model, extra_callbacks=extra
    )
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1]), sys.argv[2:]))

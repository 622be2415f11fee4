"""Ctrl-C (SIGINT) or SIGTERM during training: the first finishes the step
in flight, writes a checkpoint of exactly the steps done and stops; a second
one exits at once.

SIGTERM is what schedulers, `kill`, and preemptible TPU/cloud VMs send
before they stop a process, so it is treated as Ctrl-C (before: the default
action killed the process at once, mid-checkpoint, leaving the `.partial`
folder and the run folder's lock, and 143 with no message). The exit code
is the shell's 128 + the signal: 130 for SIGINT, 143 for SIGTERM.

Python delivers SIGINT to the main thread between bytecodes, and the default
handler raises `KeyboardInterrupt` there, wherever that is: inside Keras'
`fit`, a `tf.data` iterator or a TensorBoard writer, which may swallow it or
leave a half-written state (measured: `train` ignored Ctrl-C, twice 30 s
apart). `StopOnInterrupt` instead only records the request in its handler
and acts at the next batch boundary, where the model is consistent.
"""

import contextlib
import os
import signal
import sys
import threading

import keras

from keras_brainformer.errors import TrainingInterrupted

EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum):
    """The shell's exit code of a process stopped by signal `signum`."""
    return 128 + int(signum)


class Terminated(KeyboardInterrupt):
    """SIGTERM outside the training steps (loading the data, building the
    model, the evaluation and preset at the end): raised where the main
    thread is, as SIGINT raises `KeyboardInterrupt`, so that `finally`
    blocks run (the run folder's lock is released). `exit_code` is 143."""

    exit_code = 128 + signal.SIGTERM

    def __init__(self):
        super().__init__(
            "Terminated (SIGTERM) outside the training steps; the checkpoints on disk are "
            "complete. Run the same command again to continue."
        )


@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside: SIGTERM raises `Terminated` (a `KeyboardInterrupt`) instead
    of killing the process at once. `StopOnInterrupt` takes over during the
    training steps, where it stops at a step with a checkpoint instead.
    Off the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_terminated(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class StopOnInterrupt(keras.callbacks.Callback):
    """A callback and a context manager: inside `with StopOnInterrupt(...)`,
    SIGINT no longer raises `KeyboardInterrupt` and SIGTERM no longer kills;
    at the next training or validation batch end, or at the epoch's end (a
    signal during the epoch's checkpoint lets that checkpoint finish), the
    callback writes a checkpoint through `checkpoint.save()` (none if that
    step is saved already) and raises `TrainingInterrupted` (message: the
    signal, the step and how to resume; its `exit_code` is 130 for SIGINT,
    143 for SIGTERM). A second signal exits the process at once with that
    code (the checkpoints already on disk are complete: they are written
    atomically). Outside the `with` block (or off the main thread, where
    Python cannot install handlers) the signals behave as usual.

    Args:
        checkpoint: an `AtomicBackupAndRestore` in the same `fit`.
        resume_hint: text appended to the message, e.g. the command to rerun.

    Example:
    ```python
    backup = AtomicBackupAndRestore("run/backup")
    stop = StopOnInterrupt(backup, resume_hint="Run the same command again.")
    with stop:
        model.fit(x, y, epochs=10, callbacks=[backup, stop])
    ```
    """

    def __init__(self, checkpoint, resume_hint=""):
        super().__init__()
        self.checkpoint = checkpoint
        self.resume_hint = resume_hint
        self.requested = False
        self.signal = None  # the signal number received, if any
        self._epoch = 0
        self._previous = {}

    def __enter__(self):
        self.requested = False
        self.signal = None
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False

    def _on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.requested:
            print(f"\n{name} again: exiting now.", file=sys.stderr, flush=True)
            os._exit(exit_code(signum))
        self.requested = True
        self.signal = signum
        again = "Ctrl-C" if signum == signal.SIGINT else name
        print(
            f"\n{name}: finishing the current step and writing a checkpoint "
            f"({again} again to exit at once).",
            file=sys.stderr,
            flush=True,
        )

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def _stop_if_requested(self):
        if not self.requested:
            return
        path = self.checkpoint.save(self._epoch)
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        name = signal.Signals(self.signal).name
        error = TrainingInterrupted(
            f"Interrupted ({name}): the checkpoint at step {step} is written ({path}). "
            f"{self.resume_hint}".strip()
        )
        error.exit_code = exit_code(self.signal)
        raise error

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_requested()

    def on_test_batch_end(self, batch, logs=None):
        self._stop_if_requested()

    def on_epoch_end(self, epoch, logs=None):
        # After the epoch's checkpoint (this callback comes after it): a
        # signal during that write stops here, not one step later.
        self._stop_if_requested()

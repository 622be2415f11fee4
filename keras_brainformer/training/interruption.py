"""Ctrl-C during training: the first interrupt finishes the step in flight,
writes a checkpoint of exactly the steps done and stops; a second one exits
at once.

Python delivers SIGINT to the main thread between bytecodes, and the default
handler raises `KeyboardInterrupt` there, wherever that is: inside Keras'
`fit`, a `tf.data` iterator or a TensorBoard writer, which may swallow it or
leave a half-written state (measured: `train` ignored Ctrl-C, twice 30 s
apart). `StopOnInterrupt` instead only records the request in its handler
and acts at the next batch boundary, where the model is consistent.
"""

import os
import signal
import sys
import threading

import keras

from keras_brainformer.errors import TrainingInterrupted

EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention


class StopOnInterrupt(keras.callbacks.Callback):
    """A callback and a context manager: inside `with StopOnInterrupt(...)`,
    SIGINT no longer raises `KeyboardInterrupt`; at the next training or
    validation batch end the callback writes a checkpoint through
    `checkpoint.save()` and raises `TrainingInterrupted` (message: the step
    and how to resume). A second SIGINT exits the process at once with code
    130 (the checkpoints already on disk are complete: they are written
    atomically). Outside the `with` block (or off the main thread, where
    Python cannot install handlers) SIGINT behaves as usual.

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
        self._epoch = 0
        self._previous = None

    def __enter__(self):
        self.requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_signal)
        return self

    def __exit__(self, *exc_info):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        return False

    def _on_signal(self, signum, frame):
        if self.requested:
            print("\nInterrupted again: exiting now.", file=sys.stderr, flush=True)
            os._exit(EXIT_INTERRUPTED)
        self.requested = True
        print(
            "\nInterrupt: finishing the current step and writing a checkpoint "
            "(Ctrl-C again to exit at once).",
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
        raise TrainingInterrupted(
            f"Interrupted: the checkpoint at step {step} is written ({path}). "
            f"{self.resume_hint}".strip()
        )

    def on_train_batch_end(self, batch, logs=None):
        self._stop_if_requested()

    def on_test_batch_end(self, batch, logs=None):
        self._stop_if_requested()

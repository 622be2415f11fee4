"""Training callbacks: throughput and learning rate in the epoch logs,
per-MoE-layer router statistics in TensorBoard, and a clear stop on a
non-finite loss.

Keras hands one `logs` dict to every callback in list order at epoch end
(`CallbackList.on_epoch_end`), so values `ThroughputLogger` adds are recorded
by `CSVLogger`, `TensorBoard` and `History` placed after it in the list.
"""

import csv
import math
import os
import time

import keras
from keras import ops


def _current_learning_rate(model):
    """The optimizer's learning rate at its current iteration, as a float."""
    optimizer = getattr(model, "optimizer", None)
    # A LossScaleOptimizer (mixed precision) wraps the real one.
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    if optimizer is None:
        return None
    return float(ops.convert_to_numpy(optimizer.learning_rate))


def _exp(x):
    return math.inf if x > 700 else math.exp(x)  # NaN stays NaN


class ThroughputLogger(keras.callbacks.Callback):
    """Adds `tokens_per_second`, `learning_rate`, `perplexity` (and
    `val_perplexity`) to each epoch's logs.

    Place it BEFORE `CSVLogger` / `TensorBoard` in the callback list so they
    record the new entries (they are also in `model.fit(...).history`).

    - `tokens_per_second`: `tokens_per_batch` × training batches of the epoch,
      divided by the wall time from the start of its first timed batch to the
      end of its last batch (validation excluded). The first batch of each
      `fit` includes tracing and compilation and is not timed, unless it is
      the epoch's only batch (then it is, compilation included, rather than
      reporting nothing). Implementing a batch hook makes Keras convert each
      batch's logs to Python floats, so batch ends are real (not
      asynchronously dispatched) times.
    - `learning_rate`: the optimizer's learning rate, its schedule evaluated
      at the current iteration (the rate of the next update).
    - `perplexity`: `exp(loss)`; `val_perplexity`: `exp(val_loss)` when
      validation ran. These are perplexities when the loss is the mean
      per-token cross-entropy. The training loss of an MoE model also
      includes the router auxiliary losses (load balance, z-loss; added only
      in training), so `perplexity` is slightly above the true training
      perplexity; `val_perplexity` has no such term. With padded batches and
      Keras's default `"sum_over_batch_size"` reduction the loss averages
      over all positions, padding included.

    Args:
        tokens_per_batch: int > 0, tokens in one training batch (batch size ×
            sequence length; padding counts).

    Example:
    ```python
    import keras
    import numpy as np
    from keras_brainformer.models import dense_transformer_layer
    from keras_brainformer.models import BrainformerBackbone, BrainformerCausalLM
    from keras_brainformer.training.callbacks import ThroughputLogger

    lm = BrainformerCausalLM(BrainformerBackbone(
        vocabulary_size=64, hidden_dim=16,
        blocks=dense_transformer_layer(num_heads=2, intermediate_dim=32), num_layers=1))
    lm.compile(optimizer="adam")
    tokens = np.random.randint(0, 64, (8, 9)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((8, 8), "int32")}
    history = lm.fit(x, tokens[:, 1:], batch_size=4, epochs=2, verbose=0,
                     callbacks=[ThroughputLogger(tokens_per_batch=4 * 8)])
    assert history.history["tokens_per_second"][-1] > 0
    ```
    """

    def __init__(self, tokens_per_batch):
        super().__init__()
        if (
            isinstance(tokens_per_batch, bool)
            or not isinstance(tokens_per_batch, int)
            or tokens_per_batch <= 0
        ):
            raise ValueError(
                "`tokens_per_batch` must be a positive integer. "
                f"Received: tokens_per_batch={tokens_per_batch!r}"
            )
        self.tokens_per_batch = tokens_per_batch

    def on_train_begin(self, logs=None):
        self._skip_next_batch = True

    def on_epoch_begin(self, epoch, logs=None):
        self._start = None  # perf_counter at the start of the first timed batch
        self._end = None  # ... at the end of the latest timed batch
        self._steps = 0  # timed batches
        self._last_batch = -1
        self._untimed = None  # (steps, seconds) of the skipped first batch

    def on_train_batch_begin(self, batch, logs=None):
        self._batch_start = time.perf_counter()
        if self._start is None and not self._skip_next_batch:
            self._start = self._batch_start

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        # `batch` is the last step's index (with steps_per_execution > 1 one
        # call covers several steps).
        steps, self._last_batch = batch - self._last_batch, batch
        if self._skip_next_batch:
            self._skip_next_batch = False
            self._untimed = (steps, now - self._batch_start)
            return
        self._steps += steps
        self._end = now

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        if self._steps > 0 and self._end > self._start:
            steps, seconds = self._steps, self._end - self._start
        elif self._untimed is not None:
            steps, seconds = self._untimed
        else:
            steps, seconds = 0, 0.0
        logs["tokens_per_second"] = (
            steps * self.tokens_per_batch / seconds if seconds > 0 else math.nan
        )
        learning_rate = _current_learning_rate(self.model)
        if learning_rate is not None:
            logs["learning_rate"] = learning_rate
        for key in ("loss", "val_loss"):
            if logs.get(key) is not None:
                logs[key.replace("loss", "perplexity")] = _exp(float(logs[key]))


class RouterStatisticsLogger(keras.callbacks.Callback):
    """Writes every MoE layer's routing statistics to TensorBoard.

    Scalars `routers/<layer path>/dropped_fraction`, `.../load_cv`,
    `.../router_entropy` and a histogram `.../expert_load` (the distribution
    of the per-expert loads), from `model.backbone.routing_statistics()`, into
    an event file under `log_dir/routers`, at the optimizer step, every
    `every_n_batches` training batches and at each epoch end. The epoch-end
    values are those of the epoch's last training batch (validation, which
    routes differently at inference, runs in between and is not logged).
    Models without MoE layers (or without a `backbone.routing_statistics`)
    log nothing. Needs TensorFlow for the summary writer, also on JAX; the
    writes run on the CPU.

    Args:
        log_dir: directory, typically the one given to
            `keras.callbacks.TensorBoard` (it writes `train/` and
            `validation/` beside `routers/`).
        every_n_batches: int > 0, write every this many training batches.
            Defaults to 50. Each write reads the statistics to the host.

    Example:
    ```python
    import tempfile
    import numpy as np
    from keras_brainformer.models import AttentionSpec, BlockSpec, MoESpec
    from keras_brainformer.models import BrainformerBackbone, BrainformerCausalLM
    from keras_brainformer.training.callbacks import RouterStatisticsLogger

    block = BlockSpec([AttentionSpec(num_heads=2), MoESpec(4, 32)])
    lm = BrainformerCausalLM(BrainformerBackbone(
        vocabulary_size=64, hidden_dim=16, blocks=block, num_layers=1))
    lm.compile(optimizer="adam")
    tokens = np.random.randint(0, 64, (8, 9)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((8, 8), "int32")}
    log_dir = tempfile.mkdtemp()
    lm.fit(x, tokens[:, 1:], batch_size=4, epochs=1, verbose=0,
           callbacks=[RouterStatisticsLogger(log_dir, every_n_batches=1)])
    # TensorBoard: tensorboard --logdir <log_dir>, tags routers/block_0/1_moe/...
    ```
    """

    def __init__(self, log_dir, every_n_batches=50):
        super().__init__()
        if (
            isinstance(every_n_batches, bool)
            or not isinstance(every_n_batches, int)
            or every_n_batches <= 0
        ):
            raise ValueError(
                "`every_n_batches` must be a positive integer. "
                f"Received: every_n_batches={every_n_batches!r}"
            )
        self.log_dir = os.fspath(log_dir)
        self.every_n_batches = every_n_batches
        self._writer = None
        self._enabled = False

    def _read(self):
        """(optimizer step, statistics) of the latest forward pass."""
        model = self.model  # on JAX, this syncs the training state
        step = int(ops.convert_to_numpy(model.optimizer.iterations))
        return step, model.backbone.routing_statistics()

    def _write(self, step, statistics):
        if step == self._last_written:
            return
        import tensorflow as tf  # TensorBoard's summary writer (heavy): only when writing

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(
                os.path.join(self.log_dir, "routers")
            )
        with tf.device("/CPU:0"), self._writer.as_default(step=step):
            for path, values in statistics.items():
                for name in ("dropped_fraction", "load_cv", "router_entropy"):
                    tf.summary.scalar(f"routers/{path}/{name}", values[name])
                tf.summary.histogram(f"routers/{path}/expert_load", values["expert_load"])
        self._last_written = step

    def on_train_begin(self, logs=None):
        backbone = getattr(self.model, "backbone", None)
        self._enabled = bool(
            getattr(backbone, "moe_layers", None)
            and hasattr(backbone, "routing_statistics")
        )
        self._last_written = None
        self._in_epoch = False

    def on_epoch_begin(self, epoch, logs=None):
        self._in_epoch = True
        self._snapshot = None
        self._step = None  # optimizer step after the latest batch
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        if not self._enabled:
            return
        # Count steps on the host; read the optimizer's step (a state sync on
        # JAX) once an epoch, after BackupAndRestore may have restored it.
        if self._step is None:
            self._step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        else:
            self._step += batch - self._last_batch
        self._last_batch = batch
        if self._last_written is None or self._step - self._last_written >= self.every_n_batches:
            self._write(*self._read())

    def on_test_begin(self, logs=None):
        # Validation inside fit: keep the last training batch's statistics.
        if self._enabled and self._in_epoch:
            self._snapshot = self._read()

    def on_epoch_end(self, epoch, logs=None):
        self._in_epoch = False
        if self._enabled:
            self._write(*(self._snapshot or self._read()))

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.flush()


class StopOnNonFiniteLoss(keras.callbacks.Callback):
    """Stops training at the first training batch whose loss is NaN or
    infinite, saying where.

    Like `keras.callbacks.TerminateOnNaN`, but the message names the epoch,
    the batch (1-based, as Keras' progress bar counts) and the optimizer
    step, and they stay on the callback: `stopped_epoch`, `stopped_batch`
    (0-based, as Keras passes them), `stopped_step` (None while training
    was not stopped) and `message`. The logged loss is the running mean of
    the epoch, so it turns non-finite at the first bad batch. Training stops
    gracefully (`model.stop_training = True`; other callbacks' `on_train_end`
    still run); `raise_error=True` raises `FloatingPointError` instead.

    Args:
        raise_error: bool, raise instead of stopping. Defaults to False.

    Example:
    ```python
    import keras
    import numpy as np
    from keras_brainformer.training.callbacks import StopOnNonFiniteLoss

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(1e30), loss="mse")
    stop = StopOnNonFiniteLoss()
    model.fit(np.ones((64, 2)) * 1e20, np.ones((64, 1)), batch_size=8, epochs=3,
              callbacks=[stop], verbose=0)
    assert stop.stopped_step is not None
    ```
    """

    def __init__(self, raise_error=False):
        super().__init__()
        self.raise_error = raise_error
        self.stopped_epoch = None
        self.stopped_batch = None
        self.stopped_step = None
        self.message = None

    def on_train_begin(self, logs=None):
        self.stopped_epoch = self.stopped_batch = self.stopped_step = None
        self.message = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        self.stopped_epoch, self.stopped_batch = self._epoch, batch
        self.stopped_step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.message = (
            f"StopOnNonFiniteLoss: the training loss is {float(loss)} at epoch "
            f"{self._epoch + 1}, batch {batch + 1} (optimizer step {self.stopped_step}); "
            "stopping training."
        )
        if self.raise_error:
            raise FloatingPointError(self.message)
        print(self.message, flush=True)
        self.model.stop_training = True


class StepClock(keras.callbacks.Callback):
    """Times training steps honestly (blocks on each step's loss) and stops
    `fit` when `stop_at` seconds of steps have run. With `skip_first`, the
    first step (tracing and compilation) is timed apart; with
    `stop_on_non_finite`, a NaN/inf loss stops too."""

    def __init__(self, stop_at, skip_first=True, seconds=0.0, stop_on_non_finite=True):
        super().__init__()
        self.stop_at = stop_at
        self.skip_first = skip_first
        self.stop_on_non_finite = stop_on_non_finite
        self.seconds = seconds
        self.compile_seconds = None
        self.steps = 0
        self.step_times = []
        self.last_loss = math.nan
        self._start = None

    def on_train_batch_begin(self, batch, logs=None):
        self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last_loss = float(keras.ops.convert_to_numpy(logs["loss"]))  # waits for the step
        elapsed = time.perf_counter() - self._start
        self.steps += 1
        if self.skip_first and self.compile_seconds is None:
            self.compile_seconds = elapsed
        else:
            self.seconds += elapsed
            self.step_times.append(elapsed)
        non_finite = self.stop_on_non_finite and not math.isfinite(self.last_loss)
        if self.seconds >= self.stop_at or non_finite:
            self.model.stop_training = True


class CompilationNotice(keras.callbacks.Callback):
    """Says when the first training step starts (tracing and XLA compilation
    happen there, silently, for seconds to minutes) and how long it took, so
    a run never sits silent under a misleading ETA. Once per instance, also
    across several `fit` calls."""

    def __init__(self):
        super().__init__()
        self._start = None
        self._done = False

    def on_train_batch_begin(self, batch, logs=None):
        if self._start is None:
            print("Compiling the training step (the first step; this can take a while)...",
                  flush=True)
            self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if not self._done:
            if logs and "loss" in logs:
                float(ops.convert_to_numpy(logs["loss"]))  # waits for the step
            self._done = True
            print(f"Compiled; the first step took {time.perf_counter() - self._start:.1f} s.",
                  flush=True)


class EpochHistoryLogger(keras.callbacks.CSVLogger):
    """`keras.callbacks.CSVLogger` (appending) that writes one row per
    *completed* epoch: an epoch cut short (a time budget, Ctrl-C, SIGTERM:
    fewer batches than `fit`'s steps per epoch) gets no row, the `fit` that
    completes it after a resume writes it. With `keep_history_rows()` called
    on a resume (rows of the epochs the checkpoint does not hold are
    dropped), the file holds each epoch once, whatever the interruptions.

    Args:
        filename: the CSV file.
    """

    def __init__(self, filename):
        super().__init__(filename, append=True)
        self._last_batch = -1

    def on_epoch_begin(self, epoch, logs=None):
        self._last_batch = -1

    def on_train_batch_end(self, batch, logs=None):
        self._last_batch = batch

    def on_epoch_end(self, epoch, logs=None):
        steps = self.params.get("steps") if self.params else None
        if steps is not None and self._last_batch + 1 < steps:
            return  # cut short: the run that completes the epoch writes its row
        super().on_epoch_end(epoch, logs)


def keep_history_rows(filename, epochs):
    """Keeps the rows of `history.csv` (a `CSVLogger` file) for epochs
    `0 .. epochs - 1`, one each (the last written wins), in order; rows of
    later epochs (trained, then lost with a checkpoint that never
    completed) and torn rows are dropped. The file is replaced atomically,
    and only if something changes. Returns the rows dropped."""
    if not os.path.exists(filename):
        return 0
    with open(filename, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "epoch" not in rows[0]:
        return 0
    header, body = rows[0], rows[1:]
    column = header.index("epoch")
    kept = {}
    for row in body:
        try:
            epoch = int(row[column])
        except (IndexError, ValueError):
            continue
        if len(row) == len(header) and 0 <= epoch < epochs:
            kept[epoch] = row
    ordered = [kept[epoch] for epoch in sorted(kept)]
    if ordered == body:
        return 0
    partial = f"{filename}.partial"
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(ordered)
    os.replace(partial, filename)
    return len(body) - len(ordered)

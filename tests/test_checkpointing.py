"""AtomicBackupAndRestore: a run killed at any stage of a checkpoint write
resumes from a complete checkpoint and ends like an uninterrupted run; an
unreadable newest checkpoint falls back to the previous one."""

import keras
import numpy as np
import pytest
from faulty_train import DiskFillsDuring

from keras_brainformer.training import checkpointing
from keras_brainformer.training.checkpointing import AtomicBackupAndRestore
from keras_brainformer.training.checkpointing import complete_checkpoints
from keras_brainformer.training.checkpointing import latest_state

EPOCHS = 4
STEPS_PER_EPOCH = 4  # 32 rows, batches of 8


class Killed(Exception):
    pass


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype("float32")
    return x, (x @ np.array([[1.0], [-2.0], [0.5]], "float32")).astype("float32")


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
    return model


def _fit(model, backup_dir, epochs=EPOCHS, on_stage=None):
    x, y = _data()
    callback = AtomicBackupAndRestore(backup_dir, on_stage=on_stage)
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
              callbacks=[callback])
    return callback


def _weights(model):
    return [np.asarray(w) for w in model.get_weights()]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    model = _model()
    _fit(model, tmp_path_factory.mktemp("straight"))
    return _weights(model)


@pytest.mark.slow
@pytest.mark.parametrize("stage", checkpointing.STAGES)
def test_killed_during_a_checkpoint_resumes_from_a_complete_one(tmp_path, straight, stage):
    def kill(epoch, at):
        if (epoch, at) == (2, stage):
            raise Killed(f"{epoch}:{at}")

    with pytest.raises(Killed):
        _fit(_model(), tmp_path, on_stage=kill)
    # Only the rename completes a checkpoint.
    expected = 2 if stage == "rename" else 1
    assert latest_state(tmp_path) == {"epoch": expected, "step": expected * STEPS_PER_EPOCH}
    model = _model()  # a fresh process: new weights, restored from disk
    callback = _fit(model, tmp_path)
    assert callback.restored_epoch == expected
    assert callback.restored_step == expected * STEPS_PER_EPOCH
    for a, b in zip(_weights(model), straight):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [
        EPOCHS * STEPS_PER_EPOCH, (EPOCHS - 1) * STEPS_PER_EPOCH]
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.slow
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, straight):
    _fit(_model(), tmp_path, epochs=3)
    newest = complete_checkpoints(tmp_path)[0][1]
    weights = newest / checkpointing.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:200])  # torn after the rename
    model = _model()
    callback = _fit(model, tmp_path)
    assert callback.restored_epoch == 2
    for a, b in zip(_weights(model), straight):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_keep_is_validated():
    with pytest.raises(ValueError, match="keep"):
        AtomicBackupAndRestore("x", keep=0)
    with pytest.raises(TypeError, match="on_stage"):
        AtomicBackupAndRestore("x", on_stage="weights")


class StopAfterStep(keras.callbacks.Callback):
    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) >= self.step:
            self.model.stop_training = True


def test_an_epoch_cut_short_is_not_recorded_as_completed(tmp_path):
    """A time budget (any `stop_training`) mid-epoch: the checkpoint holds
    the exact step and the epochs really completed, so nothing is skipped."""
    x, y = _data()
    model = _model()
    model.fit(x, y, batch_size=8, epochs=EPOCHS, shuffle=False, verbose=0,
              callbacks=[StopAfterStep(6), AtomicBackupAndRestore(tmp_path)])
    assert latest_state(tmp_path) == {"step": 6, "epoch": 1}
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [6, 4]
    restored = _model()
    callback = AtomicBackupAndRestore(tmp_path)
    callback.set_model(restored)
    callback.on_train_begin()
    assert (callback.restored_step, callback.restored_epoch) == (6, 1)
    for a, b in zip(_weights(restored), _weights(model)):
        np.testing.assert_array_equal(a, b)


def test_save_between_steps_writes_the_current_step(tmp_path):
    """`save()` from a batch callback (the trainer's Ctrl-C) captures the
    weights of exactly the steps done, on every backend (JAX keeps them
    apart from the variables during an epoch)."""
    x, y = _data()
    model = _model()
    backup = AtomicBackupAndRestore(tmp_path)

    class SaveAt(keras.callbacks.Callback):
        calls = 0

        def on_train_batch_end(self, batch, logs=None):
            self.calls += 1
            if self.calls == 7:  # epoch 1, batch 2
                backup.save(epoch=1)  # 3 of the epoch's 4 steps: not completed
                raise Killed("after the save")

    with pytest.raises(Killed):
        model.fit(x, y, batch_size=8, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[backup, SaveAt()])
    assert latest_state(tmp_path) == {"step": 7, "epoch": 1}
    # The same steps again, uninterrupted: the same weights.
    reference = _model()
    reference.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=[StopAfterStep(7)])
    restored = _model()
    callback = AtomicBackupAndRestore(tmp_path)
    callback.set_model(restored)
    callback.on_train_begin()
    for a, b in zip(_weights(restored), _weights(reference)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_a_full_disk_is_a_clean_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """The HDF5 writer can segfault on a full disk, so the space is checked
    before a checkpoint starts: an `OSError` (ENOSPC) naming the folder, no
    partial folder, the previous checkpoint intact."""
    import collections
    import errno

    x, y = _data()
    model = _model()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[AtomicBackupAndRestore(tmp_path)])
    before = sorted(p.name for p in tmp_path.iterdir())
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda path: usage(1, 1, 1000))
    with pytest.raises(OSError) as error:
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=[AtomicBackupAndRestore(tmp_path)])
    assert error.value.errno == errno.ENOSPC and str(tmp_path) in error.value.strerror
    assert "nothing was written" in error.value.strerror
    assert "the checkpoint at step 4 (step-000000004) is intact" in error.value.strerror
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("allowed", [0, 100, 10_000])
def test_a_disk_filling_during_the_write_is_a_clean_error(tmp_path, monkeypatch, allowed):
    """The free-space check passed, then the disk fills part way through the
    weights file: an `OSError` that says so and which checkpoint is kept
    (none before the first one), no partial folder, the previous checkpoint
    still loads. (HDF5 writing to such a disk segfaults the process at exit;
    the weights file is made in memory and written by plain Python.)"""
    import errno

    x, y = _data()
    model = _model()
    monkeypatch.setattr(checkpointing, "os", DiskFillsDuring(str(tmp_path), allowed))
    with pytest.raises(OSError) as error:
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
                  callbacks=[AtomicBackupAndRestore(tmp_path)])
    assert error.value.errno == errno.ENOSPC
    message = error.value.strerror
    assert message.startswith("No space left on device while writing the checkpoint at step 4")
    assert "no earlier checkpoint exists" in message and "intact" not in message
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    model = _model()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0,
              callbacks=[AtomicBackupAndRestore(tmp_path)])
    kept = _weights(model)
    monkeypatch.setattr(checkpointing, "os", DiskFillsDuring(str(tmp_path), allowed))
    with pytest.raises(OSError) as error:
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                  callbacks=[AtomicBackupAndRestore(tmp_path)])
    assert "the checkpoint at step 4 (step-000000004) is intact" in error.value.strerror
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["step-000000004"]
    restored = _model()
    callback = AtomicBackupAndRestore(tmp_path)
    callback.set_model(restored)
    assert callback.restore() == {"step": 4, "epoch": 1}
    for a, b in zip(_weights(restored), kept):
        np.testing.assert_array_equal(a, b)


def test_sigterm_finishes_the_step_writes_a_checkpoint_and_says_143(tmp_path):
    """SIGTERM (a scheduler, a preempted VM) is Ctrl-C: the step in flight
    finishes, its checkpoint is written, `TrainingInterrupted` says so with
    exit code 143; the default action (kill at once) is back afterwards."""
    import os
    import signal

    from keras_brainformer.errors import TrainingInterrupted
    from keras_brainformer.training.interruption import StopOnInterrupt

    x, y = _data()
    model = _model()
    backup = AtomicBackupAndRestore(tmp_path)
    stop = StopOnInterrupt(backup, resume_hint="Rerun.")

    class TermInStep(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:  # step 3 in flight
                os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as error, stop:
        model.fit(x, y, batch_size=8, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[TermInStep(), backup, stop])
    assert error.value.exit_code == 143
    assert str(error.value).startswith("Interrupted (SIGTERM): the checkpoint at step 3")
    assert latest_state(tmp_path) == {"step": 3, "epoch": 0}
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_during_the_epoch_checkpoint_stops_after_it(tmp_path):
    """A signal while the epoch's checkpoint is written: that checkpoint
    completes, and training stops there (not one step later), without
    writing the same step twice."""
    import os
    import signal

    from keras_brainformer.errors import TrainingInterrupted
    from keras_brainformer.training.interruption import StopOnInterrupt

    x, y = _data()
    model = _model()
    stages = []

    def on_stage(epoch, stage):
        stages.append((epoch, stage))
        if (epoch, stage) == (2, "weights"):
            os.kill(os.getpid(), signal.SIGTERM)

    backup = AtomicBackupAndRestore(tmp_path, on_stage=on_stage)
    stop = StopOnInterrupt(backup)
    with pytest.raises(TrainingInterrupted) as error, stop:
        model.fit(x, y, batch_size=8, epochs=EPOCHS, shuffle=False, verbose=0,
                  callbacks=[backup, stop])
    assert "at step 8" in str(error.value) and error.value.exit_code == 143
    assert latest_state(tmp_path) == {"step": 8, "epoch": 2}
    assert stages.count((2, "rename")) == 1 and not list(tmp_path.glob("*.partial"))


def test_history_has_one_row_per_completed_epoch_whatever_the_interruptions(tmp_path):
    """A cut epoch writes no row (the run completing it does), and a resume
    drops the rows of the epochs its checkpoint does not hold: epochs 0, 1,
    2 once each, in order."""
    import csv

    from keras_brainformer.training.callbacks import EpochHistoryLogger
    from keras_brainformer.training.callbacks import keep_history_rows

    x, y = _data()
    path = tmp_path / "history.csv"
    model = _model()
    model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0,
              callbacks=[EpochHistoryLogger(str(path)), StopAfterStep(6)])  # epoch 1 cut

    def epochs():
        with open(path, newline="") as f:
            return [int(row["epoch"]) for row in csv.DictReader(f)]

    assert epochs() == [0]
    # The rerun completes epoch 1 (2 steps left), then epoch 2.
    model.fit(x[16:], y[16:], batch_size=8, initial_epoch=1, epochs=2, shuffle=False,
              verbose=0, callbacks=[EpochHistoryLogger(str(path))])
    model.fit(x, y, batch_size=8, initial_epoch=2, epochs=3, shuffle=False, verbose=0,
              callbacks=[EpochHistoryLogger(str(path))])
    assert epochs() == [0, 1, 2]
    # Epoch 2's checkpoint never completed (killed while writing it): the
    # resume from epoch 1's checkpoint drops epoch 2's row, and redoes it.
    with open(path, "a") as f:
        f.write("3,0.5")  # and a row torn by a kill
    assert keep_history_rows(path, 2) == 2
    assert epochs() == [0, 1]
    model.fit(x, y, batch_size=8, initial_epoch=2, epochs=3, shuffle=False, verbose=0,
              callbacks=[EpochHistoryLogger(str(path))])
    assert epochs() == [0, 1, 2]
    assert keep_history_rows(path, 3) == 0  # nothing to drop: the file is left as is


def test_the_preset_write_refuses_a_disk_without_room(tmp_path, monkeypatch):
    """The preset at the end is written by keras-hub through HDF5 (which
    segfaults on a disk that fills under it): its space is checked first,
    and nothing is written when it is short."""
    import collections
    import errno

    from keras_brainformer.models import BrainformerBackbone
    from keras_brainformer.models import BrainformerCausalLM
    from keras_brainformer.models import dense_transformer_layer
    from keras_brainformer.training import trainer

    lm = BrainformerCausalLM(BrainformerBackbone(
        vocabulary_size=64, hidden_dim=16,
        blocks=dense_transformer_layer(num_heads=2, intermediate_dim=32), num_layers=1))
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(trainer.shutil, "disk_usage", lambda path: usage(1, 1, 1000))
    with pytest.raises(OSError) as error:
        trainer._save_preset_atomically(lm, tmp_path / "preset")
    assert error.value.errno == errno.ENOSPC
    assert error.value.strerror.startswith("No space left for the preset")
    assert list(tmp_path.iterdir()) == []

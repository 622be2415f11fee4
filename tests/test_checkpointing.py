"""AtomicBackupAndRestore: a run killed at any stage of a checkpoint write
resumes from a complete checkpoint and ends like an uninterrupted run; an
unreadable newest checkpoint falls back to the previous one."""

import keras
import numpy as np
import pytest

from keras_brainformer.training import checkpointing
from keras_brainformer.training.checkpointing import AtomicBackupAndRestore
from keras_brainformer.training.checkpointing import complete_checkpoints
from keras_brainformer.training.checkpointing import latest_epoch

EPOCHS = 4


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
    assert latest_epoch(tmp_path) == expected
    model = _model()  # a fresh process: new weights, restored from disk
    callback = _fit(model, tmp_path)
    assert callback.restored_epoch == expected
    for a, b in zip(_weights(model), straight):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert [epoch for epoch, _ in complete_checkpoints(tmp_path)] == [EPOCHS, EPOCHS - 1]
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

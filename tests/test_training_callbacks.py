"""Learning-rate schedule, optimizer factory and training callbacks."""

import csv
import math
import os

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec
from keras_brainformer.training.callbacks import RouterStatisticsLogger
from keras_brainformer.training.callbacks import StopOnNonFiniteLoss
from keras_brainformer.training.callbacks import ThroughputLogger
from keras_brainformer.training.schedules import InverseSquareRootSchedule
from keras_brainformer.training.schedules import make_optimizer

VOCAB, D, L, BATCH, STEPS = 64, 16, 8, 4, 3

# === Schedule ===


def test_schedule_values_by_hand():
    schedule = InverseSquareRootSchedule(0.02, constant_steps=100, warmup_steps=10)
    expected = {
        0: 0.0,  # warm-up from 0
        5: 0.01,  # 0.02 * 5 / 10
        9: 0.018,
        10: 0.02,  # constant phase
        50: 0.02,
        100: 0.02,  # decay starts: 0.02 * sqrt(100 / 100)
        400: 0.01,  # 0.02 * sqrt(100 / 400)
        10_000: 0.002,  # 0.02 * sqrt(100 / 10_000)
    }
    for step, value in expected.items():
        np.testing.assert_allclose(to_numpy(schedule(step)), value, rtol=1e-6, atol=1e-9)


def test_schedule_without_warmup_is_constant_then_decays_continuously():
    schedule = InverseSquareRootSchedule(0.01)  # the paper: 10K constant steps
    assert schedule.constant_steps == 10_000 and schedule.warmup_steps == 0
    steps = np.array([0, 1, 9_999, 10_000, 10_001, 40_000], "int64")
    values = to_numpy(schedule(steps))
    np.testing.assert_allclose(values[:4], 0.01, rtol=1e-6)
    np.testing.assert_allclose(values[4], 0.01 * math.sqrt(10_000 / 10_001), rtol=1e-6)
    np.testing.assert_allclose(values[5], 0.005, rtol=1e-6)
    # Continuity at both boundaries, monotone decay afterwards.
    warm = InverseSquareRootSchedule(1.0, constant_steps=1000, warmup_steps=100)
    around = to_numpy(warm(np.array([99.999, 100.0, 1000.0, 1000.001], "float32")))
    np.testing.assert_allclose(around, 1.0, rtol=1e-4)
    decay = to_numpy(warm(np.arange(1000, 5000, 7)))
    assert np.all(np.diff(decay) < 0)


def test_schedule_serialization_round_trip():
    schedule = InverseSquareRootSchedule(3e-3, constant_steps=500, warmup_steps=50)
    config = keras.saving.serialize_keras_object(schedule)
    assert config["registered_name"] == "keras_brainformer>InverseSquareRootSchedule"
    restored = keras.saving.deserialize_keras_object(config)
    assert isinstance(restored, InverseSquareRootSchedule)
    assert restored.get_config() == schedule.get_config()
    steps = np.array([0, 25, 300, 2000])
    np.testing.assert_allclose(to_numpy(restored(steps)), to_numpy(schedule(steps)))
    # Inside an optimizer config too.
    optimizer = keras.optimizers.Adafactor.from_config(
        make_optimizer("adafactor", learning_rate=schedule).get_config()
    )
    assert optimizer.get_config()["learning_rate"]["config"] == schedule.get_config()


def test_schedule_compiles_with_a_tensor_step():
    schedule = InverseSquareRootSchedule(0.01, constant_steps=100, warmup_steps=20)
    expected = to_numpy(schedule(np.array([10, 50, 400])))
    if keras.backend.backend() == "jax":
        import jax

        compiled = jax.jit(lambda step: schedule(step))
    else:
        import tensorflow as tf

        compiled = tf.function(lambda step: schedule(step), jit_compile=True)
    got = [to_numpy(compiled(keras.ops.convert_to_tensor(s, "int32"))) for s in (10, 50, 400)]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(expected, [0.005, 0.01, 0.005], rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"peak_learning_rate": 0.0}, "peak_learning_rate"),
        ({"peak_learning_rate": float("nan")}, "peak_learning_rate"),
        ({"peak_learning_rate": "0.1"}, "peak_learning_rate"),
        ({"peak_learning_rate": 0.1, "constant_steps": 0}, "constant_steps"),
        ({"peak_learning_rate": 0.1, "constant_steps": 10.5}, "constant_steps"),
        ({"peak_learning_rate": 0.1, "warmup_steps": -1}, "warmup_steps"),
        ({"peak_learning_rate": 0.1, "constant_steps": 10, "warmup_steps": 11}, "warmup_steps"),
    ],
)
def test_schedule_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        InverseSquareRootSchedule(**kwargs)


# === Optimizers ===


def test_make_optimizer_names():
    adafactor = make_optimizer()
    assert isinstance(adafactor, keras.optimizers.Adafactor)
    assert isinstance(adafactor._learning_rate, InverseSquareRootSchedule)
    assert adafactor.clip_threshold == 1.0 and adafactor.weight_decay is None
    adamw = make_optimizer("AdamW", learning_rate=1e-3)
    assert isinstance(adamw, keras.optimizers.AdamW)
    assert (adamw.beta_1, adamw.beta_2, adamw.weight_decay) == (0.9, 0.99, 0.01)
    assert make_optimizer("adamw", weight_decay=0.1, beta_2=0.95).beta_2 == 0.95
    np.testing.assert_allclose(float(adamw.learning_rate), 1e-3)


def test_make_optimizer_rejects_unknown_names():
    with pytest.raises(ValueError, match="adafactor.*adamw.*Received: name='sgd'"):
        make_optimizer("sgd")


# === Callbacks ===


def tiny_lm(moe=True):
    keras.utils.set_random_seed(0)
    sublayers = [AttentionSpec(num_heads=2)]
    sublayers += [MoESpec(4, 24, top_k=2, capacity_factor=1.0)] if moe else [FeedForwardSpec(24)]
    backbone = BrainformerBackbone(
        vocabulary_size=VOCAB, hidden_dim=D, blocks=BlockSpec(sublayers), num_layers=2
    )
    lm = BrainformerCausalLM(backbone)
    lm.compile(
        optimizer=make_optimizer(
            "adafactor", learning_rate=InverseSquareRootSchedule(0.01, 4, warmup_steps=2)
        )
    )
    return lm


def tiny_data(batches=STEPS):
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, VOCAB, (batches * BATCH, L + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((len(tokens), L), "int32")}
    return x, tokens[:, 1:]


def read_scalars(directory):
    """({scalar tag: [(step, value), ...]}, {histogram tag}) of the event
    files under `directory`."""
    import tensorflow as tf
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars, histograms = {}, set()
    for root, _, files in os.walk(directory):
        if any(".tfevents." in f for f in files):
            events = EventAccumulator(root, size_guidance={"tensors": 0})
            events.Reload()
            for tag in events.Tags()["tensors"]:
                for event in events.Tensors(tag):
                    value = tf.make_ndarray(event.tensor_proto)
                    if value.ndim == 0:
                        scalars.setdefault(tag, []).append((event.step, float(value)))
                    else:
                        histograms.add(tag)
    return scalars, histograms


def test_throughput_logger_feeds_csv_logger(tmp_path):
    lm = tiny_lm()
    x, y = tiny_data()
    x_val, y_val = tiny_data(1)
    csv_path = tmp_path / "history.csv"
    history = lm.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        validation_data=(x_val, y_val),
        callbacks=[ThroughputLogger(BATCH * L), keras.callbacks.CSVLogger(str(csv_path))],
        verbose=0,
    )
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    for epoch, row in enumerate(rows):
        for key in ("tokens_per_second", "learning_rate", "perplexity", "val_perplexity"):
            value = float(row[key])
            assert math.isfinite(value) and value > 0, (key, value)
        np.testing.assert_allclose(float(row["perplexity"]), math.exp(float(row["loss"])))
        np.testing.assert_allclose(
            float(row["val_perplexity"]), math.exp(float(row["val_loss"]))
        )
        # The schedule at the optimizer's step after the epoch: 3 then 6 updates,
        # constant until step 4, then 0.01 * sqrt(4 / 6).
        expected = 0.01 if epoch == 0 else 0.01 * math.sqrt(4 / 6)
        np.testing.assert_allclose(float(row["learning_rate"]), expected, rtol=1e-5)
    assert history.history["tokens_per_second"] == [float(r["tokens_per_second"]) for r in rows]


def test_throughput_logger_times_a_lone_first_batch():
    lm = tiny_lm(moe=False)
    x, y = tiny_data(1)
    logger = ThroughputLogger(BATCH * L)
    history = lm.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[logger], verbose=0)
    assert history.history["tokens_per_second"][0] > 0
    with pytest.raises(ValueError, match="tokens_per_batch"):
        ThroughputLogger(0)


def test_router_statistics_logger_writes_every_moe_layer(tmp_path):
    lm = tiny_lm()
    paths = [moe.path for moe in lm.backbone.moe_layers]
    assert len(paths) == 2
    x, y = tiny_data()
    x_val, y_val = tiny_data(1)
    lm.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        validation_data=(x_val, y_val),
        callbacks=[RouterStatisticsLogger(str(tmp_path), every_n_batches=2)],
        verbose=0,
    )
    assert os.listdir(tmp_path) == ["routers"]
    scalars, histograms = read_scalars(tmp_path / "routers")
    statistics = lm.backbone.routing_statistics()
    for path in paths:
        for name in ("dropped_fraction", "load_cv", "router_entropy"):
            tag = f"routers/{path}/{name}"
            assert tag in scalars, sorted(scalars)
            # Steps: the first batch (1), every 2 batches (3, 5) and epoch ends
            # (3 already written, 6).
            assert [step for step, _ in scalars[tag]] == [1, 3, 5, 6]
            assert all(math.isfinite(v) for _, v in scalars[tag])
        assert f"routers/{path}/expert_load" in histograms
    # Capacity factor 1 with top-2 drops some token choices in training; the
    # epoch-end value is the last training batch's, not validation's (causal
    # inference routing is dropless).
    assert scalars[f"routers/{paths[0]}/dropped_fraction"][-1][1] > 0
    assert statistics[paths[0]]["dropped_fraction"] == 0.0  # the latest call: validation


def test_router_statistics_logger_is_a_no_op_without_moe(tmp_path):
    lm = tiny_lm(moe=False)
    x, y = tiny_data()
    logger = RouterStatisticsLogger(str(tmp_path), every_n_batches=1)
    lm.fit(x, y, batch_size=BATCH, epochs=1, callbacks=[logger], verbose=0)
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="every_n_batches"):
        RouterStatisticsLogger(str(tmp_path), every_n_batches=0)


def test_tensorboard_records_throughput_and_learning_rate(tmp_path):
    lm = tiny_lm()
    x, y = tiny_data()
    lm.fit(
        x,
        y,
        batch_size=BATCH,
        epochs=2,
        callbacks=[
            ThroughputLogger(BATCH * L),
            keras.callbacks.TensorBoard(log_dir=str(tmp_path)),
            RouterStatisticsLogger(str(tmp_path)),
        ],
        verbose=0,
    )
    scalars, _ = read_scalars(tmp_path / "train")
    for tag in ("epoch_tokens_per_second", "epoch_learning_rate", "epoch_perplexity"):
        assert [step for step, _ in scalars[tag]] == [0, 1], (tag, sorted(scalars))
        assert all(v > 0 and math.isfinite(v) for _, v in scalars[tag])
    assert "epoch_moe_load_cv" in scalars
    router_scalars, _ = read_scalars(tmp_path / "routers")
    assert any(tag.endswith("/router_entropy") for tag in router_scalars)


def test_stop_on_non_finite_loss_names_the_step(capsys):
    lm = tiny_lm(moe=False)
    x, y = tiny_data()
    stop = StopOnNonFiniteLoss()

    class PoisonAfter(keras.callbacks.Callback):
        """Makes the embedding NaN after the second batch of the second epoch."""

        def on_train_batch_end(self, batch, logs=None):
            if self.params and batch == 1 and self._epoch == 1:
                for w in self.model.backbone.token_embedding.weights:
                    w.assign(np.full(w.shape, np.nan, "float32"))

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    history = lm.fit(
        x, y, batch_size=BATCH, epochs=3, callbacks=[PoisonAfter(), stop], verbose=0
    )
    assert (stop.stopped_epoch, stop.stopped_batch, stop.stopped_step) == (1, 2, 6)
    assert "epoch 2, batch 3 (optimizer step 6)" in capsys.readouterr().out
    assert len(history.history["loss"]) == 2
    raising = StopOnNonFiniteLoss(raise_error=True)
    raising.set_model(lm)
    raising.on_train_begin()
    with pytest.raises(FloatingPointError, match="epoch 1, batch 1"):
        raising.on_train_batch_end(0, {"loss": float("inf")})

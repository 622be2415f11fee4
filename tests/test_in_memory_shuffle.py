"""shuffled_fit_arguments: in-memory fit data is shuffled every epoch, as
`keras.Model.fit(shuffle=True)` promises; datasets and `shuffle=False` pass."""

import keras
import numpy as np
import pytest

from keras_brainformer.utils.in_memory_shuffle import shuffled_fit_arguments


def _epoch(dataset):
    return [tuple(np.asarray(t).tolist() for t in batch) for batch in dataset]


def test_every_sample_once_per_epoch_in_a_new_order_each_epoch():
    keras.utils.set_random_seed(0)
    x = np.arange(40).reshape(20, 2)
    y = np.arange(20)
    dataset, y_out, kwargs = shuffled_fit_arguments(x, y, (), {"batch_size": 4, "epochs": 2})
    assert y_out is None and kwargs == {"epochs": 2}
    orders = []
    for _ in range(2):
        labels = [label for _, ys in _epoch(dataset) for label in ys]
        assert sorted(labels) == list(range(20))
        orders.append(labels)
    assert orders[0] != list(range(20)) and orders[0] != orders[1]
    for xs, ys in _epoch(dataset):  # rows stay with their labels
        assert [row[0] // 2 for row in xs] == ys


def test_strings_dicts_and_sample_weights():
    keras.utils.set_random_seed(0)
    texts = [f"text {i}" for i in range(6)]
    dataset, _, _ = shuffled_fit_arguments(
        {"text": texts}, np.arange(6), (), {"sample_weight": np.ones(6), "batch_size": 6}
    )
    (x, y, weight), = list(dataset)
    assert sorted(t.decode() for t in np.asarray(x["text"])) == sorted(texts)
    assert np.asarray(weight).tolist() == [1.0] * 6


def test_validation_split_takes_the_last_samples_before_shuffling():
    x, y = np.arange(10), np.arange(10)
    dataset, _, kwargs = shuffled_fit_arguments(x, y, (), {"validation_split": 0.2})
    vx, vy = kwargs["validation_data"]
    assert vx.tolist() == [8, 9] and vy.tolist() == [8, 9]
    assert sorted(v for _, ys in _epoch(dataset) for v in ys) == list(range(8))
    with pytest.raises(ValueError, match="not both"):
        shuffled_fit_arguments(x, y, (), {"validation_split": 0.2, "validation_data": (x, y)})


def test_datasets_shuffle_false_and_positional_arguments_pass_through():
    import tensorflow as tf

    x, y = np.arange(4), np.arange(4)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    assert shuffled_fit_arguments(dataset, None, (), {})[0] is dataset
    assert shuffled_fit_arguments(x, y, (), {"shuffle": False}) == (x, y, {"shuffle": False})
    assert shuffled_fit_arguments(x, y, (2,), {})[0] is x

"""In-memory training data that is shuffled, as Keras users expect.

`keras.Model.fit(x, y, shuffle=True)` (the default) shuffles NumPy arrays and
lists every epoch. keras-hub tasks with a preprocessor batch such data into a
dataset in file order first (keras-hub's `pipeline_model.py`), and Keras
cannot shuffle a dataset, so `shuffle=True` silently does nothing: measured,
`BrainformerTextClassifier.fit` on a list grouped by class learned one class
(accuracy 0.557, the majority). `shuffled_fit_arguments` turns in-memory
`x, y, sample_weight` into a `tf.data.Dataset` reshuffled every epoch before
the task sees it. The order follows TensorFlow's global seed, which
`keras.utils.set_random_seed(seed)` sets, so a seeded run is reproducible.
"""

import inspect

import keras
import numpy as np


def _is_in_memory(x):
    if x is None or isinstance(x, keras.utils.PyDataset) or inspect.isgenerator(x):
        return False
    if hasattr(x, "element_spec") or type(x).__name__.endswith("Dataset"):
        return False  # tf.data / grain datasets
    return True


def _length(structure):
    return len(keras.tree.flatten(structure)[0])


def _rows(structure, start, stop):
    return keras.tree.map_structure(lambda a: a[start:stop], structure)


def _as_array(value):
    """One field (a list of strings or numbers, an array, a tensor) as a
    NumPy array (strings: an object array, which `tf.data` reads as text)."""
    if value is None or isinstance(value, np.ndarray):
        return value
    if isinstance(value, (list, tuple)):
        strings = bool(value) and isinstance(value[0], (str, bytes))
        return np.asarray(value, dtype=object if strings else None)
    return keras.ops.convert_to_numpy(value)


def _as_arrays(x):
    if isinstance(x, dict):
        return {key: _as_array(value) for key, value in x.items()}
    return _as_array(x)


def shuffled_fit_arguments(x, y, args, kwargs):
    """`(x, y, kwargs)` for `fit`: unchanged unless `x` is in-memory data,
    `shuffle` is true (the default) and no positional arguments follow `y`;
    then `x` is a shuffled, batched `tf.data.Dataset` of `(x, y,
    sample_weight)` (`y`, `batch_size`, `sample_weight` and
    `validation_split` consumed; `validation_split` takes the last samples
    as validation data before shuffling, as Keras does)."""
    if args or not kwargs.get("shuffle", True) or not _is_in_memory(x):
        return x, y, kwargs
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], str):
        return x, y, kwargs  # a list of input arrays: left to Keras
    import tensorflow as tf  # keras-hub's preprocessing runs on tf.data

    kwargs = dict(kwargs)
    kwargs.pop("shuffle", None)
    batch_size = kwargs.pop("batch_size", None) or 32
    sample_weight = kwargs.pop("sample_weight", None)
    data = keras.utils.pack_x_y_sample_weight(
        _as_arrays(x), _as_array(y), _as_array(sample_weight)
    )
    count = _length(data)
    split = kwargs.pop("validation_split", None)
    if split:
        if kwargs.get("validation_data") is not None:
            raise ValueError("Pass `validation_split` or `validation_data`, not both.")
        start = int(count * (1 - split))
        kwargs["validation_data"] = _rows(data, start, count)
        data, count = _rows(data, 0, start), start
    dataset = tf.data.Dataset.from_tensor_slices(data)
    dataset = dataset.shuffle(count, reshuffle_each_iteration=True).batch(batch_size)
    return dataset, None, kwargs

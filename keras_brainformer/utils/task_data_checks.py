"""Checks of the data a Brainformer task receives, at its entry points:
token ids inside the vocabulary and the context, class labels inside
`num_classes`, and the training and validation data of a `fit` call. Each
error names the field, the value and what is allowed.

Only concrete data is checked (NumPy arrays, lists, eager tensors:
`concrete_array`); a `tf.data.Dataset`, a generator or symbolic/traced
tensors pass, since their values are only seen inside the compiled step
(on JAX, XLA's gather would otherwise clamp an out-of-range id silently).
The layers' own argument checks are `layers/validation.py`.
"""

import contextlib
import inspect
import numbers

import keras
import numpy as np


def concrete_array(x):
    """`x` as a NumPy array when its values are known now (NumPy, lists,
    eager tensors); None for symbolic or traced tensors (Keras functional
    construction, `tf.function`, `jax.jit`), where only static checks apply."""
    if x is None:
        return None
    if isinstance(x, np.ndarray):
        return x
    if isinstance(x, (list, tuple, numbers.Number, str, bytes)):
        return np.asarray(x)
    module = type(x).__module__
    if module.startswith("keras"):
        return None  # KerasTensor
    if module.startswith("jax"):
        import jax  # a JAX array: jax is loaded already (and only then imported)

        if isinstance(x, jax.core.Tracer):
            return None
        return np.asarray(x)
    if module.startswith("tensorflow"):
        import tensorflow as tf  # a TensorFlow tensor: TF is loaded already

        if not tf.executing_eagerly() or not hasattr(x, "numpy"):
            return None
        if isinstance(x, (tf.RaggedTensor, tf.SparseTensor)):
            return None
        return x.numpy()
    if module.startswith("torch"):
        return x.detach().cpu().numpy()
    return None


def check_token_ids(
    token_ids,
    vocabulary_size,
    max_sequence_length=None,
    padding_mask=None,
    field="token_ids",
):
    """Checks a `[batch, sequence]` batch of token ids at a model boundary.

    Static properties (dtype, rank) are checked on any tensor; values (ids in
    `[0, vocabulary_size)`), the sequence length and a non-empty batch only on
    concrete inputs, before any backend kernel sees them (XLA's gather clamps
    out-of-range ids silently). Raises a `TypeError` or `ValueError` naming
    `field`.
    """
    value = concrete_array(token_ids)
    dtype = value.dtype if value is not None else getattr(token_ids, "dtype", None)
    shape = value.shape if value is not None else getattr(token_ids, "shape", None)
    if dtype is not None:
        dtype_name = str(getattr(dtype, "name", dtype)).replace("torch.", "")
        try:
            kind = np.dtype(dtype_name).kind
        except TypeError:
            kind = None
        if kind in ("U", "S", "O") or dtype_name.startswith(("str", "bytes")):
            raise TypeError(
                f"`{field}` must hold integer token ids, not strings (dtype "
                f"{dtype_name}); tokenize them first, or attach a preprocessor."
            )
        if kind not in ("i", "u"):
            raise TypeError(
                f"`{field}` must hold integer token ids (int32/int64). "
                f"Received dtype {dtype_name}."
            )
    if shape is not None and getattr(shape, "rank", len(tuple(shape))) is not None:
        shape = tuple(shape)
        if len(shape) != 2:
            raise ValueError(
                f"`{field}` must have rank 2, `[batch, sequence]`. "
                f"Received shape {shape}."
            )
    if value is None:
        return
    if value.shape[0] == 0:
        raise ValueError(
            f"`{field}` is an empty batch (0 rows). Received shape {value.shape}."
        )
    if max_sequence_length is not None and value.shape[1] > max_sequence_length:
        raise ValueError(
            f"`{field}` has sequence length {value.shape[1]}, longer than the "
            f"model's max_sequence_length={max_sequence_length}. "
            f"Received shape {value.shape}."
        )
    if value.size:
        low, high = int(value.min()), int(value.max())
        if low < 0 or high >= vocabulary_size:
            bad = (value < 0) | (value >= vocabulary_size)
            position = first_position(bad)
            raise ValueError(
                f"`{field}` must be in [0, vocabulary_size={vocabulary_size}). "
                f"Received ids from {low} to {high}; the first out of range is "
                f"{value[position].item()} at position {position}."
            )
    mask = concrete_array(padding_mask)
    if mask is not None and mask.shape != value.shape:
        raise ValueError(
            f"`padding_mask` must have the shape of `{field}` {value.shape}. "
            f"Received shape {mask.shape}."
        )


def first_position(bad):
    """The index tuple of the first True entry of the boolean array `bad`."""
    index = np.unravel_index(int(np.argmax(bad)), bad.shape)
    return tuple(int(i) for i in index)


def check_class_labels(labels, limit, limit_name="num_classes", field="y"):
    """Checks concrete integer labels (class ids, or next-token ids) against
    `[0, limit)`; symbolic tensors, datasets and other non-array inputs pass.

    Float labels must be whole numbers (a sparse loss casts 1.5 to 1
    silently). Raises a `TypeError` (strings, objects) or `ValueError` (out of
    range, not whole) naming `field`, the first bad value and its position.
    """
    value = concrete_array(labels)
    if value is None:
        return
    allowed = f"integer labels in [0, {limit_name}={limit})"
    kind = value.dtype.kind
    if kind not in "biuf":
        raise TypeError(
            f"`{field}` must hold {allowed}. Received dtype {value.dtype}."
        )
    if not value.size:
        return
    if kind == "f":
        with np.errstate(invalid="ignore"):
            bad = ~np.isfinite(value) | (value != np.round(value))
        if bad.any():
            position = first_position(bad)
            raise ValueError(
                f"`{field}` must hold {allowed}. Received "
                f"{value[position].item()!r} at position {position}."
            )
    bad = (value < 0) | (value >= limit)
    if bad.any():
        position = first_position(bad)
        raise ValueError(
            f"`{field}` must hold {allowed}. Received labels from "
            f"{value.min().item()} to {value.max().item()}; the first out of "
            f"range is {value[position].item()} at position {position}."
        )


def uses_sparse_labels(loss):
    """Whether a compiled `loss` takes integer class ids as labels (sparse
    categorical crossentropy, the default of the Keras-Hub tasks); only then
    do the label checks of `fit`/`evaluate` apply."""

    if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
        return True
    if isinstance(loss, str):
        return loss == "sparse_categorical_crossentropy"
    return loss is keras.losses.sparse_categorical_crossentropy


@contextlib.contextmanager
def errors_prefixed(prefix):
    """Re-raises a `TypeError`/`ValueError` with `prefix` on its message (to
    say which argument, for example `validation_data`, held the bad value)."""
    try:
        yield
    except (TypeError, ValueError) as error:
        raise type(error)(f"{prefix}{error}") from None


def check_fit_arguments(fit, check_data, x, y, args, kwargs):
    """Runs `check_data(x, y)` on the training data of a `fit(x, y, *args,
    **kwargs)` call and on its `validation_data` when that is an `(x, y)` or
    `(x, y, sample_weight)` tuple (datasets and generators pass: their
    batches are only seen inside the compiled train step). `fit` is the
    method about to be called, used to find `validation_data` among
    positional arguments."""
    check_data(x, y)
    validation_data = kwargs.get("validation_data")
    if args:
        try:
            bound = inspect.signature(fit).bind(x, y, *args, **kwargs)
            validation_data = bound.arguments.get("validation_data", validation_data)
        except TypeError:
            pass  # `fit` itself will report the bad arguments
    if isinstance(validation_data, (tuple, list)) and 2 <= len(validation_data) <= 3:
        with errors_prefixed("In `validation_data`: "):
            check_data(validation_data[0], validation_data[1])


def check_task_inputs(task, x):
    """Checks token-id inputs a task's `predict` / `generate` received, on
    concrete values before tracing (on JAX an out-of-range id would otherwise
    be clamped silently by XLA's gather). Strings meant for the task's
    preprocessor, datasets and generators pass through unchecked."""
    if isinstance(x, dict) and "token_ids" in x:
        task.backbone.check_inputs(x)
    elif isinstance(x, tuple) and x and isinstance(x[0], dict):
        check_task_inputs(task, x[0])  # an `(x, y, sample_weight)` tuple
    elif hasattr(x, "dtype") and hasattr(x, "shape"):
        dtype = str(getattr(x.dtype, "name", x.dtype))
        is_text = dtype == "object" or dtype.startswith(("str", "bytes", "<U", "|S"))
        if not (is_text and getattr(task, "preprocessor", None) is not None):
            task.backbone.check_inputs(x)

"""Argument checks shared by layers and specs: each error names the field,
the value received and what is allowed."""

import math
import numbers

import numpy as np


def check_positive_int(field, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{field}` must be a positive integer. Received: {field}={value!r}"
        )
    if value <= 0:
        raise ValueError(
            f"`{field}` must be a positive integer. Received: {field}={value!r}"
        )
    return int(value)


def check_optional_positive_int(field, value):
    return None if value is None else check_positive_int(field, value)


def check_non_negative_float(field, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{field}` must be a number >= 0. Received: {field}={value!r}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{field}` must be a finite number >= 0. Received: {field}={value!r}"
        )
    return float(value)


def check_rate(field, value):
    value = check_non_negative_float(field, value)
    if value >= 1:
        raise ValueError(
            f"`{field}` must be in [0, 1). Received: {field}={value!r}"
        )
    return value


def check_capacity_factor(field, value, allow_none):
    if value is None:
        if allow_none:
            return None
        raise ValueError(
            f"`{field}` must be a number > 0. Received: {field}=None"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"`{field}` must be a number > 0"
            + (" or None (dropless)" if allow_none else "")
            + f". Received: {field}={value!r}"
        )
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"`{field}` must be a finite number > 0"
            + (" or None (dropless)" if allow_none else "")
            + f". Received: {field}={value!r}"
        )
    return float(value)


def check_choice(field, value, allowed):
    if value not in allowed:
        raise ValueError(
            f"Unknown `{field}`={value!r}. Allowed values: {tuple(allowed)}."
        )
    return value


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
        import jax

        if isinstance(x, jax.core.Tracer):
            return None
        return np.asarray(x)
    if module.startswith("tensorflow"):
        import tensorflow as tf

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
            raise ValueError(
                f"`{field}` must be in [0, vocabulary_size={vocabulary_size}). "
                f"Received ids from {low} to {high}."
            )
    mask = concrete_array(padding_mask)
    if mask is not None and mask.shape != value.shape:
        raise ValueError(
            f"`padding_mask` must have the shape of `{field}` {value.shape}. "
            f"Received shape {mask.shape}."
        )

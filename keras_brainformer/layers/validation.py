"""Argument checks shared by layers and specs: each error names the field,
the value received and what is allowed."""

import math
import numbers


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
    if value is None:
        return None
    try:
        return check_positive_int(field, value)
    except (TypeError, ValueError) as e:
        raise type(e)(
            f"`{field}` must be a positive integer or None. Received: {field}={value!r}"
        ) from None


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

"""The activation functions of the paper's search space, for dense FFNs and experts.

An activation is named by a string. Plain activations map the hidden pre-activation
`h = x @ W_in` to `f(h)`. Gated activations (GLU variants, Shazeer 2020) use a second
input projection: `f(x @ W_gate) * (x @ W_in)`, so a gated FFN has three weight
matrices instead of two.
"""

from keras import activations
from keras import ops


def _squared_relu(x):
    # Primer (So et al., 2021): relu(x) ** 2.
    return ops.square(ops.relu(x))


def _gelu(x):
    return activations.gelu(x, approximate=True)


_BASE_ACTIVATIONS = {
    "relu": ops.relu,
    "gelu": _gelu,
    "silu": ops.silu,
    "swish": ops.silu,
    "squared_relu": _squared_relu,
}

_GATED_ALIASES = {"reglu": "gated_relu", "geglu": "gated_gelu", "swiglu": "gated_silu"}

ACTIVATIONS = tuple(sorted(
    list(_BASE_ACTIVATIONS)
    + [f"gated_{name}" for name in _BASE_ACTIVATIONS]
    + list(_GATED_ALIASES)
))


def canonical_activation(name):
    """Returns the canonical name of `name`, or raises a `ValueError`."""
    if not isinstance(name, str):
        raise TypeError(
            f"`activation` must be a string, one of {ACTIVATIONS}. "
            f"Received: activation={name!r}"
        )
    name = _GATED_ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(
            f"Unknown `activation`={name!r}. Allowed values: {ACTIVATIONS}."
        )
    return name


def get_activation(name):
    """Returns `(fn, gated)` for an activation name.

    `fn` is the elementwise nonlinearity; `gated` says whether the layer must
    multiply `fn(x @ W_gate)` by a second projection `x @ W_in`.

    Example:
    >>> fn, gated = get_activation("gated_gelu")
    >>> gated
    True
    """
    name = canonical_activation(name)
    gated = name.startswith("gated_")
    base = name[len("gated_"):] if gated else name
    return _BASE_ACTIVATIONS[base], gated


def is_gated(name):
    """Whether activation `name` is a gated (GLU) variant."""
    return get_activation(name)[1]

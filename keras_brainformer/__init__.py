"""keras_brainformer: Brainformer and MoE models for Keras 3 and keras-hub.

Importing the package is cheap (the command line's `--help` does not load
Keras): `keras_brainformer.layers`, `keras_brainformer.models` and the other
subpackages load on first use. Importing `keras_brainformer.models` (any
`from keras_brainformer.models import ...` does) registers the family and
its presets with keras-hub, so that `keras_hub.models.CausalLM.from_preset`
finds them by name.
"""

import importlib

__version__ = "0.1.0"

_SUBPACKAGES = ("cli", "distribution", "layers", "models", "search", "training", "utils", "zoo")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBPACKAGES))

"""Building a model, its optimizer and its metrics without allocating a weight.

`abstract_build(build)` runs `build` (any code that creates Keras objects:
`BrainformerCausalLM(BrainformerBackbone.from_config(...))`, `compile`,
`optimizer.build`, the `_symbolic_build` that `fit` does first) inside
`jax.eval_shape`, so every initial value Keras computes is an abstract
tracer, never an array. When `build` returns, every variable it created gets
a `jax.ShapeDtypeStruct` as its value: its shape, dtype and sharding (the
layout the active `keras.distribution` gives it, as Keras would when it
initialises the variable), and nothing else. The model then has its paths,
shapes, dtypes and layouts, and Keras' own JAX trainer can trace its
`train_step` with those structs as the state (`tpu_compile.py` lowers and
compiles it for a TPU topology).

Why not `keras.StatelessScope`: a variable created inside it is deferred,
but leaving the outermost scope runs `initialize_all_variables()`, which
materialises every deferred variable at once (that is where a build "under
StatelessScope" reached the model's float32 size: 0.85 -> 5.8 GB RSS for
`glam_100m_32e`); Keras' optimizer also creates its `iterations` counter
from a concrete value, which a stateless scope refuses. Under `eval_shape`
neither happens.

A model built this way is only good for tracing: reading a variable's value
gives a `ShapeDtypeStruct`, so calling the model eagerly, saving it or
`fit`ting it fails loudly. Build a fresh model for that.

Private Keras API used (no public form exists): a variable's value is held
in its `_value` attribute (Keras' own JAX trainer sets it to None in
`_purge_model_variables`) and its layout in `_layout`.
"""

import resource

import jax
import keras


def abstract_build(build):
    """Runs `build()` with every Keras initial value abstract; returns what it
    returns, with the variables it created holding `ShapeDtypeStruct`s.

    Args:
        build: a function of no argument that creates Keras objects (model,
            optimizer, metrics) and returns them (any structure of Python
            objects; `keras.Variable`s reachable from a returned `Model` or
            `Optimizer` are made abstract).

    Use it inside the `keras.distribution` scope the model would train under:
    the shardings come from that distribution (`get_variable_layout`).

    Example:
    >>> import keras
    >>> model = abstract_build(lambda: keras.Sequential(
    ...     [keras.Input((1000,)), keras.layers.Dense(100_000)]))
    >>> kernel = model.layers[0].kernel
    >>> type(kernel.value).__name__, kernel.value.shape
    ('ShapeDtypeStruct', (1000, 100000))
    """
    created = []

    def traced():
        result = build()
        created.append(result)
        return 0

    jax.eval_shape(traced)
    result = created[0]
    for variable in _variables_of(result):
        _make_abstract(variable)
    return result


def _variables_of(result):
    """Every `keras.Variable` reachable from `result`'s models and optimizers
    (trainable, non-trainable, optimizer and metrics variables), once each."""
    seen = {}
    stack = [result]
    while stack:
        obj = stack.pop()
        if isinstance(obj, (list, tuple)):
            stack.extend(obj)
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, keras.Model):
            for variable in obj.variables:
                seen[id(variable)] = variable
            for variable in getattr(obj, "metrics_variables", []):
                seen[id(variable)] = variable
            if getattr(obj, "optimizer", None) is not None:
                stack.append(obj.optimizer)
        elif isinstance(obj, keras.optimizers.Optimizer):
            for variable in obj.variables:
                seen[id(variable)] = variable
        elif isinstance(obj, keras.Variable):
            seen[id(obj)] = obj
    return list(seen.values())


def _make_abstract(variable):
    """Gives `variable` a `ShapeDtypeStruct` value with the sharding Keras'
    `JaxVariable._initialize_layout` would give it under the current
    distribution (replicated on one device without one)."""
    distribution = keras.distribution.distribution()
    sharding = None
    if distribution is not None:
        layout = variable._layout
        if layout is None:
            layout = distribution.get_variable_layout(variable)
            variable._layout = layout
        sharding = getattr(layout, "backend_layout", layout)
    variable._value = jax.ShapeDtypeStruct(
        tuple(variable.shape), variable.dtype, sharding=sharding
    )


def is_abstract(variable):
    """Whether `variable` holds a `ShapeDtypeStruct` (no array)."""
    return isinstance(variable._value, jax.ShapeDtypeStruct)


def peak_rss_bytes():
    """This process's peak resident memory so far (Linux: `ru_maxrss` KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


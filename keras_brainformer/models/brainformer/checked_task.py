"""What the family's tasks share around `keras.Model`'s entry points:
concrete data checked at the door, in-memory data shuffled, int8 reaching
every kernel. `BrainformerCausalLM` and `BrainformerTextClassifier` are
decorated with `checked_task` and define `check_data`.

A class decorator rather than a mixin base: keras-hub names a preset's tasks
after each task class's first base (`metadata.json` `"tasks"`), so the
keras-hub task class must stay the only base.
"""

from keras_brainformer.layers.validation import check_fit_arguments
from keras_brainformer.models.brainformer.brainformer_backbone import check_task_inputs
from keras_brainformer.models.brainformer.in_memory_shuffle import shuffled_fit_arguments
from keras_brainformer.models.brainformer.task_quantization import quantize_task


def checked_task(cls):
    """Gives the keras-hub task class `cls` checked `fit`, `evaluate`,
    `predict` and `quantize`. `cls` defines `check_data(x, y=None)`, which
    raises a `TypeError`/`ValueError` naming the field, the value and the
    allowed range for bad concrete data (token ids, labels)."""
    if not callable(getattr(cls, "check_data", None)):
        raise TypeError(f"{cls.__name__} must define `check_data(x, y=None)`.")

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, with the data checked first when it is concrete.

        NumPy arrays, lists and eager tensors in `x`/`y`, and the same in a
        `validation_data` tuple, go through `check_data` (see it) before
        training starts: a bad value raises a `TypeError`/`ValueError` naming
        the field, the value and the allowed range, and nothing is trained
        (on JAX, XLA's gather would otherwise clamp an out-of-range id
        silently).

        A `tf.data.Dataset`, generator or `keras.utils.PyDataset` passes
        unchecked: its batches are only seen inside the compiled train step,
        where values cannot be checked. Check such data when building it.

        In-memory data is shuffled every epoch when `shuffle=True` (the
        default), as `keras.Model.fit` does and keras-hub's preprocessing
        pipeline does not (see `in_memory_shuffle.py`); the order follows
        `keras.utils.set_random_seed`.
        """
        base_fit = super(cls, self).fit
        check_fit_arguments(base_fit, self.check_data, x, y, args, kwargs)
        x, y, kwargs = shuffled_fit_arguments(x, y, args, kwargs)
        return base_fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`, with concrete data checked first (`check_data`)."""
        self.check_data(x, y)
        return super(cls, self).evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`, with concrete token ids checked first."""
        check_task_inputs(self, x)
        return super(cls, self).predict(x, *args, **kwargs)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize`. `"int8"` reaches every attention, dense
        FFN and expert kernel and the token embedding (routers and norms stay
        float32); it works straight after `from_preset` (see
        `task_quantization.py`). Quantize the task rather than its backbone,
        so the task's compiled functions are rebuilt."""
        return quantize_task(
            self, super(cls, self).quantize, mode, config=config, filters=filters, **kwargs
        )

    for method in (fit, evaluate, predict, quantize):
        method.__qualname__ = f"{cls.__qualname__}.{method.__name__}"
        method.__module__ = cls.__module__
        setattr(cls, method.__name__, method)
    return cls

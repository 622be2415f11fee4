"""What the family's tasks share around `keras.Model`'s entry points:
concrete data checked at the door, in-memory data shuffled, int8 reaching
every kernel. `BrainformerCausalLM` and `BrainformerTextClassifier` put
`CheckedTask` before their keras-hub base class and define `check_data`."""

from keras_brainformer.layers.validation import check_fit_arguments
from keras_brainformer.models.brainformer.brainformer_backbone import check_task_inputs
from keras_brainformer.models.brainformer.in_memory_shuffle import shuffled_fit_arguments
from keras_brainformer.models.brainformer.task_quantization import quantize_task


class CheckedTask:
    """Mixin for a keras-hub task (`class T(CheckedTask, keras_hub.models.X)`).

    The task defines `check_data(x, y=None)`, which raises a
    `TypeError`/`ValueError` naming the field, the value and the allowed
    range for bad concrete data (token ids, labels)."""

    def check_data(self, x, y=None):
        raise NotImplementedError(f"{type(self).__name__} must define `check_data(x, y)`.")

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit`, with the data checked first when it is concrete.

        NumPy arrays, lists and eager tensors in `x`/`y`, and the same in a
        `validation_data` tuple, go through `check_data` (see the task's)
        before training starts: a bad value raises a `TypeError`/`ValueError`
        naming the field, the value and the allowed range, and nothing is
        trained (on JAX, XLA's gather would otherwise clamp an out-of-range
        id silently).

        A `tf.data.Dataset`, generator or `keras.utils.PyDataset` passes
        unchecked: its batches are only seen inside the compiled train step,
        where values cannot be checked. Check such data when building it.

        In-memory data is shuffled every epoch when `shuffle=True` (the
        default), as `keras.Model.fit` does and keras-hub's preprocessing
        pipeline does not (see `in_memory_shuffle.py`); the order follows
        `keras.utils.set_random_seed`.
        """
        check_fit_arguments(super().fit, self.check_data, x, y, args, kwargs)
        x, y, kwargs = shuffled_fit_arguments(x, y, args, kwargs)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`, with concrete data checked first (`check_data`)."""
        self.check_data(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`, with concrete token ids checked first."""
        check_task_inputs(self, x)
        return super().predict(x, *args, **kwargs)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize`. `"int8"` reaches every attention, dense
        FFN and expert kernel and the token embedding (routers and norms stay
        float32); it works straight after `from_preset` (see
        `task_quantization.py`). Quantize the task rather than its backbone,
        so the task's compiled functions are rebuilt."""
        return quantize_task(
            self, super().quantize, mode, config=config, filters=filters, **kwargs
        )

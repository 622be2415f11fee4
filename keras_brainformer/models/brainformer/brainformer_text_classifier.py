"""Brainformer text classifier: a decoder backbone pooled at its last real token."""

import numbers

import keras
from keras import ops
from keras_hub.models import TextClassifier

from keras_brainformer.layers.routers import INFERENCE_ROUTING
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.layers.validation import check_rate
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_text_classifier_preprocessor import (
    BrainformerTextClassifierPreprocessor,
)
from keras_brainformer.utils.in_memory_shuffle import shuffled_fit_arguments
from keras_brainformer.utils.preset_loading import load_zoo_preset
from keras_brainformer.utils.task_data_checks import check_class_labels
from keras_brainformer.utils.task_data_checks import check_fit_arguments
from keras_brainformer.utils.task_data_checks import check_task_inputs
from keras_brainformer.utils.task_data_checks import uses_sparse_labels
from keras_brainformer.utils.task_quantization import quantize_task


def last_token_selection(padding_mask):
    """`[B, T]` bool, True exactly at the last real (nonzero) position of each
    row; at position 0 for a row with no real token.

    For a right-padded row this is position `sum(padding_mask) - 1` (clipped
    at 0); it is also right for left padding or any other mask. Only cumulative
    sums and comparisons, so it needs no static sequence length.
    """
    mask = ops.cast(ops.not_equal(padding_mask, 0), "int32")
    counts = ops.cumsum(mask, axis=1)
    lengths = counts[:, -1:]
    last = ops.logical_and(ops.equal(mask, 1), ops.equal(counts, lengths))
    first = ops.equal(ops.cumsum(ops.ones_like(mask), axis=1), 1)
    return ops.where(ops.equal(lengths, 0), first, last)


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerLastTokenPooling(keras.layers.Layer):
    """Pools `[B, T, d]` hidden states to `[B, d]`: the hidden state at the
    last real token of each row (see `last_token_selection`).

    Computed as a masked sum over time (`x * one_hot`), which is exact: the
    selected value is copied bit for bit, and gradients reach only that
    position.
    """

    def call(self, hidden_states, padding_mask):
        select = ops.cast(last_token_selection(padding_mask), hidden_states.dtype)
        return ops.sum(hidden_states * select[:, :, None], axis=1)

    def compute_output_shape(self, hidden_states_shape, padding_mask_shape=None):
        return (hidden_states_shape[0], hidden_states_shape[-1])


def check_num_classes(num_classes):
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer. "
            f"Received: num_classes={num_classes!r}"
        )
    return int(num_classes)


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerTextClassifier(TextClassifier):
    """A `BrainformerBackbone` with a classification head, for fine-tuning.

    The backbone is a causal decoder, so only the last real token of a text
    has attended to all of it: the classifier takes the backbone's final
    hidden states `[B, T, d]`, keeps the one at the last non-padding position
    of each row (position `sum(padding_mask) - 1`; with the default
    preprocessor that is the end token `</s>`), applies dropout and a dense
    layer to `num_classes` logits. Padding after that position never changes
    the output.

    MoE sublayers with expert choice route causally at inference by default
    (dropless token choice on the trained router; `fit` always uses the
    trained routing). The pooled last token still sees the whole text either
    way; `set_inference_routing("as_trained")` evaluates with the training
    routing instead.

    With a preprocessor (the default from `from_preset()`), `fit`,
    `evaluate` and `predict` take raw strings and integer labels in
    `[0, num_classes)`. `from_preset(preset, num_classes=n)` loads the
    backbone (and preprocessor) of any Brainformer preset with a new, randomly
    initialised head; `from_preset(preset)` on a saved classifier restores
    its head too.

    The default `compile()` is `keras_hub.models.TextClassifier`'s:
    `Adam(5e-5)` (a fine-tuning rate: pass a larger one when training from
    scratch), `SparseCategoricalCrossentropy` (from logits unless
    `activation="softmax"`) and `SparseCategoricalAccuracy`. Router auxiliary
    losses of the backbone are added to the loss automatically.

    Args:
        backbone: a `BrainformerBackbone`.
        num_classes: int, number of classes to predict.
        preprocessor: a `BrainformerTextClassifierPreprocessor` or None (feed
            `{"token_ids", "padding_mask"}` yourself).
        activation: None (logits, the default), `"softmax"` (probabilities)
            or any Keras activation applied to the outputs.
        dropout: float in [0, 1), dropout on the pooled hidden state.
        **kwargs: passed to `keras_hub.models.TextClassifier` (for example
            `name`, or `compile=False`).

    Example:
    ```python
    import keras
    from keras_brainformer.models import AttentionSpec, BlockSpec, MoESpec
    from keras_brainformer.models import BrainformerBackbone
    from keras_brainformer.models import BrainformerTextClassifier
    from keras_brainformer.models import BrainformerTextClassifierPreprocessor
    from keras_brainformer.models import BrainformerTokenizer

    tokenizer = BrainformerTokenizer()
    backbone = BrainformerBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), hidden_dim=32,
        blocks=BlockSpec([
            AttentionSpec(num_heads=2),
            MoESpec(num_experts=4, intermediate_dim=64, router="expert_choice",
                    capacity_factor=1.0),
        ]),
        num_layers=1)
    classifier = BrainformerTextClassifier(
        backbone, num_classes=2,
        preprocessor=BrainformerTextClassifierPreprocessor(
            tokenizer, sequence_length=16))
    classifier.compile(optimizer=keras.optimizers.Adam(1e-3))

    texts = ["import os", "x = 1 + 2", "import re", "y = 3 * 4"]
    labels = [0, 1, 0, 1]
    classifier.fit(texts, labels, batch_size=2, epochs=1)
    logits = classifier.predict(["import json"])  # [1, 2]
    ```
    """

    backbone_cls = BrainformerBackbone
    preprocessor_cls = BrainformerTextClassifierPreprocessor

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; weightless zoo presets build a random init."""
        return load_zoo_preset(cls, super().from_preset, preset, *args, **kwargs)

    def __init__(
        self,
        backbone,
        num_classes,
        preprocessor=None,
        activation=None,
        dropout=0.0,
        **kwargs,
    ):
        num_classes = check_num_classes(num_classes)
        dropout = check_rate("dropout", dropout)

        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.pooling = BrainformerLastTokenPooling(
            dtype=backbone.dtype_policy, name="last_token_pooling"
        )
        self.output_dropout = keras.layers.Dropout(
            dropout, dtype=backbone.dtype_policy, name="classifier_dropout"
        )
        self.output_dense = keras.layers.Dense(
            num_classes,
            activation=activation,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=backbone.dtype_policy,
            name="logits",
        )
        # Set before `super().__init__()`, whose default `compile()` reads it
        # to choose `from_logits`.
        self.activation = keras.activations.get(activation)

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        pooled = self.pooling(hidden_states, inputs["padding_mask"])
        pooled = self.output_dropout(pooled)
        outputs = self.output_dense(pooled)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.num_classes = num_classes
        self.dropout = dropout

    def check_data(self, x, y=None):
        """Checks concrete `fit`/`evaluate` data before any step runs (see
        `fit`): token ids in `x` (raw text goes to the preprocessor), and
        labels `y` in `[0, num_classes)` when the loss takes integer labels
        (the default `compile()`)."""
        check_task_inputs(self, x)
        if y is not None and uses_sparse_labels(getattr(self, "loss", None)):
            check_class_labels(y, self.num_classes)

    def fit(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.fit` with concrete token ids and labels checked first
        (`check_data`, also on a `validation_data` tuple) and in-memory data
        shuffled every epoch, as `BrainformerCausalLM.fit` does."""
        check_fit_arguments(super().fit, self.check_data, x, y, args, kwargs)
        x, y, kwargs = shuffled_fit_arguments(x, y, args, kwargs)
        return super().fit(x, y, *args, **kwargs)

    def evaluate(self, x=None, y=None, *args, **kwargs):
        """`keras.Model.evaluate`; concrete ids and labels are checked first."""
        self.check_data(x, y)
        return super().evaluate(x, y, *args, **kwargs)

    def predict(self, x, *args, **kwargs):
        """`keras.Model.predict`; concrete token ids are checked first."""
        check_task_inputs(self, x)
        return super().predict(x, *args, **kwargs)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """`keras.Model.quantize` of the whole task, as `BrainformerCausalLM.quantize`."""
        return quantize_task(self, super().quantize, mode, config=config, filters=filters, **kwargs)
    def set_inference_routing(self, mode):
        """`"causal"` (default) or `"as_trained"` routing of every MoE
        sublayer at inference (`predict`, `evaluate`); resets the compiled
        predict/evaluate functions so the change takes effect.

        A classifier never generates, so either is valid: `"as_trained"`
        evaluates with the routing `fit` used (for expert choice, each
        sequence's tokens compete for expert slots; padding does not take
        part), `"causal"` with dropless token choice on the same router.
        """
        check_choice("inference_routing", mode, INFERENCE_ROUTING)
        self.backbone.set_inference_routing(mode)
        self.predict_function = None
        self.test_function = None

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "activation": keras.activations.serialize(self.activation),
                "dropout": self.dropout,
            }
        )
        return config

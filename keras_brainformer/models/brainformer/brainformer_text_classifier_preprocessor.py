"""Brainformer text-classifier preprocessor: raw strings to padded token ids."""

import keras
import numpy as np
from keras_hub.layers import StartEndPacker
from keras_hub.models import TextClassifierPreprocessor

from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_causal_lm_preprocessor import (
    check_preprocessor_arguments,
)
from keras_brainformer.models.brainformer.brainformer_causal_lm_preprocessor import check_text
from keras_brainformer.models.brainformer.brainformer_tokenizer import BrainformerTokenizer
from keras_brainformer.upstream_private import preprocessing_function
from keras_brainformer.utils.preset_loading import load_zoo_preset
from keras_brainformer.utils.task_data_checks import check_class_labels


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerTextClassifierPreprocessor(TextClassifierPreprocessor):
    """Brainformer text-classifier preprocessor.

    Tokenizes raw strings, adds `start_token_id` at the front and
    `end_token_id` at the back (each optional), and truncates or pads with
    `pad_token_id` to `sequence_length`. Labels and sample weights pass
    through unchanged. Calling it returns `x`, `(x, y)` or
    `(x, y, sample_weight)` with `x = {"token_ids", "padding_mask"}`, each
    `[batch, sequence_length]` (token ids int32, the mask bool: True on real
    tokens, start and end tokens included).

    A decoder classifier reads the hidden state of the last real token
    (`BrainformerTextClassifier`), the only one that has attended to the whole
    text. The end token `</s>` is therefore appended by default, so that the
    pooled position is the same learned token for every input, and truncation
    cuts the text, never the end token: a text longer than `sequence_length`
    keeps its first `sequence_length - 2` tokens, then `</s>` (the same rule
    as `keras_hub.layers.StartEndPacker`, which this layer uses).

    Only single-segment inputs are supported (one string per example). It
    runs eagerly on Python strings or NumPy arrays and inside
    `tf.data.Dataset.map`. Concrete inputs are checked: anything but a
    string, a list of strings or a 1-D string array (token ids, numbers,
    None, nested lists, dicts) raises a `TypeError`, an empty batch a
    `ValueError`.

    Works with any tokenizer that has `start_token_id`, `end_token_id` and
    `pad_token_id`: `BrainformerTokenizer` (the default, and what
    `from_preset()` loads when a preset has no `preprocessor.json`) or
    `BrainformerByteTokenizer` passed explicitly.

    Args:
        tokenizer: a `BrainformerTokenizer`, a `BrainformerByteTokenizer`, or
            None for `BrainformerTokenizer()` with the shipped vocabulary.
        sequence_length: int, the length of the packed sequences.
        add_start_token: bool, prepend the start token.
        add_end_token: bool, append the end token (the pooled token).
        num_classes: int or None. When set, concrete labels passed with the
            texts must be whole numbers in `[0, num_classes)`
            (`BrainformerTextClassifier.fit` checks its labels either way).
        **kwargs: passed to `keras_hub.models.TextClassifierPreprocessor`.

    Example:
    ```python
    from keras_brainformer.models import BrainformerByteTokenizer
    from keras_brainformer.models import BrainformerTextClassifierPreprocessor

    preprocessor = BrainformerTextClassifierPreprocessor(sequence_length=16)
    x, y = preprocessor(["import os\\n", "def f():\\n    pass\\n"], [0, 1])
    assert tuple(x["token_ids"].shape) == (2, 16)
    assert tuple(x["padding_mask"].shape) == (2, 16)

    byte_preprocessor = BrainformerTextClassifierPreprocessor(
        BrainformerByteTokenizer(), sequence_length=8)
    x = byte_preprocessor(["a long text that is truncated"])
    # x["token_ids"][0]: 2 (start), the first 6 bytes "a long", 3 (end)
    assert list(x["token_ids"][0]) == [2, 97, 32, 108, 111, 110, 103, 3]
    ```
    """

    backbone_cls = BrainformerBackbone
    tokenizer_cls = BrainformerTokenizer

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; weightless zoo presets build a random init."""
        return load_zoo_preset(cls, super().from_preset, preset, *args, **kwargs)

    def __init__(
        self,
        tokenizer=None,
        sequence_length=512,
        add_start_token=True,
        add_end_token=True,
        num_classes=None,
        **kwargs,
    ):
        tokenizer, sequence_length = check_preprocessor_arguments(
            self, tokenizer, sequence_length, add_start_token, add_end_token
        )
        num_classes = check_optional_positive_int("num_classes", num_classes)
        reserved = int(add_start_token) + int(add_end_token)
        if sequence_length <= reserved:
            raise ValueError(
                f"`sequence_length` must leave room for text after the {reserved} "
                f"special token(s). Received: sequence_length={sequence_length}"
            )
        # `truncate` is the base class's multi-segment option; one segment here.
        kwargs.pop("truncate", None)
        super().__init__(tokenizer=tokenizer, sequence_length=sequence_length, **kwargs)
        self.add_start_token = add_start_token
        self.add_end_token = add_end_token
        self.num_classes = num_classes

    def build(self, input_shape):
        # Defer packer creation to `build()` so that tokenizer assets have
        # loaded when restoring a saved preprocessor.
        self.packer = StartEndPacker(
            start_value=self.tokenizer.start_token_id,
            end_value=self.tokenizer.end_token_id,
            pad_value=self.tokenizer.pad_token_id,
            sequence_length=self.sequence_length,
            return_padding_mask=True,
        )
        self.built = True

    def _segment(self, x):
        """The one text segment of `x` (a 1-tuple of segments is unwrapped)."""
        if isinstance(x, tuple):
            if len(x) != 1:
                raise ValueError(
                    f"{self.__class__.__name__} takes one text segment per "
                    f"example. Received a tuple of {len(x)} segments."
                )
            (x,) = x
        return x

    def check_inputs(self, x, y=None):
        """Checks concrete inputs (tensors in a `tf.data` pipeline pass): `x`
        is a string, a non-empty list of strings or a non-empty 1-D string
        array; `y` holds labels in `[0, num_classes)` when `num_classes` is
        set."""
        where = f"{self.__class__.__name__}.call"
        x = self._segment(x)
        if isinstance(x, dict):
            raise TypeError(
                f"`{where}` takes raw text: a string, a list of strings or a "
                f"string array. Received: a dict with keys {sorted(x)}. Token "
                "ids skip the preprocessor: call the model on them directly."
            )
        check_text(x, where)
        if isinstance(x, (list, tuple, np.ndarray)):
            shape = np.shape(x)
            if len(shape) > 1:
                raise ValueError(
                    f"`{where}` takes one string per example: a 1-D batch. "
                    f"Received a string array of shape {shape}."
                )
            if shape and shape[0] == 0:
                raise ValueError(
                    f"`{where}` received an empty batch (0 texts). "
                    "Pass at least one string."
                )
        if self.num_classes is not None and y is not None:
            check_class_labels(y, self.num_classes)

    def call(self, x, y=None, sample_weight=None):
        self.check_inputs(x, y)
        return super().call(x, y=y, sample_weight=sample_weight)

    def _pack(self, x):
        x = self._segment(x)
        token_ids, padding_mask = self.packer(
            self.tokenizer(x),
            add_start_value=self.add_start_token,
            add_end_value=self.add_end_token,
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def _call_python(self, x, y=None, sample_weight=None):
        return keras.utils.pack_x_y_sample_weight(self._pack(x), y, sample_weight)

    @preprocessing_function
    def _call_tf(self, x, y=None, sample_weight=None):
        return keras.utils.pack_x_y_sample_weight(self._pack(x), y, sample_weight)

    def get_config(self):
        config = super().get_config()
        config.pop("truncate", None)
        config.update(
            {
                "add_start_token": self.add_start_token,
                "add_end_token": self.add_end_token,
            }
        )
        if self.num_classes is not None:
            config["num_classes"] = self.num_classes
        return config

"""Brainformer causal-LM preprocessor: raw strings to packed next-token batches."""

import keras
import numpy as np
from keras_hub.models import CausalLMPreprocessor

from keras_brainformer.layers.validation import check_positive_int
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_tokenizer import BrainformerTokenizer
from keras_brainformer.models.brainformer.brainformer_tokenizer import check_special_token_ids
from keras_brainformer.utils.preset_loading import load_zoo_preset


def check_preprocessor_arguments(
    preprocessor, tokenizer, sequence_length, add_start_token, add_end_token, detokenize=False
):
    """The family's preprocessors' shared constructor checks: the tokenizer
    (default `BrainformerTokenizer()`) has the special tokens they need, a
    positive `sequence_length`, bool `add_start_token` / `add_end_token`.
    Returns `(tokenizer, sequence_length)`."""
    if tokenizer is None:
        tokenizer = BrainformerTokenizer()
    check_special_token_ids(tokenizer, type(preprocessor).__name__, detokenize=detokenize)
    sequence_length = check_positive_int("sequence_length", sequence_length)
    for name, value in (("add_start_token", add_start_token), ("add_end_token", add_end_token)):
        if not isinstance(value, bool):
            raise TypeError(f"`{name}` must be a bool. Received: {name}={value!r}")
    return tokenizer, sequence_length


def check_text(x, where):
    """Raw text (a string, a list of strings or a string array) is what the
    preprocessor takes; concrete non-text inputs (token ids, numbers, None)
    are rejected with a `TypeError`. Tensors (`tf.data` pipelines) pass."""
    if isinstance(x, (str, bytes)):
        return
    if x is None or isinstance(x, (int, float, bool, np.number)):
        bad = repr(x)
    elif isinstance(x, np.ndarray):
        if x.dtype.kind in "US" or (
            x.dtype.kind == "O" and all(isinstance(v, (str, bytes)) for v in x.flat)
        ):
            return
        bad = f"an array of dtype {x.dtype} and shape {x.shape}"
    elif isinstance(x, (list, tuple)):
        if all(isinstance(v, (str, bytes)) for v in x):
            return
        bad = f"a {type(x).__name__} holding {sorted({type(v).__name__ for v in x})}"
    else:
        return
    raise TypeError(
        f"`{where}` takes raw text: a string, a list of strings or a string "
        f"array. Received: {bad}. To feed token ids, skip the preprocessor "
        "(`preprocessor=None`) and pass `{'token_ids', 'padding_mask'}`."
    )


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerCausalLMPreprocessor(CausalLMPreprocessor):
    """Brainformer causal-LM preprocessor.

    Tokenizes raw strings, adds `start_token_id` at the front and
    `end_token_id` at the back (each optional), pads with `pad_token_id` or
    truncates to `sequence_length + 1` tokens, and splits the result into
    inputs and next-token labels. Calling it on a batch of strings returns
    `(x, y, sample_weight)`:

    - `x = {"token_ids", "padding_mask"}`, each `[batch, sequence_length]`
      (token ids int32, the mask bool: True on real tokens);
    - `y`: `[batch, sequence_length]`, `x["token_ids"]` shifted left by one;
    - `sample_weight`: `[batch, sequence_length]`, the padding mask of `y`
      (False where the label is padding).

    `generate_preprocess()` and `generate_postprocess()` prepare prompts for
    and decode outputs of `CausalLM.generate()`. It runs eagerly on NumPy or
    the backend's tensors, and inside `tf.data.Dataset.map`.

    Works with any tokenizer that has `start_token_id`, `end_token_id`,
    `pad_token_id` and `detokenize()`: `BrainformerTokenizer` (the default,
    and what `from_preset()` loads when the preset has no
    `preprocessor.json`) or `BrainformerByteTokenizer` passed explicitly.

    Args:
        tokenizer: a `BrainformerTokenizer`, a `BrainformerByteTokenizer`, or
            None for `BrainformerTokenizer()` with the shipped vocabulary.
        sequence_length: int, the length of the packed sequences.
        add_start_token: bool, prepend the start token.
        add_end_token: bool, append the end token.
        **kwargs: passed to `keras_hub.models.CausalLMPreprocessor`.

    Example:
    ```python
    from keras_brainformer.models import BrainformerByteTokenizer
    from keras_brainformer.models import BrainformerCausalLMPreprocessor

    preprocessor = BrainformerCausalLMPreprocessor(sequence_length=16)
    x, y, sample_weight = preprocessor(["import os\\n", "def f():\\n    pass\\n"])
    assert tuple(x["token_ids"].shape) == (2, 16)
    assert tuple(x["padding_mask"].shape) == (2, 16)
    assert tuple(y.shape) == tuple(sample_weight.shape) == (2, 16)

    byte_preprocessor = BrainformerCausalLMPreprocessor(
        BrainformerByteTokenizer(), sequence_length=16)
    x, y, sample_weight = byte_preprocessor(["import os\\n"])
    # x["token_ids"][0]: 2 (start), the 10 bytes of "import os\\n", 3 (end), 0...
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
        sequence_length=1024,
        add_start_token=True,
        add_end_token=True,
        **kwargs,
    ):
        tokenizer, sequence_length = check_preprocessor_arguments(
            self, tokenizer, sequence_length, add_start_token, add_end_token, detokenize=True
        )
        super().__init__(
            tokenizer=tokenizer,
            sequence_length=sequence_length,
            add_start_token=add_start_token,
            add_end_token=add_end_token,
            **kwargs,
        )

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        check_text(x, f"{self.__class__.__name__}.call")
        return super().call(
            x, y=y, sample_weight=sample_weight, sequence_length=sequence_length
        )

    def generate_preprocess(self, x, sequence_length=None):
        check_text(x, f"{self.__class__.__name__}.generate_preprocess")
        return super().generate_preprocess(x, sequence_length=sequence_length)

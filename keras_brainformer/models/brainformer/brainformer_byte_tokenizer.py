"""Brainformer byte-level tokenizer: UTF-8 bytes, no vocabulary file."""

import keras
from keras_hub.tokenizers import ByteTokenizer

from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone

# The helpers keras-hub's own `ByteTokenizer` is written with (`tf` is None
# when TensorFlow is not installed; the Python path does not need it).
from keras_brainformer.upstream_private import canonicalize_python_token_inputs
from keras_brainformer.upstream_private import convert_to_ragged_batch
from keras_brainformer.upstream_private import preprocessing_function
from keras_brainformer.upstream_private import tf


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerByteTokenizer(ByteTokenizer):
    """Byte-level tokenizer for the Brainformer family: no vocabulary needed.

    Each UTF-8 byte of the text is one token, so the vocabulary is the 256
    byte values (`vocabulary_size() == 256`, the `vocabulary_size` of a
    byte-level backbone) and any text, in any script, is representable.
    Three ASCII control bytes that do not occur in source code or prose
    double as the special tokens the Brainformer preprocessors need:

    | token  | byte          | id |
    |--------|---------------|----|
    | pad    | `"\\x00"` NUL | 0  |
    | start  | `"\\x02"` STX | 2  |
    | end    | `"\\x03"` ETX | 3  |

    (NUL is also what keras-hub's `ByteTokenizer` pads with; STX/ETX are
    ASCII's "start of text"/"end of text".) `detokenize()` drops these three
    ids, as SentencePiece drops its control tokens, so it is exact for any
    text that contains no NUL, STX or ETX character.

    Unlike `keras_hub.tokenizers.ByteTokenizer`, text is not lowercased by
    default (case matters in code).

    Args:
        sequence_length: int or None. If set, outputs are padded (with 0) or
            truncated to this length.
        lowercase: bool. Case-fold the text before tokenizing. Defaults to
            False.
        normalization_form: None (the default), `"NFC"`, `"NFKC"`, `"NFD"`
            or `"NFKD"`: Unicode normalisation applied before tokenizing.
        errors: `"replace"` (default), `"ignore"` or `"strict"`: what
            `detokenize()` does with invalid UTF-8.
        replacement_char: int, the code point used by `errors="replace"`.
        dtype: integer output dtype.
        **kwargs: passed to `keras_hub.tokenizers.ByteTokenizer`.

    Example:
    ```python
    from keras_brainformer.models import BrainformerByteTokenizer

    tokenizer = BrainformerByteTokenizer()
    text = "Grüße, 世界 ☃\\n    pass\\n"
    ids = tokenizer(text)  # one id per UTF-8 byte
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.detokenize(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.start_token_id,
            tokenizer.end_token_id) == (0, 2, 3)
    ```
    """

    backbone_cls = BrainformerBackbone

    def __init__(
        self,
        sequence_length=None,
        lowercase=False,
        normalization_form=None,
        errors="replace",
        replacement_char=65533,
        dtype="int32",
        **kwargs,
    ):
        self._add_special_token("\x02", "start_token")
        self._add_special_token("\x03", "end_token")
        self._add_special_token("\x00", "pad_token")
        super().__init__(
            lowercase=lowercase,
            sequence_length=sequence_length,
            normalization_form=normalization_form,
            errors=errors,
            replacement_char=replacement_char,
            dtype=dtype,
            **kwargs,
        )

    @property
    def _dropped_ids(self):
        return sorted({self.pad_token_id, self.start_token_id, self.end_token_id})

    def _detokenize_python(self, inputs):
        inputs, batched = canonicalize_python_token_inputs(inputs)
        dropped = set(self._dropped_ids)
        inputs = [[i for i in ids if i not in dropped] for ids in inputs]
        return super()._detokenize_python(inputs if batched else inputs[0])

    @preprocessing_function
    def _detokenize_tf(self, inputs):
        self._maybe_initialized_tf()
        inputs, unbatched, _ = convert_to_ragged_batch(inputs)
        keep = tf.ones_like(inputs, dtype="bool")
        for token_id in self._dropped_ids:
            keep = tf.logical_and(keep, tf.not_equal(inputs, token_id))
        inputs = tf.ragged.boolean_mask(inputs, keep)
        outputs = tf.strings.reduce_join(tf.gather(self._char_lst, inputs), axis=-1)
        outputs = tf.strings.unicode_transcode(
            outputs,
            "UTF-8",
            "UTF-8",
            errors=self.errors,
            replacement_char=self.replacement_char,
        )
        if unbatched:
            outputs = tf.squeeze(outputs, 0)
        return outputs

    # No vocabulary file: presets store only `tokenizer.json`.
    def save_assets(self, dir_path):
        pass

    def load_assets(self, dir_path):
        pass

    def load_preset_assets(self, preset):
        pass

"""Brainformer SentencePiece tokenizer, with a vocabulary shipped in the package."""

import os

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.utils.preset_loading import load_zoo_preset

# SentencePiece trainer options that give the family's special-token ids.
SPECIAL_TOKEN_TRAINER_OPTIONS = dict(
    pad_id=0,
    unk_id=1,
    bos_id=2,
    eos_id=3,
    pad_piece="<pad>",
    unk_piece="<unk>",
    bos_piece="<s>",
    eos_piece="</s>",
)

BRAINFORMER_VOCABULARY_FILE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    "assets",
    "brainformer_stdlib_8k.spm",
)


def _tf_kernel_cache_epoch():
    """An object that changes whenever TensorFlow's eager kernel cache is cleared.

    `tf.random.set_seed` (called by `keras.utils.set_random_seed`) clears the
    eager kernel cache, which destroys the `tensorflow-text` SentencePiece
    resource of every tokenizer built before it: their next use inside
    `tf.data` fails with "Resource ... SentencepieceResource does not exist".
    The seed call also replaces the context's private `_rng` object, which is
    what this returns (None if TensorFlow or that attribute is unavailable).
    """
    try:  # TensorFlow's eager context: optional, absent without TensorFlow
        from tensorflow.python.eager import context
    except ImportError:
        return None
    return getattr(context.context(), "_rng", None)


def check_special_token_ids(tokenizer, owner, detokenize=False):
    """Raises a `ValueError` naming `owner` unless `tokenizer` has start, end
    and pad token ids (and `detokenize()` when `detokenize`)."""
    missing = [
        name
        for name in ("start_token_id", "end_token_id", "pad_token_id")
        if getattr(tokenizer, name, None) is None
    ]
    if detokenize and not hasattr(tokenizer, "detokenize"):
        missing.append("detokenize()")
    if missing:
        raise ValueError(
            f"{owner} needs a tokenizer with `start_token_id`, `end_token_id`, "
            f"`pad_token_id`{' and `detokenize()`' if detokenize else ''}, such as "
            "`BrainformerTokenizer` or `BrainformerByteTokenizer`. "
            f"Received: {tokenizer!r} (missing: {missing})"
        )


def default_vocabulary():
    """The serialized SentencePiece proto shipped with the package (bytes).

    An 8192-piece BPE vocabulary trained offline on `pydoc_data.topics` and
    about 4 MB of standard-library Python sources by
    `presets/tokenizer/train_vocabulary.py`: identity normalisation (spaces,
    indentation and newlines are kept), byte fallback (any UTF-8 text is
    representable), `<pad>` 0, `<unk>` 1, `<s>` 2, `</s>` 3.
    """
    with open(BRAINFORMER_VOCABULARY_FILE, "rb") as file:
        return file.read()


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerTokenizer(SentencePieceTokenizer):
    """Brainformer tokenizer layer based on SentencePiece.

    Tokenizes raw strings into integer ids with a SentencePiece model and
    checks that the model has the special tokens the Brainformer family's
    preprocessors need: `<pad>` (id 0, `pad_token_id`), `<s>` (id 2,
    `start_token_id`), `</s>` (id 3, `end_token_id`); `<unk>` is id 1.

    Without a `proto` the tokenizer uses the vocabulary shipped with the
    package (`keras_brainformer/assets/brainformer_stdlib_8k.spm`, 8192 BPE
    pieces trained on Python's own documentation and standard-library
    sources), so `BrainformerTokenizer()` works offline. That vocabulary
    keeps whitespace as is, so Python source round-trips exactly (newlines
    and indentation included), and falls back to UTF-8 bytes for characters
    it has no piece for (only U+2581, SentencePiece's space marker, comes
    back as a space). `from_preset()` replaces it with the preset's
    `assets/tokenizer/vocabulary.spm`.

    Eager calls (and Grain pipelines) run the `sentencepiece` package; inside
    `tf.data` or a `tf.function` the `tensorflow-text` kernel is used. Both
    give the same ids with the shipped vocabulary.

    A batch of strings gives a list of id lists (a `tf.RaggedTensor` inside
    `tf.data`); a single string gives a dense `[None]` tensor. With
    `sequence_length` the output is dense, truncated or padded with
    `pad_token_id`.

    Args:
        proto: a path to a SentencePiece proto file, a `bytes` object with a
            serialized proto, or None (the default) for the shipped
            vocabulary. The proto must contain `<pad>`, `<s>` and `</s>`.
        sequence_length: int or None. If set, outputs are padded or
            truncated to this length.
        add_bos: bool. Prepend `<s>` when tokenizing (the preprocessors add
            it themselves; leave False for them).
        add_eos: bool. Append `</s>` when tokenizing.
        dtype: the output dtype, an integer type or `"string"` (pieces).
        **kwargs: passed to `keras_hub.tokenizers.SentencePieceTokenizer`.

    Example:
    ```python
    from keras_brainformer.models import BrainformerTokenizer

    tokenizer = BrainformerTokenizer()
    source = "def add(a, b):\\n    return a + b\\n"
    ids = tokenizer(source)
    assert tokenizer.detokenize(ids) == source
    assert tokenizer.vocabulary_size() == 8192
    assert (tokenizer.pad_token_id, tokenizer.start_token_id,
            tokenizer.end_token_id) == (0, 2, 3)
    batch = tokenizer(["x = 1\\n", "print(x)\\n"])  # one id list per string
    ```
    """

    backbone_cls = BrainformerBackbone

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; weightless zoo presets build a random init."""
        return load_zoo_preset(cls, super().from_preset, preset, *args, **kwargs)

    def __init__(self, proto=None, **kwargs):
        self._add_special_token("<s>", "start_token")
        self._add_special_token("</s>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        if proto is None:
            proto = default_vocabulary()
        super().__init__(proto=proto, **kwargs)

    def _set_proto_tf(self, proto):
        super()._set_proto_tf(proto)
        self._tf_epoch = _tf_kernel_cache_epoch()

    def _maybe_initialized_tf(self):
        # Rebuild the TensorFlow kernel's resource if a seed reset destroyed
        # it. `init_scope` builds it eagerly even while `tf.data` traces us,
        # as keras-hub requires ("built outside the `tf.data` pipeline").
        stale = getattr(self, "_tf_epoch", None) is not _tf_kernel_cache_epoch()
        if getattr(self, "_sentence_piece", None) is None or stale:
            import tensorflow as tf  # heavy: only when the SentencePiece kernel is built

            with tf.init_scope():
                self._set_proto_tf(self.proto)

    @property
    def unk_token(self):
        """The piece unknown text maps to (never produced with byte fallback)."""
        return "<unk>"

    @property
    def unk_token_id(self):
        return self._unk_token_id

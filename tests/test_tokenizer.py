"""Brainformer tokenizers (SentencePiece and byte-level) and the causal-LM preprocessor."""

import importlib.util
import io
import os
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf
from conftest import to_numpy

from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerByteTokenizer
from keras_brainformer.models import BrainformerCausalLMPreprocessor
from keras_brainformer.models import BrainformerTokenizer
from keras_brainformer.models import dense_transformer_layer
from keras_brainformer.models.brainformer.brainformer_tokenizer import BRAINFORMER_VOCABULARY_FILE
from keras_brainformer.models.brainformer.brainformer_tokenizer import SPECIAL_TOKEN_TRAINER_OPTIONS
from keras_brainformer.training.builtin_text import stdlib_source_files

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(REPOSITORY_ROOT, "presets", "tokenizer", "train_vocabulary.py")

# Python with 4-space indentation, nested blocks, blank lines, a docstring,
# a comment and trailing newline, exactly as in the standard library.
CODE = '''class Stack:
    """A last-in, first-out container."""

    def __init__(self, items=()):
        self._items = list(items)

    def push(self, item):
        # Amortised O(1).
        self._items.append(item)

    def pop(self):
        if not self._items:
            raise IndexError("pop from an empty stack")
        return self._items.pop()
'''


@pytest.fixture(scope="module")
def tokenizer():
    return BrainformerTokenizer()


def stdlib_snippet(name="textwrap.py", characters=4000):
    with open(os.path.join(os.path.dirname(os.__file__), name), encoding="utf-8") as file:
        return file.read()[:characters]


def as_lists(ids):
    if isinstance(ids, tf.RaggedTensor):
        return ids.to_list()
    if isinstance(ids, list):
        return [list(map(int, row)) for row in ids]
    return to_numpy(ids).tolist()


def train_tiny_proto(vocabulary_size=300, **overrides):
    import sentencepiece

    options = dict(
        model_type="bpe",
        minloglevel=2,
        **SPECIAL_TOKEN_TRAINER_OPTIONS,
    )
    options.update(overrides)
    writer = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([stdlib_snippet(characters=20000)]),
        model_writer=writer,
        vocab_size=vocabulary_size,
        max_sentence_length=1 << 16,
        **options,
    )
    return writer.getvalue()


def tiny_backbone(vocabulary_size):
    return BrainformerBackbone(
        vocabulary_size=vocabulary_size,
        hidden_dim=16,
        blocks=dense_transformer_layer(num_heads=2, intermediate_dim=32),
        num_layers=1,
    )


# --- BrainformerTokenizer -------------------------------------------------------------


def test_special_tokens_and_vocabulary(tokenizer):
    assert tokenizer.vocabulary_size() == 8192
    assert (tokenizer.pad_token, tokenizer.start_token, tokenizer.end_token) == (
        "<pad>",
        "<s>",
        "</s>",
    )
    assert tokenizer.pad_token_id == 0
    assert tokenizer.unk_token_id == 1
    assert tokenizer.start_token_id == 2
    assert tokenizer.end_token_id == 3
    assert sorted(tokenizer.special_token_ids) == [0, 2, 3]
    assert [tokenizer.id_to_token(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tokenizer.token_to_id("</s>") == 3
    assert BrainformerTokenizer.backbone_cls is BrainformerBackbone
    # The shipped proto is small package data.
    assert os.path.getsize(BRAINFORMER_VOCABULARY_FILE) < 500_000


def test_round_trip_is_exact_on_python_source(tokenizer):
    snippet = stdlib_snippet()
    assert "\n    " in snippet and "\n        " in snippet and "\n\n" in snippet
    for text in (CODE, snippet):
        ids = tokenizer(text)
        assert to_numpy(ids).ndim == 1
        assert tokenizer.detokenize(ids) == text
    # Indentation is tokenized, not normalised away: 4 and 8 spaces differ.
    assert tokenizer("    x\n").tolist() != tokenizer("        x\n").tolist()
    assert tokenizer.detokenize(tokenizer("a  b   c\n\n\n")) == "a  b   c\n\n\n"


def test_byte_fallback_makes_any_text_representable(tokenizer):
    text = "Grüße, 世界! ☃ 🐍\tTab\r\nCRLF  trailing  \n\x7f"
    ids = tokenizer(text).tolist()
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.detokenize(ids) == text
    assert any(tokenizer.id_to_token(i).startswith("<0x") for i in ids)
    # The one exception: SentencePiece's own space marker U+2581 decodes as a space.
    assert tokenizer.detokenize(tokenizer("a\u2581b")) == "a b"


def test_tf_data_path_gives_the_same_ids(tokenizer):
    texts = [CODE, stdlib_snippet("argparse.py"), "x = 1\n", "Grüße 🐍\n"]
    eager = as_lists(tokenizer(texts))
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(len(texts)).map(tokenizer)
    ragged = next(iter(dataset))
    assert ragged.to_list() == eager
    detokenized = tf.data.Dataset.from_tensors(ragged).map(tokenizer.detokenize)
    assert [s.decode("utf-8") for s in next(iter(detokenized)).numpy()] == texts


def test_tf_data_survives_a_later_seed_reset():
    # `keras.utils.set_random_seed` clears TensorFlow's kernel cache, which
    # destroys tensorflow-text resources built before it; the tokenizer
    # rebuilds its own.
    tokenizer = BrainformerTokenizer()
    keras.utils.set_random_seed(7)
    dataset = tf.data.Dataset.from_tensor_slices(["x = 1\n"]).batch(1).map(tokenizer)
    assert next(iter(dataset)).to_list() == as_lists(tokenizer(["x = 1\n"]))


def test_batch_and_sequence_length(tokenizer):
    batch = tokenizer(["import os\n", "def f():\n    pass\n"])
    assert len(batch) == 2 and tokenizer.detokenize(batch) == [
        "import os\n",
        "def f():\n    pass\n",
    ]
    dense = BrainformerTokenizer(sequence_length=8)(["import os\n", CODE])
    dense = to_numpy(dense)
    assert dense.shape == (2, 8)
    assert dense[0, -1] == 0  # padded with <pad>
    assert (dense[1] != 0).all()  # truncated


def test_custom_proto_and_missing_special_tokens():
    proto = train_tiny_proto(300)
    custom = BrainformerTokenizer(proto=proto)
    assert custom.vocabulary_size() == 300
    assert custom.detokenize(custom("import os")) == "import os"
    with pytest.raises(ValueError, match="<s>"):
        BrainformerTokenizer(proto=train_tiny_proto(300, bos_piece="<bos>"))


def test_compression_on_held_out_stdlib(tokenizer):
    held_out = stdlib_source_files(max_bytes=1_000_000, held_out=True)
    training = set(stdlib_source_files())
    assert held_out and not training.intersection(held_out)
    characters = tokens = 0
    for path in held_out:
        with open(path, encoding="utf-8") as file:
            text = file.read()
        characters += len(text)
        tokens += len(tokenizer(text))
    ratio = characters / tokens
    print(
        f"\nheld-out stdlib ({len(held_out)} files, {characters:,} characters): "
        f"{ratio:.2f} characters/token"
    )
    assert ratio > 2.5
    # The byte tokenizer's figure, for scale.
    ascii_text = "".join(c for c in CODE if ord(c) < 128)
    assert len(BrainformerByteTokenizer()(ascii_text)) == len(ascii_text)


def test_training_script_reproduces_the_shipped_proto():
    spec = importlib.util.spec_from_file_location("train_vocabulary", TRAIN_SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    chunks = list(script.text_chunks(["a\n    b\n\nc\n\n" * 3], chunk_characters=10))
    assert "".join(chunks) == "a\n    b\n\nc\n\n" * 3
    import sentencepiece

    if (
        sys.version.split()[0] != script.SHIPPED_WITH_PYTHON
        or sentencepiece.__version__ != script.SHIPPED_WITH_SENTENCEPIECE
    ):
        pytest.skip("the shipped vocabulary was trained on another Python/sentencepiece")
    proto, stats = script.train(verbose=False)
    with open(BRAINFORMER_VOCABULARY_FILE, "rb") as file:
        assert file.read() == proto
    assert stats["stdlib_bytes"] <= script.MAX_SOURCE_BYTES


# --- BrainformerByteTokenizer ---------------------------------------------------------


def test_byte_tokenizer_round_trip_and_special_ids():
    tokenizer = BrainformerByteTokenizer()
    assert tokenizer.vocabulary_size() == 256
    assert (tokenizer.pad_token_id, tokenizer.start_token_id, tokenizer.end_token_id) == (
        0,
        2,
        3,
    )
    assert sorted(tokenizer.special_token_ids) == [0, 2, 3]
    text = "Grüße, 世界! ☃ 🐍\n    Mixed Case\tTab\r\n"
    ids = tokenizer(text)
    assert to_numpy(ids).tolist() == list(text.encode("utf-8"))
    assert tokenizer.detokenize(ids) == text
    assert tokenizer.detokenize(tokenizer(CODE)) == CODE
    # Start/end/pad bytes are control ids and are dropped, as SentencePiece does.
    assert tokenizer.detokenize([2, 104, 105, 3, 0, 0]) == "hi"
    assert tokenizer.detokenize([[2, 104, 3], [111, 107, 0]]) == ["h", "ok"]
    batch = tokenizer([text, "ab"])
    assert tokenizer.detokenize(batch) == [text, "ab"]
    dataset = tf.data.Dataset.from_tensor_slices([text, "ab"]).batch(2).map(tokenizer)
    ragged = next(iter(dataset))
    assert ragged.to_list() == as_lists(batch)
    with_specials = tf.ragged.constant([[2] + list(text.encode("utf-8")) + [3, 0], [2, 97, 3]])
    detokenized = tf.data.Dataset.from_tensors(with_specials).map(tokenizer.detokenize)
    assert [s.decode("utf-8") for s in next(iter(detokenized)).numpy()] == [text, "a"]


def test_byte_tokenizer_config_round_trip():
    tokenizer = BrainformerByteTokenizer(sequence_length=6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(tokenizer))
    assert isinstance(restored, BrainformerByteTokenizer)
    assert restored.lowercase is False
    assert to_numpy(restored(["Ab", "abcdefgh"])).tolist() == [
        [65, 98, 0, 0, 0, 0],
        [97, 98, 99, 100, 101, 102],
    ]


# --- BrainformerCausalLMPreprocessor ------------------------------------------------------


@pytest.mark.parametrize("kind", ["sentencepiece", "byte"])
def test_preprocessor_outputs(kind):
    tokenizer = BrainformerTokenizer() if kind == "sentencepiece" else BrainformerByteTokenizer()
    sequence_length = 24
    preprocessor = BrainformerCausalLMPreprocessor(tokenizer, sequence_length=sequence_length)
    texts = ["import os\n", "def f():\n    return 1\n", CODE]
    x, y, sample_weight = preprocessor(texts)
    token_ids, padding_mask = to_numpy(x["token_ids"]), to_numpy(x["padding_mask"])
    y, sample_weight = to_numpy(y), to_numpy(sample_weight)
    for array in (token_ids, padding_mask, y, sample_weight):
        assert array.shape == (3, sequence_length)
    assert (token_ids[:, 0] == 2).all()  # start token
    for row, text in enumerate(texts):
        ids = as_lists(tokenizer([text]))[0]
        packed = [2] + ids + [3]
        length = min(len(packed), sequence_length + 1)
        full = packed[:length] + [0] * (sequence_length + 1 - length)
        if len(packed) > sequence_length + 1:
            full[sequence_length] = 3  # truncated: the end token is kept last
        assert token_ids[row].tolist() == full[:-1]
        assert y[row].tolist() == full[1:]
        assert padding_mask[row].tolist() == [i < length for i in range(sequence_length)]
        assert sample_weight[row].tolist() == [i + 1 < length for i in range(sequence_length)]
    # The short rows end with </s> then padding; the long one is truncated.
    short = len(as_lists(tokenizer(["import os\n"]))[0])
    assert y[0, short] == 3 and not sample_weight[0, short + 1 :].any()
    assert sample_weight[2].all()
    # tf.data gives the same batch.
    dataset = tf.data.Dataset.from_tensor_slices(texts).batch(3).map(preprocessor)
    tx, ty, tw = next(iter(dataset))
    assert np.array_equal(tx["token_ids"].numpy(), token_ids)
    assert np.array_equal(ty.numpy(), y)
    assert np.array_equal(tw.numpy(), sample_weight)
    # Generation helpers: no end token on prompts, specials stripped on output.
    prompt = preprocessor.generate_preprocess(["def f():\n    "], sequence_length=16)
    assert to_numpy(prompt["token_ids"])[0, 0] == 2
    assert 3 not in to_numpy(prompt["token_ids"]).tolist()[0]
    assert preprocessor.generate_postprocess(prompt) == ["def f():\n    "]


def test_preprocessor_defaults_and_validation():
    preprocessor = BrainformerCausalLMPreprocessor(sequence_length=8)
    assert isinstance(preprocessor.tokenizer, BrainformerTokenizer)
    assert BrainformerCausalLMPreprocessor.tokenizer_cls is BrainformerTokenizer
    assert BrainformerCausalLMPreprocessor.backbone_cls is BrainformerBackbone
    x, y, sample_weight = preprocessor("x = 1\n")
    assert tuple(x["token_ids"].shape) == (8,) and tuple(y.shape) == (8,)
    no_specials = keras_hub.tokenizers.ByteTokenizer()
    with pytest.raises(ValueError, match="start_token_id"):
        BrainformerCausalLMPreprocessor(no_specials)
    unchanged = BrainformerCausalLMPreprocessor(
        add_start_token=False, add_end_token=False, sequence_length=4
    )
    x, _, _ = unchanged(["x"])
    assert 2 not in to_numpy(x["token_ids"]).tolist()[0]


# --- Presets ------------------------------------------------------------------------------


def test_preset_round_trip(tmp_path, tokenizer):
    preset = str(tmp_path / "brainformer_preset")
    tiny_backbone(tokenizer.vocabulary_size()).save_to_preset(preset)
    tokenizer.save_to_preset(preset)
    preprocessor = BrainformerCausalLMPreprocessor(tokenizer, sequence_length=32)
    preprocessor.save_to_preset(preset)
    for name in ("config.json", "tokenizer.json", "preprocessor.json"):
        assert os.path.exists(os.path.join(preset, name))
    assert os.path.exists(os.path.join(preset, "assets", "tokenizer", "vocabulary.spm"))

    texts = [CODE, "Grüße 🐍\n"]
    restored = BrainformerTokenizer.from_preset(preset)
    assert isinstance(restored, BrainformerTokenizer)
    assert as_lists(restored(texts)) == as_lists(tokenizer(texts))
    generic = keras_hub.tokenizers.Tokenizer.from_preset(preset)
    assert isinstance(generic, BrainformerTokenizer)

    restored_preprocessor = BrainformerCausalLMPreprocessor.from_preset(preset)
    assert isinstance(restored_preprocessor, BrainformerCausalLMPreprocessor)
    assert restored_preprocessor.sequence_length == 32
    expected, restored_output = preprocessor(texts), restored_preprocessor(texts)
    assert np.array_equal(
        to_numpy(expected[0]["token_ids"]), to_numpy(restored_output[0]["token_ids"])
    )
    assert np.array_equal(to_numpy(expected[1]), to_numpy(restored_output[1]))
    generic = keras_hub.models.CausalLMPreprocessor.from_preset(preset, sequence_length=7)
    assert isinstance(generic, BrainformerCausalLMPreprocessor)
    assert tuple(generic(texts)[0]["token_ids"].shape) == (2, 7)


def test_preset_loads_its_own_vocabulary(tmp_path):
    # A preset with a custom vocabulary and no preprocessor.json: from_preset
    # must use the preset's asset, not the shipped default.
    custom = BrainformerTokenizer(proto=train_tiny_proto(300))
    preset = str(tmp_path / "custom")
    tiny_backbone(300).save_to_preset(preset)
    custom.save_to_preset(preset)
    restored = BrainformerTokenizer.from_preset(preset)
    assert restored.vocabulary_size() == 300
    assert as_lists(restored([CODE])) == as_lists(custom([CODE]))
    preprocessor = BrainformerCausalLMPreprocessor.from_preset(preset, sequence_length=10)
    assert preprocessor.tokenizer.vocabulary_size() == 300
    assert to_numpy(preprocessor([CODE])[0]["token_ids"]).max() < 300


def test_byte_preprocessor_preset_round_trip(tmp_path):
    preset = str(tmp_path / "bytes")
    tiny_backbone(256).save_to_preset(preset)
    preprocessor = BrainformerCausalLMPreprocessor(BrainformerByteTokenizer(), sequence_length=16)
    preprocessor.save_to_preset(preset)
    restored = BrainformerCausalLMPreprocessor.from_preset(preset)
    assert isinstance(restored.tokenizer, BrainformerByteTokenizer)
    texts = ["Grüße\n", "def f():\n    pass\n"]
    assert np.array_equal(
        to_numpy(restored(texts)[0]["token_ids"]), to_numpy(preprocessor(texts)[0]["token_ids"])
    )

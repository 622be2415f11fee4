"""Bad input at the model boundaries gives a clear `ValueError`/`TypeError`
naming what is wrong, before any backend kernel sees it (on JAX, XLA's gather
would silently clamp out-of-range token ids)."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerByteTokenizer
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import BrainformerCausalLMPreprocessor
from keras_brainformer.models import BrainformerTextClassifier
from keras_brainformer.models import BrainformerTextClassifierPreprocessor
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec

VOCAB, D, MAX_LEN, B, T = 64, 16, 16, 2, 8

SPEC = BlockSpec(
    [
        AttentionSpec(num_heads=2),
        MoESpec(4, 16, router="expert_choice", capacity_factor=1.0),
        FeedForwardSpec(16),
    ]
)


def make_backbone(vocabulary_size=VOCAB):
    return BrainformerBackbone(
        vocabulary_size=vocabulary_size,
        hidden_dim=D,
        blocks=SPEC,
        num_layers=1,
        max_sequence_length=MAX_LEN,
    )


@pytest.fixture(scope="module")
def backbone():
    keras.utils.set_random_seed(0)
    return make_backbone()


def inputs(token_ids, padding_mask=None):
    token_ids = np.asarray(token_ids)
    if padding_mask is None:
        padding_mask = np.ones(token_ids.shape, "int32")
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def ids(value=1, shape=(B, T), dtype="int32"):
    return np.full(shape, value).astype(dtype)


# (case id, inputs, error type, words the message must contain)
BAD_INPUTS = [
    ("negative_id", inputs(ids(-1)), ValueError, ["token_ids", "vocabulary_size", "-1"]),
    ("id_eq_vocab", inputs(ids(VOCAB)), ValueError, ["token_ids", "vocabulary_size", "64"]),
    ("id_gt_vocab", inputs(ids(10**6)), ValueError, ["token_ids", "vocabulary_size"]),
    ("float_ids", inputs(ids(1.5, dtype="float32")), TypeError, ["token_ids", "float32"]),
    ("bool_ids", inputs(ids(1, dtype="bool")), TypeError, ["token_ids", "bool"]),
    ("string_ids", inputs(np.full((B, T), "a")), TypeError, ["token_ids", "string"]),
    ("rank_1", inputs(ids(shape=(T,))), ValueError, ["token_ids", "rank 2", "(8,)"]),
    ("rank_3", inputs(ids(shape=(B, T, 1))), ValueError, ["token_ids", "rank 2"]),
    ("too_long", inputs(ids(shape=(B, 2 * MAX_LEN))), ValueError, ["max_sequence_length=16"]),
    ("empty_batch", inputs(ids(shape=(0, T))), ValueError, ["token_ids", "empty batch"]),
    (
        "mask_shape",
        inputs(ids(), np.ones((B, T + 1), "int32")),
        ValueError,
        ["padding_mask", "(2, 9)"],
    ),
]
# The table: every bad input through the backbone call, the one boundary
# check every entry point shares.
BAD_IDS = [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS]
# The wiring: each entry point (predict, generate, fit, the classifier's) is
# shown to reach that check with a value error and a type error in the fast
# tier; the rest of the cross product runs in the slow tier.
WIRING = ("id_eq_vocab", "float_ids")
ENTRY_POINT_IDS = [
    pytest.param(*case[1:], id=case[0], marks=() if case[0] in WIRING else pytest.mark.slow)
    for case in BAD_INPUTS
]


def assert_raises(error_type, words, fn):
    with pytest.raises(error_type) as info:
        fn()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in: {message}"
    # Raised by our boundary check, not by a backend kernel.
    assert "Gather" not in message and "XLA" not in message, message


@pytest.mark.parametrize("x, error_type, words", BAD_IDS)
def test_backbone_call_rejects(backbone, x, error_type, words):
    assert_raises(error_type, words, lambda: backbone(x))


@pytest.fixture(scope="module")
def causal_lm(backbone):
    return BrainformerCausalLM(backbone)


@pytest.mark.parametrize("x, error_type, words", ENTRY_POINT_IDS)
def test_causal_lm_predict_rejects(causal_lm, x, error_type, words):
    assert_raises(error_type, words, lambda: causal_lm.predict(x, verbose=0))


@pytest.mark.parametrize("x, error_type, words", ENTRY_POINT_IDS)
def test_causal_lm_generate_rejects(causal_lm, x, error_type, words):
    assert_raises(error_type, words, lambda: causal_lm.generate(x, stop_token_ids=None))


def test_causal_lm_evaluate_rejects_out_of_range_ids(causal_lm):
    causal_lm.compile(optimizer="adam")
    x = inputs(ids(VOCAB + 3))
    assert_raises(
        ValueError, ["token_ids", "vocabulary_size"],
        lambda: causal_lm.evaluate(x, ids(1), verbose=0),
    )


@pytest.fixture(scope="module")
def classifier(backbone):
    return BrainformerTextClassifier(backbone, num_classes=3)


@pytest.mark.parametrize("x, error_type, words", ENTRY_POINT_IDS)
def test_text_classifier_predict_rejects(classifier, x, error_type, words):
    assert_raises(error_type, words, lambda: classifier.predict(x, verbose=0))


def test_valid_inputs_still_work(backbone, causal_lm, classifier):
    x = inputs(np.arange(B * T).reshape(B, T) % VOCAB)
    assert to_numpy(backbone(x)).shape == (B, T, D)
    assert causal_lm.predict(x, verbose=0).shape == (B, T, VOCAB)
    assert classifier.predict(x, verbose=0).shape == (B, 3)
    # Ids at both ends of the vocabulary and a full-length sequence pass.
    edge = inputs(np.tile([0, VOCAB - 1], (1, MAX_LEN // 2)))
    assert np.all(np.isfinite(to_numpy(backbone(edge))))
    prompt = inputs(
        np.array([[5, 6, 7, 0, 0, 0, 0, 0]] * B, "int32"),
        np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * B, "int32"),
    )
    out = causal_lm.generate(prompt, stop_token_ids=None)
    assert to_numpy(out["token_ids"]).shape == (B, T)
    assert to_numpy(out["token_ids"]).max() < VOCAB


def test_fit_on_tf_data_unaffected(causal_lm):
    """Checks skip symbolic tensors, so `fit` on a `tf.data.Dataset` (and
    the traced train step on any backend) runs as before."""
    tf = pytest.importorskip("tensorflow")
    tokens = np.random.default_rng(0).integers(0, VOCAB, (4, T + 1)).astype("int32")
    data = tf.data.Dataset.from_tensor_slices(
        (inputs(tokens[:, :-1]), tokens[:, 1:])
    ).batch(2)
    causal_lm.compile(optimizer="adam")
    history = causal_lm.fit(data, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


# === fit on concrete data: checked before training starts ===


def weights_of(model):
    return [to_numpy(w).copy() for w in model.weights]


def assert_rejected_without_training(model, error_type, words, fn):
    before = weights_of(model)
    assert_raises(error_type, words, fn)
    for old, new in zip(before, weights_of(model)):
        np.testing.assert_array_equal(old, new)


def next_token_labels(x):
    shape = np.shape(x["token_ids"])
    return np.ones(shape if len(shape) == 2 else (B, T), "int32")


@pytest.mark.parametrize("x, error_type, words", ENTRY_POINT_IDS)
def test_causal_lm_fit_rejects_bad_ids(causal_lm, x, error_type, words):
    assert_rejected_without_training(
        causal_lm, error_type, words,
        lambda: causal_lm.fit(x, next_token_labels(x), epochs=1, verbose=0),
    )


BAD_NEXT_TOKEN_LABELS = [
    pytest.param(
        ids(VOCAB), ValueError, ["`y`", "vocabulary_size=64", "64", "(0, 0)"], id="eq_vocab"
    ),
    pytest.param(ids(-1), ValueError, ["`y`", "vocabulary_size=64", "-1"], id="negative"),
    pytest.param(ids(1.5, dtype="float32"), ValueError, ["`y`", "1.5", "(0, 0)"], id="fraction"),
    pytest.param(np.full((B, T), "a"), TypeError, ["`y`", "<U1"], id="strings"),
]


@pytest.mark.parametrize("y, error_type, words", BAD_NEXT_TOKEN_LABELS)
def test_causal_lm_fit_rejects_bad_labels(causal_lm, y, error_type, words):
    x = inputs(ids())
    assert_rejected_without_training(
        causal_lm, error_type, words, lambda: causal_lm.fit(x, y, verbose=0)
    )
    assert_raises(error_type, words, lambda: causal_lm.evaluate(x, y, verbose=0))


def test_causal_lm_fit_rejects_bad_validation_data(causal_lm):
    x, y = inputs(ids()), ids()
    bad_x = inputs(ids(VOCAB + 1))
    assert_rejected_without_training(
        causal_lm, ValueError, ["validation_data", "token_ids", "vocabulary_size"],
        lambda: causal_lm.fit(x, y, validation_data=(bad_x, y), verbose=0),
    )
    assert_rejected_without_training(
        causal_lm, ValueError, ["validation_data", "`y`", "vocabulary_size"],
        lambda: causal_lm.fit(x, y, validation_data=(x, ids(-3), None), verbose=0),
    )
    # The first out-of-range id is named with its position.
    partly_bad = ids()
    partly_bad[1, 5] = VOCAB + 7
    assert_rejected_without_training(
        causal_lm, ValueError, ["token_ids", str(VOCAB + 7), "(1, 5)"],
        lambda: causal_lm.fit(inputs(partly_bad), y, verbose=0),
    )


def test_causal_lm_fit_on_valid_arrays_trains():
    keras.utils.set_random_seed(0)
    lm = BrainformerCausalLM(make_backbone())
    lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    tokens = np.random.default_rng(0).integers(0, VOCAB, (4, T + 1)).astype("int32")
    x = inputs(tokens[:, :-1])
    before = weights_of(lm)
    history = lm.fit(
        x, tokens[:, 1:], batch_size=2, epochs=1, verbose=0,
        validation_data=(x, tokens[:, 1:]),
    )
    assert np.isfinite(history.history["val_loss"][-1])
    assert any(not np.array_equal(a, b) for a, b in zip(before, weights_of(lm)))


BAD_CLASS_LABELS = [
    pytest.param([0, 3], ValueError, ["`y`", "num_classes=3", "3", "(1,)"], id="eq_num_classes"),
    pytest.param(
        np.array([-1, 0]), ValueError, ["`y`", "num_classes=3", "-1", "(0,)"], id="negative"
    ),
    pytest.param(np.array([[0], [9]]), ValueError, ["`y`", "9", "(1, 0)"], id="column"),
    pytest.param(np.array([0.0, 1.5]), ValueError, ["`y`", "1.5", "(1,)"], id="fraction"),
    pytest.param(np.array([0.0, np.nan]), ValueError, ["`y`", "nan"], id="nan"),
    pytest.param(np.array(["a", "b"]), TypeError, ["`y`", "<U1"], id="strings"),
]


@pytest.mark.parametrize("y, error_type, words", BAD_CLASS_LABELS)
def test_text_classifier_fit_rejects_bad_labels(classifier, y, error_type, words):
    x = inputs(ids())
    assert_rejected_without_training(
        classifier, error_type, words, lambda: classifier.fit(x, y, verbose=0)
    )
    assert_raises(error_type, words, lambda: classifier.evaluate(x, y, verbose=0))
    assert_rejected_without_training(
        classifier, error_type, ["validation_data"] + words,
        lambda: classifier.fit(x, [0, 1], validation_data=(x, y), verbose=0),
    )


@pytest.mark.parametrize("x, error_type, words", ENTRY_POINT_IDS)
def test_text_classifier_fit_rejects_bad_ids(classifier, x, error_type, words):
    assert_rejected_without_training(
        classifier, error_type, words,
        lambda: classifier.fit(x, np.zeros(B, "int32"), verbose=0),
    )


def test_text_classifier_fit_checks_labels_only_for_a_sparse_loss(backbone):
    """One-hot labels with a categorical loss are not class ids: no check."""
    classifier = BrainformerTextClassifier(backbone, num_classes=3)
    classifier.compile(
        optimizer="adam",
        loss=keras.losses.CategoricalCrossentropy(from_logits=True),
        metrics=[keras.metrics.CategoricalAccuracy()],
    )
    one_hot = np.eye(3, dtype="float32")[[0, 2]]
    history = classifier.fit(inputs(ids()), one_hot, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_text_classifier_fit_from_text_checks_labels():
    tokenizer = BrainformerByteTokenizer()
    keras.utils.set_random_seed(0)
    classifier = BrainformerTextClassifier(
        make_backbone(tokenizer.vocabulary_size()),
        num_classes=2,
        preprocessor=BrainformerTextClassifierPreprocessor(tokenizer, sequence_length=T),
    )
    texts = ["import os", "x = 1"]
    assert_rejected_without_training(
        classifier, ValueError, ["`y`", "num_classes=2", "5"],
        lambda: classifier.fit(texts, [0, 5], verbose=0),
    )
    history = classifier.fit(texts, [0, 1], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


# === Preprocessor ===


@pytest.mark.parametrize(
    "kwargs, error_type, field",
    [
        ({"sequence_length": 0}, ValueError, "sequence_length"),
        ({"sequence_length": -4}, ValueError, "sequence_length"),
        ({"sequence_length": 8.5}, TypeError, "sequence_length"),
        ({"sequence_length": None}, TypeError, "sequence_length"),
        ({"sequence_length": "8"}, TypeError, "sequence_length"),
        ({"add_start_token": "yes"}, TypeError, "add_start_token"),
        ({"add_end_token": 1}, TypeError, "add_end_token"),
    ],
)
def test_preprocessor_rejects_bad_arguments(kwargs, error_type, field):
    assert_raises(
        error_type, [field], lambda: BrainformerCausalLMPreprocessor(**kwargs)
    )


@pytest.fixture(scope="module")
def preprocessor():
    return BrainformerCausalLMPreprocessor(sequence_length=T)


@pytest.mark.parametrize(
    "x",
    [
        pytest.param(np.array([[1, 2, 3]]), id="int_ids"),
        pytest.param([1, 2, 3], id="int_list"),
        pytest.param(np.array([1.5, 2.5]), id="floats"),
        pytest.param(None, id="none"),
    ],
)
def test_preprocessor_rejects_non_text(preprocessor, x):
    words = ["raw text", "string"]
    assert_raises(TypeError, words, lambda: preprocessor(x))
    assert_raises(TypeError, words, lambda: preprocessor.generate_preprocess(x))


def test_generate_from_text_checks_the_model_limits(preprocessor):
    """Strings go through the preprocessor; its output is then checked
    against the model: a vocabulary the model cannot embed, or a
    `max_length` beyond `max_sequence_length`, is an error, not a clamp."""
    keras.utils.set_random_seed(0)
    mismatched = BrainformerCausalLM(make_backbone(VOCAB), preprocessor=preprocessor)
    assert_raises(
        ValueError,
        ["token_ids", f"vocabulary_size={VOCAB}"],
        lambda: mismatched.generate(["def main():"], max_length=T),
    )
    vocab = preprocessor.tokenizer.vocabulary_size()
    matched = BrainformerCausalLM(make_backbone(vocab), preprocessor=preprocessor)
    assert_raises(
        ValueError,
        ["max_sequence_length"],
        lambda: matched.generate(["def main():"], max_length=2 * MAX_LEN),
    )
    assert isinstance(matched.generate("def main():", max_length=T), str)


@pytest.fixture(scope="module")
def text_lm(preprocessor):
    keras.utils.set_random_seed(0)
    vocab = preprocessor.tokenizer.vocabulary_size()
    return BrainformerCausalLM(make_backbone(vocab), preprocessor=preprocessor)


LONG_PROMPT = "def main(): return 1 " * 2  # 14 tokens with the start token
TOO_LONG_PROMPT = "def main(): return 1 " * 4  # 26 tokens, more than MAX_LEN


@pytest.mark.parametrize(
    "kwargs, error_type, words",
    [
        # keras-hub returned the prompt cut to `max_length`, nothing generated.
        (dict(inputs=LONG_PROMPT, max_length=10), ValueError,
         ["14 tokens", "max_length=10 leaves no room", "above 14 (at most 16)",
          "shorter prompt"]),
        # Same with the default length (the preprocessor's sequence_length).
        (dict(inputs=[LONG_PROMPT]), ValueError,
         ["max_length=None (the preprocessor's sequence_length 8)", "above 14"]),
        # No length could generate from it: say what is possible.
        (dict(inputs=TOO_LONG_PROMPT, max_length=MAX_LEN), ValueError,
         ["26 tokens", f"max_sequence_length {MAX_LEN}", "prompt of at most 14 tokens"]),
        # keras-hub ignored 0 (a full sample came back).
        (dict(inputs="def ", max_length=0), ValueError, ["max_length=0", f"[1, {MAX_LEN}]"]),
        (dict(inputs="def ", max_length=-3), ValueError, ["max_length=-3", f"[1, {MAX_LEN}]"]),
        (dict(inputs="def ", max_length=2 * MAX_LEN), ValueError,
         ["max_length=32", f"max_sequence_length {MAX_LEN}"]),
        (dict(inputs="def ", max_length=4.0), TypeError, ["max_length=4.0", "float"]),
        (dict(inputs="def ", max_length=True), TypeError, ["max_length=True", "bool"]),
        # keras-hub failed with "rank 2 ... shape (8,)".
        (dict(inputs=[]), ValueError, ["`inputs` holds no prompt", "Received: []"]),
        (dict(inputs=np.array([], dtype=str)), ValueError, ["`inputs` holds no prompt"]),
    ],
    ids=["longer_than_max_length", "longer_than_default", "longer_than_the_model",
         "zero", "negative", "beyond_the_model", "float", "bool", "empty_list",
         "empty_array"],
)
def test_generate_from_text_rejects_bad_arguments(text_lm, kwargs, error_type, words):
    assert_raises(error_type, words, lambda: text_lm.generate(**kwargs))


def test_generate_from_text_still_fills_to_max_length(text_lm):
    text_lm.compile(sampler="greedy")
    out = text_lm.generate(["def ", "import"], max_length=T, stop_token_ids=None)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    assert out[0].startswith("def")


def test_generate_from_token_ids_refuses_a_length_it_would_ignore(causal_lm):
    prompt = inputs(ids(shape=(B, T)), np.array([[1] * 3 + [0] * (T - 3)] * B, "int32"))
    assert_raises(
        ValueError, ["length 8", "max_length=12 would be ignored"],
        lambda: causal_lm.generate(prompt, max_length=12, stop_token_ids=None),
    )
    out = causal_lm.generate(prompt, max_length=T, stop_token_ids=None)
    assert to_numpy(out["token_ids"]).shape == (B, T)


# === Text-classifier preprocessor ===


@pytest.mark.parametrize(
    "kwargs, error_type, field",
    [
        ({"sequence_length": 0}, ValueError, "sequence_length"),
        ({"sequence_length": -4}, ValueError, "sequence_length"),
        ({"sequence_length": 2}, ValueError, "sequence_length"),  # only </s>, <s>
        ({"sequence_length": 8.5}, TypeError, "sequence_length"),
        ({"sequence_length": None}, TypeError, "sequence_length"),
        ({"sequence_length": "8"}, TypeError, "sequence_length"),
        ({"add_start_token": "yes"}, TypeError, "add_start_token"),
        ({"add_end_token": 1}, TypeError, "add_end_token"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
    ],
)
def test_classifier_preprocessor_rejects_bad_arguments(kwargs, error_type, field):
    kwargs = {"tokenizer": BrainformerByteTokenizer(), **kwargs}
    assert_raises(
        error_type, [field], lambda: BrainformerTextClassifierPreprocessor(**kwargs)
    )


@pytest.fixture(scope="module")
def classifier_preprocessor():
    return BrainformerTextClassifierPreprocessor(
        BrainformerByteTokenizer(), sequence_length=T, num_classes=3
    )


@pytest.mark.parametrize(
    "x, error_type, words",
    [
        pytest.param(np.array([[1, 2, 3]]), TypeError, ["raw text", "int"], id="int_ids"),
        pytest.param([1, 2, 3], TypeError, ["raw text", "int"], id="int_list"),
        pytest.param(np.array([1.5, 2.5]), TypeError, ["raw text", "float"], id="floats"),
        pytest.param(7, TypeError, ["raw text", "7"], id="int"),
        pytest.param(None, TypeError, ["raw text", "None"], id="none"),
        pytest.param([["a", "b"]], TypeError, ["raw text", "list"], id="nested_list"),
        pytest.param(inputs(ids()), TypeError, ["raw text", "dict", "token_ids"], id="dict"),
        pytest.param(np.array([["a"], ["b"]]), ValueError, ["1-D", "(2, 1)"], id="rank_2"),
        pytest.param([], ValueError, ["empty batch"], id="empty_list"),
        pytest.param(np.array([], dtype=str), ValueError, ["empty batch"], id="empty_array"),
    ],
)
def test_classifier_preprocessor_rejects_non_text(classifier_preprocessor, x, error_type, words):
    assert_raises(error_type, words, lambda: classifier_preprocessor(x))


@pytest.mark.parametrize("y", [[0, 3], [-1, 0], [0.5, 1.0]])
def test_classifier_preprocessor_rejects_bad_labels(classifier_preprocessor, y):
    assert_raises(
        ValueError, ["`y`", "num_classes=3"],
        lambda: classifier_preprocessor(["a", "b"], y),
    )


def test_classifier_preprocessor_accepts_text(classifier_preprocessor):
    x, y = classifier_preprocessor(["import os", "x = 1"], [0, 2])
    assert to_numpy(x["token_ids"]).shape == (2, T)
    assert to_numpy(classifier_preprocessor(np.array(["a", "b"]))["token_ids"]).shape == (2, T)
    config = classifier_preprocessor.get_config()
    restored = BrainformerTextClassifierPreprocessor.from_config(config)
    assert restored.num_classes == 3
    # Without `num_classes`, the config has no such key (older configs load).
    plain = BrainformerTextClassifierPreprocessor(BrainformerByteTokenizer(), sequence_length=T)
    assert "num_classes" not in plain.get_config()

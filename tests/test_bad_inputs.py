"""Bad input at the model boundaries gives a clear `ValueError`/`TypeError`
naming what is wrong, before any backend kernel sees it (on JAX, XLA's gather
would silently clamp out-of-range token ids)."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_brainformer.layers import AttentionSpec
from keras_brainformer.layers import BlockSpec
from keras_brainformer.layers import FeedForwardSpec
from keras_brainformer.layers import MoESpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import BrainformerCausalLMPreprocessor
from keras_brainformer.models import BrainformerTextClassifier

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
        num_blocks=1,
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
BAD_IDS = [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS]


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


@pytest.mark.parametrize("x, error_type, words", BAD_IDS)
def test_causal_lm_predict_rejects(causal_lm, x, error_type, words):
    assert_raises(error_type, words, lambda: causal_lm.predict(x, verbose=0))


@pytest.mark.parametrize("x, error_type, words", BAD_IDS)
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


@pytest.mark.parametrize("x, error_type, words", BAD_IDS)
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

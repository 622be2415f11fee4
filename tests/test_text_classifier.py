"""BrainformerTextClassifier and its preprocessor: last-token pooling, fit from
raw strings, presets, config round trips, validation."""

import copy

import keras
import keras_hub
import numpy as np
import pytest
from conftest import inference_call
from conftest import to_numpy

from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerByteTokenizer
from keras_brainformer.models import BrainformerTextClassifier
from keras_brainformer.models import BrainformerTextClassifierPreprocessor
from keras_brainformer.models import BrainformerTokenizer
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec
from keras_brainformer.models.brainformer.brainformer_text_classifier import last_token_selection
from keras_brainformer.training.classification_data import stdlib_docstring_dataset

D = 16
SPEC = BlockSpec(
    [
        AttentionSpec(num_heads=2),
        MoESpec(4, 24, router="expert_choice", capacity_factor=1.0),
        FeedForwardSpec(24),
    ]
)

# A toy set separable by its first word: imports vs assignments.
TEXTS = [
    "import os",
    "import re",
    "import json",
    "import sys",
    "x = 1",
    "y = x + 2",
    "total = 0",
    "name = 'a'",
]
LABELS = [0, 0, 0, 0, 1, 1, 1, 1]


def tiny_backbone(vocabulary_size, seed=0, num_layers=2):
    keras.utils.set_random_seed(seed)
    return BrainformerBackbone(
        vocabulary_size=vocabulary_size, hidden_dim=D, blocks=SPEC, num_layers=num_layers
    )


def tiny_classifier(num_classes=2, sequence_length=12, seed=0, **kwargs):
    tokenizer = BrainformerTokenizer()
    preprocessor = BrainformerTextClassifierPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    backbone = tiny_backbone(tokenizer.vocabulary_size(), seed=seed, num_layers=1)
    return BrainformerTextClassifier(
        backbone, num_classes=num_classes, preprocessor=preprocessor, **kwargs
    )


def id_batch(lengths, total, seed=1, vocabulary_size=64):
    rng = np.random.default_rng(seed)
    token_ids = rng.integers(1, vocabulary_size, (len(lengths), total)).astype("int32")
    mask = np.zeros((len(lengths), total), "int32")
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    return {"token_ids": token_ids, "padding_mask": mask}


# --- Pooling ------------------------------------------------------------------------------


def test_selection_marks_exactly_the_last_real_token():
    mask = np.array(
        [
            [1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1],
            [1, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],  # no real token: position 0
            [0, 0, 1, 1, 0],  # left and right padding
        ],
        "int32",
    )
    expected = np.zeros_like(mask, dtype=bool)
    for row, col in enumerate([2, 4, 0, 0, 3]):
        expected[row, col] = True
    np.testing.assert_array_equal(to_numpy(last_token_selection(mask)), expected)
    np.testing.assert_array_equal(to_numpy(last_token_selection(mask.astype(bool))), expected)


def test_pooling_picks_exactly_the_last_real_token():
    vocab = 64
    classifier = BrainformerTextClassifier(tiny_backbone(vocab), num_classes=3)

    forward = inference_call(classifier)  # compiled on JAX, eager on TensorFlow

    def logits_of(x):
        return to_numpy(forward(x))

    lengths = [4, 7, 10, 1]
    x = id_batch(lengths, total=10, vocabulary_size=vocab)
    logits = logits_of(x)
    assert logits.shape == (4, 3)

    # The same computation by hand: backbone states at index sum(mask) - 1.
    hidden = to_numpy(inference_call(classifier.backbone)(x))
    pooled = hidden[np.arange(4), np.array(lengths) - 1]
    kernel, bias = (to_numpy(w) for w in classifier.output_dense.weights)
    np.testing.assert_allclose(logits, pooled @ kernel + bias, rtol=1e-5, atol=1e-6)

    # Other ids at the padded positions, and more padding: the same logits.
    other = id_batch(lengths, total=10, seed=7, vocabulary_size=vocab)
    padded_ids = np.where(x["padding_mask"] == 1, x["token_ids"], other["token_ids"])
    np.testing.assert_allclose(
        logits_of(dict(x, token_ids=padded_ids)), logits, rtol=1e-5, atol=1e-6
    )
    longer = {
        "token_ids": np.concatenate([x["token_ids"], np.zeros((4, 6), "int32")], axis=1),
        "padding_mask": np.concatenate([x["padding_mask"], np.zeros((4, 6), "int32")], axis=1),
    }
    np.testing.assert_allclose(logits_of(longer), logits, rtol=1e-5, atol=1e-6)

    # But the last real token itself matters.
    last = x["token_ids"].copy()
    last[0, lengths[0] - 1] = (last[0, lengths[0] - 1] % (vocab - 1)) + 1
    moved = logits_of(dict(x, token_ids=last))
    assert not np.allclose(moved[0], logits[0])
    np.testing.assert_allclose(moved[1:], logits[1:], rtol=1e-5, atol=1e-6)


# --- Preprocessor ------------------------------------------------------------------------


def test_preprocessor_keeps_the_end_token_when_truncating():
    tokenizer = BrainformerTokenizer()
    preprocessor = BrainformerTextClassifierPreprocessor(tokenizer, sequence_length=6)
    long_text = "def function_with_a_long_name(argument, other_argument):\n    pass\n"
    x, y = preprocessor([long_text, "x"], [1, 0])
    ids, mask = to_numpy(x["token_ids"]), to_numpy(x["padding_mask"])
    assert ids.shape == mask.shape == (2, 6)
    full = list(to_numpy(tokenizer(long_text)))
    assert ids[0].tolist() == [2] + full[:4] + [3]
    assert mask[0].all()
    assert ids[1, 0] == 2 and ids[1, mask[1].sum() - 1] == 3
    assert (ids[1, mask[1].sum():] == 0).all()
    np.testing.assert_array_equal(to_numpy(y), [1, 0])

    no_start = BrainformerTextClassifierPreprocessor(
        tokenizer, sequence_length=6, add_start_token=False
    )
    assert to_numpy(no_start([long_text])["token_ids"])[0].tolist() == full[:5] + [3]


def test_preprocessor_with_byte_tokenizer_and_tf_data():
    import tensorflow as tf

    preprocessor = BrainformerTextClassifierPreprocessor(
        BrainformerByteTokenizer(), sequence_length=8
    )
    texts = ["a long text that is truncated", "ab"]
    eager = to_numpy(preprocessor(texts)["token_ids"])
    assert eager.tolist() == [[2, 97, 32, 108, 111, 110, 103, 3], [2, 97, 98, 3, 0, 0, 0, 0]]
    ds = tf.data.Dataset.from_tensor_slices((texts, [0, 1])).batch(2).map(preprocessor)
    (x, y) = next(iter(ds))
    np.testing.assert_array_equal(x["token_ids"].numpy(), eager)
    np.testing.assert_array_equal(x["padding_mask"].numpy(), eager != 0)

    restored = BrainformerTextClassifierPreprocessor.from_config(preprocessor.get_config())
    assert isinstance(restored.tokenizer, BrainformerByteTokenizer)
    np.testing.assert_array_equal(to_numpy(restored(texts)["token_ids"]), eager)


def test_preprocessor_validation():
    with pytest.raises(ValueError, match="sequence_length"):
        BrainformerTextClassifierPreprocessor(BrainformerByteTokenizer(), sequence_length=2)
    preprocessor = BrainformerTextClassifierPreprocessor(
        BrainformerByteTokenizer(), sequence_length=8
    )
    with pytest.raises(ValueError, match="one text segment"):
        preprocessor((["a"], ["b"]), [0])


# --- Training ----------------------------------------------------------------------------


def test_fit_from_raw_strings_learns_a_separable_toy_set_given_grouped_by_class():
    """Raw strings through the preprocessor, and the fine-tuning trap: the
    list is in file order, grouped by class, fit with the default
    `shuffle=True`. keras-hub's pipeline batches it in file order; our
    tasks shuffle it every epoch, so both classes are learned (unshuffled,
    the last steps see one class only: this fails without the shuffle)."""
    keras.utils.set_random_seed(0)
    pairs = sorted(zip(TEXTS, LABELS), key=lambda pair: pair[1])
    texts = [t for t, label in pairs for _ in range(10)]
    labels = [label for t, label in pairs for _ in range(10)]
    assert labels == sorted(labels)
    classifier = tiny_classifier(sequence_length=8)
    classifier.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = classifier.evaluate(TEXTS, LABELS, batch_size=8, verbose=0, return_dict=True)
    # 20 steps of batch 4 over the toy set.
    history = classifier.fit(texts, labels, batch_size=4, epochs=1, verbose=0)
    after = classifier.evaluate(TEXTS, LABELS, batch_size=8, verbose=0, return_dict=True)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(after["loss"])
    assert after["loss"] < 0.5 * before["loss"]
    assert after["sparse_categorical_accuracy"] == 1.0
    predictions = to_numpy(classifier.predict(["import io", "z = 3"], verbose=0))
    assert predictions.shape == (2, 2)


def test_set_inference_routing():
    classifier = BrainformerTextClassifier(tiny_backbone(64), num_classes=2)
    assert classifier.backbone.inference_routing == "causal"
    classifier.set_inference_routing("as_trained")
    assert classifier.backbone.inference_routing == "as_trained"
    assert classifier.predict_function is None and classifier.test_function is None
    with pytest.raises(ValueError, match="inference_routing"):
        classifier.set_inference_routing("lookahead")


# --- Presets and configs -------------------------------------------------------------------


def test_preset_round_trip(tmp_path):
    classifier = tiny_classifier(num_classes=3, dropout=0.1)
    preset = str(tmp_path / "classifier")
    classifier.save_to_preset(preset)
    expected = to_numpy(classifier.predict(TEXTS, verbose=0))

    restored = BrainformerTextClassifier.from_preset(preset)
    assert isinstance(restored.preprocessor, BrainformerTextClassifierPreprocessor)
    assert restored.preprocessor.sequence_length == 12
    assert (restored.num_classes, restored.dropout) == (3, 0.1)
    np.testing.assert_array_equal(to_numpy(restored.predict(TEXTS, verbose=0)), expected)

    generic = keras_hub.models.TextClassifier.from_preset(preset)
    assert isinstance(generic, BrainformerTextClassifier)
    np.testing.assert_array_equal(to_numpy(generic.predict(TEXTS, verbose=0)), expected)

    # `num_classes` given: keras-hub's rule is a fresh head on the saved backbone.
    new_head = BrainformerTextClassifier.from_preset(preset, num_classes=5)
    assert new_head.num_classes == 5
    # (Trainable weights: routing statistics are state that `predict` updates.)
    for a, b in zip(new_head.backbone.trainable_weights, classifier.backbone.trainable_weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert to_numpy(new_head.predict(TEXTS, verbose=0)).shape == (len(TEXTS), 5)


def test_classifier_from_a_backbone_only_preset(tmp_path):
    tokenizer = BrainformerTokenizer()
    backbone = tiny_backbone(tokenizer.vocabulary_size(), num_layers=1)
    preset = str(tmp_path / "backbone")
    backbone.save_to_preset(preset)
    tokenizer.save_to_preset(preset)
    classifier = BrainformerTextClassifier.from_preset(preset, num_classes=4)
    assert isinstance(classifier.preprocessor, BrainformerTextClassifierPreprocessor)
    for a, b in zip(classifier.backbone.trainable_weights, backbone.trainable_weights):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert to_numpy(classifier.predict(TEXTS[:2], verbose=0)).shape == (2, 4)


def test_from_a_zoo_preset_name():
    classifier = BrainformerTextClassifier.from_preset("brainformer1_tiny", num_classes=3)
    assert isinstance(classifier.preprocessor, BrainformerTextClassifierPreprocessor)
    assert isinstance(classifier.preprocessor.tokenizer, BrainformerTokenizer)
    assert classifier.backbone.hidden_dim == 64 and classifier.backbone.moe_layers
    assert classifier.output_dense.units == 3


def test_config_round_trip_and_softmax_activation():
    classifier = tiny_classifier(num_classes=4, activation="softmax", dropout=0.2)
    config = classifier.get_config()
    for key in ("backbone", "preprocessor", "num_classes", "activation", "dropout"):
        assert key in config
    assert (config["num_classes"], config["activation"], config["dropout"]) == (4, "softmax", 0.2)
    restored = BrainformerTextClassifier.from_config(copy.deepcopy(config))
    restored.set_weights(classifier.get_weights())
    assert restored.get_config() == config
    x = restored.preprocessor(TEXTS)
    probabilities = to_numpy(inference_call(restored)(x))
    np.testing.assert_allclose(probabilities.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(probabilities, to_numpy(inference_call(classifier)(x)))
    # The default compile sees the activation: probabilities, not logits.
    assert restored.loss.get_config()["from_logits"] is False
    assert classifier.loss.get_config()["from_logits"] is False
    logits_classifier = BrainformerTextClassifier(tiny_backbone(64), num_classes=2)
    assert logits_classifier.loss.get_config()["from_logits"] is True


@pytest.mark.parametrize("num_classes", [0, -2, 2.5, "3", True, None])
def test_bad_num_classes_raises(num_classes):
    with pytest.raises(ValueError, match="num_classes"):
        BrainformerTextClassifier(tiny_backbone(64), num_classes=num_classes)


def test_bad_dropout_raises():
    with pytest.raises(ValueError, match="dropout"):
        BrainformerTextClassifier(tiny_backbone(64), num_classes=2, dropout=1.5)


# --- The docstring data set --------------------------------------------------------------


def test_stdlib_docstring_dataset_is_deterministic_and_deduplicated():
    data = stdlib_docstring_dataset(modules=("json", "tarfile"))
    assert data == stdlib_docstring_dataset(modules=("json", "tarfile"))
    assert data.label_names == ("json", "tarfile") and data.num_classes == 2
    assert set(data.train_labels) == set(data.validation_labels) == {0, 1}
    texts = data.train_texts + data.validation_texts
    assert len(set(texts)) == len(texts)  # unique, so no text in both splits
    assert 0.1 < len(data.validation_texts) / len(texts) < 0.35
    assert all(len(text) >= 40 for text in texts)
    counts = data.class_counts("validation")
    assert data.majority_baseline() == max(counts.values()) / len(data.validation_texts)
    # The split of a text does not depend on which other modules are loaded.
    more = stdlib_docstring_dataset(modules=("tarfile", "json", "http"))
    assert set(data.validation_texts) <= set(more.validation_texts)
    with pytest.raises(ValueError, match="itertools"):
        stdlib_docstring_dataset(modules=("json", "itertools"))

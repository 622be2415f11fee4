"""The byte-level corpus and the README's main job (`keras-brainformer-demo`)."""

import math

import numpy as np
import pytest

from keras_brainformer.cli import demo
from keras_brainformer.training.builtin_text import byte_lm_arrays
from keras_brainformer.training.builtin_text import pydoc_text


def test_byte_arrays_are_shifted_windows_with_a_held_out_tail():
    text = "abcdefghij" * 10  # 100 bytes -> 9 windows of 11
    (x, y), (x_val, y_val) = byte_lm_arrays(text, sequence_length=10, validation_fraction=0.2)
    assert x["token_ids"].shape == (7, 10) and x_val["token_ids"].shape == (2, 10)
    np.testing.assert_array_equal(x["token_ids"][:, 1:], y[:, :-1])
    data = np.frombuffer(text.encode(), np.uint8)
    np.testing.assert_array_equal(x_val["token_ids"][-1], data[88:98])
    assert (x["padding_mask"] == 1).all()
    with pytest.raises(ValueError, match="too short"):
        byte_lm_arrays("abc", sequence_length=10)
    for fraction in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="validation_fraction"):
            byte_lm_arrays(text, sequence_length=10, validation_fraction=fraction)
    (x, _), _ = byte_lm_arrays(text, sequence_length=10, validation_fraction=0.99)
    assert len(x["token_ids"]) >= 1


def test_pydoc_text_is_deterministic_and_large():
    text = pydoc_text()
    assert len(text) > 100_000 and text == pydoc_text()


@pytest.mark.slow
def test_demo_trains_and_returns_a_finite_loss(capsys):
    loss = demo.main(
        ["--steps", "4", "--sequence-length", "32", "--hidden-dim", "16", "--num-blocks", "1"]
    )
    assert math.isfinite(loss) and loss < math.log(256) + 0.5
    out = capsys.readouterr().out
    assert "Validation loss" in out and "after 4 steps" in out
    assert "causal routing" in out and "trained expert-choice routing" in out

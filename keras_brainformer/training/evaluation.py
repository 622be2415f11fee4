"""Held-out evaluation of a trained causal LM on a fixed text.

Used to record a shipped preset's loss and, in the tests, to check that a
loaded preset (weights, tokenizer, routing) still gives that loss.
"""

import keras
import numpy as np

from keras_brainformer.training.corpus import Document
from keras_brainformer.training.corpus import pack
from keras_brainformer.training.corpus import tokenize_documents


def heldout_windows(text, tokenizer, sequence_length=128, max_windows=32):
    """The first `max_windows` packed windows `[N, sequence_length + 1]` of
    `text` (tokenized as one document, followed by the end token)."""
    stream = tokenize_documents([Document("heldout", text)], tokenizer)
    return pack(stream, sequence_length)[:max_windows]


def heldout_loss(lm, text, sequence_length=128, max_windows=32, batch_size=8):
    """Mean next-token cross-entropy (nats/token) of `lm` on `text`, with the
    causal inference routing, over the first `max_windows` windows.

    Args:
        lm: a `BrainformerCausalLM` with a preprocessor (its tokenizer is used).
        text: the held-out text.
    """
    windows = heldout_windows(text, lm.preprocessor.tokenizer, sequence_length, max_windows)
    return windows_loss(lm, windows, batch_size)


def windows_loss(lm, windows, batch_size=8):
    """Mean next-token cross-entropy (nats/token) of `lm` over token
    `windows` `[N, length + 1]` (inputs `[:, :-1]`, labels `[:, 1:]`)."""

    losses = []
    for start in range(0, len(windows), batch_size):
        rows = windows[start : start + batch_size]
        # Called directly: `predict` would send token ids through the
        # preprocessor (which expects strings).
        logits = lm({"token_ids": rows[:, :-1], "padding_mask": np.ones_like(rows[:, :-1])})
        losses.append(
            keras.ops.convert_to_numpy(
                keras.losses.sparse_categorical_crossentropy(
                    rows[:, 1:], keras.ops.cast(logits, "float32"), from_logits=True
                )
            )
        )
    return float(np.mean(np.concatenate(losses)))

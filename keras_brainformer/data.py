"""Text every Python install has, as a small byte-level language-modelling corpus.

`pydoc_data.topics` holds about 0.5 MB of the Python reference manual's prose
(the text behind `help("topics")`). Tokens are UTF-8 bytes (vocabulary 256),
which needs no trained tokenizer and no download.
"""

import numpy as np

BYTE_VOCABULARY_SIZE = 256


def pydoc_text():
    """The Python reference topics as one string, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def byte_lm_arrays(text, sequence_length, validation_fraction=0.05):
    """Packs `text` into `(x, y)` next-byte prediction arrays.

    The byte stream is cut into windows of `sequence_length + 1` bytes; the
    last `validation_fraction` of the windows (a contiguous tail of the text,
    so deterministic and disjoint) is the validation split.

    Returns:
        `(train, validation)`, each `(x, y)` with `x = {"token_ids",
        "padding_mask"}` int32 `[N, sequence_length]` and `y` the next bytes.
    """
    if sequence_length < 1:
        raise ValueError(f"`sequence_length` must be >= 1. Received: {sequence_length}")
    if not 0 < validation_fraction < 1:
        raise ValueError(
            "`validation_fraction` must be in (0, 1). "
            f"Received: validation_fraction={validation_fraction}"
        )
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype("int32")
    windows = len(data) // (sequence_length + 1)
    if windows < 2:
        raise ValueError(
            f"The text ({len(data)} bytes) is too short for two sequences of "
            f"length {sequence_length}."
        )
    data = data[: windows * (sequence_length + 1)].reshape(windows, sequence_length + 1)
    num_validation = min(windows - 1, max(1, int(round(windows * validation_fraction))))

    def split(rows):
        x = {"token_ids": rows[:, :-1], "padding_mask": np.ones_like(rows[:, :-1])}
        return x, rows[:, 1:]

    return split(data[:-num_validation]), split(data[-num_validation:])

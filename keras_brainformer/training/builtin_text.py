"""Text every Python install has, as a small byte-level language-modelling corpus.

`pydoc_data.topics` holds about 0.5 MB of the Python reference manual's prose
(the text behind `help("topics")`). Tokens are UTF-8 bytes (vocabulary 256),
which needs no trained tokenizer and no download.
"""

import os
import zlib

import numpy as np

BYTE_VOCABULARY_SIZE = 256


def pydoc_text():
    """The Python reference topics as one string, in a fixed order."""
    from pydoc_data.topics import topics  # 0.5 MB of text: imported when asked for

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


STDLIB_EXCLUDED_DIRECTORIES = (
    "__pycache__",
    "encodings",
    "idlelib",
    "pydoc_data",
    "site-packages",
    "test",
    "tests",
)


def stdlib_source_files(max_bytes=4_000_000, held_out=False, held_out_modulus=16):
    """A deterministic selection of the standard library's `.py` sources.

    Files under `os.path.dirname(os.__file__)` are eligible unless they lie
    in a directory named in `STDLIB_EXCLUDED_DIRECTORIES` (test suites, IDLE,
    installed packages, the `encodings` code-page tables and `pydoc_data`,
    whose prose `pydoc_text()` already returns). Each eligible file is keyed
    by the CRC-32 of its path relative to the standard-library root: files
    whose key is divisible by `held_out_modulus` form the held-out split
    (about 1/16 of the files), the others the training split. Within a split,
    files are visited in key order (a fixed pseudo-random order that does not
    favour the alphabet's start) and taken until adding the next one would
    exceed `max_bytes`.

    Args:
        max_bytes: int or None. Cap on the total size of the returned files.
        held_out: bool. Return the held-out split instead of the training one.
        held_out_modulus: int. One file in about this many is held out.

    Returns:
        A list of absolute file paths, sorted.
    """
    root = os.path.dirname(os.__file__)
    candidates = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(
            d for d in subdirectories if d not in STDLIB_EXCLUDED_DIRECTORIES
        )
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            key = zlib.crc32(relative.encode("utf-8"))
            if (key % held_out_modulus == 0) == held_out:
                candidates.append((key, relative, path))
    selected = []
    total = 0
    for _, _, path in sorted(candidates):
        size = os.path.getsize(path)
        if max_bytes is not None and total + size > max_bytes:
            break
        selected.append(path)
        total += size
    return sorted(selected)

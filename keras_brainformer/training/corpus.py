"""Language-modelling data for `keras-brainformer train`.

The pipeline is: documents (the embedded Python corpus, `default_documents()`,
or the user's files, `read_documents()`) -> a document-level train/validation
split (`split_documents()`, stable under adding documents) -> one token
stream per split, documents separated by the tokenizer's end token
(`tokenize_documents()`) -> non-overlapping windows of `sequence_length + 1`
tokens (`pack()`) -> `LanguageModelData`, whose `train_dataset()` is an
infinite, seeded, resumable `tf.data` pipeline and whose
`validation_dataset()` is a fixed, finite one.
`build_language_model_data()` runs all of it.

Everything is deterministic: the same files, tokenizer and arguments give the
same windows, and the same `seed` gives the same batch at every global step,
whatever step training (re)starts from.
"""

import codecs
import hashlib
import os
import zlib
from typing import NamedTuple

import keras
import numpy as np

from keras_brainformer.training.builtin_text import stdlib_source_files

DEFAULT_EXTENSIONS = (".py", ".txt", ".md", ".rst")
# A NUL byte among a file's first bytes marks it as binary.
_BINARY_PROBE_BYTES = 8192


class CorpusTooSmallError(ValueError):
    """A split of the corpus packs to no window. The message names this
    module's arguments; the fields let a caller name its own (the command
    line names its flags).

    Attributes:
        split: `"train"` or `"validation"`.
        documents, tokens: the split's documents and tokens.
        window: tokens in one window (`sequence_length + 1`).
        total_bytes, total_documents: the corpus used.
        capped: whether `max_bytes` cut the corpus.
        source: the corpus, in words.
    """

    def __init__(self, message, **fields):
        super().__init__(message)
        for name, value in fields.items():
            setattr(self, name, value)


class Document(NamedTuple):
    """One text of the corpus: a stable `name` (what splits are keyed on) and its `text`."""

    name: str
    text: str


def _utf8_size(text):
    return len(text.encode("utf-8"))


def cap_documents(documents, max_bytes):
    """The documents, in order, up to `max_bytes` bytes of UTF-8 text in all.

    Documents are taken in order; the one that crosses the cap is cut to the
    bytes left (at a character boundary) and is the last one taken. With
    `max_bytes=None` the documents are returned unchanged.
    """
    documents = list(documents)
    if max_bytes is None:
        return documents
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise ValueError(
            f"`max_bytes` must be a positive integer or None. Received: max_bytes={max_bytes!r}"
        )
    capped = []
    left = max_bytes
    for document in documents:
        data = document.text.encode("utf-8")
        if len(data) >= left:
            text = data[:left].decode("utf-8", errors="ignore")
            if text:
                capped.append(Document(document.name, text))
            break
        capped.append(document)
        left -= len(data)
    return capped


def _interleave_by_progress(first, second):
    """Merges two document lists in proportion to their sizes: the next
    document is the one that leaves its list's used fraction of bytes the
    smaller (ties go to `first`), so small documents are not held back behind
    a large one of the other list."""
    sizes = [[_utf8_size(d.text) for d in first], [_utf8_size(d.text) for d in second]]
    totals = [max(1, sum(s)) for s in sizes]
    lists = [first, second]
    positions = [0, 0]
    used = [0, 0]
    merged = []
    while positions[0] < len(first) or positions[1] < len(second):
        candidates = [i for i in (0, 1) if positions[i] < len(lists[i])]
        i = min(candidates, key=lambda i: ((used[i] + sizes[i][positions[i]]) / totals[i], i))
        merged.append(lists[i][positions[i]])
        used[i] += sizes[i][positions[i]]
        positions[i] += 1
    return merged


def default_documents(max_bytes=None):
    """The embedded corpus: Python's reference prose and standard-library code.

    Prose: one `Document` per `pydoc_data.topics` entry (about 0.47 MB in all),
    named `"pydoc:<topic>"`. Code: the standard-library files of
    `keras_brainformer.data.stdlib_source_files()` (its training split, about
    4 MB), named `"stdlib:<path relative to the standard library>"`, read as
    UTF-8. This is the text the shipped `BrainformerTokenizer` vocabulary was
    trained on; it needs no download.

    Within each kind, documents are ordered by the CRC-32 of their name (a
    fixed pseudo-random order, the one `stdlib_source_files()` selects by);
    the two kinds are then interleaved in proportion to their sizes, so that
    any prefix of the list holds prose and code in the ratio of the whole
    corpus (about 1 : 8.6). `max_bytes` takes that prefix (see
    `cap_documents()`), so a capped corpus keeps the mix.

    Args:
        max_bytes: int or None. Cap on the total UTF-8 size of the text.

    Returns:
        A list of `Document`s, in a deterministic order.
    """
    from pydoc_data.topics import topics  # 0.5 MB of text: imported when asked for

    def crc_order(documents):
        return sorted(documents, key=lambda d: (zlib.crc32(d.name.encode("utf-8")), d.name))

    prose = crc_order(Document(f"pydoc:{name}", text) for name, text in topics.items())
    root = os.path.dirname(os.__file__)
    code = []
    for path in stdlib_source_files():
        relative = os.path.relpath(path, root).replace(os.sep, "/")
        with open(path, encoding="utf-8", errors="replace") as file:
            code.append(Document(f"stdlib:{relative}", file.read()))
    code = crc_order(code)
    return cap_documents(_interleave_by_progress(prose, code), max_bytes)


def _posix(path):
    return os.path.normpath(path).replace(os.sep, "/")


def _decode(path, encoding):
    """The text of `path`, or `(None, reason)` if it is not text in `encoding`."""
    with open(path, "rb") as file:
        data = file.read()
    if b"\x00" in data[:_BINARY_PROBE_BYTES] and not encoding.lower().startswith("utf-16"):
        return None, "binary data (NUL bytes; UTF-16 text needs --encoding utf-16)"
    try:
        return data.decode(encoding), None
    except UnicodeDecodeError as error:
        return None, (
            f"not {encoding} text (byte {error.start}: {data[error.start:error.start + 1]!r}); "
            "give its --encoding, e.g. latin-1"
        )


def read_documents(paths, extensions=DEFAULT_EXTENSIONS, encoding="utf-8", skipped=None):
    """Reads text files, and folders of them, as `Document`s.

    A file named in `paths` is read whatever its extension. A folder is
    walked recursively in sorted order, keeping the files whose name ends
    with one of `extensions` (case-insensitively) and skipping hidden entries
    (names starting with `.`) and `__pycache__`. Files are decoded strictly
    with `encoding`: a file with NUL bytes (binary data) or bytes that do not
    decode is refused if named in `paths` and skipped if found in a folder
    (listed in `skipped`), never read with replacement characters. A file
    reached twice is read once. Each document's name is its path as given (a
    folder's files: the folder as given joined with the path inside it),
    with `/` separators. Empty files are left out.

    Args:
        paths: a path or a list of paths (files or folders).
        extensions: the file-name endings kept in folders.
        encoding: the files' text encoding (default UTF-8).
        skipped: optional list; `(path, reason)` is appended for each file
            of a folder that was skipped as not text.

    Returns:
        A list of `Document`s, in the order of `paths`, each folder sorted.

    Raises:
        FileNotFoundError: a path does not exist.
        ValueError: a file named in `paths` is not text in `encoding`, the
            encoding is unknown, or the files hold no text at all.
    """
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"Unknown encoding {encoding!r} (Python's codec names, e.g. "
                         "utf-8, latin-1, utf-16).") from None
    if isinstance(paths, (str, bytes, os.PathLike)):
        paths = [paths]
    paths = [os.fsdecode(path) for path in paths]
    if isinstance(extensions, str):
        extensions = (extensions,)
    endings = tuple(extension.lower() for extension in extensions)
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Corpus path not found: {path!r}")
    files = []
    named = set()
    for path in paths:
        if not os.path.isdir(path):
            files.append(path)
            named.add(path)
            continue
        for directory, subdirectories, names in os.walk(path):
            subdirectories[:] = sorted(
                d for d in subdirectories if not d.startswith(".") and d != "__pycache__"
            )
            for name in sorted(names):
                if not name.startswith(".") and name.lower().endswith(endings):
                    files.append(os.path.join(directory, name))
    documents = []
    seen = set()
    for path in files:
        key = os.path.realpath(path)
        if key in seen:
            continue
        seen.add(key)
        text, reason = _decode(path, encoding)
        if text is None:
            if path in named:
                raise ValueError(f"{path}: {reason}.")
            if skipped is not None:
                skipped.append((_posix(path), reason))
            continue
        if text:
            documents.append(Document(_posix(path), text))
    if not documents:
        raise ValueError(
            f"The corpus is empty: no text in {paths} ({len(files)} file(s) found; "
            f"folders are searched for files ending in {list(extensions)})."
        )
    return documents


def _hash_position(name):
    """The document's place in [0, 1), from the SHA-256 of its name."""
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(documents, validation_fraction=0.05):
    """Splits documents into `(train, validation)` by a stable hash of their names.

    A document is in the validation split when the SHA-256 of its name,
    read as a number in [0, 1), is at least `1 - validation_fraction`, so a
    document's split never depends on the other documents: adding documents
    moves none of the existing ones. Both splits are kept non-empty: if
    hashing leaves the validation split empty, the training document with
    the largest hash moves to it (and if it leaves training empty, the
    validation document with the smallest hash moves to training). Each
    split keeps the input order.

    A single document cannot be split that way; it is cut in two at a line
    boundary instead: about the first `1 - validation_fraction` of its
    characters for training (named `"<name>[train]"`), the rest for
    validation (`"<name>[validation]"`).

    Args:
        documents: a list of `Document`s.
        validation_fraction: float in (0, 1). The expected fraction of
            documents in the validation split.

    Returns:
        `(train_documents, validation_documents)`.
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(
            "`validation_fraction` must be in (0, 1). "
            f"Received: validation_fraction={validation_fraction!r}"
        )
    documents = list(documents)
    if not documents:
        raise ValueError("Cannot split an empty list of documents.")
    if len(documents) == 1:
        (document,) = documents
        text = document.text
        cut = min(len(text), max(1, int(round(len(text) * (1 - validation_fraction)))))
        newline = text.find("\n", cut - 1)
        if 0 <= newline < len(text) - 1 and newline - cut < 1000:
            cut = newline + 1
        return (
            [Document(f"{document.name}[train]", text[:cut])],
            [Document(f"{document.name}[validation]", text[cut:])],
        )
    positions = [_hash_position(d.name) for d in documents]
    in_validation = [p >= 1 - validation_fraction for p in positions]
    if not any(in_validation):
        last = max(range(len(documents)), key=lambda i: (positions[i], documents[i].name))
        in_validation[last] = True
    elif all(in_validation):
        first = min(range(len(documents)), key=lambda i: (positions[i], documents[i].name))
        in_validation[first] = False
    train = [d for d, v in zip(documents, in_validation) if not v]
    validation = [d for d, v in zip(documents, in_validation) if v]
    return train, validation


def _rows(outputs):
    """A tokenizer's batch output (id lists, ragged or dense tensor) as numpy rows."""
    if isinstance(outputs, (list, tuple)):
        return [np.asarray(row, dtype="int32").reshape(-1) for row in outputs]
    if hasattr(outputs, "flat_values") and hasattr(outputs, "row_lengths"):
        values = np.asarray(outputs.flat_values, dtype="int32")
        lengths = np.asarray(outputs.row_lengths())
        return np.split(values, np.cumsum(lengths)[:-1])
    array = np.asarray(keras.ops.convert_to_numpy(outputs), dtype="int32")
    return list(array.reshape(array.shape[0], -1))


def tokenize_documents(documents, tokenizer, batch_size=256, verbose=False):
    """Tokenizes documents into one int32 stream, each followed by the end token.

    The stream is `tokens(d0), end, tokens(d1), end, ...` with
    `end = tokenizer.end_token_id`, so a model trained on windows of it
    learns where documents stop and never sees one document's text run into
    the next without a separator. The tokenizer is called on lists of
    `batch_size` texts (eagerly; `BrainformerTokenizer` then runs the
    `sentencepiece` package). It must not pad or truncate
    (`sequence_length=None`) and must not add start/end tokens itself.

    Args:
        documents: a list of `Document`s (or of strings).
        tokenizer: a tokenizer with `end_token_id`, such as
            `BrainformerTokenizer()` or `BrainformerByteTokenizer()`.
        batch_size: int. Texts per tokenizer call.
        verbose: bool. Show a `keras.utils.Progbar` when there is more than
            one batch.

    Returns:
        A 1-D int32 numpy array.
    """
    end_token_id = getattr(tokenizer, "end_token_id", None)
    if end_token_id is None:
        raise ValueError(
            "`tokenize_documents()` needs a tokenizer with an `end_token_id` (the "
            f"document separator), such as `BrainformerTokenizer`. Received: {tokenizer!r}"
        )
    if getattr(tokenizer, "sequence_length", None) is not None:
        raise ValueError(
            "`tokenize_documents()` needs a tokenizer without `sequence_length` (it would "
            f"pad or truncate documents). Received: sequence_length={tokenizer.sequence_length}"
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1. Received: batch_size={batch_size}")
    texts = [d.text if isinstance(d, Document) else d for d in documents]
    progbar = None
    if verbose and len(texts) > batch_size:
        progbar = keras.utils.Progbar(len(texts), unit_name="document")
    end = np.array([end_token_id], dtype="int32")
    pieces = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        for row in _rows(tokenizer(batch)):
            pieces.append(row)
            pieces.append(end)
        if progbar is not None:
            progbar.update(start + len(batch))
    if not pieces:
        return np.zeros([0], dtype="int32")
    return np.concatenate(pieces).astype("int32", copy=False)


def pack(stream, sequence_length):
    """Cuts a token stream into non-overlapping windows of `sequence_length + 1`.

    Window `i` is `stream[i * (L + 1) : (i + 1) * (L + 1)]`; tokens after the
    last full window are dropped. A window gives the inputs `window[:-1]`
    and the next-token targets `window[1:]`.

    Returns:
        An int32 array `[N, sequence_length + 1]`.
    """
    if isinstance(sequence_length, bool) or not isinstance(sequence_length, int):
        raise ValueError(
            f"`sequence_length` must be an integer. Received: sequence_length={sequence_length!r}"
        )
    if sequence_length < 1:
        raise ValueError(f"`sequence_length` must be >= 1. Received: {sequence_length}")
    stream = np.asarray(stream, dtype="int32").reshape(-1)
    width = sequence_length + 1
    count = len(stream) // width
    if count == 0:
        raise ValueError(
            f"A stream of {len(stream)} tokens is too short for one window of "
            f"sequence_length + 1 = {width} tokens."
        )
    return stream[: count * width].reshape(count, width)


def _inputs_and_targets(windows):
    """`[B, L + 1]` windows -> `({"token_ids", "padding_mask"}, targets)`, each `[B, L]`."""
    import tensorflow as tf  # tf.data (heavy): loaded when a pipeline is built

    token_ids = windows[:, :-1]
    return {"token_ids": token_ids, "padding_mask": tf.ones_like(token_ids)}, windows[:, 1:]


def _check_count(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}. Received: {name}={value!r}")


def _epoch_order(seed, epoch, count):
    """The order in which epoch `epoch` visits `count` training windows."""
    return np.random.default_rng([seed, epoch]).permutation(count)


class LanguageModelData:
    """Packed train and validation windows, and `tf.data` pipelines over them.

    Args:
        train_windows: int array `[N, sequence_length + 1]` (see `pack()`).
        validation_windows: int array `[M, sequence_length + 1]`.
        vocabulary_size: int. The tokenizer's vocabulary size.
        train_documents, validation_documents: int or None. Document counts
            (for `summary()`).
        train_stream_tokens, validation_stream_tokens: int or None. Stream
            lengths before packing (for `summary()`).

    Attributes:
        sequence_length: the model's input length `L` (windows are `L + 1`).
        train_tokens, validation_tokens: target tokens per pass over a split,
            `windows * sequence_length`.
    """

    def __init__(
        self,
        train_windows,
        validation_windows,
        vocabulary_size,
        train_documents=None,
        validation_documents=None,
        train_stream_tokens=None,
        validation_stream_tokens=None,
        document_digests=None,
    ):
        train_windows = np.asarray(train_windows, dtype="int32")
        validation_windows = np.asarray(validation_windows, dtype="int32")
        for name, windows in (("train", train_windows), ("validation", validation_windows)):
            if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
                raise ValueError(
                    f"The {name} windows must be a non-empty `[N, sequence_length + 1]` array "
                    f"with sequence_length >= 1. Received shape: {windows.shape}"
                )
        if train_windows.shape[1] != validation_windows.shape[1]:
            raise ValueError(
                "Train and validation windows must have the same length. Received shapes: "
                f"{train_windows.shape} and {validation_windows.shape}"
            )
        self.train_windows = train_windows
        self.validation_windows = validation_windows
        self.sequence_length = train_windows.shape[1] - 1
        self.vocabulary_size = int(vocabulary_size)
        self.train_documents = train_documents
        self.validation_documents = validation_documents
        self.train_stream_tokens = train_stream_tokens
        self.validation_stream_tokens = validation_stream_tokens
        self.document_digests = document_digests

    @property
    def train_tokens(self):
        return len(self.train_windows) * self.sequence_length

    @property
    def validation_tokens(self):
        return len(self.validation_windows) * self.sequence_length

    def tokens_per_batch(self, batch_size):
        """Target tokens in one batch: `batch_size * sequence_length`."""
        return batch_size * self.sequence_length

    def steps_per_epoch(self, batch_size):
        """Full training batches per epoch: `len(train_windows) // batch_size`."""
        return len(self.train_windows) // batch_size

    def check_train_batch_size(self, batch_size):
        """Raises `ValueError` unless one full batch of `batch_size` windows exists."""
        _check_count("batch_size", batch_size, 1)
        if batch_size > len(self.train_windows):
            raise ValueError(
                f"`batch_size` ({batch_size}) is larger than the number of training windows "
                f"({len(self.train_windows)} of {self.sequence_length + 1} tokens): use a smaller "
                "batch size or sequence length, or more text."
            )

    def train_batch(self, step, batch_size, seed):
        """The training windows `[batch_size, L + 1]` of global step `step`.

        Epoch `e = step // steps_per_epoch` visits the windows in the order
        `np.random.default_rng([seed, e]).permutation(N)`, `batch_size` at a
        time; the last `N % batch_size` windows of that order are left out
        (a different, random few each epoch).
        """
        self.check_train_batch_size(batch_size)
        epoch, index = divmod(int(step), self.steps_per_epoch(batch_size))
        order = _epoch_order(seed, epoch, len(self.train_windows))
        return self.train_windows[order[index * batch_size : (index + 1) * batch_size]]

    def train_dataset(self, batch_size, seed, start_step=0):
        """An infinite, deterministic, resumable training `tf.data.Dataset`.

        Element `i` is the batch of global step `start_step + i` (see
        `train_batch()`), so a run resumed with `start_step=k` sees exactly
        the batches an uninterrupted run sees from step `k` on. Elements are
        `(x, y)` with `x = {"token_ids": int32 [B, L], "padding_mask": int32
        ones [B, L]}` and `y` the next tokens, int32 `[B, L]`; batches are
        always full, with static shapes.

        Args:
            batch_size: int, at most the number of training windows.
            seed: int >= 0. Selects the per-epoch shuffles.
            start_step: int >= 0. The global step of the first batch.
        """
        import tensorflow as tf  # tf.data (heavy): loaded when a pipeline is built

        self.check_train_batch_size(batch_size)
        _check_count("seed", seed, 0)
        _check_count("start_step", start_step, 0)
        windows = self.train_windows
        steps_per_epoch = self.steps_per_epoch(batch_size)
        seed, start_step = int(seed), int(start_step)

        def batches():
            epoch = order = None
            step = start_step
            while True:
                step_epoch, index = divmod(step, steps_per_epoch)
                if step_epoch != epoch:
                    epoch = step_epoch
                    order = _epoch_order(seed, epoch, len(windows))
                yield windows[order[index * batch_size : (index + 1) * batch_size]]
                step += 1

        signature = tf.TensorSpec([batch_size, self.sequence_length + 1], tf.int32)
        dataset = tf.data.Dataset.from_generator(batches, output_signature=signature)
        # Re-batched so that the batch size is visible to tf.data (Keras
        # splits a dataset between processes by it in multi-host runs); the
        # batches are the same.
        dataset = dataset.unbatch().batch(batch_size, drop_remainder=True)
        return dataset.map(_inputs_and_targets).prefetch(tf.data.AUTOTUNE)

    def validation_steps(self, batch_size, max_batches=None):
        """The number of batches `validation_dataset()` yields."""
        _check_count("batch_size", batch_size, 1)
        if max_batches is not None:
            _check_count("max_batches", max_batches, 1)
        count = max(1, len(self.validation_windows) // batch_size)
        return count if max_batches is None else min(count, max_batches)

    def validation_dataset(self, batch_size, max_batches=None):
        """A finite validation `tf.data.Dataset` in a fixed order.

        The windows in their stored order, `batch_size` at a time, full
        batches only (the remainder is dropped), at most `max_batches`
        batches. If there are fewer validation windows than `batch_size`,
        the dataset is a single batch of all of them (a smaller batch, so a
        compiled model traces one more shape for it). Elements are as in
        `train_dataset()`.
        """
        import tensorflow as tf  # tf.data (heavy): loaded when a pipeline is built

        count = self.validation_steps(batch_size, max_batches)
        windows = self.validation_windows
        if len(windows) < batch_size:
            rows, batch_size = windows, len(windows)
        else:
            rows = windows[: count * batch_size]
        dataset = tf.data.Dataset.from_tensor_slices(rows)
        dataset = dataset.batch(batch_size, drop_remainder=True)
        return dataset.map(_inputs_and_targets)

    def summary(self):
        """One line: documents, tokens and windows per split."""

        def describe(name, documents, stream_tokens, windows):
            parts = []
            if documents is not None:
                parts.append(f"{documents:,} documents")
            if stream_tokens is not None:
                parts.append(f"{stream_tokens:,} tokens")
            parts.append(f"{len(windows):,} windows")
            return f"{name}: " + ", ".join(parts)

        return (
            describe("train", self.train_documents, self.train_stream_tokens, self.train_windows)
            + "; "
            + describe(
                "validation",
                self.validation_documents,
                self.validation_stream_tokens,
                self.validation_windows,
            )
            + f" (windows of sequence_length + 1 = {self.sequence_length + 1} tokens, "
            f"vocabulary {self.vocabulary_size:,})"
        )

    def __repr__(self):
        return f"<LanguageModelData {self.summary()}>"

    def fingerprint(self):
        """What the data is, as JSON-ready values: per split the documents,
        the tokens, the windows and the SHA-256 of the packed windows (so
        of the text, the split, the tokenizer and the sequence length), and
        a short digest of each document's text by name (when known). Two
        `LanguageModelData` give the same batches at every step exactly
        when their splits' `sha256` agree; see `data_changes()`."""

        def split(documents, stream_tokens, windows):
            return {
                "documents": documents,
                "tokens": stream_tokens,
                "windows": int(len(windows)),
                "sha256": hashlib.sha256(np.ascontiguousarray(windows).tobytes()).hexdigest(),
            }

        return {
            "train": split(self.train_documents, self.train_stream_tokens, self.train_windows),
            "validation": split(
                self.validation_documents, self.validation_stream_tokens,
                self.validation_windows,
            ),
            "sequence_length": self.sequence_length,
            "documents": dict(self.document_digests) if self.document_digests else None,
        }


def _listed(names, limit=5):
    names = sorted(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def data_changes(previous, current):
    """What differs between two `LanguageModelData.fingerprint()`s, as a
    list of short phrases (empty when both splits are the same)."""
    changes = []
    for name in ("train", "validation"):
        old, new = previous.get(name) or {}, current.get(name) or {}
        if old.get("sha256") == new.get("sha256"):
            continue
        sizes = []
        for key in ("documents", "tokens"):
            if old.get(key) != new.get(key) and None not in (old.get(key), new.get(key)):
                sizes.append(f"{old[key]:,} to {new[key]:,} {key}")
        what = f"went from {' and '.join(sizes)}" if sizes else "has the same size, other content"
        changes.append(f"the {name} split {what}")
    if changes:
        old_documents = previous.get("documents") or {}
        new_documents = current.get("documents") or {}
        if old_documents and new_documents:
            edited = [n for n in new_documents if n in old_documents
                      and new_documents[n] != old_documents[n]]
            added = [n for n in new_documents if n not in old_documents]
            removed = [n for n in old_documents if n not in new_documents]
            for label, names in (("edited", edited), ("added", added), ("removed", removed)):
                if names:
                    changes.append(f"{label}: {_listed(names)}")
    return changes


def build_language_model_data(
    tokenizer,
    sequence_length,
    paths=None,
    validation_fraction=0.05,
    max_bytes=None,
    verbose=True,
    encoding="utf-8",
):
    """Reads, splits, tokenizes and packs a corpus into `LanguageModelData`.

    Args:
        tokenizer: a tokenizer with `end_token_id` and `vocabulary_size()`,
            such as `BrainformerTokenizer()`.
        sequence_length: int. The model's input length.
        paths: None for the embedded corpus (`default_documents()`), or a
            path or list of paths for `read_documents()`.
        validation_fraction: float in (0, 1), see `split_documents()`.
        max_bytes: int or None. Cap on the UTF-8 size of the text used
            (`cap_documents()`), for the embedded corpus or the user's files.
        verbose: bool. Print what is read (files skipped as not text, the
            bytes used and any cap applied) and tokenized, with a progress bar.
        encoding: the text encoding of the files in `paths`.

    Raises:
        ValueError: either split packs to no window (the corpus is too small
            for `sequence_length`).
    """
    _check_count("sequence_length", sequence_length, 1)
    if paths is None:
        documents = default_documents(max_bytes)
        source = "the embedded Python corpus"
    else:
        skipped = []
        read = read_documents(paths, encoding=encoding, skipped=skipped)
        documents = cap_documents(read, max_bytes)
        source = f"{paths}"
        if verbose and skipped:
            print(f"Skipped {len(skipped)} file(s) that are not {encoding} text:")
            for path, reason in skipped[:10]:
                print(f"  {path}: {reason}")
            if len(skipped) > 10:
                print(f"  ... and {len(skipped) - 10} more")
        read_bytes = sum(_utf8_size(d.text) for d in read)
        used_bytes = sum(_utf8_size(d.text) for d in documents)
        if verbose and used_bytes < read_bytes:
            print(
                f"Using the first {used_bytes:,} of {read_bytes:,} bytes of text "
                f"({len(documents):,} of {len(read):,} files): capped by max_bytes="
                f"{max_bytes:,} (--max-corpus-bytes)."
            )
    total_bytes = sum(_utf8_size(d.text) for d in documents)
    if paths is None:  # capped when the cap was reached (to a character's bytes)
        capped = max_bytes is not None and total_bytes > max_bytes - 4
    else:
        capped = total_bytes < sum(_utf8_size(d.text) for d in read)
    digests = {
        d.name: hashlib.sha256(d.text.encode("utf-8")).hexdigest()[:16] for d in documents
    }
    train, validation = split_documents(documents, validation_fraction)
    if verbose:
        print(
            f"Tokenizing {len(documents):,} documents ({total_bytes / 1e6:.2f} MB) "
            f"from {source} with {type(tokenizer).__name__}."
        )
    windows = {}
    streams = {}
    for name, split in (("train", train), ("validation", validation)):
        stream = tokenize_documents(split, tokenizer, verbose=verbose)
        streams[name] = len(stream)
        if len(stream) < sequence_length + 1:
            cap = f" (capped by max_bytes={max_bytes:,})" if capped else ""
            raise CorpusTooSmallError(
                f"The {name} split ({len(split):,} documents, {len(stream):,} tokens) is "
                f"too small for one window of sequence_length + 1 = {sequence_length + 1} "
                f"tokens. The corpus, {source}, has {total_bytes:,} bytes{cap} in "
                f"{len(documents):,} documents, split with validation_fraction="
                f"{validation_fraction}. Use more text, a larger `max_bytes` or "
                "`validation_fraction`, or a shorter `sequence_length`.",
                split=name,
                documents=len(split),
                tokens=len(stream),
                window=sequence_length + 1,
                total_bytes=total_bytes,
                total_documents=len(documents),
                capped=capped,
                source=source,
            )
        windows[name] = pack(stream, sequence_length)
    return LanguageModelData(
        windows["train"],
        windows["validation"],
        vocabulary_size=tokenizer.vocabulary_size(),
        train_documents=len(train),
        validation_documents=len(validation),
        train_stream_tokens=streams["train"],
        validation_stream_tokens=streams["validation"],
        document_digests=digests,
    )

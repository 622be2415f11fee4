import numpy as np
import pytest

from keras_brainformer.models import BrainformerByteTokenizer
from keras_brainformer.models import BrainformerTokenizer
from keras_brainformer.training.corpus import Document
from keras_brainformer.training.corpus import LanguageModelData
from keras_brainformer.training.corpus import build_language_model_data
from keras_brainformer.training.corpus import cap_documents
from keras_brainformer.training.corpus import default_documents
from keras_brainformer.training.corpus import pack
from keras_brainformer.training.corpus import read_documents
from keras_brainformer.training.corpus import split_documents
from keras_brainformer.training.corpus import tokenize_documents


def numbered_documents(count, start=0):
    return [Document(f"doc{i}", f"text {i}\n") for i in range(start, start + count)]


def batches_as_numpy(dataset, count):
    out = []
    for x, y in dataset.take(count):
        out.append((np.asarray(x["token_ids"]), np.asarray(x["padding_mask"]), np.asarray(y)))
    return out


def window_data(train_windows=10, validation_windows=7, sequence_length=4):
    width = sequence_length + 1
    train = pack(np.arange(train_windows * width), sequence_length)
    validation = pack(1000 + np.arange(validation_windows * width), sequence_length)
    return LanguageModelData(train, validation, vocabulary_size=2000)


# Splitting.


def test_split_is_deterministic_and_stable_when_adding_documents():
    documents = numbered_documents(400)
    train, validation = split_documents(documents, 0.1)
    assert split_documents(documents, 0.1) == (train, validation)
    assert len(train) + len(validation) == 400
    assert 20 <= len(validation) <= 60
    assert {d.name for d in train}.isdisjoint(d.name for d in validation)
    # Input order is kept within each split.
    assert [d.name for d in train] == [d.name for d in documents if d in train]

    more_train, more_validation = split_documents(numbered_documents(300, 400) + documents, 0.1)
    assert set(validation) <= set(more_validation)
    assert set(train) <= set(more_train)


def test_split_keeps_both_splits_non_empty():
    for count in (2, 3, 5):
        train, validation = split_documents(numbered_documents(count), 0.01)
        assert train and validation and len(train) + len(validation) == count
        train, validation = split_documents(numbered_documents(count), 0.99)
        assert train and validation and len(train) + len(validation) == count


def test_split_single_document_is_cut_at_a_line():
    text = "".join(f"line {i}\n" for i in range(100))
    (train,), (validation,) = split_documents([Document("book", text)], 0.1)
    assert train.text + validation.text == text
    assert train.text.endswith("\n") and validation.text
    assert (train.name, validation.name) == ("book[train]", "book[validation]")
    assert 0.8 < len(train.text) / len(text) < 0.95


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.1])
def test_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match="validation_fraction"):
        split_documents(numbered_documents(10), fraction)


# Packing and windows.


def test_pack_is_exact_and_drops_the_tail():
    windows = pack(np.arange(23), 4)
    assert windows.dtype == np.int32 and windows.shape == (4, 5)
    np.testing.assert_array_equal(windows.reshape(-1), np.arange(20))
    np.testing.assert_array_equal(pack([1, 2, 3, 4], 1), [[1, 2], [3, 4]])
    with pytest.raises(ValueError, match="4 tokens.*sequence_length \\+ 1 = 5"):
        pack(np.arange(4), 4)


def test_windows_give_targets_shifted_by_one():
    data = window_data()
    for token_ids, padding_mask, y in batches_as_numpy(data.train_dataset(3, seed=0), 4):
        np.testing.assert_array_equal(token_ids[:, 1:], y[:, :-1])
        np.testing.assert_array_equal(y, token_ids + 1)  # windows of consecutive numbers
        np.testing.assert_array_equal(padding_mask, np.ones_like(token_ids))
        assert token_ids.dtype == padding_mask.dtype == y.dtype == np.int32
        assert (token_ids[:, 0] % 5 == 0).all()  # windows start at multiples of L + 1


# Training and validation datasets.


def test_train_dataset_is_deterministic_and_resumable():
    data = window_data(train_windows=10)  # 3 batches of 3 per epoch
    batches = batches_as_numpy(data.train_dataset(3, seed=7), 12)
    again = batches_as_numpy(data.train_dataset(3, seed=7), 12)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a[0], b[0])
    resumed = batches_as_numpy(data.train_dataset(3, seed=7, start_step=4), 8)
    for step, (a, b) in enumerate(zip(batches[4:], resumed), start=4):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[0], data.train_batch(step, 3, seed=7)[:, :-1])
    other_seed = batches_as_numpy(data.train_dataset(3, seed=8), 12)
    assert any((a[0] != b[0]).any() for a, b in zip(batches, other_seed))

    # Each epoch visits distinct windows, in a different order each epoch.
    firsts = [b[0][:, 0] // 5 for b in batches]
    epochs = [np.concatenate(firsts[e * 3 : (e + 1) * 3]) for e in range(4)]
    for order in epochs:
        assert len(set(order.tolist())) == 9
    assert len({tuple(order.tolist()) for order in epochs}) == 4


def test_train_dataset_has_full_static_batches():
    data = window_data(train_windows=10)
    dataset = data.train_dataset(4, seed=0)
    x_spec, y_spec = dataset.element_spec
    assert x_spec["token_ids"].shape.as_list() == [4, 4]
    assert x_spec["padding_mask"].shape.as_list() == [4, 4]
    assert y_spec.shape.as_list() == [4, 4]
    assert all(b[0].shape == (4, 4) for b in batches_as_numpy(dataset, 7))
    assert data.steps_per_epoch(4) == 2 and data.tokens_per_batch(4) == 16
    with pytest.raises(ValueError, match="batch_size.*11.*training windows \\(10 of 5"):
        data.train_dataset(11, seed=0)


def test_validation_dataset_has_a_fixed_order():
    data = window_data(validation_windows=7)
    batches = batches_as_numpy(data.validation_dataset(3), 10)
    assert len(batches) == 2 == data.validation_steps(3)
    np.testing.assert_array_equal(
        np.concatenate([b[0] for b in batches]), data.validation_windows[:6, :-1]
    )
    np.testing.assert_array_equal(
        np.concatenate([b[2] for b in batches]), data.validation_windows[:6, 1:]
    )
    again = batches_as_numpy(data.validation_dataset(3), 10)
    for a, b in zip(batches, again):
        np.testing.assert_array_equal(a[0], b[0])
    assert len(batches_as_numpy(data.validation_dataset(3, max_batches=1), 10)) == 1
    # Fewer windows than the batch size: one batch of all of them.
    (single,) = batches_as_numpy(data.validation_dataset(16), 10)
    np.testing.assert_array_equal(single[0], data.validation_windows[:, :-1])


# Reading and tokenizing documents.


def test_read_documents(tmp_path):
    for relative in ("b.txt", "a.py", "c.md", "d.rst", "e.json", "sub/f.PY", ".hidden/g.py"):
        path = tmp_path / "corpus" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"text of {relative}\n")
    (tmp_path / "corpus" / "empty.txt").write_text("")
    (tmp_path / "corpus" / "latin1.txt").write_bytes(b"caf\xe9\n")
    (tmp_path / "corpus" / "random.txt").write_bytes(bytes(range(256)) * 4)
    folder = str(tmp_path / "corpus")
    skipped = []
    documents = read_documents(folder, skipped=skipped)
    names = [d.name[len(folder) + 1 :] for d in documents]
    # Not UTF-8 text: skipped by name, never read with replacement characters.
    assert names == ["a.py", "b.txt", "c.md", "d.rst", "sub/f.PY"]
    assert documents[0].text == "text of a.py\n"
    assert [(path[len(folder) + 1 :], reason.split(" (")[0]) for path, reason in skipped] == [
        ("latin1.txt", "not utf-8 text"), ("random.txt", "binary data")]
    assert "--encoding" in skipped[0][1]
    latin1 = read_documents(str(tmp_path / "corpus" / "latin1.txt"), encoding="latin-1")
    assert latin1[0].text == "caf\u00e9\n"
    # Named explicitly, a file that is not text is refused.
    with pytest.raises(ValueError, match="latin1.txt: not utf-8 text"):
        read_documents(str(tmp_path / "corpus" / "latin1.txt"))
    with pytest.raises(ValueError, match="random.txt: binary data"):
        read_documents([str(tmp_path / "corpus" / "random.txt")], encoding="latin-1")
    with pytest.raises(ValueError, match="Unknown encoding 'klingon'"):
        read_documents(folder, encoding="klingon")

    explicit = read_documents([str(tmp_path / "corpus" / "e.json"), folder], extensions=(".md",))
    assert [d.name.rsplit("/", 1)[-1] for d in explicit] == ["e.json", "c.md"]

    missing = str(tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        read_documents([folder, missing])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="corpus is empty.*empty"):
        read_documents(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="corpus is empty.*empty.txt"):
        read_documents(str(tmp_path / "corpus" / "empty.txt"))


def test_tokenization_separates_documents_with_end_tokens():
    tokenizer = BrainformerByteTokenizer()
    documents = [Document("a", "ab"), Document("b", ""), Document("c", "é")]
    expected = [97, 98, 3, 3, 195, 169, 3]
    for batch_size in (1, 2, 256):
        stream = tokenize_documents(documents, tokenizer, batch_size=batch_size)
        assert stream.dtype == np.int32
        assert stream.tolist() == expected
    assert tokenize_documents([], tokenizer).tolist() == []
    with pytest.raises(ValueError, match="sequence_length"):
        tokenize_documents(documents, BrainformerByteTokenizer(sequence_length=8))


def test_cap_documents_cuts_at_a_character_boundary():
    documents = [Document("a", "abc"), Document("b", "é" * 4), Document("c", "xyz")]
    assert cap_documents(documents, None) == documents
    assert cap_documents(documents, 3) == documents[:1]
    assert cap_documents(documents, 6) == [documents[0], Document("b", "é")]
    assert cap_documents(documents, 8) == [documents[0], Document("b", "éé")]
    with pytest.raises(ValueError, match="max_bytes"):
        cap_documents(documents, 0)


def test_default_documents_capped_keep_prose_and_code():
    documents = default_documents(max_bytes=200_000)
    assert documents == default_documents(max_bytes=200_000)
    assert 190_000 < sum(len(d.text.encode("utf-8")) for d in documents) <= 200_000
    prose = [d for d in documents if d.name.startswith("pydoc:")]
    code = [d for d in documents if d.name.startswith("stdlib:")]
    assert prose and code and len(prose) + len(code) == len(documents)
    assert all(d.name.endswith(".py") for d in code)
    # A larger cap extends the same list.
    larger = default_documents(max_bytes=300_000)
    assert [d.name for d in larger[: len(documents) - 1]] == [d.name for d in documents[:-1]]


# End to end.


def test_build_language_model_data_with_sentencepiece(capsys):
    tokenizer = BrainformerTokenizer()
    data = build_language_model_data(
        tokenizer, 64, validation_fraction=0.2, max_bytes=150_000, verbose=True
    )
    assert "Tokenizing" in capsys.readouterr().out
    assert data.sequence_length == 64 and data.vocabulary_size == 8192
    assert data.train_windows.shape[1] == data.validation_windows.shape[1] == 65
    assert len(data.train_windows) > len(data.validation_windows) > 0
    assert 0 <= data.train_windows.min() and data.train_windows.max() < 8192
    assert data.train_documents + data.validation_documents > 4
    assert (data.train_windows == tokenizer.end_token_id).any()  # document separators
    assert data.train_tokens == 64 * len(data.train_windows)
    summary = data.summary()
    assert f"{len(data.train_windows):,} windows" in summary
    assert f"{data.train_documents:,} documents" in summary
    assert "validation:" in summary and "\n" not in summary
    x, y = next(iter(data.train_dataset(4, seed=0)))
    assert x["token_ids"].shape == (4, 64) and y.shape == (4, 64)


def test_build_language_model_data_from_files(tmp_path):
    for i in range(6):
        (tmp_path / f"part{i}.txt").write_text(f"paragraph {i} " * 40 + "\n")
    data = build_language_model_data(
        BrainformerByteTokenizer(),
        32,
        paths=[str(tmp_path)],
        validation_fraction=0.3,
        verbose=False,
    )
    assert data.vocabulary_size == 256
    assert data.train_documents + data.validation_documents == 6
    # max_bytes caps the user's text too.
    with pytest.raises(ValueError, match="too small.*max_bytes=40"):
        build_language_model_data(
            BrainformerByteTokenizer(), 32, paths=str(tmp_path), max_bytes=40, verbose=False
        )


def test_too_small_corpus_is_a_clear_error(tmp_path):
    (tmp_path / "a.txt").write_text("a short text\n")
    (tmp_path / "b.txt").write_text("another short text\n")
    with pytest.raises(ValueError, match="split .*too small.*sequence_length \\+ 1 = 513"):
        build_language_model_data(
            BrainformerByteTokenizer(), 512, paths=[str(tmp_path)], verbose=False
        )


def test_the_fingerprint_says_what_changed_between_two_corpora(tmp_path):
    """What a resume compares (`data.json`): the same files give the same
    fingerprint; an edited, an added and a removed file are named, with the
    splits' sizes."""
    from keras_brainformer.training.corpus import data_changes

    def data():
        return build_language_model_data(
            BrainformerByteTokenizer(), 16, paths=str(tmp_path), verbose=False
        )

    for i in range(40):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document {i} " * 20)
    first = data().fingerprint()
    assert data_changes(first, data().fingerprint()) == []
    assert data_changes(first, json_roundtrip(first)) == []  # as read back from data.json
    (tmp_path / "doc03.txt").write_text("edited " * 50)
    (tmp_path / "doc40.txt").write_text("added " * 50)
    (tmp_path / "doc05.txt").unlink()
    changes = data_changes(first, data().fingerprint())
    assert any(c.startswith("the train split went from") or c.startswith("the validation split")
               for c in changes), changes
    names = {c.split(": ")[0]: c.split(": ")[1] for c in changes if ": " in c}
    assert names["edited"].endswith("doc03.txt") and names["added"].endswith("doc40.txt")
    assert names["removed"].endswith("doc05.txt")


def json_roundtrip(value):
    import json

    return json.loads(json.dumps(value))

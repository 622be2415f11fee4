"""Trains the Brainformer SentencePiece vocabulary offline, deterministically.

Usage (from the repository root):

    python presets/tokenizer/train_vocabulary.py            # rebuild the shipped proto
    python presets/tokenizer/train_vocabulary.py --check    # retrain, compare, write nothing

The corpus is text every CPython install has: the Python reference prose in
`pydoc_data.topics` (`keras_brainformer.data.pydoc_text()`) and about 4 MB of
standard-library `.py` sources (`keras_brainformer.data.stdlib_source_files()`,
which holds out about 1/16 of the files for evaluation).

Why not `keras_hub.tokenizers.compute_sentence_piece_proto`: it hard-codes the
`nmt_nfkc` normaliser with default whitespace handling and accepts no other
trainer options, so the vocabulary it trains collapses runs of spaces, drops
newlines and cannot represent characters it has not seen:
`"def f(x):\\n    return 1\\n"` comes back as `"def f(x): return 1"`. This
vocabulary is meant for generating Python, so it is trained with the same
trainer (`sentencepiece.SentencePieceTrainer`) and the same id scheme that
function uses (`<pad>` 0, `<unk>` 1, `<s>` 2, `</s>` 3), plus the options in
`TRAINER_OPTIONS`: identity normalisation, no whitespace folding, no dummy
prefix, whitespace-only pieces (indentation), byte fallback (any UTF-8 text is
representable) and training "sentences" that keep their newlines.

BPE rather than unigram: on held-out stdlib code BPE compresses as well as or
better than unigram at this size, and its ids are identical on keras-hub's two
tokenisation paths (the `sentencepiece` package used eagerly and the
`tensorflow-text` kernel used inside `tf.data`); unigram's Viterbi ties on runs
of one character (indentation) are broken differently by the two.
"""

import argparse
import hashlib
import io
import os
import sys
import time

from keras_brainformer.models.brainformer.brainformer_tokenizer import SPECIAL_TOKEN_TRAINER_OPTIONS

VOCABULARY_SIZE = 8192
MODEL_TYPE = "bpe"
MAX_SOURCE_BYTES = 4_000_000
MAX_HELD_OUT_BYTES = 1_000_000
CHUNK_CHARACTERS = 2000
SEED = 1234
# The shipped proto was trained with these versions: other CPython versions
# have other standard-library sources, so they train a (slightly) different
# vocabulary; `--check` is exact only with both versions equal.
SHIPPED_WITH_PYTHON = "3.11.7"
SHIPPED_WITH_SENTENCEPIECE = "0.2.3"

REPOSITORY_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUTPUT = os.path.join(
    REPOSITORY_ROOT, "keras_brainformer", "assets", "brainformer_stdlib_8k.spm"
)

TRAINER_OPTIONS = dict(
    model_type=MODEL_TYPE,
    **SPECIAL_TOKEN_TRAINER_OPTIONS,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    byte_fallback=True,
    character_coverage=0.9999,
    max_sentence_length=1 << 16,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    num_threads=1,
    minloglevel=2,
)


def text_chunks(texts, chunk_characters=CHUNK_CHARACTERS):
    """Cuts texts at blank lines into pieces of about `chunk_characters`.

    Every chunk keeps its newlines and indentation, so the trainer sees "\\n"
    and runs of spaces as ordinary characters.
    """
    for text in texts:
        buffer = ""
        for block in text.split("\n\n"):
            if buffer and len(buffer) + len(block) > chunk_characters:
                yield buffer
                buffer = ""
            buffer += block + "\n\n"
        if buffer.strip():
            yield buffer


def read_files(paths):
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as file:
            yield file.read()


def train(vocabulary_size=VOCABULARY_SIZE, max_source_bytes=MAX_SOURCE_BYTES, verbose=True):
    """Returns `(proto_bytes, stats)` for the vocabulary trained on the corpus."""
    import sentencepiece

    from keras_brainformer.training.builtin_text import pydoc_text
    from keras_brainformer.training.builtin_text import stdlib_source_files

    files = stdlib_source_files(max_bytes=max_source_bytes)
    prose = pydoc_text()
    source_bytes = sum(os.path.getsize(path) for path in files)
    chunks = list(text_chunks([prose, *read_files(files)]))
    stats = {
        "python": sys.version.split()[0],
        "sentencepiece": sentencepiece.__version__,
        "stdlib_files": len(files),
        "stdlib_bytes": source_bytes,
        "pydoc_characters": len(prose),
        "chunks": len(chunks),
    }
    if verbose:
        print(
            f"corpus: pydoc_data.topics ({len(prose):,} characters) + {len(files)} stdlib "
            f"files ({source_bytes:,} bytes) = {len(chunks):,} chunks "
            f"(Python {stats['python']}, sentencepiece {stats['sentencepiece']})",
            flush=True,
        )
        print(
            f"training a {MODEL_TYPE} vocabulary of {vocabulary_size} pieces ...",
            flush=True,
        )
    sentencepiece.set_random_generator_seed(SEED)
    writer = io.BytesIO()
    start = time.perf_counter()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(chunks),
        model_writer=writer,
        vocab_size=vocabulary_size,
        **TRAINER_OPTIONS,
    )
    stats["training_seconds"] = time.perf_counter() - start
    proto = writer.getvalue()
    if verbose:
        print(f"trained in {stats['training_seconds']:.1f} s", flush=True)
    return proto, stats


def vocabulary_stats(proto):
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    control = [i for i in range(len(pieces)) if processor.is_control(i)]
    byte = [i for i in range(len(pieces)) if processor.is_byte(i)]
    return {
        "pieces": len(pieces),
        "control": len(control) + 1,  # + <unk>
        "byte_fallback": len(byte),
        "whitespace_only": sum(1 for p in pieces if p and set(p) == {"\u2581"}),
        "with_newline": sum(1 for p in pieces if "\n" in p),
        "longest_piece": max((p for p in pieces), key=len),
        "special": {p: processor.piece_to_id(p) for p in ("<pad>", "<unk>", "<s>", "</s>")},
    }


def evaluate(proto, max_held_out_bytes=MAX_HELD_OUT_BYTES):
    """Characters per token and exact round trips on held-out stdlib files."""
    import sentencepiece

    from keras_brainformer.training.builtin_text import stdlib_source_files

    processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    files = stdlib_source_files(max_bytes=max_held_out_bytes, held_out=True)
    characters = tokens = failures = 0
    for text in read_files(files):
        ids = processor.encode(text)
        characters += len(text)
        tokens += len(ids)
        failures += processor.decode(ids) != text
    return {
        "held_out_files": len(files),
        "held_out_characters": characters,
        "held_out_tokens": tokens,
        "characters_per_token": characters / max(tokens, 1),
        "round_trip_failures": failures,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--vocabulary-size", type=int, default=VOCABULARY_SIZE)
    parser.add_argument("--max-source-bytes", type=int, default=MAX_SOURCE_BYTES)
    parser.add_argument(
        "--check",
        action="store_true",
        help="retrain and compare with --output instead of writing it (exit 1 if different)",
    )
    args = parser.parse_args(argv)
    if REPOSITORY_ROOT not in sys.path:
        sys.path.insert(0, REPOSITORY_ROOT)

    proto, _ = train(args.vocabulary_size, args.max_source_bytes)
    digest = hashlib.sha256(proto).hexdigest()
    stats = vocabulary_stats(proto)
    print(
        f"vocabulary: {stats['pieces']} pieces ({stats['control']} special, "
        f"{stats['byte_fallback']} byte-fallback, {stats['whitespace_only']} whitespace-only, "
        f"{stats['with_newline']} containing a newline); longest piece "
        f"{stats['longest_piece']!r}; special ids {stats['special']}"
    )
    print(f"proto: {len(proto):,} bytes, sha256 {digest}")
    evaluation = evaluate(proto)
    print(
        f"held-out: {evaluation['held_out_files']} stdlib files, "
        f"{evaluation['held_out_characters']:,} characters -> "
        f"{evaluation['held_out_tokens']:,} tokens = "
        f"{evaluation['characters_per_token']:.2f} characters/token; "
        f"{evaluation['round_trip_failures']} inexact round trips"
    )
    if args.check:
        with open(args.output, "rb") as file:
            shipped = file.read()
        same = shipped == proto
        print(f"{args.output}: {'identical' if same else 'DIFFERENT'}")
        return 0 if same else 1
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "wb") as file:
        file.write(proto)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`TrainingConfig`: how a language model is trained, in one object.

`keras-brainformer train`, `compare` and `search` (and their functions
`train_language_model`, `compare_families`, `run_search`, `evaluate_block`)
train the same way: text from the same corpus reader, the same tokenizers,
the same batch shape, optimizer and seed. Those settings, their defaults,
their checks and their command-line flags are defined here once; each
command adds only what is its own (steps and a checkpoint schedule for
`train`, a budget and families for `compare`, the search space for
`search`).

This module imports nothing heavy: the command line builds its parsers from
it without loading a backend.
"""

import dataclasses
import math
import os

from keras_brainformer.argument_types import positive_float
from keras_brainformer.argument_types import positive_int
from keras_brainformer.errors import TrainingError

OPTIMIZERS = ("adafactor", "adamw")
# The families `compare` races when none are named (tiny, matched activated
# parameters).
COMPARE_DEFAULT_FAMILIES = ("brainformer1_tiny", "glam_tiny", "dense_tiny", "primer_tiny")
# "preset": each model's own tokenizer (its preset folder's), "sentencepiece":
# the shipped 8K vocabulary, "byte": 256 byte ids (any text, any vocabulary
# of at least 256 entries).
TOKENIZERS = ("preset", "sentencepiece", "byte")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
    """The training settings shared by `train`, `compare` and `search`.

    Frozen and checked when made: a bad value raises `TrainingError` naming
    the field, the value and what is allowed.

    Args:
        data_paths: text files or folders (a tuple of paths), or None for the
            embedded corpus (Python's reference manual and standard-library
            sources).
        encoding: text encoding of the files in `data_paths`.
        max_corpus_bytes: cap on the text read.
        tokenizer: `"preset"` (the model's own), `"sentencepiece"` (the
            shipped 8K vocabulary) or `"byte"`.
        sequence_length: tokens per training row.
        batch_size: rows per step.
        optimizer: `"adafactor"` (the paper's) or `"adamw"`.
        learning_rate: peak learning rate.
        seed: seeds initialisation and data order.
        validation_batches: validation batches per evaluation.

    Example:
    >>> config = TrainingConfig(batch_size=8, tokenizer="byte")
    >>> config.tokens_per_batch
    1024
    >>> config.replace(seed=1).seed
    1
    >>> TrainingConfig(batch_size=0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    keras_brainformer.errors.TrainingError: `batch_size` must be a positive integer. ...
    """

    data_paths: tuple = None
    encoding: str = "utf-8"
    max_corpus_bytes: int = 2_000_000
    tokenizer: str = "preset"
    sequence_length: int = 128
    batch_size: int = 16
    optimizer: str = "adafactor"
    learning_rate: float = 0.01
    seed: int = 0
    validation_batches: int = 8

    def __post_init__(self):
        for name in ("max_corpus_bytes", "sequence_length", "batch_size", "validation_batches"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise TrainingError(
                    f"`{name}` must be a positive integer. Received: {name}={value!r}"
                )
        rate = self.learning_rate
        if (
            isinstance(rate, bool)
            or not isinstance(rate, (int, float))
            or not math.isfinite(rate)
            or rate <= 0
        ):
            raise TrainingError(
                f"`learning_rate` must be a positive number. Received: learning_rate={rate!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TrainingError(f"`seed` must be an integer. Received: seed={self.seed!r}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("tokenizer", self.tokenizer, TOKENIZERS)
        if not isinstance(self.encoding, str) or not self.encoding:
            raise TrainingError(
                f"`encoding` must be a text encoding name. Received: encoding={self.encoding!r}"
            )
        paths = self.data_paths
        if paths is not None:
            if isinstance(paths, (str, os.PathLike)):
                paths = (paths,)
            paths = tuple(str(p) for p in paths) or None
            object.__setattr__(self, "data_paths", paths)
        for path in self.data_paths or ():
            if not os.path.exists(path):
                raise TrainingError(f"Data path {path!r} does not exist.")

    @property
    def tokens_per_batch(self):
        return self.batch_size * self.sequence_length

    def replace(self, **changes):
        """A copy with `changes` (checked like a new config)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def create(cls, config=None, **changes):
        """`config` (default: the defaults) with `changes` applied: how the
        functions taking a config also take its fields as keywords."""
        return (config or cls()).replace(**changes) if changes else (config or cls())

    @classmethod
    def from_dict(cls, values):
        """The config of a dict holding its fields (and maybe more keys,
        such as a command's saved settings)."""
        return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})

    def as_dict(self):
        """The settings as JSON-ready values (paths as a list)."""
        values = dataclasses.asdict(self)
        values["data_paths"] = list(self.data_paths) if self.data_paths else None
        return values

    # === The command line: each flag defined here, once ===

    @classmethod
    def add_arguments(cls, parser, defaults=None, tokenizers=TOKENIZERS):
        """Adds the flags of every field to an argparse (sub)parser.

        Args:
            parser: the parser of a command.
            defaults: a `TrainingConfig` holding that command's defaults
                (default: the class's).
            tokenizers: the tokenizer choices that command accepts.
        """
        default = dataclasses.asdict(defaults or cls())
        group = parser.add_argument_group("training settings (shared by train, compare, search)")
        group.add_argument(
            "--data", dest="data_paths", nargs="+", default=default["data_paths"],
            metavar="PATH",
            help="text files or folders (default: the embedded Python docs and stdlib sources)",
        )
        group.add_argument(
            "--encoding", default=default["encoding"],
            help="text encoding of the --data files (files that are not text in it are "
            "refused, or skipped in folders, by name)",
        )
        group.add_argument(
            "--max-corpus-bytes", type=positive_int, default=default["max_corpus_bytes"],
            help="cap on the text used (said when it applies)",
        )
        group.add_argument(
            "--tokenizer", choices=tokenizers, default=default["tokenizer"],
            help="'preset': the model's own; 'sentencepiece': the shipped 8K vocabulary; "
            "'byte': 256 byte ids",
        )
        group.add_argument(
            "--sequence-length", type=positive_int, default=default["sequence_length"],
            help="tokens per training row",
        )
        group.add_argument(
            "--batch-size", type=positive_int, default=default["batch_size"],
            help="rows per step",
        )
        group.add_argument("--optimizer", choices=OPTIMIZERS, default=default["optimizer"])
        group.add_argument(
            "--learning-rate", type=positive_float, default=default["learning_rate"],
            help="peak learning rate",
        )
        group.add_argument(
            "--seed", type=int, default=default["seed"],
            help="seeds initialisation and data order",
        )
        group.add_argument(
            "--validation-batches", type=positive_int, default=default["validation_batches"],
            help="validation batches per evaluation",
        )

    @classmethod
    def from_args(cls, args):
        """The config of parsed arguments (made by `add_arguments`)."""
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})

    def to_argv(self):
        """The flags that reproduce this config on a command line."""
        argv = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "data_paths":
                if value:
                    argv += ["--data", *value]
                continue
            flag = "--" + field.name.replace("_", "-")
            argv += [flag, repr(value) if isinstance(value, float) else str(value)]
        return argv


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise TrainingError(
            f"Unknown {name} {value!r}. Allowed: {', '.join(repr(a) for a in allowed)}."
        )


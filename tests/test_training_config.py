"""`TrainingConfig`: one definition of the training settings, their checks
and their flags, shared by `train`, `compare` and `search`."""

import dataclasses

import pytest

from keras_brainformer.cli.commands import build_parser
from keras_brainformer.errors import TrainingError
from keras_brainformer.search.driver import run_search
from keras_brainformer.search.training_proxy import SEARCH_TRAINING
from keras_brainformer.training.config import TrainingConfig

FIELDS = [f.name for f in dataclasses.fields(TrainingConfig)]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("batch_size", 0, "`batch_size` must be a positive integer. Received: batch_size=0"),
        ("sequence_length", 2.5, "`sequence_length` must be a positive integer"),
        ("validation_batches", True, "`validation_batches` must be a positive integer"),
        ("max_corpus_bytes", -1, "`max_corpus_bytes` must be a positive integer"),
        ("learning_rate", 0.0, "`learning_rate` must be a positive number"),
        ("learning_rate", float("nan"), "`learning_rate` must be a positive number"),
        ("seed", 1.5, "`seed` must be an integer"),
        ("optimizer", "sgd", "Unknown optimizer 'sgd'. Allowed: 'adafactor', 'adamw'."),
        ("tokenizer", "bpe", "Unknown tokenizer 'bpe'. Allowed: 'preset', 'sentencepiece', 'byte'"),
        ("encoding", "", "`encoding` must be a text encoding name"),
        ("data_paths", ["/no/such/file.txt"], "Data path '/no/such/file.txt' does not exist."),
    ],
)
def test_bad_values_are_refused_naming_field_and_value(field, value, message):
    with pytest.raises(TrainingError) as error:
        TrainingConfig(**{field: value})
    assert message in str(error.value)
    # `replace` checks the same way.
    with pytest.raises(TrainingError):
        TrainingConfig().replace(**{field: value})


def test_frozen_and_paths_normalised(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello")
    config = TrainingConfig(data_paths=path)
    assert config.data_paths == (str(path),)
    assert TrainingConfig(data_paths=[]).data_paths is None
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 2
    assert config.as_dict()["data_paths"] == [str(path)]
    assert TrainingConfig.from_dict({**config.as_dict(), "other": 1}) == config


def test_create_applies_keywords_over_a_config():
    base = TrainingConfig(batch_size=4)
    assert TrainingConfig.create() == TrainingConfig()
    assert TrainingConfig.create(base) is base
    assert TrainingConfig.create(base, seed=3) == TrainingConfig(batch_size=4, seed=3)
    with pytest.raises(TypeError):
        TrainingConfig.create(base, batchsize=3)


@pytest.mark.parametrize("command", ["train", "compare", "search"])
def test_each_command_takes_every_field_from_one_definition(command, tmp_path):
    """Every field is a flag of each command, parsed back exactly."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("text")
    tokenizer = "byte"
    config = TrainingConfig(
        data_paths=(str(corpus),), encoding="latin-1", max_corpus_bytes=1234,
        tokenizer=tokenizer, sequence_length=32, batch_size=3, optimizer="adamw",
        learning_rate=0.003, seed=7, validation_batches=2,
    )
    required = ["--preset", "dense_tiny"] if command == "train" else []
    args = build_parser(only=command).parse_args([command, *required, *config.to_argv()])
    assert TrainingConfig.from_args(args) == config


def test_command_defaults():
    parse = lambda *argv: TrainingConfig.from_args(build_parser(only=argv[0]).parse_args(argv))  # noqa: E731
    assert parse("train", "--preset", "dense_tiny") == TrainingConfig()
    assert parse("compare") == TrainingConfig()
    # The search builds its models (no preset tokenizer), and evaluates twice a trial.
    assert parse("search") == SEARCH_TRAINING
    assert SEARCH_TRAINING.tokenizer == "sentencepiece" and SEARCH_TRAINING.validation_batches == 4


def test_search_refuses_the_preset_tokenizer():
    with pytest.raises(SystemExit):
        build_parser(only="search").parse_args(["search", "--tokenizer", "preset"])
    with pytest.raises(TrainingError, match="Unknown tokenizer 'preset' for a search"):
        run_search(out="unused", tokenizer="preset")


def test_flags_are_defined_once():
    """No command defines a training flag of its own beside the shared ones."""
    for command in ("train", "compare", "search"):
        parser = build_parser(only=command)
        sub = parser._subparsers._group_actions[0].choices[command]
        destinations = [a.dest for a in sub._actions]
        for field in FIELDS:
            assert destinations.count(field) == 1, (command, field)

"""`keras-brainformer`: presets listing, bad input, a smoke `train`, generation
from the written preset, resume after SIGKILL, and a tiny `compare`.

Trainings and subprocesses are the slow tier (`-m slow`)."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import h5py
import numpy as np
import pytest

from keras_brainformer import cli
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets

# Seconds-scale settings: tiny model, short sequences, a small corpus slice.
SMOKE = [
    "--sequence-length", "32",
    "--batch-size", "4",
    "--steps-per-epoch", "2",
    "--max-corpus-bytes", "150000",
    "--validation-batches", "1",
]  # fmt: skip


def run_cli(argv):
    return cli.main([str(a) for a in argv])


def test_presets_lists_every_preset(capsys):
    assert run_cli(["presets"]) == 0
    out = capsys.readouterr().out
    for name in backbone_presets:
        assert name in out
    assert "Table 3" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--preset", "no_such_preset"], "Unknown preset"),
        (["train", "--preset", "dense_tiny", "--data", "/no/such/file.txt"], "does not exist"),
        # A trained preset is a valid starting point (fine-tuning on your text):
        # the error is about the data, not the preset.
        (["train", "--preset", "brainformer1_tiny_stdlib", "--data", "/no/such"],
         "does not exist"),
        (["train", "--preset", "brainformer1_tiny", "--sequence-length", "300"],
         "longer than the model's max_sequence_length 256"),
        (["train", "--preset", "dense_tiny", "--batch-size", "1000",
          "--max-corpus-bytes", "150000"], "batch"),
        # Far beyond this machine's memory: refused before anything runs.
        (["train", "--preset", "dense_tiny", "--batch-size", "1000000"],
         "GB of memory for one training step"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(argv, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli(argv + ["--out", out]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err
    assert not out.exists()


def test_out_pointing_at_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "a_file"
    out.write_text("mine")
    assert run_cli(["train", "--preset", "dense_tiny", "--out", out]) == 2
    assert "is a file" in capsys.readouterr().err
    assert out.read_text() == "mine"


def test_a_run_folder_in_use_is_refused(tmp_path, capsys):
    from keras_brainformer.training.run_lock import RunFolderLock

    out = tmp_path / "run"
    with RunFolderLock(out):  # another `train` (here: this process) holds it
        assert run_cli(["train", "--preset", "dense_tiny", "--out", out]) == 2
    assert "is in use by process" in capsys.readouterr().err
    assert not out.exists()  # the holder created it and left nothing


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sampler", "nope"], "Unknown --sampler 'nope'. Allowed: greedy, top_k"),
        (["--max-length", "9999"], "longer than the model's max_sequence_length 256"),
        (["--max-length", "2"], "leaves no room to generate"),
    ],
)
def test_generate_rejects_with_one_line(argv, message, capsys):
    code = run_cli(["generate", "--preset", "dense_tiny_stdlib", *argv, "def f(x):"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_generate_advice_for_a_prompt_longer_than_the_model_is_possible(capsys):
    # Was "Use a --max-length above 8500 (at most 256)": no such length exists.
    code = run_cli(["generate", "--preset", "dense_tiny_stdlib", "x " * 300])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The prompt 'x x x") and err.count("\n") == 1, err
    assert "max_sequence_length 256 leaves room for at most 255" in err
    assert "Use a prompt of at most 254 tokens" in err and "above" not in err


def test_generate_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        run_cli(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 64)", "(default: top_k)", "(default: 0)"):
        assert default in out, out


def test_generate_refuses_a_folder_that_is_not_a_preset(tmp_path, capsys):
    assert run_cli(["generate", "--preset", tmp_path, "hi"]) == 2
    assert "not a zoo preset name" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_from_random_weights_says_so(capsys):
    assert run_cli(["generate", "--preset", "dense_tiny", "--max-length", "6", "hi"]) == 0
    assert "no trained weights" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--time-budget", "-1")])
def test_non_positive_budget_is_a_usage_error(flag, value, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["train", "--preset", "dense_tiny", flag, value, "--out", tmp_path / "r"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "r").exists()


def test_empty_corpus_exits_2(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "empty.txt").write_text("")
    argv = ["train", "--preset", "dense_tiny", "--data", tmp_path / "data"]
    assert run_cli(argv + ["--out", tmp_path / "run"]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "run" / "preset").exists()


@pytest.mark.slow
def test_smoke_train_writes_a_loadable_preset_and_refuses_other_runs(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--preset", "glam_ec_tiny", "--steps", "4", "--out", out] + SMOKE
    assert run_cli(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["tokens_seen"] == 4 * 4 * 32
    assert np.isfinite(summary["validation_loss_causal"])
    assert summary["has_moe"] and np.isfinite(summary["validation_loss_as_trained"])
    printed = capsys.readouterr().out
    assert "causal routing" in printed and "as trained" in printed
    with open(out / "history.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2  # two epochs of two steps
    assert {"tokens_per_second", "learning_rate", "val_loss"} <= set(rows[0])
    assert list((out / "logs").rglob("events.out.tfevents*"))
    # The preset generates text from the command line.
    assert run_cli(["generate", "--preset", out / "preset", "def ", "--max-length", "12"]) == 0
    assert "def " in capsys.readouterr().out
    # Same folder, other settings: refused (exit 2) and left as it was ...
    other = ["train", "--preset", "dense_tiny", "--steps", "4", "--out", out] + SMOKE
    assert run_cli(other) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert json.loads((out / "run.json").read_text())["preset"] == "glam_ec_tiny"
    # ... unless asked to overwrite.
    assert run_cli(other + ["--overwrite"]) == 0
    assert json.loads((out / "run.json").read_text())["preset"] == "dense_tiny"


def _train_subprocess(out, faults=None):
    """`keras-brainformer train` in a subprocess; `faults` (a dict) runs it
    through `tests/faulty_train.py`, which injects them."""
    command = [sys.executable, "-m", "keras_brainformer"]
    if faults:
        command = [sys.executable, str(pathlib.Path(__file__).parent / "faulty_train.py"),
                   json.dumps(faults)]
    argv = command + [
        "train", "--preset", "brainformer1_tiny",
        "--steps", "6", "--out", str(out), "--seed", "3",
    ] + SMOKE  # fmt: skip
    return subprocess.run(argv, env=dict(os.environ), capture_output=True, text=True,
                          timeout=600)


def _weights(preset_dir):
    values = {}
    with h5py.File(pathlib.Path(preset_dir) / "model.weights.h5", "r") as f:
        f.visititems(
            lambda name, item: values.__setitem__(name, item[()])
            if isinstance(item, h5py.Dataset)
            else None
        )
    return values


@pytest.mark.slow
def test_resume_after_sigkill_ctrl_c_or_a_cut_epoch_ends_like_an_uninterrupted_run(tmp_path):
    """Killed after a checkpoint, killed in the middle of one, Ctrl-C in the
    middle of an epoch, and an epoch cut short (as a time budget does): each
    rerun of the same command ends with the uninterrupted run's weights and
    losses (no batch skipped or repeated)."""
    # Uninterrupted: 3 epochs of 2 steps.
    done = _train_subprocess(tmp_path / "straight")
    assert done.returncode == 0, done.stderr[-2000:]
    # Killed (SIGKILL) right after epoch 1's checkpoint, then the same command again.
    killed = _train_subprocess(tmp_path / "resumed", {"kill_at_epoch": 1})
    assert killed.returncode == -9
    assert not (tmp_path / "resumed" / "summary.json").exists()
    resumed = _train_subprocess(tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Resuming" in resumed.stdout
    # Killed in the middle of epoch 2's checkpoint (its weights written, its
    # epoch not yet): the half-written checkpoint must not be used.
    torn = _train_subprocess(tmp_path / "torn", {"kill_in_checkpoint": "2:weights"})
    assert torn.returncode == -9
    assert list((tmp_path / "torn" / "backup").glob("step-000000004.partial"))
    again_torn = _train_subprocess(tmp_path / "torn")
    assert again_torn.returncode == 0, again_torn.stderr[-2000:]
    assert "Resuming" in again_torn.stdout and "after epoch 1 of 3" in again_torn.stdout
    # Ctrl-C (a real SIGINT) during step 3: it finishes, its checkpoint is
    # written, exit 130 with nothing else written and the lock released.
    ctrl_c = _train_subprocess(tmp_path / "ctrl_c", {"sigint_in_step": 3})
    assert ctrl_c.returncode == 130, ctrl_c.stderr[-2000:]
    assert "Interrupted: the checkpoint at step 3 is written" in ctrl_c.stderr
    assert "Run the same command again" in ctrl_c.stderr
    assert "Traceback" not in ctrl_c.stderr
    assert not (tmp_path / "ctrl_c" / "summary.json").exists()
    assert not (tmp_path / "ctrl_c" / ".lock").exists()
    again_ctrl_c = _train_subprocess(tmp_path / "ctrl_c")
    assert again_ctrl_c.returncode == 0, again_ctrl_c.stderr[-2000:]
    assert "at step 3 of 6 (after epoch 1 of 3, 1 steps into the next)" in again_ctrl_c.stdout
    # An epoch cut short at step 3 (what --time-budget does): the run ends
    # normally, and the rerun finishes the cut epoch from step 3.
    cut = _train_subprocess(tmp_path / "cut", {"stop_at_step": 3})
    assert cut.returncode == 0, cut.stderr[-2000:]
    assert "Stopped at step 3 of 6" in cut.stdout
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["steps"] == 3
    again_cut = _train_subprocess(tmp_path / "cut")
    assert again_cut.returncode == 0, again_cut.stderr[-2000:]
    assert "at step 3 of 6" in again_cut.stdout
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    a = _weights(tmp_path / "straight" / "preset")
    for run in ("resumed", "torn", "ctrl_c", "cut"):
        again = json.loads((tmp_path / run / "summary.json").read_text())
        assert again["steps"] == straight["steps"] == 6
        for key in ("validation_loss_causal", "validation_loss_as_trained"):
            assert again[key] == pytest.approx(straight[key], abs=1e-6)
        b = _weights(tmp_path / run / "preset")
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=f"{run}: {name}")


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    # Epoch 1 = steps 1-2 (checkpointed); step 3's loss is NaN.
    out = tmp_path / "nan"
    done = _train_subprocess(out, {"nan_at_step": 3})
    assert done.returncode == 3, done.stderr[-2000:]
    assert "the training loss is nan" in done.stderr
    assert "at epoch 2, batch 1 (optimizer step 3)" in done.stderr
    assert "checkpoint after epoch 1 is kept" in done.stderr
    assert not (out / "preset").exists() and not (out / "summary.json").exists()
    backup = sorted((out / "backup").rglob("*.weights.h5"))
    assert backup
    for path in backup:  # every checkpoint on disk is the good one
        with h5py.File(path, "r") as f:
            values = []
            f.visititems(
                lambda name, item: values.append(item[()])
                if isinstance(item, h5py.Dataset) else None
            )
        assert values and all(np.all(np.isfinite(v)) for v in values), path


@pytest.mark.slow
def test_time_budget_and_mixed_bfloat16(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--preset", "primer_tiny", "--steps", "400", "--time-budget", "0.5"]
    assert run_cli(argv + ["--mixed-bfloat16", "--out", out] + SMOKE) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 1 <= summary["steps"] < 400  # stopped by the clock, not the step count
    assert np.isfinite(summary["validation_loss_causal"])
    config = json.loads((out / "preset" / "config.json").read_text())["config"]
    assert config["dtype"]["config"]["name"] == "mixed_bfloat16"


def test_train_refuses_a_binary_or_undecodable_file_by_name(tmp_path, capsys):
    (tmp_path / "random.bin").write_bytes(bytes(range(256)) * 1000)
    (tmp_path / "latin1.txt").write_bytes("café crème\n".encode("latin-1") * 1000)
    for name, words in (("random.bin", "binary data"), ("latin1.txt", "not utf-8 text")):
        out = tmp_path / f"run_{name}"
        argv = ["train", "--preset", "dense_tiny", "--data", tmp_path / name, "--out", out]
        assert run_cli(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and name in err and words in err, err
        assert not out.exists()
    argv = ["train", "--preset", "dense_tiny", "--data", tmp_path / "latin1.txt",
            "--encoding", "klingon", "--out", tmp_path / "run"]
    assert run_cli(argv) == 2
    assert "Unknown encoding 'klingon'" in capsys.readouterr().err


@pytest.mark.slow
def test_help_and_presets_load_no_backend_and_commands_print_no_native_logs():
    code = (
        "import sys\n"
        "from keras_brainformer import cli\n"
        "assert cli.main(['presets']) == 0\n"
        "try:\n"
        "    cli.main(['--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('keras', 'jax', 'tensorflow', 'keras_hub') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout and "brainformer1_tiny_stdlib" in done.stdout
    generate = subprocess.run(
        [sys.executable, "-m", "keras_brainformer", "generate", "--preset",
         "dense_tiny_stdlib", "--max-length", "8", "def"],
        capture_output=True, text=True, timeout=300,
    )
    assert generate.returncode == 0, generate.stderr
    assert generate.stderr == "", generate.stderr  # no oneDNN/CUDA/absl/SentencePiece lines
    verbose = subprocess.run(
        [sys.executable, "-m", "keras_brainformer", "generate", "--preset",
         "dense_tiny_stdlib", "--max-length", "8", "--verbose", "def"],
        capture_output=True, text=True, timeout=300,
    )
    assert verbose.returncode == 0 and verbose.stderr != ""


def test_an_environment_failure_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys):
    import errno

    from keras_brainformer.training import trainer

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left for a checkpoint", str(tmp_path))

    monkeypatch.setattr(trainer, "train_language_model", full_disk)
    assert run_cli(["train", "--preset", "dense_tiny", "--out", tmp_path / "run"]) == 1
    err = capsys.readouterr().err
    assert err == f"error: No space left for a checkpoint: {tmp_path}\n"


def test_compare_help_examples_parse():
    """Every command line in `compare --help`'s examples (the studies of
    docs/reproducing_the_paper.md among them) is one the parser accepts."""
    from keras_brainformer.cli.commands import COMPARE_EPILOG
    from keras_brainformer.cli.commands import build_parser

    joined = COMPARE_EPILOG.replace("\\\n", " ")
    lines = [line.split() for line in joined.splitlines() if "keras-brainformer" in line]
    assert len(lines) >= 4
    parser = build_parser(only="compare")
    for words in lines:
        assert words[:2] == ["keras-brainformer", "compare"], words
        args = parser.parse_args(words[1:])
        assert args.command == "compare"
    studies = [words for words in lines if "--out" in words and "small" in " ".join(words)]
    assert any("runs/small_bytes_300s" in words for words in studies)
    assert any("keras/src" in words and "byte" in words for words in studies)  # study 3
    assert any(  # study 4
        "docs/study_evidence/presets/searched_small" in words for words in studies
    )
    assert any("sentencepiece" in words and "brainformer1_tiny" in words for words in lines)

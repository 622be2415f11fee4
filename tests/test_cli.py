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


def _train_subprocess(out, faults=None, extra=()):
    """`keras-brainformer train` in a subprocess; `faults` (a dict) runs it
    through `tests/faulty_train.py`, which injects them; `extra`: more flags."""
    command = [sys.executable, "-m", "keras_brainformer"]
    if faults:
        command = [sys.executable, str(pathlib.Path(__file__).parent / "faulty_train.py"),
                   json.dumps(faults)]
    argv = command + [
        "train", "--preset", "brainformer1_tiny",
        "--steps", "6", "--out", str(out), "--seed", "3",
    ] + SMOKE + [str(a) for a in extra]  # fmt: skip
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
    assert "Interrupted (SIGINT): the checkpoint at step 3 is written" in ctrl_c.stderr
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
    assert "Trained 3 steps in" in again_cut.stdout and "(steps 4-6, resumed at step 3)" in \
        again_cut.stdout
    # SIGTERM (a scheduler, a preempted VM) while epoch 2's checkpoint is
    # written: that checkpoint completes, exit 143 with the resume line, no
    # partial folder, no lock.
    term = _train_subprocess(tmp_path / "sigterm", {"signal_in_checkpoint": "2:weights:SIGTERM"})
    assert term.returncode == 143, term.stderr[-2000:]
    assert "Interrupted (SIGTERM): the checkpoint at step 4 is written" in term.stderr
    assert "Run the same command again" in term.stderr and "Traceback" not in term.stderr
    assert not list((tmp_path / "sigterm" / "backup").glob("*.partial"))
    assert not (tmp_path / "sigterm" / ".lock").exists()
    again_term = _train_subprocess(tmp_path / "sigterm")
    assert again_term.returncode == 0, again_term.stderr[-2000:]
    assert "at step 4 of 6 (after epoch 2 of 3)" in again_term.stdout
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    a = _weights(tmp_path / "straight" / "preset")
    for run in ("straight", "resumed", "torn", "ctrl_c", "cut", "sigterm"):
        # One row per epoch, whatever the interruptions (before: the cut
        # epoch and the epoch of a checkpoint killed half way came twice).
        with open(tmp_path / run / "history.csv") as f:
            assert [row["epoch"] for row in csv.DictReader(f)] == ["0", "1", "2"], run
    for run in ("resumed", "torn", "ctrl_c", "cut", "sigterm"):
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


def test_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for out in ("", "  "):
        assert run_cli(["train", "--preset", "dense_tiny", "--out", out]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out") and "empty" in err and err.count("\n") == 1, err
    assert list(tmp_path.iterdir()) == []  # no runs/dense_tiny, nothing in the cwd


def test_a_corpus_too_small_names_the_flags(tmp_path, capsys):
    """The message names `train`'s flags (not the corpus functions'
    `max_bytes` / `validation_fraction`, which are no flags)."""
    (tmp_path / "tiny.txt").write_text("hello world\nthis is tiny\n")
    argv = ["train", "--preset", "dense_tiny", "--data", tmp_path / "tiny.txt",
            "--out", tmp_path / "run"]
    assert run_cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: The corpus is too small") and err.count("\n") == 1, err
    assert "--sequence-length" in err and "--data" in err
    assert "max_bytes" not in err and "validation_fraction" not in err
    assert not (tmp_path / "run").exists()


def test_an_error_under_a_progress_bar_starts_its_own_line(monkeypatch, tmp_path, capsys):
    """Keras' progress bar leaves its line open; the `error:` line that
    follows must not be glued to it."""
    import errno

    from keras_brainformer.training import trainer

    def full_disk_mid_epoch(*args, **kwargs):
        sys.stdout.write("\r1/2 ━━━━━━━━━━ 0s 63ms/step - loss: 9.0149")
        raise OSError(errno.ENOSPC, "No space left on device while writing the checkpoint")

    monkeypatch.setattr(trainer, "train_language_model", full_disk_mid_epoch)
    assert run_cli(["train", "--preset", "dense_tiny", "--out", tmp_path / "run"]) == 1
    captured = capsys.readouterr()
    assert captured.out.endswith("loss: 9.0149\n")
    assert captured.err == "error: No space left on device while writing the checkpoint\n"


def test_sigterm_outside_the_training_steps_releases_the_lock_and_exits_143(
    monkeypatch, tmp_path, capsys
):
    """SIGTERM while the data loads or the model builds (before the steps,
    where a checkpoint is written instead): 143 with a message and the run
    folder's lock released (before: killed at once, the lock left)."""
    import signal

    from keras_brainformer.training import trainer
    from keras_brainformer.training.run_lock import RunFolderLock

    def terminated_while_loading(preset, out, *args, **kwargs):
        with RunFolderLock(out):
            os.kill(os.getpid(), signal.SIGTERM)
            raise AssertionError("SIGTERM did not stop the command")

    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(trainer, "train_language_model", terminated_while_loading)
    assert run_cli(["train", "--preset", "dense_tiny", "--out", tmp_path / "run"]) == 143
    assert "Terminated (SIGTERM)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # lock released, the empty folder removed
    assert signal.getsignal(signal.SIGTERM) == before


def test_the_summary_tells_this_invocation_from_the_run():
    from keras_brainformer.training.trainer import format_summary

    common = dict(validation_loss_causal=5.0, validation_perplexity_causal=148.4,
                  has_moe=False, preset_dir="runs/x/preset", sample="def",
                  seconds_this_run=12.3, tokens_seen=7680)
    resumed = format_summary(dict(common, steps=60, total_steps=60, steps_this_run=20,
                                  first_step_this_run=40))
    assert resumed.splitlines()[0] == (
        "Trained 20 steps in 12 s this run (steps 41-60, resumed at step 40); all 60 steps "
        "of the run done (7,680 tokens)."
    )
    fresh = format_summary(dict(common, steps=60, total_steps=60, steps_this_run=60,
                                first_step_this_run=0))
    assert fresh.splitlines()[0] == "Trained 60 steps (7,680 tokens) in 12 s."
    stopped = format_summary(dict(common, steps=30, total_steps=60, steps_this_run=30,
                                  first_step_this_run=0))
    assert stopped.splitlines()[0].endswith("; 30 of 60 steps done.")


@pytest.mark.slow
def test_a_resume_on_changed_data_is_refused_unless_allowed(tmp_path):
    """Interrupt, edit the corpus, rerun: refused with one `error:` line
    naming what changed (before: resumed silently on the new data);
    `--allow-data-change` continues and records the change."""
    corpus = tmp_path / "corpus.txt"
    source = pathlib.Path(json.__file__).parent
    corpus.write_text("".join(p.read_text() for p in sorted(source.glob("*.py"))))
    out = tmp_path / "run"
    data = ["--data", corpus, "--max-corpus-bytes", "1000000"]
    cut = _train_subprocess(out, {"stop_at_step": 2}, extra=data)
    assert cut.returncode == 0, cut.stderr[-2000:]
    unchanged = _train_subprocess(out, {"stop_at_step": 3}, extra=data)  # same data: resumes
    assert unchanged.returncode == 0 and "Resuming" in unchanged.stdout, unchanged.stderr[-2000:]
    corpus.write_text(corpus.read_text() * 2)
    refused = _train_subprocess(out, extra=data)
    assert refused.returncode == 2, refused.stderr[-2000:]
    err = [line for line in refused.stderr.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert "The data changed since the checkpoint at step 3" in err[0]
    assert "the train split went from" in err[0] and f"edited: {corpus.as_posix()}" in err[0]
    assert "--allow-data-change" in err[0]
    assert "Resuming" not in refused.stdout
    allowed = _train_subprocess(out, extra=data + ["--allow-data-change"])
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert "warning: the data changed since the checkpoint at step 3" in allowed.stdout
    recorded = json.loads((out / "data.json").read_text())
    assert recorded["accepted_changes"][0]["step"] == 3


@pytest.mark.slow
@pytest.mark.parametrize("fault, at_first", [
    ({"file_size_limit": 4_000_000}, True),  # the kernel refuses to write past 4 MB: EFBIG
    ({"disk_full_at_step": 4}, False),  # the disk fills in the middle of epoch 2's write
])
def test_a_disk_filling_during_a_checkpoint_is_one_error_line_and_exit_1(
    tmp_path, fault, at_first
):
    """Before: exit 139 (HDF5 segfaults after a failed write), a multi-line
    error and six `__dealloc__` tracebacks. Now: exit 1, one `error:` line
    on a line of its own, no partial folder, no lock, and the rerun resumes
    from the checkpoint the message names."""
    out = tmp_path / "run"
    done = _train_subprocess(out, fault)
    assert done.returncode == 1, (done.returncode, done.stderr[-3000:])
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    for trace in ("Traceback", "__dealloc__", "errno =", "Segmentation"):
        assert trace not in done.stderr, done.stderr[-3000:]
    assert done.stdout.endswith("\n")  # the progress bar's line is ended first
    assert not list((out / "backup").glob("*.partial")) and not (out / ".lock").exists()
    if at_first:
        assert "File too large while writing the checkpoint at step 2" in lines[0]
        assert "no earlier checkpoint exists" in lines[0]
        assert not list((out / "backup").iterdir())
        return
    assert "No space left on device while writing the checkpoint at step 4" in lines[0]
    assert "the checkpoint at step 2 (step-000000002) is intact" in lines[0]
    again = _train_subprocess(out)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Resuming" in again.stdout and "at step 2 of 6" in again.stdout


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

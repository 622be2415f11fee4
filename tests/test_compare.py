"""`keras-brainformer compare` as a study: any presets, seeds, intervals,
the paired clock, resuming."""

import csv
import json
import math

import numpy as np
import pytest

from keras_brainformer.errors import TrainingError
from keras_brainformer.models import BrainformerByteTokenizer
from keras_brainformer.training import compare
from keras_brainformer.training.compare import compare_families
from keras_brainformer.training.compare import summarise

SMALL = dict(sequence_length=32, batch_size=4, eval_every=3, max_corpus_bytes=150_000,
             validation_batches=1, timing_rounds=2, timing_steps=3, verbose=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"families": ()}, "`families` is empty"),
        ({"families": ("no_such_preset",)}, "Unknown preset 'no_such_preset'"),
        ({"budget": 0}, "`budget` must be > 0 seconds"),
        ({"seeds": (0, 0)}, "A seed is listed twice"),
        ({"seeds": (0.5,)}, "Seeds must be integers"),
        ({"clock": "cpu"}, "Unknown clock 'cpu'. Allowed: 'paired', 'wall'."),
        ({"reference": "primer_tiny"}, "Unknown reference family 'primer_tiny'"),
        ({"target_loss": -1.0}, "`target_loss` must be a loss > 0"),
        ({"eval_every": 0}, "`eval_every` must be a positive integer"),
        ({"steps": 0}, "`steps` must be a positive integer"),
        ({"steps": 2.5}, "`steps` must be a positive integer"),
        ({"sequence_length": 4096}, "longer than the model's max_sequence_length"),
    ],
)
def test_bad_study_arguments_are_refused_before_anything_is_written(kwargs, message, tmp_path):
    arguments = {"families": ("dense_tiny", "glam_tiny"), "out": tmp_path / "study", **kwargs}
    with pytest.raises(TrainingError, match=message):
        compare_families(**arguments)
    assert not (tmp_path / "study").exists()


def test_families_of_other_vocabularies_need_one_tokenizer():
    families = ("dense_tiny", "dense_100m")  # 8192 vs the paper's 256K entries
    configs = {p: compare.preset_model_config(p) for p in families}
    with pytest.raises(TrainingError, match="do not share one vocabulary"):
        compare._shared_tokenizer(families, configs, "preset")
    assert isinstance(compare._shared_tokenizer(families, configs, "byte"),
                      BrainformerByteTokenizer)


def test_a_study_with_other_settings_is_refused_and_more_seeds_extend_it(tmp_path):
    out = tmp_path / "study"
    study = {"families": ["dense_tiny"], "budget_seconds": 5.0, "seeds": [0]}
    compare._claim_output_folder(out, study, overwrite=False)
    (out / "runs").mkdir()
    compare._claim_output_folder(out, {**study, "seeds": [0, 1, 2]}, overwrite=False)
    assert (out / "runs").exists()  # extended, kept
    with pytest.raises(TrainingError, match="differing: budget_seconds"):
        compare._claim_output_folder(out, {**study, "budget_seconds": 9.0}, overwrite=False)
    compare._claim_output_folder(out, {**study, "budget_seconds": 9.0}, overwrite=True)
    assert not (out / "runs").exists()


def _run(family, seed, losses, seconds, final):
    curve = [{"seconds": s, "val_loss": v, "step": i, "tokens": 0, "train_loss": v}
             for i, (s, v) in enumerate(zip(seconds, losses))]
    return {"family": family, "seed": seed, "val_loss_causal": final, "val_loss_as_trained": final,
            "step_ms": 10.0 + seed, "steps": len(seconds), "train_seconds": seconds[-1],
            "params": 2, "activated_params": 1, "curve": curve}


def test_summary_targets_reference_fractions_and_intervals():
    runs = [
        _run("glam", 0, [5.0, 4.0, 3.0], [0.0, 5.0, 10.0], 3.0),
        _run("brainformer", 0, [5.0, 3.0, 2.0], [0.0, 4.0, 8.0], 2.0),
        _run("glam", 1, [5.0, 4.0, 3.5], [0.0, 5.0, 10.0], 3.5),
        _run("brainformer", 1, [5.0, 4.5, 4.0], [0.0, 4.0, 8.0], 4.0),
    ]
    rows, targets = summarise(runs, ["glam", "brainformer"], [0, 1], reference="glam")
    assert targets == {0: 3.0, 1: 4.0}  # the worst family's final loss, per seed
    glam, brainformer = rows
    # Seed 0: glam reaches 3.0 at 10 s; brainformer at 4 s (3.0 exactly).
    # Seed 1: target 4.0 -> glam at 5 s, brainformer at 8 s.
    assert glam["seconds_to_target"]["mean"] == pytest.approx(7.5)
    assert brainformer["seconds_to_target"]["mean"] == pytest.approx(6.0)
    # Reference fractions: brainformer reaches glam's final 3.0 at 4 s of glam's 10 s
    # in seed 0, and never reaches 3.5 in seed 1.
    fraction = brainformer["fraction_of_reference_time"]
    assert (fraction["n"], fraction["of"], fraction["mean"]) == (1, 2, pytest.approx(0.4))
    assert glam["fraction_of_reference_time"]["mean"] == pytest.approx(1.0)
    loss = brainformer["val_loss_causal"]
    assert loss["mean"] == 3.0 and loss["std"] == pytest.approx(math.sqrt(2))
    # 95 % Student-t interval with 1 degree of freedom: 12.706 * std / sqrt(2).
    assert loss["high"] - loss["mean"] == pytest.approx(12.7062, rel=1e-4)


def test_results_table_gives_both_routings_final_losses():
    runs = [_run("glam", seed, [5.0, 3.0], [0.0, 10.0], 3.0) for seed in (0, 1)]
    runs += [dict(_run("ec", seed, [5.0, 3.2], [0.0, 10.0], 3.2 + seed / 10),
                  val_loss_as_trained=2.9 + seed / 10) for seed in (0, 1)]
    rows, targets = summarise(runs, ["glam", "ec"], [0, 1], reference="glam")
    study = {"seeds": [0, 1], "clock": "wall", "budget_seconds": 10.0, "backend": "jax",
             "target_loss": None, "training": {"tokenizer": "byte", "data_paths": None,
                                               "batch_size": 4, "sequence_length": 8,
                                               "optimizer": "adafactor", "learning_rate": 0.01}}
    table = compare.results_markdown(study, rows, targets, "glam", None)
    equal_time = table.split("**At equal time**")[1].splitlines()
    header = next(line for line in equal_time if line.startswith("| family"))
    assert "| final val loss | final val loss as trained |" in header
    ec = next(line for line in equal_time if line.startswith("| ec |"))
    cells = [cell.strip() for cell in ec.strip("|").split("|")]
    assert cells[4].startswith("3.250 [") and cells[5].startswith("2.950 [")


def test_results_read_equal_steps_first_with_the_difference_to_the_reference():
    # Dense steps twice as fast as GLaM: ahead at equal time, behind at
    # equal steps; the table that compares per step comes first.
    def run(family, seed, losses, step_seconds):
        points = [{"step": 100 * i, "seconds": 100 * i * step_seconds, "val_loss": v,
                   "tokens": 0, "train_loss": v} for i, v in enumerate(losses)]
        return {"family": family, "seed": seed, "val_loss_causal": losses[-1],
                "val_loss_as_trained": losses[-1], "step_ms": 1000 * step_seconds,
                "steps": points[-1]["step"], "train_seconds": points[-1]["seconds"],
                "params": 2, "activated_params": 1, "curve": points}

    runs = [run("glam", 0, [5.0, 3.0, 2.6, 2.4, 2.2], 0.2),
            run("glam", 1, [5.0, 3.1, 2.7, 2.5, 2.3], 0.2),
            run("dense", 0, [5.0, 3.2, 2.8, 2.6, 2.5, 2.4, 2.3, 2.2, 2.1], 0.1),
            run("dense", 1, [5.0, 3.4, 2.9, 2.7, 2.6, 2.5, 2.4, 2.3, 2.2], 0.1)]
    rows, targets = summarise(runs, ["glam", "dense"], [0, 1], reference="dense")
    glam, dense = rows
    assert list(glam["loss_at_steps"]) == [100, 200, 300, 400]  # glam's last step
    assert glam["loss_at_steps"][400]["mean"] == pytest.approx(2.25)
    assert dense["loss_at_steps"][400]["mean"] == pytest.approx(2.55)
    difference = glam["difference_to_reference_at_steps"][400]
    assert (difference["mean"], difference["std"]) == (pytest.approx(-0.3), pytest.approx(0.0))
    assert dense["difference_to_reference_at_steps"][400]["mean"] == 0.0
    study = {"seeds": [0, 1], "clock": "paired", "budget_seconds": 80.0, "backend": "jax",
             "target_loss": None, "timing_rounds": 3, "timing_steps": 5,
             "training": {"tokenizer": "byte", "data_paths": None, "batch_size": 4,
                          "sequence_length": 8, "optimizer": "adafactor", "learning_rate": 0.01}}
    table = compare.results_markdown(study, rows, targets, "dense", None)
    assert table.index("**At equal steps**") < table.index("**At equal time**")
    equal_steps = table.split("**At equal steps**")[1].split("**At equal time**")[0]
    header = "| family | step 100 | step 200 | step 300 | step 400 | − dense at step 400 |"
    assert header in equal_steps
    glam_row = next(line for line in equal_steps.splitlines() if line.startswith("| glam |"))
    assert glam_row.split("|")[5].strip().startswith("2.250 [") and "-0.300" in glam_row


@pytest.mark.slow
def test_seeded_study_writes_every_output_and_resumes_exactly(tmp_path, capsys):
    out = tmp_path / "study"
    runs = compare_families(("dense_tiny", "glam_tiny"), 1.5, out, seeds=(0, 1), **SMALL)
    assert [(r["family"], r["seed"]) for r in runs] == [
        ("dense_tiny", 0), ("glam_tiny", 0), ("dense_tiny", 1), ("glam_tiny", 1)]
    timing = json.loads((out / "step_times.json").read_text())
    for r in runs:
        step = timing[r["family"]]["median_seconds"]
        assert r["steps"] == max(1, round(1.5 / step))  # the paired clock: a step count
        assert r["curve"][-1]["seconds"] == pytest.approx(r["steps"] * step, abs=1e-3)
        assert np.isfinite(r["val_loss_causal"])
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(row["family"], row["seed"]) for row in rows} == {
        ("dense_tiny", "0"), ("glam_tiny", "0"), ("dense_tiny", "1"), ("glam_tiny", "1")}
    table = (out / "results.md").read_text()
    assert "paired clock" in table and "| dense_tiny |" in table
    assert "glam_tiny's final loss" in table
    assert (out / "curves.png").stat().st_size > 1000

    # Killed half way: one run lost. The rerun trains only that one, and, the
    # step count being fixed by the saved timing, reproduces it.
    lost = out / "runs" / "glam_tiny" / "seed-1.json"
    before = json.loads(lost.read_text())
    lost.unlink()
    capsys.readouterr()
    again = compare_families(("dense_tiny", "glam_tiny"), 1.5, out, seeds=(0, 1),
                             **{**SMALL, "verbose": 1})
    printed = capsys.readouterr().out
    assert printed.count("done earlier") == 3 and "Step times measured earlier" in printed
    redone = again[-1]
    assert redone["steps"] == before["steps"]
    np.testing.assert_allclose([p["val_loss"] for p in redone["curve"]],
                               [p["val_loss"] for p in before["curve"]], rtol=1e-5)


@pytest.mark.slow
def test_an_equal_steps_study_trains_every_family_the_same_steps(tmp_path):
    out = tmp_path / "steps"
    runs = compare_families(("dense_tiny", "glam_tiny"), out=out, steps=7, seeds=(0,),
                            **SMALL)
    assert [(r["family"], r["steps"]) for r in runs] == [("dense_tiny", 7), ("glam_tiny", 7)]
    # Points at every eval_every steps and at the last step; times measured.
    assert [p["step"] for p in runs[1]["curve"]] == [3, 6, 7]
    assert all(p["seconds"] > 0 for p in runs[1]["curve"])
    # The routers' statistics ride along an MoE family's curve (0 < entropy
    # <= log E), never a dense one's.
    assert all(0 < p["router_entropy"] <= math.log(8) + 1e-6 and p["load_cv"] >= 0
               for p in runs[1]["curve"])
    assert not any("router_entropy" in p for p in runs[0]["curve"])
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[-1]["router_entropy"] and not rows[0]["router_entropy"]
    assert not (out / "step_times.json").exists()  # no paired timing
    study = json.loads((out / "study.json").read_text())
    assert (study["clock"], study["steps"], study["budget_seconds"]) == ("steps", 7, None)
    table = (out / "results.md").read_text()
    assert "Budget: 7 steps per family" in table and "equal steps: every family" in table
    assert "| family | step 3 | step 6 | step 7 |" in table


def test_command_line_reaches_every_study_option(monkeypatch, tmp_path):
    from keras_brainformer.cli.commands import main

    seen = {}
    monkeypatch.setattr(compare, "compare_families", lambda **kwargs: seen.update(kwargs))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("some text")
    assert main(["compare", "--families", "dense_tiny", str(tmp_path / "preset"),
                 "--seeds", "3", "4", "--clock", "wall", "--timing-rounds", "2",
                 "--timing-steps", "4", "--target-loss", "5.5", "--reference", "none",
                 "--overwrite", "--data", str(corpus), "--tokenizer", "byte",
                 "--budget", "30", "--out", str(tmp_path / "o")]) == 0
    assert seen["families"] == ("dense_tiny", str(tmp_path / "preset"))
    assert seen["seeds"] == (3, 4) and seen["clock"] == "wall" and seen["budget"] == 30.0
    assert (seen["timing_rounds"], seen["timing_steps"]) == (2, 4)
    assert seen["target_loss"] == 5.5 and seen["reference"] is None and seen["overwrite"]
    assert seen["config"].data_paths == (str(corpus),) and seen["config"].tokenizer == "byte"
    assert seen["steps"] is None
    assert main(["compare", "--families", "dense_tiny", "--steps", "600",
                 "--out", str(tmp_path / "o2")]) == 0
    assert seen["steps"] == 600


def test_small_families_share_the_byte_tokenizer_of_their_folders():
    families = ("brainformer1_small", "glam_small", "glam_ec_small", "dense_small",
                "primer_small", "brainformer2_small")
    configs = {p: compare.preset_model_config(p) for p in families}
    tokenizer = compare._shared_tokenizer(families, configs, "preset")
    assert isinstance(tokenizer, BrainformerByteTokenizer)
    with pytest.raises(TrainingError, match="do not share one vocabulary"):
        compare._shared_tokenizer(("glam_small", "glam_tiny"), {
            p: compare.preset_model_config(p) for p in ("glam_small", "glam_tiny")}, "preset")

"""The block search: space, regularized-evolution oracle, fitness constraint,
a tiny local search with resumption, and a chief + 2 workers on loopback."""

import csv
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import keras_tuner
import numpy as np
import pytest
from keras_tuner.engine import trial as trial_module

from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.search.fitness import Baseline
from keras_brainformer.search.fitness import constraint_violations
from keras_brainformer.search.fitness import evaluate_block
from keras_brainformer.search.oracle import RegularizedEvolutionOracle
from keras_brainformer.search.space import SearchSpace
from keras_brainformer.search.space import slot_gene

# A search small enough for CI: 2-sublayer blocks, 1/32 widths, 2 experts,
# byte tokenizer, 16-token windows, half-second trials.
TINY = dict(
    budget_per_trial=0.5, population_size=2, tournament_size=2, num_sublayers=2,
    scale=1 / 32, num_experts=2, num_blocks=1, sequence_length=16, batch_size=4,
    tokenizer="byte", max_corpus_bytes=30_000, validation_batches=1, top_k=2,
    target_activated=145e6, seed=0,
    # Lenient constraint: on a busy CI machine timing noise could reject every
    # candidate (the constraint has its own test).
    step_time_slack=100.0, loss_margin=100.0,
)
TINY_FLAGS = [
    "--budget-per-trial", "0.5", "--population-size", "2", "--tournament-size", "2",
    "--num-sublayers", "2", "--scale", "1/32", "--num-experts", "2", "--num-blocks", "1",
    "--sequence-length", "16", "--batch-size", "4", "--tokenizer", "byte",
    "--max-corpus-bytes", "30000", "--validation-batches", "1", "--top-k", "2",
    "--step-time-slack", "100", "--loss-margin", "100",
]


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


# === Search space ===


def test_space_scales_table_1():
    proxy = SearchSpace(scale=1 / 8)
    assert proxy.model_dims == (64, 96, 128)
    assert proxy.hidden_dims == (192, 256, 384, 512)
    assert proxy.head_dim == 8
    paper = SearchSpace(scale=1, num_experts=32)
    assert paper.model_dims == (512, 768, 1024)
    assert paper.head_dim == 64
    assert len(paper.gene_names()) == 3 + 8 * 4


def test_sample_is_in_space_and_builds_every_head_count():
    space = SearchSpace(scale=1 / 8)
    rng = random.Random(0)
    for _ in range(50):
        genome = space.check_genome(space.sample(rng))
        spec = space.to_block_spec(genome)
        assert len(spec.sublayers) == 8
        for i, sub in enumerate(spec.sublayers):
            assert sub.kind == genome[slot_gene(i, "type")]
            if sub.kind == "moe":
                assert sub.num_experts == 8
                assert sub.router == {"top_2": "top_k", "expert_choice": "expert_choice"}[
                    genome["gating"]]
            if sub.kind == "attention":
                assert sub.head_dim == 8  # fixed head width: 12/16/20 heads fit every d


def test_mutation_changes_exactly_one_active_gene():
    space = SearchSpace(scale=1 / 8)
    rng = random.Random(1)
    for _ in range(200):
        parent = space.sample(rng)
        child = space.mutate(parent, rng)
        changed = [g for g in parent if parent[g] != child[g]]
        assert len(changed) == 1
        assert changed[0] in space.active_genes(parent)
        space.check_genome(child)


def test_search_with_top2_and_fixed_experts():
    space = SearchSpace(gating=("top_2",), num_experts=4, scale=1 / 8)
    rng = random.Random(2)
    routers = set()
    for _ in range(30):
        genome = space.mutate(space.sample(rng), rng)
        for sub in space.to_block_spec(genome).sublayers:
            if sub.kind == "moe":
                routers.add((sub.router, sub.top_k, sub.num_experts))
    assert routers == {("top_k", 2, 4)}


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(scale=0), "scale"),
        (dict(num_sublayers=0), "num_sublayers"),
        (dict(gating=("top_3",)), "gating"),
        (dict(num_experts=1), "num_experts"),
        (dict(scale=1 / 4096), "scale"),
        (dict(activations=("tanhh",)), "activation"),
    ],
)
def test_space_rejects_bad_arguments(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        SearchSpace(**kwargs)


def test_genome_errors_name_the_gene():
    space = SearchSpace(num_sublayers=2)
    genome = space.sample(random.Random(0))
    genome["s1_hidden"] = 7
    with pytest.raises(ValueError, match=r"s1_hidden.*Allowed values"):
        space.check_genome(genome)


def test_baseline_genomes_are_glam_and_dense_layouts():
    space = SearchSpace(scale=1 / 8)
    glam = space.to_block_spec(space.glam_genome())
    assert [s.kind for s in glam.sublayers] == ["attention", "moe", "attention", "ffn"] * 2
    assert glam.sublayers[1].router == "top_k" and glam.sublayers[1].capacity_factor == 2.0
    assert space.glam_genome()["model_dim"] == 96
    dense = space.to_block_spec(space.dense_genome())
    assert [s.kind for s in dense.sublayers] == ["attention", "ffn"] * 4


# === Oracle ===


def test_tournament_picks_the_best_of_its_sample():
    members = [("a", 0.1), ("b", 0.4), ("c", -1.0), ("d", 0.3), ("e", 0.2)]
    assert RegularizedEvolutionOracle.tournament(members, 5, random.Random(0)) == "b"
    for seed in range(100):
        picked = RegularizedEvolutionOracle.tournament(members, 2, random.Random(seed))
        sample = [members[i] for i in sorted(random.Random(seed).sample(range(5), 2))]
        assert picked == max(sample, key=lambda m: m[1])[0]
        assert picked != "c"  # the worst member never wins a tournament of 2


def _oracle(tmp_path, **kwargs):
    space = SearchSpace(num_sublayers=4, scale=1 / 8, num_experts=4)
    settings = dict(max_trials=20, population_size=3, tournament_size=2, seed=7)
    settings.update(kwargs)
    oracle = RegularizedEvolutionOracle(space, **settings)
    oracle._set_project_dir(str(tmp_path), "search")
    return oracle


def _finish(oracle, trial, reward):
    oracle.update_trial(trial.trial_id, {"reward": reward})
    trial.status = trial_module.TrialStatus.COMPLETED
    oracle.end_trial(trial)


def test_oracle_evolves_a_population_and_removes_the_oldest(tmp_path):
    oracle = _oracle(tmp_path)
    space = oracle.space
    ids = []
    for n in range(7):
        trial = oracle.create_trial("tuner0")
        assert trial.status == trial_module.TrialStatus.RUNNING  # never IDLE
        origin = oracle.origins[trial.trial_id]
        if n < 3:
            assert origin == "random"
        else:
            parent_id = origin.removeprefix("mutation of ")
            assert parent_id in ids[-3:]
            parent = oracle.trials[parent_id].hyperparameters.values
            child = trial.hyperparameters.values
            assert sum(parent[g] != child[g] for g in space.gene_names()) == 1
        ids.append(trial.trial_id)
        _finish(oracle, trial, reward=0.1 * (n + 1))
        assert oracle.population == ids[-3:]  # the oldest left, age not fitness


def test_oracle_hands_out_random_work_while_the_population_fills(tmp_path):
    oracle = _oracle(tmp_path, population_size=3)
    # Three workers ask before anything finished: all get random candidates.
    trials = [oracle.create_trial(f"tuner{k}") for k in range(3)]
    assert [oracle.origins[t.trial_id] for t in trials] == ["random"] * 3
    assert all(t.status == trial_module.TrialStatus.RUNNING for t in trials)


def test_oracle_state_resumes_the_population(tmp_path):
    oracle = _oracle(tmp_path)
    for n in range(5):
        _finish(oracle, oracle.create_trial("tuner0"), reward=0.1 * n)
    state = json.loads(json.dumps(oracle.get_state()))  # KerasTuner saves JSON
    assert state["evolution"]["population"] == oracle.population

    reloaded = _oracle(tmp_path)
    reloaded.reload()
    assert reloaded.population == oracle.population
    assert reloaded.end_order == oracle.end_order
    assert reloaded.origins == oracle.origins
    trial = reloaded.create_trial("tuner0")
    assert trial.trial_id == "05"
    assert reloaded.origins["05"].startswith("mutation of ")


def test_oracle_refuses_a_folder_of_another_space(tmp_path):
    oracle = _oracle(tmp_path)
    _finish(oracle, oracle.create_trial("tuner0"), reward=0.5)
    other = RegularizedEvolutionOracle(SearchSpace(num_sublayers=4, scale=1 / 16), max_trials=5,
                                       population_size=3, tournament_size=2)
    other._set_project_dir(str(tmp_path), "search")
    with pytest.raises(ValueError, match="another space"):
        other.reload()


# === Fitness and constraint ===


def test_constraint_violations_hand_built():
    baseline = Baseline(step_ms=10.0, val_loss_at_check=4.0)
    assert constraint_violations(10.9, 4.1, baseline, 1.1, 0.2) == (False, False)
    assert constraint_violations(11.1, 4.1, baseline, 1.1, 0.2) == (True, False)
    assert constraint_violations(10.0, 4.3, baseline, 1.1, 0.2) == (False, True)
    assert constraint_violations(10.0, math.nan, baseline, 1.1, 0.2) == (False, True)


@pytest.fixture(scope="module")
def tiny_data():
    from keras_brainformer.models import BrainformerByteTokenizer
    from keras_brainformer.training.corpus import build_language_model_data

    return build_language_model_data(
        BrainformerByteTokenizer(), 16, max_bytes=30_000, verbose=False
    )


@pytest.mark.slow
def test_constraint_stops_early_with_reward_minus_one(tiny_data):
    space = SearchSpace(num_sublayers=2, scale=1 / 32, num_experts=2)
    genome = space.glam_genome()
    block = space.to_block_spec(genome)
    kwargs = dict(num_blocks=1, batch_size=4, validation_batches=1, check_fraction=0.25)
    # A baseline no candidate can match: 1 microsecond per step.
    slow = evaluate_block(block, genome["model_dim"], tiny_data, 0.8,
                          baseline=Baseline(step_ms=1e-3, val_loss_at_check=100.0), **kwargs)
    assert slow["reward"] == -1.0
    assert slow["rejected_step_time"] == 1.0 and slow["rejected_loss"] == 0.0
    assert slow["train_seconds"] < 0.5  # stopped at the check, not at the budget
    assert slow["val_loss"] == slow["val_loss_at_check"]
    # (A block that passes trains the whole budget: every accepted trial of
    # `tiny_search` below, whose reward is exp(-val_loss).)


# === A tiny search, local, then resumed ===


@pytest.fixture(scope="module")
def tiny_search(tmp_path_factory):
    from keras_brainformer.search.driver import run_search

    out = tmp_path_factory.mktemp("search")
    started = time.perf_counter()
    best = run_search(out=str(out), trials=3, **TINY)
    return out, best, time.perf_counter() - started


@pytest.mark.slow
def test_tiny_search_writes_every_output(tiny_search):
    out, best, _ = tiny_search
    rows = read_csv(out / "trials.csv")
    assert [r["trial_id"] for r in rows] == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    for r in rows:  # every measured figure is in the CSV
        for name in ("reward", "val_loss", "step_ms", "steps", "baseline_step_ms"):
            assert math.isfinite(float(r[name]))
        reward = float(r["reward"])
        assert reward == -1.0 or reward == pytest.approx(math.exp(-float(r["val_loss"])))
        if float(r["rejected"]) == 0:  # accepted blocks train the whole budget
            assert float(r["train_seconds"]) >= TINY["budget_per_trial"]
        else:  # rejected ones stop at the check (25 %)
            assert float(r["train_seconds"]) < TINY["budget_per_trial"]
    assert [r["origin"] for r in rows][:2] == ["random", "random"]
    assert all(r["origin"].startswith("mutation of ") for r in rows[2:])
    assert (out / "search.png").stat().st_size > 1000
    assert (out / "search" / "baseline-tuner0.json").exists()
    assert best, "no accepted block"
    assert "GLaM-style baseline" in (out / "summary.md").read_text()


@pytest.mark.slow
def test_top_blocks_round_trip_and_build(tiny_search):
    from keras_brainformer.models import BrainformerBackbone

    out, best, _ = tiny_search
    spec = BlockSpec.from_json((out / "top" / "rank1.block.json").read_text())
    record = json.loads((out / "top" / "rank1.json").read_text())
    assert record["trial_id"] == best[0]["trial_id"]
    backbone = BrainformerBackbone(vocabulary_size=256, hidden_dim=record["model_dim"],
                                   blocks=spec, num_layers=2)
    hidden = backbone({"token_ids": np.ones((1, 8), "int32"),
                       "padding_mask": np.ones((1, 8), "int32")})
    assert tuple(hidden.shape) == (1, 8, record["model_dim"])
    # The proxy preset (as searched) loads with from_preset.
    proxy = BrainformerBackbone.from_preset(str(out / "presets" / "search_rank1_proxy"))
    assert proxy.hidden_dim == record["model_dim"]
    # The paper-size preset: widths x32, 32 experts, stacked to ~145M activated.
    with open(out / "presets" / "search_rank1_paper" / "config.json") as f:
        config = json.load(f)["config"]
    with open(out / "presets" / "search_rank1_paper" / "metadata.json") as f:
        metadata = json.load(f)
    assert config["hidden_dim"] == record["model_dim"] * 32
    assert config["hidden_dim"] in (512, 768, 1024)
    paper_spec = BlockSpec.from_dict(config["blocks"])
    assert all(s.num_experts == 32 for s in paper_spec.sublayers if s.kind == "moe")
    activated = metadata["paper_convention_counts"]["activated"]
    one_more = config["num_layers"] + 1
    assert abs(activated - 145e6) <= activated / config["num_layers"] * one_more


@pytest.mark.slow
def test_rerun_resumes_the_population(tiny_search):
    from keras_brainformer.search.driver import run_search

    out, _, _ = tiny_search
    with open(out / "search" / "oracle.json") as f:
        before = json.load(f)["evolution"]
    baseline_file = out / "search" / "baseline-tuner0.json"
    baseline_mtime = baseline_file.stat().st_mtime
    run_search(out=str(out), trials=5, **TINY)
    rows = read_csv(out / "trials.csv")
    assert [r["trial_id"] for r in rows] == ["0", "1", "2", "3", "4"]
    with open(out / "search" / "oracle.json") as f:
        after = json.load(f)["evolution"]
    # New trials are children of the saved population, which kept aging.
    for trial_id in ("3", "4"):
        assert after["origins"][trial_id].startswith("mutation of ")
    assert after["origins"]["3"].removeprefix("mutation of ") in before["population"]
    assert after["population"] == ["3", "4"]  # the two oldest members left
    assert {k: after["origins"][k] for k in before["origins"]} == before["origins"]
    assert baseline_file.stat().st_mtime == baseline_mtime  # measured once


@pytest.mark.slow
def test_remeasure_compares_best_glam_and_dense(tiny_search, tiny_data):
    from keras_brainformer.search.driver import remeasure_best

    out, _, _ = tiny_search
    settings = json.loads((out / "search.json").read_text())
    best_id = json.loads((out / "top" / "rank1.json").read_text())["trial_id"]
    measurements = remeasure_best(out, settings, 0.3, data=tiny_data, verbose=0)
    assert [m["model"] for m in measurements] == [
        f"best (trial {best_id})", "GLaM-style baseline", "dense baseline"]
    assert all(m["train_seconds"] >= 0.3 and m["rejected"] == 0.0 for m in measurements)
    table = (out / "remeasure.md").read_text()
    assert "GLaM-style baseline" in table and "dense baseline" in table


@pytest.mark.slow
def test_rerun_with_other_settings_is_refused(tiny_search):
    from keras_brainformer.cli import main

    out, _, _ = tiny_search
    flags = list(TINY_FLAGS)
    flags[flags.index("--scale") + 1] = "1/16"
    assert main(["search", "--out", str(out), "--trials", "5", *flags]) == 2


@pytest.mark.parametrize(
    "extra",
    [
        ["--population-size", "2", "--tournament-size", "3"],
        ["--check-fraction", "2"],
        ["--data", "/nonexistent/corpus"],
    ],
)
def test_cli_bad_input_exits_2(tmp_path, extra, capsys):
    from keras_brainformer.cli import main

    assert main(["search", "--out", str(tmp_path / "s"), *extra]) == 2
    assert "error:" in capsys.readouterr().err


def test_chief_refuses_a_public_address_without_the_flag(tmp_path, monkeypatch, capsys):
    from keras_brainformer.cli import main

    monkeypatch.setenv("KERASTUNER_TUNER_ID", "chief")
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "10.1.2.3")
    monkeypatch.setenv("KERASTUNER_ORACLE_PORT", "8000")
    assert main(["search", "--out", str(tmp_path / "s"), *TINY_FLAGS]) == 2
    assert "--oracle-address" in capsys.readouterr().err


# === Chief and two workers on 127.0.0.1 ===


@pytest.mark.slow
def test_chief_and_two_workers_on_loopback(tmp_path):
    out = tmp_path / "distributed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERASTUNER_")}
    command = [sys.executable, "-m", "keras_brainformer", "search", "--out", str(out),
               "--trials", "3", "--workers", "2", *TINY_FLAGS]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"distributed search timed out:\n{output[-3000:]}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, output[-3000:]
    assert "Oracle listening on 127.0.0.1:" in output
    rows = read_csv(out / "trials.csv")
    assert sorted(r["trial_id"] for r in rows) == ["0", "1", "2"]
    assert all(r["status"] == "COMPLETED" for r in rows)
    # Both workers ran trials against the one oracle, each with its own baseline.
    assert (out / "search" / "baseline-tuner0.json").exists()
    assert (out / "search" / "baseline-tuner1.json").exists()
    assert (out / "top" / "rank1.block.json").exists()
    with open(out / "search" / "oracle.json") as f:
        evolution = json.load(f)["evolution"]
    assert len(evolution["population"]) == 2


def test_keras_tuner_is_the_engine():
    assert issubclass(RegularizedEvolutionOracle, keras_tuner.Oracle)

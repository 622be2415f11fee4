"""The step-time model (`distribution/step_time.py`, `distribution/hardware.py`)
and `keras-brainformer plan --hardware`: exact FLOP counts, roofline bounds,
collectives per layout, the JSON fields and bad input. Analytic only: no
model is built, the 8B presets included."""

import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import pytest

from keras_brainformer.cli import main
from keras_brainformer.distribution.hardware import HARDWARE
from keras_brainformer.distribution.hardware import HARDWARE_NAMES
from keras_brainformer.distribution.hardware import get_hardware
from keras_brainformer.distribution.memory_plan import shard_weights
from keras_brainformer.distribution.step_time import collective_seconds
from keras_brainformer.distribution.step_time import matmul_term
from keras_brainformer.distribution.step_time import predict_step_time
from keras_brainformer.distribution.step_time import step_terms
from keras_brainformer.distribution.step_time import term_seconds
from keras_brainformer.models import dense_transformer_layer
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.zoo.parameter_count import count_parameters

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def _dense_config(d=64, heads=4, hidden=256, blocks=2, vocab=1000):
    return {"vocabulary_size": vocab, "hidden_dim": d, "num_layers": blocks,
            "blocks": dense_transformer_layer(heads, hidden).to_dict()}


def test_matmul_term_counts_forward_and_backward_exactly():
    term = matmul_term("dense ffn", "w", m=128, k=64, n=256, element_bytes=4, dtype="float32")
    assert term.flops == 2 * 128 * 64 * 256 * 3
    assert term.bytes == 3 * (128 * 64 + 64 * 256 + 128 * 256) * 4


def test_dense_ffn_flops_equal_6_m_n_k_per_matrix():
    config = _dense_config()
    B, T, d = 4, 32, 64
    terms = step_terms(config, {"batch": 1}, B, T, expert_dim_name=None)
    ffn = [t for t in terms if t.part == "dense ffn" and t.flops]
    # Two blocks of one FFN each, `w_in` and `w_out` [d, h] / [h, d] (gelu, not gated).
    assert len(ffn) == 4
    assert all(t.flops == 2 * (B * T) * d * 256 * 3 for t in ffn)


def test_executed_flops_are_model_flops_plus_attention_core_minus_norms():
    """6 · activated parameters · tokens counts every matmul weight once per
    token (the tied embedding as the output layer); the model executes that
    plus attention's T² products, and norms are no matmuls."""
    config = _dense_config()
    B, T = 2, 64
    plan = predict_step_time(config, "batch=1", B, T, "h100", expert_dim_name=None)
    core = sum(t.flops for t in plan.terms if "scores" in t.name or "probs·v" in t.name)
    norm_params = (2 * config["num_layers"] + 1) * config["hidden_dim"]
    assert plan.model_flops == 6 * count_parameters(config)["activated"] * B * T
    assert plan.executed_flops == plan.model_flops + core - 6 * norm_params * B * T


def test_roofline_switches_from_memory_to_compute_bound_at_the_ridge():
    hw = get_hardware("h100")
    k = n = 8192
    a = 2
    ridge = hw.peak("bfloat16") / hw.memory_bandwidth  # FLOP per byte

    def bound(m):
        t = matmul_term("moe experts", "w", m, k, n, a, "bfloat16")
        compute = t.flops / hw.peak("bfloat16")
        assert term_seconds(t, hw, {"batch": 1}) == max(compute, t.bytes / hw.memory_bandwidth)
        return "compute" if compute >= t.bytes / hw.memory_bandwidth else "memory"

    # 2·m·k·n / (a·(m·k + k·n + m·n)) = ridge, solved for m.
    m_star = ridge * a * k * n / (2 * k * n - ridge * a * (k + n))
    assert bound(math.floor(m_star)) == "memory"
    assert bound(math.ceil(m_star)) == "compute"
    assert bound(16) == "memory" and bound(8192) == "compute"


def test_collectives_vanish_on_one_device():
    plan = predict_step_time(get_preset_config("glam_tiny"), "batch=1", 8, 256, "tpu-v4",
                             expert_dim_name=None)
    assert plan.communication_seconds == 0.0
    assert all(t.group == 1 for t in plan.terms if t.collective)
    assert plan.step_seconds == plan.compute_seconds == plan.overlapped_seconds


def test_collectives_follow_the_layout():
    config = get_preset_config("glam_tiny")  # 2 MoE layers, E = 8
    expert = predict_step_time(config, "batch=2,expert=2", 8, 256, "h100")
    kinds = {(t.part, t.collective) for t in expert.terms if t.collective and t.bytes}
    assert ("experts all-gather / all-to-all", "all-gather") in kinds
    assert ("gradient all-reduce", "all-reduce") in kinds
    assert sum(t.collective == "all-gather" for t in expert.terms) == 2 * 2
    assert expert.communication_seconds > 0

    gshard = predict_step_time(config, "batch=4", 8, 256, "h100", expert_dim_name="batch")
    assert sum(t.collective == "all-to-all" for t in gshard.terms) == 4 * 2
    assert not any(t.collective == "all-gather" for t in gshard.terms)

    fsdp = predict_step_time(get_preset_config("brainformer1_tiny"), "batch=2,model=2", 8,
                             256, "h100", fsdp=True, expert_dim_name="batch")
    parts = {t.part for t in fsdp.terms if t.collective and t.group > 1}
    assert {"fsdp all-gather / reduce-scatter", "tensor-parallel all-reduce"} <= parts


def test_bf16_casts_touch_the_stored_shards():
    # Under mixed_bfloat16 each weight and its gradient are cast once each way.
    # With fsdp a chip casts its stored shard and all-gathers it in bf16 (the
    # compiled dense_8b step gathers 6.68 GB of bf16, 0.23 GB of float32, a
    # chip), so the casts shrink with the batch axis as the shards do.
    config = _dense_config()
    casts = {}
    for fsdp in (False, True):
        terms = step_terms(config, "batch=4,model=2", 8, 32, dtype="mixed_bfloat16",
                           fsdp=fsdp)
        (cast,) = [t for t in terms if t.name == "bf16 weight and gradient casts"]
        stored = shard_weights(config, {"batch": 4, "model": 2}, fsdp, "mixed_bfloat16")
        local = sum(math.prod(w.local_shape) for w in stored.values() if w.trainable)
        assert cast.bytes == local * (4 + 2) * 2
        casts[fsdp] = cast.bytes
    assert casts[True] < casts[False] / 3
    float32 = step_terms(config, "batch=4,model=2", 8, 32, fsdp=True)
    assert not [t for t in float32 if t.name == "bf16 weight and gradient casts"]


def test_ring_collective_times():
    assert collective_seconds("all-gather", 8e9, 8, 1e11, 0.0) == pytest.approx(0.07)
    assert collective_seconds("all-reduce", 8e9, 8, 1e11, 1e-6) == pytest.approx(
        0.14 + 14e-6)
    with pytest.raises(ValueError, match="Unknown collective 'broadcast'"):
        collective_seconds("broadcast", 1, 2, 1, 0)


def test_gpu_axis_crossing_nodes_uses_the_network():
    config = get_preset_config("dense_tiny")
    inside = predict_step_time(config, "batch=8", 8, 256, "h100")
    across = predict_step_time(config, "batch=16", 16, 256, "h100")
    grad = [t for t in across.terms if t.part == "gradient all-reduce"][0]
    assert term_seconds(grad, HARDWARE["h100"], across.mesh) > term_seconds(
        [t for t in inside.terms if t.part == "gradient all-reduce"][0], HARDWARE["h100"],
        inside.mesh)


def test_heavy_presets_are_planned_analytically():
    glam = predict_step_time(get_preset_config("glam_8b_64e"), "batch=64,model=8", 256, 1024,
                             "tpu-v4", dtype="mixed_bfloat16", fsdp=True,
                             expert_dim_name="batch")
    bf = predict_step_time(get_preset_config("brainformer1_8b"), "batch=64,model=8", 256, 1024,
                           "tpu-v4", dtype="mixed_bfloat16", fsdp=True,
                           expert_dim_name="batch")
    assert glam.chips == bf.chips == 512
    assert 0 < glam.mfu < 1 and 0 < bf.mfu < 1
    # GLaM pays for k=2 experts x capacity factor 2 = 4 slots per token: one
    # expert a device (64 / 64), all 256 groups x C = ceil(2·1024·2 / 64) = 64
    # rows, 4x the device's 4096 tokens.
    expert_rows = [t for t in glam.terms if t.part == "moe experts" and " in (" in t.name]
    assert len(expert_rows) == 16
    assert "(1x16384 rows)" in expert_rows[0].name


def test_bad_hardware_and_chips():
    with pytest.raises(ValueError, match="Unknown hardware 'tpu-v9'.*tpu-v4"):
        get_hardware("tpu-v9")
    with pytest.raises(ValueError, match="--chips 8 does not match the mesh batch=2"):
        predict_step_time(get_preset_config("glam_tiny"), "batch=2", 2, 64, "h100", chips=8)


def _cli(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_bad_hardware_is_one_error_line(capsys):
    code, out, err = _cli(capsys, "--preset", "glam_tiny", "--hardware", "tpu-v9")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert err.startswith("error: Unknown hardware 'tpu-v9'")
    assert all(name in err for name in HARDWARE_NAMES)
    code, _, err = _cli(capsys, "--preset", "glam_tiny", "--mesh", "batch=2", "--hardware",
                        "h100", "--chips", "3")
    assert code == 2 and err.startswith("error: --chips 3 does not match the mesh batch=2")
    code, _, err = _cli(capsys, "--preset", "glam_tiny", "--chips", "1")
    assert code == 2 and err.startswith("error: --chips needs --hardware")
    # Was "give a mesh whose sizes multiply to 0" (issue 32).
    for chips in ("0", "-2"):
        code, _, err = _cli(capsys, "--preset", "glam_tiny", "--mesh", "batch=2",
                            "--hardware", "h100", "--chips", chips)
        assert code == 2 and err.count("\n") == 1, err
        assert err.startswith("error: --chips must be at least 1") and chips in err
        assert "multiply to" not in err
    with pytest.raises(ValueError, match="`chips` .* must be an int of at least 1, the mesh "
                       "size \\(2 for this mesh\\). Received: 0"):
        predict_step_time(get_preset_config("glam_tiny"), "batch=2", 2, 64, "h100", chips=0)


def test_cli_table_and_json(capsys):
    code, out, _ = _cli(capsys, "--preset", "glam_tiny", "--mesh", "batch=2,expert=2",
                        "--batch-size", "4", "--hardware", "a100", "--chips", "4",
                        "--optimizer", "adamw")
    assert code == 0
    assert "step time on 4 x a100" in out and "experts all-gather / all-to-all" in out
    code, out, _ = _cli(capsys, "--preset", "glam_tiny", "--mesh", "batch=2,expert=2",
                        "--batch-size", "4", "--hardware", "a100", "--json")
    assert code == 0
    data = json.loads(out)
    assert [p["optimizer"] for p in data["plans"]] == ["adafactor", "adamw"]
    step = data["plans"][0]["step_time"]
    for field in ("step_seconds", "steps_per_second", "tokens_per_second", "mfu",
                  "compute_seconds", "communication_seconds", "parts", "hardware", "chips"):
        assert field in step
    assert step["chips"] == 4 and step["hardware"] == "a100"
    assert sum(p["seconds"] for p in step["parts"].values()) == pytest.approx(
        step["step_seconds"])
    assert {"seconds", "share", "bound"} <= set(step["parts"]["moe experts"])
    assert data["fits"] is True and data["device_memory"] == HARDWARE["a100"].memory_bytes


def _run_benchmark(*argv):
    # The repository root first on the path: the scripts import this checkout.
    env = dict(os.environ, KERAS_BACKEND="jax",
               PYTHONPATH=str(BENCHMARKS.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / argv[0]), *argv[1:]],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the suite runs on JAX")
def test_device_suite_cpu_mode_runs():
    out = _run_benchmark("device_suite.py", "--cpu")
    for expected in ("## 1. matmul peak", "| slots cf1.25 |", "| brainformer1 |",
                     "brainformer1 / glam step time: measured", "| 1 |"):
        assert expected in out


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the scripts run on JAX")
def test_step_time_checks_run():
    out = _run_benchmark("step_time_check.py", "--quick")
    assert "| brainformer1 |" in out and "measured / predicted" in out
    out = _run_benchmark("paper_step_time.py", "--batch-sizes", "64")
    assert "| 8B/64E | 512 | 64 | `batch=64,model=8` | on |" in out

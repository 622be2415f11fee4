"""Smoke runs of the benchmark scripts' `--quick` modes (about 1 min in all
on a 2-core machine; marked slow)."""

import os
import pathlib
import subprocess
import sys

import keras
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.slow
@pytest.mark.skipif(
    keras.backend.backend() != "jax",
    reason="the scripts run on JAX whatever the suite's backend: once is enough",
)
@pytest.mark.parametrize(
    "script, expected",
    [
        ("machine_peak.py", "| n | median ms |"),
        ("training_throughput.py", "target: tiny brainformer1 step time"),
        ("moe_scaling.py", "| tokens | d / h | router |"),
        ("keras_hub_moe.py", "| E | k | variant | step (ms) |"),
    ],
)
def test_quick_mode_runs(script, expected):
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--quick"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout

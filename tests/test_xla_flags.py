"""The test command on any jaxlib: `tests/conftest.py` adds XLA flags only
where the installed jaxlib accepts them, and an `XLA_FLAGS` that would abort
every JAX process (jaxlib's "Unknown flag in XLA_FLAGS") stops the run with
one message naming the flag instead of killing every worker without a word."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(keras.backend.backend() != "jax", reason="XLA flags are JAX's"),
]


def _pytest(tmp_path, xla_flags, *args):
    env = {**os.environ, "KERAS_BACKEND": "jax", "TMPDIR": str(tmp_path)}
    env.pop("PYTEST_XDIST_WORKER", None)
    env.pop("KERAS_BRAINFORMER_TEST_XLA_CACHE", None)
    env["XLA_FLAGS"] = xla_flags
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )


def test_an_unknown_xla_flag_stops_the_run_with_one_message(tmp_path):
    result = _pytest(tmp_path, "--xla_kb_no_such_flag=1", "-q", "-n", "2",
                     "tests/test_normalization.py")
    output = result.stdout + result.stderr
    assert result.returncode not in (0, 5), output
    assert "XLA_FLAGS='--xla_kb_no_such_flag=1' aborts every JAX process" in output
    assert "node down" not in output
    assert not list(tmp_path.glob("kb-xla-cache-*")), "a cache folder was left behind"


def test_the_fast_tier_runs_whatever_flags_this_jaxlib_accepts(tmp_path):
    result = _pytest(tmp_path, "", "tests/test_normalization.py")
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert " passed" in output
    # The header says which flags were set, or that this jaxlib refused them.
    assert "XLA_FLAGS=" in output
    assert not list(tmp_path.glob("kb-xla-cache-*")), "a cache folder was left behind"

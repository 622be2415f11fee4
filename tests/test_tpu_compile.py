"""`keras-brainformer compile`: fit's real train step compiled by XLA's TPU
compiler (libtpu) for a small Cloud TPU slice, on a machine without a TPU.

The compiling tests need libtpu (`pip install -e ".[tpu]"`). Without it they
skip, unless `KERAS_BRAINFORMER_REQUIRE_LIBTPU=1` (CI sets it), where they
fail: a CI that lost libtpu must not pass silently. The abstract-build and
missing-libtpu tests need no libtpu.
"""

import importlib.util
import math
import os
import resource

import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from keras_brainformer.cli import main
from keras_brainformer.distribution import tpu_compile
from keras_brainformer.distribution.abstract_build import abstract_build
from keras_brainformer.distribution.abstract_build import is_abstract
from keras_brainformer.distribution.mesh import distribution_scope
from keras_brainformer.distribution.mesh import make_distribution
from keras_brainformer.layers import causal_self_attention as attention
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.zoo.parameter_count import count_parameters
from keras_brainformer.zoo.weight_specs import weight_shapes

ON_JAX = keras.config.backend() == "jax"
jax_only = pytest.mark.skipif(not ON_JAX, reason="compile lowers Keras' JAX train step")
REQUIRE_ENV = "KERAS_BRAINFORMER_REQUIRE_LIBTPU"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TOPOLOGY = "v4:2x2x1"  # 4 TPU v4 chips, one host


def need_libtpu():
    if HAS_LIBTPU:
        return
    message = 'libtpu is not installed (pip install -e ".[tpu]")'
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {message}")
    pytest.skip(f"{message}; set {REQUIRE_ENV}=1 to fail instead of skipping")


def _compile(mesh, **kwargs):
    need_libtpu()
    # The fast tier turns XLA's optimisations off (conftest); a TPU user's
    # compilation has them on, and the memory and collectives depend on it.
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        return tpu_compile.compile_train_step(
            get_preset_config("glam_tiny"), mesh, TOPOLOGY, batch_size=4,
            sequence_length=64, optimizer="adafactor", preset="glam_tiny", **kwargs,
        )
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(scope="module")
def expert_axis_report():
    return _compile("batch=2,expert=2")


@pytest.fixture(scope="module")
def gshard_report():
    return _compile("batch=4", experts_on="batch")


def _moe_layers():
    config = get_preset_config("glam_tiny")
    lm = abstract_build(lambda: BrainformerBackbone.from_config(config))
    return len(lm.moe_layers)


def test_fit_step_fits_and_plan_bounds_the_compiler_peak(expert_axis_report, gshard_report):
    for report in (expert_axis_report, gshard_report):
        assert report.device_kind == "TPU v4" and report.chips == 4
        assert report.fits and 0 < report.peak_bytes < report.hbm_bytes
        assert report.memory["argument"] > 0 and report.flops > 0
        # The plan is conservative (every activation alive at once) but not
        # wildly; at this small shape it is even under: measured 0.86 (GShard)
        # with libtpu 0.0.42.1, batch 4 x 64.
        assert 0.8 <= report.plan_over_peak <= 1.6, (report.mesh, report.plan_over_peak)
    # GShard splits the expert banks 4 ways instead of 2: fewer bytes a chip.
    assert gshard_report.memory["argument"] < expert_axis_report.memory["argument"]


def test_plan_parts_match_the_compiler_split(expert_axis_report, gshard_report):
    # The compiler's peak is arguments + outputs not aliased + working
    # memory. The TPU plan's first two parts come from the weights and the
    # optimizer alone: within 2.6 MB of the compiler's at 100M and 8B
    # (tests/test_memory_plan.py, from docs/tpu_evidence/). At glam_tiny's
    # widths the TPU's (8, 128) tiles pad the small dimensions: measured
    # plan / compiler 0.78-0.82 for both parts with libtpu 0.0.42.1. Padding
    # only adds, so the plan stays below the compiler's and above 0.6 of it.
    for report in (expert_axis_report, gshard_report):
        m = report.memory
        for planned, compiled in ((report.plan_tpu_arguments, m["argument"]),
                                  (report.plan_tpu_written, m["output"] - m["alias"])):
            assert 0.6 * compiled <= planned <= compiled, (report.mesh, planned, compiled)
        assert "plan / compiler by part: arguments" in report.table()


def test_gshard_layout_moves_tokens_to_experts_by_all_to_all(gshard_report):
    # Experts on the batch axis: dispatch and combine, forward and backward,
    # are all-to-alls (4 a MoE layer at least), and no expert bank is gathered.
    found = gshard_report.collectives
    assert found.get("all-to-all", {}).get("count", 0) >= 4 * _moe_layers(), found
    assert gshard_report.estimated_seconds > 0 and gshard_report.steps_per_second > 0
    assert 0 < gshard_report.mfu < 1


def test_cost_model_time_is_positive_and_above_the_roofline(expert_axis_report, gshard_report):
    # The cost model's time (optimal_seconds with each uncosted custom call's
    # -1 s taken back out) is a sum of per-op rooflines at rates at most the
    # chip's peaks: never below the whole program's roofline.
    for report in (expert_axis_report, gshard_report):
        assert report.unknown_custom_calls == [], report.custom_calls
        seconds = report.estimated_seconds
        assert seconds == pytest.approx(report.optimal_seconds + report.uncosted_custom_calls)
        assert 0 < report.roofline_seconds <= seconds < 1, (report.roofline_seconds, seconds)
    text = expert_axis_report.table()
    assert "XLA cost-model step time" in text and "roofline" in text
    out = expert_axis_report.to_dict()
    seconds = expert_axis_report.estimated_seconds
    assert out["estimated_seconds"] == seconds and out["roofline_seconds"] > 0
    assert out["steps_per_second"] == pytest.approx(1 / seconds)


def test_cost_model_seconds_counts_only_known_custom_calls():
    # Measured with libtpu 0.0.42.1 (docs/performance_model.md): the MoE
    # layer's step on v5e:4x4 gave -6.904853 s with 7 ConcatBitcasts, and
    # +0.095451 s compiled without sliced prefetch (its AsyncCollective
    # pair is costed).
    calls = {"AssumeGatherIndicesInBound": 3, "GatherScatterIndicesBitpacked": 3,
             "AsyncCollectiveStart": 1, "AsyncCollectiveDone": 1, "ConcatBitcast": 7}
    assert tpu_compile.cost_model_seconds(-6.904853, calls) == pytest.approx(0.095451, rel=0.01)
    # A custom call of unknown costing: no estimate rather than a wrong one.
    assert tpu_compile.cost_model_seconds(-6.904853, {**calls, "SomeKernel": 1}) is None
    assert tpu_compile.cost_model_seconds(-1.5, {"ConcatBitcast": 1}) is None


def test_concat_bitcast_costs_minus_one_second_and_is_taken_back():
    # Why optimal_seconds is negative: the TPU compiler prefetches a large
    # weight in slices and joins them with a ConcatBitcast custom call, which
    # XLA's cost analysis cannot time and counts as -1 s. The same program
    # compiled without sliced prefetch has no custom call; the two times agree
    # once the -1 s is taken back out.
    need_libtpu()
    device = tpu_compile.tpu_devices(TOPOLOGY)[0]
    sharding = NamedSharding(Mesh(np.array([device]), ("x",)), PartitionSpec())
    weight = jax.ShapeDtypeStruct((8192, 70), jnp.float32, sharding=sharding)
    tokens = jax.ShapeDtypeStruct((512, 70), jnp.float32, sharding=sharding)

    def loss(w, x):
        return jnp.sum(jax.nn.log_softmax(x @ w.T)) + jnp.sum(w * w)

    lowered = jax.jit(jax.grad(loss)).lower(weight, tokens)
    results = []
    for options in ({}, {"xla_tpu_sliced_prefetch_max_slices": 0}):
        compiled = lowered.compile(options)
        cost = tpu_compile._cost(compiled.cost_analysis())
        results.append((cost["optimal_seconds"], tpu_compile.custom_calls(compiled.as_text())))
    (sliced, sliced_calls), (plain, plain_calls) = results
    assert sliced_calls.get("ConcatBitcast", 0) >= 1 and sliced < 0, results
    assert plain_calls == {} and plain > 0, results
    assert tpu_compile.cost_model_seconds(sliced, sliced_calls) == pytest.approx(plain, rel=0.2)


def test_expert_axis_layout_gathers_expert_outputs_instead(expert_axis_report):
    # Experts on their own axis: every device of an expert group holds the
    # same tokens (Keras splits the input along `batch` only), so reaching an
    # expert is a local slice and the expert outputs are all-gathered
    # (docs/distributed_training.md); no all-to-all.
    found = expert_axis_report.collectives
    assert "all-to-all" not in found, found
    assert found.get("all-gather", {}).get("count", 0) >= 2 * _moe_layers(), found


@jax_only
def test_step_lowered_for_a_tpu_takes_the_attention_a_tpu_runs():
    # This process's devices are CPUs, where attention keeps our einsum core;
    # under a distribution over a TPU slice's devices (what `compile` lowers
    # on) it takes `keras.ops.dot_product_attention`, as `fit` on a TPU does.
    need_libtpu()
    assert not attention.uses_keras_attention()
    tpu = make_distribution("batch=2,model=2", devices=list(tpu_compile.tpu_devices(TOPOLOGY)))
    with distribution_scope(tpu):
        assert attention.uses_keras_attention()
    cpu = make_distribution("batch=1", devices=keras.distribution.list_devices()[:1])
    with distribution_scope(cpu):
        assert not attention.uses_keras_attention()
    assert not attention.uses_keras_attention()


@jax_only
def test_largest_preset_builds_without_allocating():
    config = get_preset_config("qwen3_moe_235b_a22b")  # 235B parameters: 940 GB in float32
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def build():
        return BrainformerCausalLM(BrainformerBackbone.from_config(config), preprocessor=None)

    lm = abstract_build(build)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < 500 * 2**20, grown
    assert all(is_abstract(v) for v in lm.variables)
    # Every weight there, with its exact path and shape (the analytic specs).
    shapes = {v.path: tuple(v.shape) for v in lm.backbone.variables}
    expected = weight_shapes(config)
    assert {k: shapes.get(k) for k in expected} == {k: tuple(s) for k, s in expected.items()}
    assert sum(math.prod(v.shape) for v in lm.trainable_variables) == (
        count_parameters(config)["total"]
    )


@jax_only
def test_compile_without_libtpu_is_one_error_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a)
    )
    code = main(["compile", "--preset", "glam_tiny", "--topology", TOPOLOGY,
                 "--mesh", "batch=2,expert=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("error:") and '".[tpu]"' in err[0], err


@jax_only
@pytest.mark.parametrize("argv, words", [
    (["--topology", "v4:2x2"], "3 positive dimensions"),
    (["--topology", "v9:2x2x1"], "Invalid TPU topology"),
    (["--topology", TOPOLOGY, "--mesh", "batch=8"], "has 4 chips"),
])
def test_compile_bad_input_is_one_error_line(argv, words, capsys):
    if "--mesh" in argv:
        need_libtpu()  # the chip count comes from libtpu's topology
    code = main(["compile", "--preset", "glam_tiny", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and words in err[0], err


@pytest.mark.skipif(ON_JAX, reason="the other backends' refusal")
def test_compile_on_another_backend_is_one_error_line(capsys):
    code = main(["compile", "--preset", "glam_tiny", "--topology", TOPOLOGY])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "compile needs the JAX backend" in err[0] and "KERAS_BACKEND=jax" in err[0]

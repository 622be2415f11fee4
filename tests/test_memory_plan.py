"""The memory planner: analytic weight shapes, sharded parameter bytes,
optimizer state and the `keras-brainformer plan` command."""

import glob
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
from conftest import TINY_PRESETS

from keras_brainformer.cli import main
from keras_brainformer.distribution.memory_plan import dispatched_tensor_axes
from keras_brainformer.distribution.memory_plan import moe_dispatch_geometry
from keras_brainformer.distribution.memory_plan import parse_bytes
from keras_brainformer.distribution.memory_plan import plan_memory
from keras_brainformer.distribution.memory_plan import shard_weights
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models.brainformer.block_spec import AttentionSpec
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.block_spec import FeedForwardSpec
from keras_brainformer.models.brainformer.block_spec import MoESpec
from keras_brainformer.models.brainformer.block_spec import resolve_block_specs
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.zoo.parameter_count import count_parameters
from keras_brainformer.zoo.weight_specs import weight_shapes
from keras_brainformer.zoo.weight_specs import weight_specs


def small_config(**overrides):
    """d=32, 4 heads, 4 gated experts of width 64, a dense FFN: every
    sharded dimension divides a 2x2x2 mesh."""
    spec = BlockSpec(
        [
            AttentionSpec(num_heads=4),
            MoESpec(num_experts=4, intermediate_dim=64, activation="gated_gelu"),
            FeedForwardSpec(intermediate_dim=64),
        ]
    )
    config = {
        "vocabulary_size": 64,
        "hidden_dim": 32,
        "blocks": spec.to_dict(),
        "num_layers": 2,
        "max_sequence_length": 16,
    }
    config.update(overrides)
    return config


CONFIGS = {name: get_preset_config(name) for name in TINY_PRESETS}
CONFIGS["untied_layer_norm_bf16"] = small_config(
    tie_embeddings=False, norm="layer", dtype="bfloat16"
)
CONFIGS["untied_primer_mixed"] = small_config(
    tie_embeddings=False,
    blocks=BlockSpec([AttentionSpec(4, head_dim=6, depthwise_conv_kernel=3)]).to_dict(),
    dtype="mixed_bfloat16",
)


@pytest.fixture(scope="module")
def built():
    """name -> backbone, built once per module. Built in a stateless scope
    that leaves the variables uninitialised (paths, shapes and dtypes are
    final, no values are drawn): eager random initialisers cost an XLA
    compilation per shape. The 8-device test below builds for real."""
    models = {}
    for name, config in CONFIGS.items():
        with keras.StatelessScope(initialize_variables=False):
            models[name] = BrainformerBackbone(**config)
    yield models
    keras.config.set_dtype_policy("float32")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_weight_shapes_match_built_model(built, name):
    config = CONFIGS[name]
    backbone = built[name]
    real = {v.path: (tuple(v.shape), v.trainable, v.dtype) for v in backbone.weights}
    specs = weight_specs(config)
    assert {p: (s.shape, s.trainable, s.dtype) for p, s in specs.items()} == real
    assert list(specs) == [v.path for v in backbone.weights]
    assert weight_shapes(config) == {p: shape for p, (shape, _, _) in real.items()}
    trainable = sum(s.size for s in specs.values() if s.trainable)
    assert trainable == count_parameters(config)["total"]


@pytest.mark.parametrize("name", ["glam_tiny", "untied_layer_norm_bf16"])
@pytest.mark.parametrize("optimizer", ["adafactor", "adamw"])
def test_one_device_bytes_match_keras(built, name, optimizer):
    """On one device: parameter bytes = count_parameters x dtype size (plus
    the router statistics), and the optimizer state equals what Keras'
    optimizer allocates for the built model (up to its few scalars)."""
    config = CONFIGS[name]
    backbone = built[name]
    plan = plan_memory(config, {"batch": 1}, batch_size=2, sequence_length=16,
                       dtype=config.get("dtype", "float32"), optimizer=optimizer)
    assert plan.num_parameters == count_parameters(config)["total"]
    real_bytes = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in backbone.weights)
    assert plan.parameters == real_bytes
    assert plan.gradients == sum(
        math.prod(v.shape) * _itemsize(v.dtype) for v in backbone.trainable_weights
    )
    if config.get("dtype") is None:
        assert plan.parameters == 4 * plan.num_parameters + plan.parameter_breakdown.get(
            "router_statistics", 0) + plan.parameter_breakdown.get("router_expert_load", 0)
    keras_optimizer = (
        keras.optimizers.Adafactor() if optimizer == "adafactor" else keras.optimizers.AdamW()
    )
    # Real variables of the model's shapes (the fixture's are uninitialised).
    variables = [
        keras.Variable(np.zeros(v.shape, "float32"), dtype=v.dtype, name=v.name)
        for v in backbone.trainable_variables
    ]
    keras_optimizer.build(variables)
    allocated = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in keras_optimizer.variables)
    assert abs(plan.optimizer_state - allocated) <= 16
    assert plan.activations > 0 and plan.total == (
        plan.parameters + plan.gradients + plan.optimizer_state + plan.activations
    )


def _itemsize(dtype):
    return {"float32": 4, "bfloat16": 2, "int32": 4, "int64": 8}[str(dtype)]


def test_8b_plan_is_fast_and_exact():
    config = get_preset_config("brainformer1_8b")
    start = time.perf_counter()
    plan = plan_memory(config, "batch=16,expert=16", batch_size=256, sequence_length=1024,
                       dtype="mixed_bfloat16", optimizer="adafactor")
    assert time.perf_counter() - start < 2.0
    assert plan.num_parameters == count_parameters(config)["total"]
    shards = plan.shards
    assert shards["block_0/1_moe/experts/w_in"].local_shape == (4, 4096, 16384)
    assert shards["token_embedding/embeddings"].local_shape == (256000, 4096)
    # Expert banks are split 16 ways, everything else is replicated.
    expert = sum(math.prod(s.shape) for s in shards.values() if s.kind.startswith("expert_"))
    other = sum(math.prod(s.shape) for s in shards.values() if not s.kind.startswith("expert_"))
    assert plan.parameters == 4 * (expert // 16 + other)
    assert not plan.fits("16GB")
    assert "does not fit" in plan.table("16GB")


def test_fsdp_and_model_axis_divide_weights():
    config = small_config()
    plain = plan_memory(config, {"batch": 2}, 4, 16)
    fsdp = plan_memory(config, {"batch": 2}, 4, 16, fsdp=True)
    assert fsdp.shards["block_0/2_ffn/w_in"].local_shape == (16, 64)
    assert fsdp.parameters < plain.parameters
    model = plan_memory(config, {"batch": 1, "model": 2}, 4, 16)
    assert model.shards["block_0/0_attention/w_query"].local_shape == (32, 2, 8)
    assert model.shards["block_0/1_moe/experts/w_out"].local_shape == (4, 32, 32)
    # GShard: experts on the batch axis; fsdp then leaves expert banks alone.
    gshard = plan_memory(config, {"batch": 2}, 4, 16, fsdp=True, expert_dim_name="batch")
    assert gshard.shards["block_0/1_moe/experts/w_in"].local_shape == (2, 32, 64)


def test_indivisible_mesh_names_the_weight():
    with pytest.raises(ValueError, match=r"block_0/1_moe/experts/w_in.*'expert' of size 3"):
        shard_weights(small_config(), {"batch": 1, "expert": 3})
    with pytest.raises(ValueError, match="batch_size"):
        plan_memory(small_config(), {"batch": 4}, 6, 16)
    with pytest.raises(ValueError, match="optimizer"):
        plan_memory(small_config(), {"batch": 1}, 4, 16, optimizer="sgd")


def test_parse_bytes():
    assert parse_bytes("16GB") == 16 * 10**9
    assert parse_bytes("16 GiB") == 16 * 2**30
    assert parse_bytes("512MB") == 512 * 10**6
    with pytest.raises(ValueError, match="unit"):
        parse_bytes("16 gigs")


def test_cli_exit_codes(capsys):
    base = ["plan", "--preset", "glam_tiny", "--mesh", "batch=2", "--batch-size", "4",
            "--seq-len", "64"]
    assert main(base + ["--device-memory", "16GB"]) == 0
    out = capsys.readouterr().out
    assert "adafactor: fits: yes" in out and "adamw: fits: yes" in out
    assert main(base + ["--device-memory", "1MB", "--optimizer", "adamw"]) == 1
    assert "does not fit" in capsys.readouterr().out
    assert main(["plan", "--preset", "glam_tiny", "--mesh", "batch=two"]) == 2
    assert "error: Invalid mesh spec" in capsys.readouterr().err
    assert main(["plan", "--preset", "no_such_preset"]) == 2
    assert "error: Unknown preset" in capsys.readouterr().err
    assert main(["plan", "--preset", "glam_tiny", "--mesh", "batch=1,expert=3"]) == 2
    assert "experts/w_in" in capsys.readouterr().err
    assert main(["plan", "--preset", "glam_tiny", "--device-memory", "lots"]) == 2


def test_cli_reads_a_preset_folder(tmp_path, capsys):
    config = small_config()
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"class_name": "BrainformerBackbone", "config": config}, f)
    assert main(["plan", "--preset", str(tmp_path), "--optimizer", "adamw"]) == 0
    out = capsys.readouterr().out
    assert f"parameters ({count_parameters(config)['total']:,} in the model)" in out


_SHARDED_BUILD = textwrap.dedent(
    """
    import json, sys
    import keras
    from keras_brainformer.models.brainformer.brainformer_layout_map import get_layout_map
    from keras_brainformer.models import BrainformerBackbone

    config = json.loads(sys.argv[1])
    devices = keras.distribution.list_devices()
    assert len(devices) == 8, devices
    mesh = keras.distribution.DeviceMesh((2, 2, 2), ("batch", "expert", "model"), devices)
    results = {}
    for fsdp in (False, True):
        distribution = keras.distribution.ModelParallel(
            layout_map=get_layout_map(mesh, fsdp=fsdp), batch_dim_name="batch")
        with distribution.scope():
            backbone = BrainformerBackbone(**config)
            result = {"shards": {v.path: list(v.value.addressable_shards[0].data.shape)
                                 for v in backbone.weights}}
            for name in ("adafactor", "adamw"):
                optimizer = keras.optimizers.get(name)
                optimizer.build(backbone.trainable_variables)
                result[name] = sum(v.value.addressable_shards[0].data.nbytes
                                   for v in optimizer.variables)
        results[str(fsdp)] = result
    print("RESULT " + json.dumps(results))
    """
)


@pytest.mark.slow  # a subprocess with 8 simulated devices
@pytest.mark.skipif(keras.backend.backend() != "jax", reason="simulated devices need JAX")
def test_shards_match_model_parallel_build():
    """A model built under `ModelParallel` on 8 simulated CPU devices (mesh
    batch=2, expert=2, model=2; with and without fsdp) has exactly the
    planner's per-device shard shapes and optimizer bytes."""
    config = small_config(tie_embeddings=False)
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_NUM_CPU_DEVICES="8",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    run = subprocess.run(
        [sys.executable, "-c", _SHARDED_BUILD, json.dumps(config)],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    line = [x for x in run.stdout.splitlines() if x.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    mesh = {"batch": 2, "expert": 2, "model": 2}
    for fsdp in (False, True):
        result = results[str(fsdp)]
        for optimizer in ("adafactor", "adamw"):
            plan = plan_memory(config, mesh, 4, 16, optimizer=optimizer, fsdp=fsdp)
            planned = {path: list(s.local_shape) for path, s in plan.shards.items()}
            assert planned == result["shards"]
            assert abs(plan.optimizer_state - result[optimizer]) <= 16
        assert plan.shards["block_0/1_moe/experts/w_in"].local_shape == (
            (2, 16, 32) if fsdp else (2, 32, 32)
        )


def test_tpu_target_arithmetic():
    """`target="tpu"` changes exactly the terms that XLA's TPU programs keep
    differently (docs/performance_model.md, "Plan vs XLA's TPU compiler"),
    and its total is the larger of the forward and the update phase."""
    config = small_config()  # d=32, 4 heads, 4 gated experts h=64, dense h=64, V=64
    b, T, d, V, H, a, f = 2, 16, 32, 64, 4, 2, 4
    N = b * T
    args = (config, {"batch": 1}, b, T)
    default = plan_memory(*args, dtype="mixed_bfloat16")
    tpu = plan_memory(*args, dtype="mixed_bfloat16", target="tpu")
    old, new = default.activation_breakdown, tpu.activation_breakdown
    norms = 2 * 3 + 1  # one per sublayer of 2 blocks, and the final norm
    assert old["norms"] == norms * N * d * (2 * a + f)
    assert new["norms"] == norms * N * d * a
    assert new["attention scores"] == 2 * b * H * T * T * (f + a)
    assert old["attention scores"] == 2 * b * H * T * T * (2 * f + a)
    assert new["embedding and logits"] == N * d * a + b * T * V * a + b * T * V // 2
    assert old["embedding and logits"] == N * d * a + b * T * V * (a + 3 * f)
    assert 2 * new["dense ffn"] == old["dense ffn"]
    assert 2 * new["moe experts"] == old["moe experts"]
    moe = [s for spec in resolve_block_specs(config["blocks"], 2) for s in spec.sublayers
           if s.kind == "moe"]
    geometry = moe_dispatch_geometry(moe[0], b, T, {"batch": 1}, dispatched_tensor_axes(("batch",)))
    slots = geometry.experts_local * geometry.groups_local * geometry.capacity
    # The dispatched tokens and expert outputs, no float32 combine.
    assert new["moe dispatched tokens"] == len(moe) * 2 * slots * d * a
    assert old["moe dispatched tokens"] == len(moe) * (
        2 * slots * d * a + 2 * slots * d * f + N * d * (f + a))
    # The router keeps no float32 copy of its input.
    assert new["moe router"] == old["moe router"] - len(moe) * N * d * f
    for group in ("attention", "bfloat16 weight copies"):
        assert new[group] == old[group]
    # Only rank >= 2 weights' velocity is written without being read.
    written = sum(s.local_bytes for s in tpu.shards.values() if s.trainable and len(s.shape) >= 2)
    assert tpu.written_state == written
    assert 0 < tpu.optimizer_breakdown["velocity, rank < 2 (read and updated)"]
    assert tpu.total == (tpu.parameters + tpu.optimizer_state - written
                         + max(tpu.activations, tpu.gradients + written))
    assert default.total == (default.parameters + default.gradients
                             + default.optimizer_state + default.activations)
    adamw = plan_memory(*args, dtype="mixed_bfloat16", optimizer="adamw", target="tpu")
    assert adamw.total == (adamw.parameters + adamw.optimizer_state
                           + max(adamw.activations, adamw.gradients))
    assert "as XLA's TPU compiler schedules them" in tpu.table()
    assert "warning" not in tpu.table()
    fsdp = plan_memory(config, {"batch": 2}, 4, T, dtype="mixed_bfloat16", fsdp=True,
                       target="tpu")
    # fsdp's step computes on the local batch (the layout's embedding-output
    # rule, tests/test_distribution.py), so the plan carries no warning.
    assert "warning" not in fsdp.table()
    # ... and that rule, `(batch, None, model)`, splits the residual stream
    # along `model`: the norms' inputs and the embedding output are d / 2
    # wide on a `model=2` mesh (the TPU target only; the default target is
    # the CPU-checked estimate and keeps them whole).
    mesh = {"batch": 2, "model": 2}
    for fsdp_on, width in ((True, d // 2), (False, d)):
        split = plan_memory(config, mesh, 4, T, dtype="mixed_bfloat16", fsdp=fsdp_on,
                            target="tpu").activation_breakdown
        assert split["norms"] == norms * N * width * a
        assert split["embedding and logits"] == N * width * a + b * T * (V // 2) * (a + 0.5)
        whole = plan_memory(config, mesh, 4, T, dtype="mixed_bfloat16", fsdp=fsdp_on)
        assert whole.activation_breakdown["norms"] == norms * N * d * (2 * a + f)
    with pytest.raises(ValueError, match="target"):
        plan_memory(*args, target="gpu")


# XLA's peak per chip (`memory_analysis()`, bytes) of the real `fit` step
# compiled for 64 TPU v4 chips, mesh batch=32,model=2 (experts on batch),
# 64 x 1024 tokens, mixed_bfloat16, Adafactor; libtpu 0.0.42.1
# (docs/performance_model.md). Brainformer-1 and -2 are planned 15-17 % over
# (see there); the others within 2 %.
_TPU_100M_PEAKS = {
    "glam_100m_32e": (3_117_473_280, 0.15),
    "glam_ec_100m_32e": (2_965_205_504, 0.15),
    "dense_100m": (2_901_156_864, 0.15),
    "primer_100m": (2_845_989_376, 0.15),
    "brainformer1_100m": (2_471_142_400, 0.2),
    "brainformer2_100m": (2_768_056_320, 0.2),
}


@pytest.mark.parametrize("name", sorted(_TPU_100M_PEAKS))
def test_tpu_plan_matches_compiled_100m_peaks(name):
    peak, tolerance = _TPU_100M_PEAKS[name]
    config = get_preset_config(name)
    kwargs = dict(dtype="mixed_bfloat16", optimizer="adafactor", expert_dim_name="batch")
    tpu = plan_memory(config, "batch=32,model=2", 64, 1024, target="tpu", **kwargs)
    assert abs(tpu.total / peak - 1) <= tolerance, tpu.total / peak
    # The CPU-checked estimate counts every float32 copy and every tensor
    # alive at once: 2.8-3.6x these TPU peaks.
    default = plan_memory(config, "batch=32,model=2", 64, 1024, **kwargs)
    assert default.total > 2.5 * peak


EVIDENCE_8B = os.path.join(
    os.path.dirname(__file__), os.pardir, "docs", "tpu_evidence", "8b_v4_512"
)


_COMPILE_REPORTS = sorted(
    glob.glob(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "tpu_evidence",
                           "*", "*.json"))
)


@pytest.mark.parametrize("path", _COMPILE_REPORTS, ids=os.path.basename)
def test_tpu_plan_parts_match_what_xla_reports_apart(path):
    """XLA's memory analysis counts a compiled step's arguments and its
    outputs not aliased to an argument in full in its peak; the rest is
    working memory. The plan gets the first two from the weights and the
    optimizer alone: for every `compile --json` report kept in
    docs/tpu_evidence/ (100M on 64 v4 chips, 8B on 512, with and without
    fsdp) they match to 2.6 MB a chip (the batch and the TPU's
    tile padding of small shards). So any gap between the plan and the
    peak is in the working memory."""
    with open(path) as f:
        report = json.load(f)
    memory = report["memory"]
    plan = plan_memory(
        get_preset_config(report["preset"]), report["mesh"], report["batch_size"],
        report["sequence_length"], dtype=report["dtype"], optimizer=report["optimizer"],
        fsdp=report["fsdp"], expert_dim_name=report["experts_on"], target="tpu",
    )
    written = memory["output"] - memory["alias"]
    for planned, compiled in ((plan.argument_bytes, memory["argument"]),
                              (plan.written_state, written)):
        assert abs(planned - compiled) <= 3 * 2**20, (planned, compiled)


@pytest.mark.parametrize("name", ["brainformer1_8b", "dense_8b", "glam_8b_64e", "glam_ec_8b_64e"])
def test_tpu_plan_matches_compiled_8b_peaks(name):
    """The four 8B `fit` steps compiled for 512 v4 chips with `--fsdp`
    (docs/tpu_evidence/8b_v4_512/, their `compile --json` reports): the TPU
    plan of the same step is within 17 % of XLA's peak (measured 0.94-1.16).
    Before the residual stream's `model` split was modelled it was 1.03-1.30
    (`dense_8b` 1.30, `glam_8b_64e` 1.27)."""
    with open(os.path.join(EVIDENCE_8B, f"{name}.json")) as f:
        report = json.load(f)
    assert report["preset"] == name and report["fsdp"] and report["experts_on"] == "batch"
    plan = plan_memory(
        get_preset_config(name), report["mesh"], report["batch_size"],
        report["sequence_length"], dtype=report["dtype"], optimizer=report["optimizer"],
        fsdp=True, expert_dim_name="batch", target="tpu",
    )
    ratio = plan.total / report["memory"]["peak"]
    assert abs(ratio - 1) <= 0.17, ratio

"""Scale-out: layout maps cover every weight; data / model / expert / data×expert
meshes on 8 simulated JAX devices train like one device; expert weights and
their optimizer slots are split as intended; the dispatched MoE tensors move
by all-to-all; a two-process (multi-host) run agrees with itself and with one
device; tf.distribute.MirroredStrategy on two logical CPUs matches one device.

The multi-device checks run in subprocesses: JAX fixes its device count when
it starts (`JAX_NUM_CPU_DEVICES`), TensorFlow its logical devices. They are
the slow tier (`-m slow`); the layout rules are checked in the fast tier from
`weight_specs(config)`, without building models.
"""

import dataclasses
import json
import os
import re
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import TINY_PRESETS

from keras_brainformer.distribution.mesh import make_distribution
from keras_brainformer.distribution.mesh import parse_mesh_spec
from keras_brainformer.layers import grouped_scatter
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_layout_map import TENSOR_RULES
from keras_brainformer.models.brainformer.brainformer_layout_map import WEIGHT_RULES
from keras_brainformer.models.brainformer.brainformer_layout_map import check_divisible
from keras_brainformer.models.brainformer.brainformer_layout_map import get_layout_map
from keras_brainformer.models.brainformer.brainformer_layout_map import match_rule
from keras_brainformer.models.brainformer.brainformer_layout_map import resolve_axes
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.zoo.weight_specs import weight_specs

TESTS = os.path.dirname(os.path.abspath(__file__))
jax_only = pytest.mark.skipif(
    keras.config.backend() != "jax", reason="keras.distribution runs on the JAX backend"
)


def _variants():
    for name in TINY_PRESETS:
        yield name, get_preset_config(name)
    untied = get_preset_config("glam_tiny")
    untied["tie_embeddings"] = False
    yield "glam_tiny untied", untied
    layer_norm = get_preset_config("primer_tiny")
    layer_norm["norm"] = "layer"
    yield "primer_tiny layer norm", layer_norm
    # Qwen-MoE's shared expert (a dense FFN and a gate inside the MoE layer).
    shared = get_preset_config("glam_tiny")
    blocks = BlockSpec.from_dict(shared["blocks"])
    shared["blocks"] = BlockSpec([
        dataclasses.replace(s, shared_expert_intermediate_dim=32) if s.kind == "moe" else s
        for s in blocks.sublayers
    ]).to_dict()
    yield "glam_tiny shared expert", shared


@pytest.mark.parametrize("name,config", list(_variants()), ids=lambda v: str(v)[:24])
def test_every_weight_matches_exactly_one_rule(name, config):
    """Driven by `weight_specs(config)`, which lists every weight path of the
    built backbone without building it (`test_memory_plan.py` checks the two
    agree, path by path)."""
    config = dict(config, vocabulary_size=256)
    paths = list(weight_specs(config))
    for path in paths:
        assert len(match_rule(path)) == 1, (path, match_rule(path))
        assert not match_rule(path, TENSOR_RULES), path
    # Keras' own lookup (re.fullmatch, an error on two matches) agrees.
    mesh = keras.distribution.DeviceMesh((1, 1, 1), ("batch", "expert", "model"),
                                         keras.distribution.list_devices()[:1])
    layout_map = get_layout_map(mesh)
    for path in paths:
        assert layout_map[path] is not None, path
    moe_paths = sorted({p.split("/router/")[0] for p in paths if "/router/" in p})
    assert bool(moe_paths) == ("dense" not in name and "primer" not in name)
    for moe_path in moe_paths:
        layout = layout_map[f"{moe_path}/dispatched"]
        assert layout.axes == ("expert", "batch", None, None)


def test_moe_layer_paths_are_the_weight_spec_prefixes():
    """The `<moe layer path>/dispatched` key above uses the MoE layer's path,
    derived from its weights' paths: check that on one built backbone."""
    config = dict(get_preset_config("brainformer1_tiny"), vocabulary_size=256)
    with keras.StatelessScope(initialize_variables=False):
        backbone = BrainformerBackbone(**config)
    derived = sorted({p.split("/router/")[0] for p in weight_specs(config) if "/router/" in p})
    assert derived == sorted(moe.path for moe in backbone.moe_layers)


def test_replicated_rules_are_exactly_the_small_weights():
    sharded = {name for name, _, axes in WEIGHT_RULES if any(a is not None for a in axes)}
    assert sharded == {
        "embedding", "reverse_embedding", "attention_qkv", "attention_output",
        "attention_conv", "attention_bias", "ffn_in", "ffn_out", "expert_in", "expert_out",
        "expert_lora", "expert_int8_scale", "shared_expert_in", "shared_expert_out",
    }


@pytest.mark.parametrize("preset", ["brainformer1_tiny", "primer_tiny"])
@pytest.mark.parametrize(
    "mode",
    [
        # int8+lora has every variable of the other two modes (the same
        # scale and adapter paths); they run in the slow tier.
        pytest.param("lora", marks=pytest.mark.slow),
        pytest.param("int8", marks=pytest.mark.slow),
        "int8+lora",
    ],
)
def test_lora_adapters_and_int8_scales_match_exactly_one_rule(preset, mode):
    # One block has every sublayer kind of the preset (the rules match
    # within a block; block indices are a wildcard).
    config = dict(get_preset_config(preset), vocabulary_size=256, num_layers=1)
    backbone = BrainformerBackbone(**config)
    if "int8" in mode:
        backbone.quantize("int8")
    if "lora" in mode:
        backbone.enable_lora(2)
    added = [v.path for v in backbone.weights if v.path.endswith(("_lora_a", "_lora_b", "_scale"))]
    assert added
    for variable in backbone.weights:
        assert len(match_rule(variable.path)) == 1, (variable.path, match_rule(variable.path))
    expert_adapters = [p for p in added if "/experts/" in p]
    if backbone.moe_layers:
        assert expert_adapters
        assert all(match_rule(p)[0].startswith("expert_") for p in expert_adapters)


def test_resolve_axes_drops_missing_and_repeated_axes():
    template = ("expert", "fsdp", "model")
    assert resolve_axes(template, ("batch", "expert"), "batch", "model", "expert", False) == (
        "expert", None, None)
    assert resolve_axes(template, ("batch", "model"), "batch", "model", "batch", True) == (
        "batch", None, "model")
    assert resolve_axes(template, ("batch", "expert", "model"), "batch", "model", "expert",
                        True) == ("expert", "batch", "model")


def test_fsdp_keeps_the_embedding_output_on_the_batch_axis():
    """Only fsdp constrains the token embedding's output (and the logits of its
    reversed call) to the batch axis; the slow test below shows why."""
    devices = keras.distribution.list_devices()[:1]
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "model"), devices)
    path = "brainformer_causal_lm/brainformer_backbone/token_embedding/output"
    assert get_layout_map(mesh, fsdp=True)[path].axes == ("batch", None, "model")
    assert get_layout_map(mesh)[path] is None
    batch_only = keras.distribution.DeviceMesh((1,), ("batch",), devices)
    assert get_layout_map(batch_only, fsdp=True)[path].axes == ("batch", None, None)


def test_mesh_spec_parsing_and_errors():
    assert parse_mesh_spec("batch=2,expert=4") == {"batch": 2, "expert": 4}
    assert parse_mesh_spec(" model = 2 ") == {"batch": 1, "model": 2}
    for bad, word in (("batch=2,batch=2", "twice"), ("gpu=2", "unknown axis"),
                      ("batch=0", ">= 1"), ("batch:2", "axis=size"), ("", "axis=size")):
        with pytest.raises(ValueError, match=word):
            parse_mesh_spec(bad)
    with pytest.raises(TypeError, match="mesh"):
        parse_mesh_spec(8)
    with pytest.raises(ValueError, match="needs 8 devices but 1"):
        make_distribution("batch=8", devices=keras.distribution.list_devices()[:1])
    with pytest.raises(ValueError, match="experts_on"):
        make_distribution("batch=1", experts_on="model")


def test_check_divisible_names_the_weight():
    mesh = keras.distribution.DeviceMesh((1,), ("batch",), keras.distribution.list_devices()[:1])
    layout_map = get_layout_map(mesh)
    check_divisible({"block_0/1_moe/experts/w_in": (8, 64, 96)}, layout_map)
    # A pretend 3-way expert axis: 8 experts do not split in three.
    layout_map_3 = _FakeLayoutMap({"expert": 3, "batch": 1})
    expected = r"block_0/1_moe/experts/w_in \(8, 64, 96\).*'expert' of size 3"
    with pytest.raises(ValueError, match=expected):
        check_divisible({"block_0/1_moe/experts/w_in": (8, 64, 96)}, layout_map_3)


def test_train_refuses_a_mesh_that_does_not_divide_the_model_before_building_it():
    from keras_brainformer.errors import TrainingError
    from keras_brainformer.training.trainer import check_layout

    distribution = type("D", (), {"_layout_map": _FakeLayoutMap({"batch": 1, "model": 2})})()
    check_layout(get_preset_config("brainformer1_tiny"), distribution)  # 4 heads: fine
    with pytest.raises(TrainingError, match=r"block_0/0_attention/w_query \(70, 5, 14\)"):
        check_layout(get_preset_config("glam_tiny"), distribution)  # 5 heads on model=2


class _FakeLayoutMap:
    """A layout map over a mesh larger than this machine (no devices needed)."""

    def __init__(self, sizes):
        self.device_mesh = type("Mesh", (), {"axis_names": tuple(sizes),
                                             "shape": tuple(sizes.values())})()

    def __getitem__(self, path):
        (name,) = match_rule(path)
        template = next(axes for n, _, axes in WEIGHT_RULES if n == name)
        axes = resolve_axes(template, self.device_mesh.axis_names, "batch", "model",
                            "expert", False)
        return type("Layout", (), {"axes": axes})()


@pytest.mark.parametrize("trailing", [(), (3,)])
def test_grouped_scatter_matches_portable_reference(trailing):
    rng = np.random.default_rng(0)
    values = rng.normal(size=(4, 10) + trailing).astype("float32")
    index = rng.integers(0, 6, size=(4, 10)).astype("int32")  # duplicates
    fast = grouped_scatter.segment_sum_per_group(values, index, 6)
    portable = grouped_scatter.portable_segment_sum_per_group(values, index, 6)
    expected = np.zeros((4, 6) + trailing, "float32")
    for g in range(4):
        for n in range(10):
            expected[g, index[g, n]] += values[g, n]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fast), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(portable), expected, rtol=1e-6, atol=1e-6
    )


def _run(script, *args, env=None, timeout=600):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    done = subprocess.run(
        [sys.executable, os.path.join(TESTS, script), *args],
        capture_output=True, text=True, env=full_env, timeout=timeout,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


JAX8 = {"JAX_NUM_CPU_DEVICES": "8", "KERAS_BACKEND": "jax"}
# float32 sums in another order (per-shard partial sums, then a collective):
# the same losses to ~1e-6 relative after 3 steps; 2e-5 leaves headroom, and a
# wrong sharding (a dropped shard, a double-counted all-reduce) moves the
# loss by far more than that.
RTOL = 2e-5


def _check_run(result, reference, sizes, experts_on):
    np.testing.assert_allclose(result["losses"], reference["losses"], rtol=RTOL)
    assert result["checksum"] == pytest.approx(reference["checksum"], rel=RTOL)
    if set(sizes) == {"batch"} and experts_on is None:
        split = 1  # plain DataParallel
    else:  # make_distribution's default: the expert axis, else the batch axis
        split = sizes[experts_on or ("expert" if "expert" in sizes else "batch")]
    model = sizes.get("model", 1)
    slots_checked = 0
    for path, weight in result["weights"].items():
        shape, local = weight["shape"], weight["local"]
        if re.search(r"moe/experts/w_(in|gate)$", path):
            assert local == [shape[0] // split, shape[1], shape[2] // model], path
        elif path.endswith("moe/experts/w_out"):
            assert local == [shape[0] // split, shape[1] // model, shape[2]], path
        elif re.search(r"attention/w_(query|key|value)$", path):
            assert local == [shape[0], shape[1] // model, shape[2]], path
        elif path.endswith("router/kernel") or path.endswith("_norm/scale"):
            assert local == shape, path
        # AdamW's momentum and velocity carry their weight's split.
        slot_prefix = path.replace("/", "_")
        for slot_path, slot in result["slots"].items():
            if slot_path.split("/", 1)[1] in (f"{slot_prefix}_momentum",
                                               f"{slot_prefix}_velocity"):
                assert slot["local"] == local, slot_path
                slots_checked += 1
    trainable = sum(w["trainable"] for w in result["weights"].values())
    assert slots_checked == 2 * trainable


MESHES = ("batch=8", "batch=2,model=4", "batch=2,expert=4", "batch=1,expert=8")
GSHARD = "batch=8@batch"  # experts on the batch axis


@pytest.fixture(scope="module")
def mesh_runs():
    """One subprocess per model: the one-device reference and every mesh."""
    cache = {}

    def get(model):
        if model not in cache:
            meshes = MESHES + ((GSHARD,) if model == "glam" else ())
            cache[model] = _run("distributed_fit.py", "--model", model, "--meshes", *meshes,
                                env=JAX8)
        return cache[model]

    return get


@pytest.mark.slow
@jax_only
@pytest.mark.parametrize("model", ["brainformer", "glam"])
def test_meshes_train_like_one_device(model, mesh_runs):
    result = mesh_runs(model)
    assert result["devices"] == 8
    reference = result["none"]
    for mesh in MESHES:
        _check_run(result[mesh], reference, parse_mesh_spec(mesh), None)
    # Data-parallel replicates; every other mesh splits the expert banks.
    assert result["batch=8"]["weights"]["block_0/1_moe/experts/w_in"]["spec"] == [None] * 3
    assert result["batch=1,expert=8"]["weights"]["block_0/1_moe/experts/w_in"]["local"][0] == 1


@pytest.mark.slow
@jax_only
def test_lora_under_expert_parallelism_trains_like_one_device():
    """LoRA adapters created under a `batch=2,expert=4` mesh: each expert's
    pair lives with its expert, only adapters train, and the losses equal one
    device's."""
    result = _run("distributed_fit.py", "--model", "glam", "--lora", "4",
                  "--meshes", "batch=2,expert=4", env=JAX8)
    reference, sharded = result["none"], result["batch=2,expert=4"]
    np.testing.assert_allclose(sharded["losses"], reference["losses"], rtol=2e-5)
    trainable = [p for p, w in sharded["weights"].items() if w["trainable"]]
    assert trainable and all("_lora_" in p for p in trainable)
    a = sharded["weights"]["block_0/1_moe/experts/w_in_lora_a"]
    assert a["shape"] == [8, 64, 4] and a["local"] == [2, 64, 4]
    assert sharded["weights"]["block_0/1_moe/experts/w_in"]["local"][0] == 2


@pytest.mark.slow
@jax_only
def test_gshard_layout_experts_on_the_batch_axis(mesh_runs):
    result = mesh_runs("glam")
    _check_run(result[GSHARD], result["none"], {"batch": 8}, "batch")


FSDP = "batch=4,model=2+fsdp"


@pytest.mark.slow
@jax_only
def test_fsdp_trains_like_one_device_on_its_local_batch():
    """`fsdp=True` on `batch=4,model=2` (experts on the batch axis): the same
    losses as one device, weights split along `d` over the batch axis, and no
    device computing hidden states or logits for the global batch. Without the
    `token_embedding/output` rule the embedding's fsdp split of `d` reached
    the hidden states and every device computed the logits `[8, 32, V/2]` of
    all 8 sequences (749 such tensors in this step; 55 small ones with it)."""
    result = _run("distributed_fit.py", "--model", "glam", "--meshes", FSDP, env=JAX8)
    reference, sharded = result["none"], result[FSDP]
    np.testing.assert_allclose(sharded["losses"], reference["losses"], rtol=RTOL)
    assert sharded["checksum"] == pytest.approx(reference["checksum"], rel=RTOL)
    weights = sharded["weights"]
    d, V = 64, 1024
    assert weights["block_0/0_attention/w_query"]["local"] == [d // 4, 2, 16]
    assert weights["token_embedding/embeddings"]["local"] == [V // 2, d // 4]
    # Experts on the batch axis: fsdp has no axis left for their d.
    assert weights["block_0/1_moe/experts/w_in"]["local"] == [2, d, 256 // 2]
    # Global-batch tensors left: the token ids and the embedding lookup of
    # each device's d/4 slice (fsdp's gather of a d-split table), the router
    # choices (k=2) and probabilities (E=8), and the MoE layer's token
    # gathers at d/2 (without fsdp this CPU program has them at d).
    shapes = sharded["global_batch_shapes"]
    assert shapes and max(shapes) <= d // 2, shapes
    assert not {d, V // 2, V} & set(shapes), shapes


HLO_SCRIPT = """
import re, jax, keras, numpy as np
from keras_brainformer.distribution.mesh import make_distribution
from keras_brainformer.layers import MoEFeedForward
counts = {}
for constrain in (True, False):
    dist = make_distribution("batch=8", experts_on="batch")
    if not constrain:
        del dist._layout_map[next(k for k in dist._layout_map if "dispatched" in k)]
    with dist.scope():
        with keras.name_scope("block_0"):
            moe = MoEFeedForward(8, 128, top_k=2, name="1_moe")
            moe.build((None, 64, 64))
        x = np.random.rand(16, 64, 64).astype("float32")
        x = jax.device_put(x, dist.get_data_layout(x.shape).backend_layout)
        tv = [v.value for v in moe.trainable_variables]
        ntv = [v.value for v in moe.non_trainable_variables]
        def loss(tv, ntv, x):
            return (moe.stateless_call(tv, ntv, x, training=True)[0] ** 2).mean()
        text = jax.jit(jax.grad(loss)).lower(tv, ntv, x).compile().as_text()
    counts[constrain] = {
        "all_to_all": len(re.findall(r" all-to-all(?:-start)?\\(", text)),
        "token_gathers": len(re.findall(r"f32\\[16,64,64\\][^ ]* all-gather", text)),
        "weight_gathers": len(re.findall(r"f32\\[8,(?:64,128|128,64)\\][^ ]* all-gather", text)),
    }
print("RESULT " + json.dumps({"constrained": counts[True], "free": counts[False]}))
"""


@pytest.mark.slow
@jax_only
def test_dispatched_tokens_move_by_all_to_all(tmp_path):
    script = tmp_path / "hlo.py"
    script.write_text("import json\n" + HLO_SCRIPT)
    result = _run(str(script), env=JAX8)
    # GShard layout (experts on the batch axis): with the sharding constraint
    # on the dispatched tensors, tokens travel by all-to-all, and neither the
    # full token tensor nor an expert bank is gathered on every device.
    assert result["constrained"]["all_to_all"] >= 2, result
    assert result["constrained"]["token_gathers"] == 0, result
    assert result["constrained"]["weight_gathers"] == 0, result
    # Without it, XLA gathers the expert banks instead (what the constraint
    # is for).
    assert result["free"]["weight_gathers"] > 0, result


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(script, args, devices_per_process):
    """Starts `script` twice as processes 0 and 1 of one JAX job on
    127.0.0.1 and returns their `RESULT` dicts; bounded by a timeout, and
    both processes are killed if anything fails."""
    address = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices_per_process), KERAS_BACKEND="jax",
               PYTHONUNBUFFERED="1")
    processes = [
        subprocess.Popen(
            [sys.executable, script, "--coordinator", address, "--process-id", str(i), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(2)
    ]
    results = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=400)
            lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
            assert process.returncode == 0 and lines, err[-4000:]
            results.append(json.loads(lines[-1][len("RESULT "):]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    return results


@pytest.mark.slow
@jax_only
def test_two_processes_on_loopback_agree_with_one_device(mesh_runs):
    results = _run_two_processes(os.path.join(TESTS, "multihost_fit.py"), [], 2)
    reference = mesh_runs("glam")["none"]  # the same model and data on one device
    for result in results:
        assert result["global_devices"] == 4 and result["local_devices"] == 2
        # Each process reads half of every global batch.
        assert result["local_batch_rows"] * 2 == result["global_rows"]
        assert result["expert_w_in_local"][0] * 2 == result["expert_w_in_global"][0]
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=RTOL)
    assert results[0]["losses"] == results[1]["losses"]


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="tf.distribute")
def test_mirrored_strategy_on_two_logical_cpus_matches_one_device():
    result = _run("mirrored_fit.py", env={"KERAS_BACKEND": "tensorflow"})
    assert result["replicas"] == 2
    np.testing.assert_allclose(result["mirrored"], result["single"], rtol=RTOL)


@pytest.mark.slow
@jax_only
def test_multihost_example_on_the_real_corpus_pipeline():
    example = os.path.join(os.path.dirname(TESTS), "examples", "train_multihost.py")
    results = _run_two_processes(
        example,
        ["--num-processes", "2", "--mesh", "batch=2,expert=4", "--steps", "3",
         "--sequence-length", "32", "--max-corpus-bytes", "100000"],
        4,
    )
    assert [r["process"] for r in results] == [0, 1]
    assert len(results[0]["losses"]) == 3 and np.all(np.isfinite(results[0]["losses"]))
    assert results[0]["losses"] == results[1]["losses"]


def test_train_mesh_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    from keras_brainformer import cli

    out = tmp_path / "run"
    common = ["train", "--preset", "glam_tiny", "--out", str(out), "--steps", "1"]
    if keras.config.backend() != "jax":
        assert cli.main(common + ["--mesh", "batch=1"]) == 2
        assert "needs the JAX backend" in capsys.readouterr().err
    else:
        assert cli.main(common + ["--mesh", "batch=3"]) == 2
        assert "batch size 16 is not divisible" in capsys.readouterr().err
        assert cli.main(common + ["--mesh", "batch=2", "--batch-size", "2"]) == 2
        assert "needs 2 devices but 1" in capsys.readouterr().err
        assert cli.main(common + ["--mesh", "batch=1", "--batch-size", "3",
                                  "--experts-on", "expert"]) == 2
        assert "not an axis of the mesh" in capsys.readouterr().err
    assert cli.main(common + ["--mesh", "batch=one"]) == 2
    assert "Invalid mesh spec" in capsys.readouterr().err
    assert cli.main(common + ["--fsdp"]) == 2
    assert "need a `mesh`" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.slow
@jax_only
def test_train_command_with_a_mesh(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "keras_brainformer", "train", "--preset", "glam_tiny",
         "--out", str(tmp_path / "run"), "--steps", "2", "--steps-per-epoch", "2",
         "--batch-size", "8", "--sequence-length", "32", "--max-corpus-bytes", "100000",
         "--validation-batches", "1", "--mesh", "batch=2,expert=4"],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, **JAX8),
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "ModelParallel over 8 devices (batch=2, expert=4)" in done.stdout
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and np.isfinite(summary["validation_loss_causal"])

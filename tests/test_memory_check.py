"""Memory before allocation (issue 34, deliverable 6): every command that
builds a full model (`train`, `convert`, `upcycle`, `generate`, `checksum`)
sizes it from its config first, with the one check in
`memory_plan.check_memory_available`, and refuses in one `error:` line that
names the GB needed, the GB available and the command that sizes the model,
before anything is built or written."""

import json
import shutil

import keras
import keras_hub
import numpy as np
import pytest
from conftest import TINY_PRESETS

from keras_brainformer import cli
from keras_brainformer.distribution import memory_plan
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.block_spec import AttentionSpec
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.block_spec import MoESpec
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.utils.preset_loading import preset_directory

# dense_tiny's blocks with the FFN turned into 4 experts of the same width.
UPCYCLE_TO = BlockSpec(
    [AttentionSpec(num_heads=3, head_dim=20),
     MoESpec(num_experts=4, intermediate_dim=240, activation="gated_gelu")]
).to_json()


@pytest.fixture
def little_memory(monkeypatch):
    """This machine with 1 MB left (more than nothing, less than any model)."""
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: 10**6)


@pytest.fixture
def nothing_built(monkeypatch):
    """Any model build fails the test: a refusal must come before it."""

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the memory check refused")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", built)
    monkeypatch.setattr(BrainformerCausalLM, "from_preset", built)
    monkeypatch.setattr(BrainformerBackbone, "from_preset", built)


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_weight_bytes_is_what_building_the_preset_allocates():
    for name in ("dense_tiny", "glam_tiny", "brainformer1_tiny"):
        model = BrainformerBackbone.from_preset(name)
        allocated = sum(
            int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in model.weights
        )
        assert memory_plan.weight_bytes(get_preset_config(name)) == allocated, name


def test_the_check_refuses_one_byte_over_and_passes_the_real_tiny_presets(monkeypatch):
    needed = memory_plan.weight_bytes(get_preset_config("glam_tiny"))
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: needed)
    memory_plan.check_memory_available(needed, "x", "(y)", "z")  # exactly enough: passes
    with pytest.raises(ValueError, match=r"^x needs about 0\.0 GB of memory \(y\), more than "
                                         r"the 0\.0 GB available\. z$"):
        memory_plan.check_memory_available(needed + 1, "x", "(y)", "z")
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: None)
    memory_plan.check_memory_available(10**15, "x", "(y)", "z")  # unknown: no refusal
    monkeypatch.undo()
    available = memory_plan.available_memory_bytes()
    assert available is not None and available > 0  # Linux: MemAvailable is read
    for name in TINY_PRESETS:  # the presets the tests and the quickstart build all pass here
        memory_plan.check_memory_available(
            2 * memory_plan.weight_bytes(get_preset_config(name)), name, "", ""
        )


def test_full_size_presets_are_refused_before_being_built(
    tmp_path, capsys, little_memory, nothing_built
):
    # 575 GB of float32 weights: the shape of the exit-137 kill of the issue.
    assert cli.main(["generate", "--preset", "glam_8b_64e", "hello"]) == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert line.startswith("error: Loading 'glam_8b_64e' needs about 575.4 GB of memory")
    assert "more than the 0.0 GB available" in line
    assert "`keras-brainformer plan --preset glam_8b_64e`" in line
    assert "`keras-brainformer compile --preset glam_8b_64e --topology" in line

    folder = tmp_path / "glam_tiny"
    shutil.copytree(preset_directory("glam_tiny"), folder)
    before = sorted((p.name, p.read_bytes()) for p in folder.iterdir() if p.is_file())
    assert cli.main(["checksum", str(folder)]) == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert line.startswith(f"error: Checking {str(folder)!r} needs about ")
    assert f"`keras-brainformer plan --preset {folder}`" in line
    assert sorted((p.name, p.read_bytes()) for p in folder.iterdir() if p.is_file()) == before


def test_upcycle_is_refused_before_building_and_writes_nothing(
    tmp_path, capsys, monkeypatch, nothing_built
):
    dense = memory_plan.weight_bytes(get_preset_config("dense_tiny"))
    # Room for the dense model, not for it and its target together.
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: dense + 1)
    out = tmp_path / "up"
    code = cli.main(["upcycle", "--preset", "dense_tiny", "--to", UPCYCLE_TO, "--out", out])
    assert code == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert line.startswith("error: Upcycling 'dense_tiny' needs about ")
    assert "(the dense model and its MoE target, alive together)" in line
    assert "`keras-brainformer plan --preset dense_tiny`" in line
    assert not out.exists() and not (tmp_path / "up.partial").exists()


def test_upcycle_with_enough_memory_still_runs(tmp_path, capsys):
    out = tmp_path / "up"
    code = cli.main(["upcycle", "--preset", "dense_tiny", "--to", UPCYCLE_TO, "--out", out])
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").exists()


def save_tiny_mixtral(folder):
    keras.utils.set_random_seed(0)
    keras_hub.models.MixtralBackbone(
        vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=16, intermediate_dim=24, num_experts=4, top_k=2,
    ).save_to_preset(str(folder))


def test_convert_is_refused_from_the_config_alone_and_writes_nothing(
    tmp_path, capsys, monkeypatch
):
    source = tmp_path / "mixtral"
    save_tiny_mixtral(source)
    with open(source / "config.json") as f:
        config = json.load(f)["config"]
    from keras_brainformer.zoo.keras_hub_conversion import brainformer_config_from_keras_hub

    one_copy = memory_plan.weight_bytes(brainformer_config_from_keras_hub(config, "mixtral"))
    # Room for one copy, not for keras-hub's model and the converted one.
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: one_copy + 1)
    built = []
    monkeypatch.setattr(
        keras_hub.models.Backbone, "from_preset", lambda *a, **k: built.append(a)
    )
    out = tmp_path / "converted"
    assert cli.main(["convert", "--preset", source, "--out", out]) == cli.EXIT_BAD_INPUT
    line = one_error_line(capsys)
    assert line.startswith(f"error: Converting {str(source)!r} (MixtralBackbone) needs about ")
    assert "(keras-hub's model and its Brainformer copy, alive together)" in line
    assert "available" in line and "keras-brainformer plan --preset OUT" in line
    assert built == [] and not out.exists() and not (tmp_path / "converted.partial").exists()


def test_convert_refuses_a_brainformer_preset_by_class_without_building_it(
    tmp_path, capsys, nothing_built
):
    # The issue's `convert --preset mixtral_8x7b`: keras-hub built the zoo's
    # 187 GB architecture preset and the kernel killed it (exit 137).
    out = tmp_path / "out"
    assert cli.main(["convert", "--preset", "mixtral_8x7b", "--out", out]) == 2
    line = one_error_line(capsys)
    assert "it is a BrainformerBackbone preset" in line and "MixtralBackbone" in line
    assert "`keras-brainformer convert --preset mixtral_8_7b_en`" in line
    assert not out.exists()


def test_train_refuses_with_the_same_check(tmp_path, capsys, little_memory):
    out = tmp_path / "run"
    assert cli.main(["train", "--preset", "dense_tiny", "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert "GB of memory for one training step" in line and "0.0 GB available" in line
    assert not out.exists()

"""The zoo's presets: their parameter counts against the paper, the stated
facts of the Brainformer blocks, and that the tiny ones build."""

import importlib.util
import json
import os

import numpy as np
import pytest
from conftest import TINY_PRESETS

from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.zoo.keras_hub_presets import KERAS_HUB_ARCHITECTURES
from keras_brainformer.zoo.keras_hub_presets import KERAS_HUB_PRESET_FAMILIES
from keras_brainformer.zoo.parameter_count import count_parameters
from keras_brainformer.zoo.preset_recipes import PAPER_VOCABULARY_SIZE
from keras_brainformer.zoo.preset_recipes import activated_non_embedding
from keras_brainformer.zoo.preset_recipes import paper_convention_counts
from keras_brainformer.zoo.preset_table import markdown_table

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGULAR = [
    "brainformer1_100m", "brainformer1_1b", "brainformer1_8b", "brainformer2_100m",
    "glam_100m_32e", "glam_100m_64e", "glam_1b7_64e", "glam_8b_64e",
    "glam_ec_100m_32e", "glam_ec_8b_64e", "dense_100m", "dense_1b7", "dense_8b",
    "primer_100m", "primer_1b7",
]  # fmt: skip
SMALL = [name.replace("_tiny", "_small") for name in TINY_PRESETS]
WITH_PAPER = [n for n in REGULAR if backbone_presets[n]["metadata"]["paper"]]


def _specs(config):
    blocks = config["blocks"]
    if isinstance(blocks, dict):
        return [BlockSpec.from_dict(blocks)] * config["num_layers"]
    return [BlockSpec.from_dict(b) for b in blocks]


def _sublayers(name, kind=None):
    spec = _specs(backbone_presets[name]["config"])[0]
    return [s for s in spec.sublayers if kind is None or s.kind == kind]


def test_preset_names():
    assert set(backbone_presets) == (
        set(REGULAR) | set(TINY_PRESETS) | set(SMALL) | set(KERAS_HUB_ARCHITECTURES)
    )
    families = {"brainformer1", "brainformer2", "glam", "glam_ec", "dense", "primer",
                *KERAS_HUB_PRESET_FAMILIES}
    for preset in backbone_presets.values():
        assert set(preset) == {"metadata", "kaggle_handle", "config"}
        assert preset["metadata"]["family"] in families
        assert "random initialisation (architecture preset)" in (
            preset["metadata"]["description"].lower()
        )


@pytest.mark.parametrize("name", WITH_PAPER)
def test_paper_convention_within_ten_percent(name):
    paper = backbone_presets[name]["metadata"]["paper"]
    assert paper["source"] in ("Table 2", "Table 3")
    counts = paper_convention_counts(backbone_presets[name]["config"])
    assert abs(counts["total"] / paper["total"] - 1) <= 0.10
    assert abs(counts["activated"] / paper["activated"] - 1) <= 0.10


def test_paper_convention_is_the_32k_embedding():
    for name in REGULAR:
        config = backbone_presets[name]["config"]
        ours, paper = count_parameters(config), paper_convention_counts(config)
        delta = (config["vocabulary_size"] - PAPER_VOCABULARY_SIZE) * config["hidden_dim"]
        assert ours["total"] - paper["total"] == delta
        assert ours["activated"] - paper["activated"] == delta


@pytest.mark.parametrize("name", [*REGULAR, *TINY_PRESETS])
def test_metadata_counts_this_config(name):
    preset = backbone_presets[name]
    counts = count_parameters(preset["config"])
    assert preset["metadata"]["params"] == counts["total"]
    assert preset["metadata"]["activated_params"] == counts["activated"]


@pytest.mark.parametrize("name", [*REGULAR, *TINY_PRESETS])
def test_config_json_round_trip(name):
    config = backbone_presets[name]["config"]
    assert json.loads(json.dumps(config)) == config
    assert json.loads(json.dumps(backbone_presets[name]["metadata"]))
    specs = _specs(config)
    assert len(specs) == config["num_layers"]
    # A spec rebuilt from its dict gives back the same dict.
    assert specs[0].to_dict() == BlockSpec.from_dict(specs[0].to_dict()).to_dict()


def test_vocabularies_and_lengths():
    for name in REGULAR:
        config = backbone_presets[name]["config"]
        assert config["vocabulary_size"] == 256000
        assert config["max_sequence_length"] == 1024
        assert config["norm"] == "rms" and config["tie_embeddings"] is True
    for name in TINY_PRESETS:
        config = backbone_presets[name]["config"]
        assert config["vocabulary_size"] == 8192
        assert config["max_sequence_length"] == 256


@pytest.mark.parametrize("name", TINY_PRESETS)
def test_tiny_preset_builds_with_counted_size(name, tiny_backbone):
    config = backbone_presets[name]["config"]
    backbone = tiny_backbone(name)
    # Trainable weights: routers also keep non-trainable routing statistics
    # (a few scalars each), which `count_params()` includes.
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    assert trainable == count_parameters(config)["total"]
    assert all("/router/" in v.path for v in backbone.non_trainable_weights)
    assert backbone.count_params() < 3_000_000


@pytest.mark.parametrize("tier, names", [("_tiny", TINY_PRESETS), ("_small", SMALL)])
def test_cpu_tiers_match_activated_parameters(tier, names):
    activated = activated_non_embedding(backbone_presets, tier)
    assert set(activated) == set(names)
    assert max(activated.values()) / min(activated.values()) < 1.05


def test_small_tier_is_byte_level_and_the_blocks_dominate():
    """Byte vocabulary: the tied embedding/output is under 4 % of each small
    preset's activated parameters (at least 30 % for the tiny tier's)."""
    for name in SMALL:
        config = backbone_presets[name]["config"]
        assert (config["vocabulary_size"], config["max_sequence_length"]) == (256, 512)
        counts = count_parameters(config)
        assert counts["embedding"] / counts["activated"] < 0.04, name
    for name in TINY_PRESETS:
        counts = count_parameters(backbone_presets[name]["config"])
        assert counts["embedding"] / counts["activated"] > 0.3, name


@pytest.mark.parametrize("name", SMALL)
def test_small_preset_builds_with_counted_size(name):
    config = backbone_presets[name]["config"]
    backbone = BrainformerBackbone(**config)
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_weights)
    assert trainable == count_parameters(config)["total"]


def test_brainformer_facts():
    scales = {
        "brainformer1_100m": (3, 1024, 32),
        "brainformer1_1b": (6, 2048, 64),
        "brainformer1_8b": (8, 4096, 64),
        "brainformer2_100m": (3, 1024, 32),
    }
    kinds = None
    for name, (num_layers, d, experts) in scales.items():
        config = backbone_presets[name]["config"]
        assert config["num_layers"] == num_layers
        assert config["hidden_dim"] == d
        sublayers = _sublayers(name)
        assert len(sublayers) == 8
        # The same layer types in the same order at every scale and in block 2.
        kinds = kinds or [s.kind for s in sublayers]
        assert [s.kind for s in sublayers] == kinds
        moes = _sublayers(name, "moe")
        assert moes and all(m.num_experts == experts for m in moes)
        assert all(m.router == "expert_choice" for m in moes)
        if name.startswith("brainformer1"):
            assert all(m.capacity_factor == 1.0 for m in moes)
        else:
            assert all(m.capacity_factor > 1.0 for m in moes)
        widths = [s.intermediate_dim for s in sublayers if s.kind != "attention"]
        base = (1536, 2048, 3072, 4096)
        assert set(widths) <= {w * d // 1024 for w in base}
        if name.endswith("_100m"):
            # A smaller expansion than the baseline's 3072 on d=768 (4x).
            assert max(widths) <= 3072
            assert max(widths) / d < 3072 / 768
    for name in ("brainformer1_tiny", "brainformer2_tiny"):
        assert len(_sublayers(name)) == 8
        assert [s.kind for s in _sublayers(name)] == kinds


def test_glam_dense_and_primer_facts():
    for name in ("glam_100m_32e", "glam_1b7_64e", "glam_8b_64e", "glam_tiny"):
        kinds = [s.kind for s in _sublayers(name)]
        assert kinds == ["attention", "moe", "attention", "ffn"]
        (moe,) = _sublayers(name, "moe")
        (ffn,) = _sublayers(name, "ffn")
        assert (moe.router, moe.top_k, moe.capacity_factor) == ("top_k", 2, 2.0)
        assert moe.load_balance_loss_weight == 0.01
        assert (moe.activation, ffn.activation) == ("gelu", "gated_gelu")
    # GLaM-EC: identical to its GLaM twin but for the router.
    for glam, ec in (("glam_100m_32e", "glam_ec_100m_32e"), ("glam_8b_64e", "glam_ec_8b_64e"),
                     ("glam_tiny", "glam_ec_tiny")):
        (ec_moe,) = _sublayers(ec, "moe")
        assert (ec_moe.router, ec_moe.capacity_factor) == ("expert_choice", 2.0)
        assert [s.kind for s in _sublayers(ec)] == [s.kind for s in _sublayers(glam)]
        (moe,) = _sublayers(glam, "moe")
        assert (ec_moe.num_experts, ec_moe.intermediate_dim, ec_moe.activation) == (
            moe.num_experts, moe.intermediate_dim, moe.activation)
        for key in ("hidden_dim", "num_layers", "vocabulary_size"):
            assert backbone_presets[ec]["config"][key] == backbone_presets[glam]["config"][key]
    assert backbone_presets["glam_100m_32e"]["config"]["num_layers"] == 6
    for name in ("primer_100m", "primer_1b7", "primer_tiny"):
        (attention,) = _sublayers(name, "attention")
        (ffn,) = _sublayers(name, "ffn")
        assert attention.depthwise_conv_kernel == 3
        assert ffn.activation == "squared_relu"
        assert backbone_presets[name]["metadata"]["paper"] is None
    for name in ("dense_100m", "dense_1b7", "dense_8b", "dense_tiny"):
        (ffn,) = _sublayers(name, "ffn")
        assert ffn.activation == "gated_gelu"


def _load_reconstruction_script():
    path = os.path.join(ROOT, "presets", "reconstruct_brainformer.py")
    spec = importlib.util.spec_from_file_location("reconstruct_brainformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reconstruction_script_reproduces_the_presets():
    script = _load_reconstruction_script()
    candidate, block2, blocks = script.chosen_blocks()
    assert candidate["worst"] <= 0.08
    assert block2["error"] <= 0.08
    for (family, scale), sublayers in blocks.items():
        preset = backbone_presets[f"{family}_{scale}"]["config"]["blocks"]
        assert BlockSpec.from_dict(preset) == BlockSpec(sublayers)


def test_docs_table_is_current():
    with open(os.path.join(ROOT, "docs", "presets.md")) as f:
        docs = f.read()
    assert markdown_table() in docs


# keras-hub 0.32's own records of the originals' sizes, and the activated
# parameters the model names state (A2.7B, A3B, A22B; Mixtral 8x7B: 12.9B).
ACTIVATED = {
    "mixtral_8x7b": 12.9e9, "qwen1_5_moe_a2_7b": 2.7e9,
    "qwen3_moe_30b_a3b": 3.3e9, "qwen3_moe_235b_a22b": 22e9,
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(KERAS_HUB_ARCHITECTURES))
def test_keras_hub_architectures_have_the_originals_parameter_counts(name):
    """Analytic (nothing allocated): every parameter of the original, exactly
    as keras-hub counts it, and the activated count its name states."""
    preset = backbone_presets[name]
    counts = count_parameters(preset["config"])
    assert counts["total"] == preset["metadata"]["keras_hub_params"]
    assert counts["total"] == KERAS_HUB_ARCHITECTURES[name][3]
    assert abs(counts["activated"] / ACTIVATED[name] - 1) < 0.03, counts["activated"]
    assert preset["metadata"]["params"] == counts["total"]

"""Arguments renamed after 0.1 to keras-hub's names (`num_blocks` ->
`num_layers`, `norm_epsilon` -> `layer_norm_epsilon`, `rotary_*` -> `rope_*`,
the FFN width `hidden_dim` / `expert_hidden_dim` -> `intermediate_dim`, `k` ->
`top_k`): configs, block-spec JSON, preset folders and `.keras` files written
by 0.1 keep loading, to the same model; code gets one clear error."""

import json
import re

import keras
import numpy as np
import pytest
from conftest import rewrite_keras_config
from conftest import to_numpy

from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.layers import ExpertBank
from keras_brainformer.layers import FeedForward
from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import TopKRouter
from keras_brainformer.layers.moe_feed_forward import ROUTER_OPTION_NAMES
from keras_brainformer.layers.renamed_arguments import RENAMED_AFTER_0_1
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.block_spec import current_backbone_config
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.models.brainformer.brainformer_presets import read_backbone_config
from keras_brainformer.preset_folders import PRESETS_ROOT

NEW = {"layer_norm_epsilon": 1e-5, "rope_max_wavelength": 5000, "rope_scaling_factor": 2.0}
OLD = {"norm_epsilon": 1e-5, "rotary_max_wavelength": 5000, "rotary_scaling_factor": 2.0}
# A GLaM-like block in 0.1's spec keys, and the same in today's.
OLD_BLOCK = {"sublayers": [
    {"kind": "attention", "num_heads": 2},
    {"kind": "moe", "num_experts": 4, "hidden_dim": 24, "router": "top_k", "k": 1,
     "shared_expert_hidden_dim": 8},
    {"kind": "ffn", "hidden_dim": 20, "activation": "gated_gelu"},
]}
NEW_BLOCK = {"sublayers": [
    {"kind": "attention", "num_heads": 2},
    {"kind": "moe", "num_experts": 4, "intermediate_dim": 24, "router": "top_k", "top_k": 1,
     "shared_expert_intermediate_dim": 8},
    {"kind": "ffn", "intermediate_dim": 20, "activation": "gated_gelu"},
]}


def test_every_old_name_maps_to_a_new_one():
    assert with_current_names(OLD, "CausalSelfAttention") == NEW
    assert with_current_names(NEW, "CausalSelfAttention") == NEW
    assert with_current_names({**OLD, "num_blocks": 2}, "BrainformerBackbone") == {
        **NEW, "num_layers": 2}
    for kind, renames in RENAMED_AFTER_0_1.items():
        assert renames and not set(renames) & set(renames.values()), kind
    # The backbone keeps `hidden_dim`: it is the model width there, as in keras-hub.
    assert "hidden_dim" not in RENAMED_AFTER_0_1["BrainformerBackbone"]


def test_both_names_at_once_is_one_clear_error():
    with pytest.raises(ValueError, match="BrainformerBackbone.*norm_epsilon.*layer_norm_epsilon"):
        BrainformerBackbone.from_config(
            {**get_preset_config("dense_tiny"), "norm_epsilon": 1e-5, "layer_norm_epsilon": 1e-6}
        )
    with pytest.raises(ValueError, match=r"sublayers\[1\].*`k`.*`top_k`"):
        BlockSpec.from_dict({"sublayers": [
            {"kind": "attention"},
            {"kind": "moe", "num_experts": 2, "intermediate_dim": 4, "k": 1, "top_k": 2}]})


@pytest.mark.parametrize(
    "build,old,new",
    [
        (lambda **kw: FeedForward(4, **kw), "hidden_dim", "intermediate_dim"),
        (lambda **kw: ExpertBank(2, 4, **kw), "hidden_dim", "intermediate_dim"),
        (lambda **kw: MoEFeedForward(2, 4, **kw), "expert_hidden_dim", "intermediate_dim"),
        (lambda **kw: MoEFeedForward(2, 4, **kw), "shared_expert_hidden_dim",
         "shared_expert_intermediate_dim"),
        (lambda **kw: TopKRouter(4, **kw), "k", "top_k"),
        (lambda **kw: MoEFeedForward(4, 4, **kw), "k", "top_k"),
        (lambda **kw: BrainformerBackbone(
            vocabulary_size=8, hidden_dim=8, blocks=NEW_BLOCK, **kw), "num_blocks", "num_layers"),
        (lambda **kw: CausalSelfAttention(num_heads=2, **kw), "norm_epsilon",
         "layer_norm_epsilon"),
    ],
)
def test_code_passing_an_old_name_is_told_the_new_one(build, old, new):
    with pytest.raises(TypeError, match=rf"`{old}` was renamed `{new}`"):
        build(**{old: 2})


def test_code_passing_router_kwargs_is_told_the_flat_arguments():
    """0.1's nested router options are arguments of the layer now (as in
    keras-hub's MoE layers): one TypeError naming them."""
    flat = "top_k, capacity_factor, eval_capacity_factor, load_balance_loss_weight"
    with pytest.raises(TypeError, match=rf"`router_kwargs` was replaced.*{flat}.*k': 1"):
        MoEFeedForward(4, 4, router_kwargs={"k": 1})
    with pytest.raises(TypeError, match="router_kwargs"):
        MoEFeedForward(4, 4, router_kwargs=None)


def test_an_old_name_in_place_of_a_required_argument_names_the_new_one():
    # Python's own error, before the layer's: it names the argument by its new name.
    with pytest.raises(TypeError, match="intermediate_dim"):
        FeedForward(hidden_dim=32)
    with pytest.raises(TypeError, match="intermediate_dim"):
        MoEFeedForward(4, expert_hidden_dim=32)


def test_0_1_layer_configs_load_to_the_same_layers():
    ffn = FeedForward(16, activation="gated_gelu")
    old = {**ffn.get_config()}
    old["hidden_dim"] = old.pop("intermediate_dim")
    assert FeedForward.from_config(old).get_config() == ffn.get_config()

    bank = ExpertBank(4, 16)
    old = {**bank.get_config()}
    old["hidden_dim"] = old.pop("intermediate_dim")
    assert ExpertBank.from_config(old).get_config() == bank.get_config()

    router = TopKRouter(4, top_k=1, capacity_factor=2.0)
    old = {**router.get_config()}
    old["k"] = old.pop("top_k")
    assert TopKRouter.from_config(old).get_config() == router.get_config()

    moe = MoEFeedForward(4, 12, shared_expert_intermediate_dim=8, top_k=1, capacity_factor=2.0)
    # 0.1 wrote the router serialised, beside `router_kwargs: None`.
    config = moe.get_config()
    old = {key: value for key, value in config.items() if key not in ROUTER_OPTION_NAMES}
    old["router"] = keras.saving.serialize_keras_object(moe.router)
    old["router_kwargs"] = None
    old["expert_hidden_dim"] = old.pop("intermediate_dim")
    old["shared_expert_hidden_dim"] = old.pop("shared_expert_intermediate_dim")
    old["router"]["config"]["k"] = old["router"]["config"].pop("top_k")
    loaded = MoEFeedForward.from_config(old)
    assert loaded.router.get_config() == moe.router.get_config()
    assert {key: value for key, value in loaded.get_config().items() if key != "router"} == {
        key: value for key, value in config.items() if key not in ("router", *ROUTER_OPTION_NAMES)
    }
    assert loaded.router.top_k == 1
    # 0.1's `router_kwargs` spelling, in a config written by hand: the same
    # layer as the flat arguments build.
    by_name = MoEFeedForward.from_config(
        {"num_experts": 4, "expert_hidden_dim": 12, "router": "top_k", "name": "moe",
         "router_kwargs": {"k": 1, "capacity_factor": 2.0}})
    assert (by_name.intermediate_dim, by_name.router.top_k) == (12, 1)
    flat = MoEFeedForward(4, 12, top_k=1, capacity_factor=2.0, name="moe")
    assert by_name.get_config() == flat.get_config()
    assert by_name.router.get_config() == flat.router.get_config()
    # A router's own `seed` or `kernel_initializer` there build the router.
    seeded = MoEFeedForward.from_config(
        {"num_experts": 4, "intermediate_dim": 12, "router": "top_k",
         "router_kwargs": {"k": 1, "jitter": 0.1, "seed": 3}})
    assert (seeded.router.name, seeded.router.top_k, seeded.router.seed) == ("router", 1, 3)
    assert seeded.router.jitter == 0.1
    with pytest.raises(ValueError, match=r"\['top_k'\] both"):
        MoEFeedForward.from_config(
            {"num_experts": 4, "intermediate_dim": 12, "top_k": 2, "router_kwargs": {"k": 1}})


def test_a_0_1_block_spec_loads_to_today_s():
    assert BlockSpec.from_dict(OLD_BLOCK) == BlockSpec.from_dict(NEW_BLOCK)
    assert BlockSpec.from_dict(OLD_BLOCK).to_dict() == BlockSpec.from_dict(NEW_BLOCK).to_dict()
    written = BlockSpec.from_dict(OLD_BLOCK).to_json()
    assert '"hidden_dim"' not in written and '"k"' not in written


def test_a_0_1_backbone_config_builds_the_same_model():
    config = get_preset_config("dense_tiny")
    new = BrainformerBackbone.from_config({**config, **NEW, "name": "b"})
    old = BrainformerBackbone.from_config({**config, **OLD, "name": "b"})
    assert old.get_config() == new.get_config()
    assert (old.layer_norm_epsilon, old.rope_max_wavelength, old.rope_scaling_factor) == (
        1e-5, 5000, 2.0,
    )
    assert not set(OLD) & set(new.get_config())
    base = {"vocabulary_size": 16, "hidden_dim": 8, "name": "b"}
    old = BrainformerBackbone.from_config({**base, "blocks": OLD_BLOCK, "num_blocks": 2})
    new = BrainformerBackbone.from_config({**base, "blocks": NEW_BLOCK, "num_layers": 2})
    assert old.get_config() == new.get_config()
    assert old.num_layers == 2 and old.count_params() == new.count_params()


def test_0_1_and_today_s_backbone_configs_compare_equal_in_today_s_form():
    """What a `train` run's resume compares (its recorded model config)."""
    old = {"vocabulary_size": 16, "hidden_dim": 8, "blocks": OLD_BLOCK, "num_blocks": 2, **OLD}
    new = {"vocabulary_size": 16, "hidden_dim": 8, "blocks": NEW_BLOCK, "num_layers": 2, **NEW}
    assert current_backbone_config(old) == current_backbone_config(new)
    assert current_backbone_config(new) != current_backbone_config({**new, "num_layers": 3})


def test_the_tools_read_a_0_1_config_like_today_s():
    """Counts, weight specs, the memory plan and the step-time model read a
    config without building it: `num_blocks` is not silently one block."""
    from keras_brainformer.distribution.memory_plan import activation_bytes
    from keras_brainformer.distribution.step_time import step_terms
    from keras_brainformer.zoo import count_parameters
    from keras_brainformer.zoo import weight_specs

    old = {"vocabulary_size": 16, "hidden_dim": 8, "blocks": OLD_BLOCK, "num_blocks": 3}
    new = {"vocabulary_size": 16, "hidden_dim": 8, "blocks": NEW_BLOCK, "num_layers": 3}
    assert count_parameters(old) == count_parameters(new)
    assert len(weight_specs(old)) == len(weight_specs(new))
    assert sorted(weight_specs(old)) == sorted(weight_specs(new))
    mesh = {"batch": 1}
    assert activation_bytes(old, mesh, 2, 8) == activation_bytes(new, mesh, 2, 8)
    assert len(step_terms(old, mesh, 2, 8)) == len(step_terms(new, mesh, 2, 8))
    one = {**new, "num_layers": 1}
    assert count_parameters(old) != count_parameters(one)


def test_upcycling_reads_a_0_1_dense_config():
    """`keras-brainformer upcycle` sizes its memory from the dense preset's
    config.json, which the shipped 0.1 trained presets write with 0.1's names."""
    from keras_brainformer.zoo.upcycling import glam_target
    from keras_brainformer.zoo.upcycling import target_block_specs
    from keras_brainformer.zoo.upcycling import upcycled_config

    dense = {"sublayers": [{"kind": "attention", "num_heads": 2},
                           {"kind": "ffn", "hidden_dim": 20, "activation": "gated_gelu"}]}
    old = {"vocabulary_size": 16, "hidden_dim": 8, "blocks": dense, "num_blocks": 4, **OLD}
    specs = glam_target(old, 4)
    assert len(specs) == 4 and specs[0].sublayers[1].kind == "moe"
    assert specs[0].sublayers[1].intermediate_dim == 20
    target = upcycled_config(old, target_block_specs(specs, old))
    assert not set(OLD) & set(target) and "num_blocks" not in target
    assert BrainformerBackbone.from_config(target).num_layers == 4


def test_a_0_1_attention_layer_config_loads():
    layer = CausalSelfAttention.from_config({"num_heads": 2, "head_dim": 4, **OLD})
    assert (layer.layer_norm_epsilon, layer.rope_max_wavelength, layer.rope_scaling_factor) == (
        1e-5, 5000, 2.0,
    )


def test_the_shipped_0_1_trained_preset_loads_with_its_old_names():
    """glam_tiny_stdlib's config.json was written by 0.1: it still says
    `norm_epsilon`, `num_blocks`, and `hidden_dim` / `k` in its block (its
    checksums are recorded, so it is kept as written)."""
    with open(PRESETS_ROOT / "glam_tiny_stdlib" / "config.json") as f:
        raw = json.load(f)["config"]
    assert set(OLD) <= set(raw) and "num_blocks" in raw
    raw_moe = raw["blocks"]["sublayers"][1]
    assert {"hidden_dim", "k"} <= set(raw_moe)
    config = read_backbone_config(PRESETS_ROOT / "glam_tiny_stdlib")
    assert config["layer_norm_epsilon"] == raw["norm_epsilon"]
    assert config["num_layers"] == raw["num_blocks"]
    moe = config["blocks"]["sublayers"][1]
    assert (moe["intermediate_dim"], moe["top_k"]) == (raw_moe["hidden_dim"], raw_moe["k"])
    backbone = BrainformerBackbone.from_preset("glam_tiny_stdlib")
    assert backbone.layer_norm_epsilon == raw["norm_epsilon"]
    assert backbone.num_layers == raw["num_blocks"]


def test_a_0_1_keras_file_loads(tmp_path):
    """A `.keras` archive whose config uses 0.1's names (the archive of today
    with its config rewritten to them) loads to the same logits."""
    lm = BrainformerCausalLM(
        BrainformerBackbone(vocabulary_size=64, hidden_dim=8, blocks=NEW_BLOCK, num_layers=2,
                            **NEW),
        preprocessor=None,
    )
    tokens = {"token_ids": np.array([[5, 6, 7, 8]], "int32"),
              "padding_mask": np.ones((1, 4), "int32")}
    expected = to_numpy(lm(tokens))
    path = tmp_path / "new.keras"
    lm.save(path)
    old_path = tmp_path / "old.keras"

    def with_0_1_names(text):
        for old, new in RENAMED_AFTER_0_1["BrainformerBackbone"].items():
            text = text.replace(f'"{new}"', f'"{old}"')
        text = text.replace('"shared_expert_intermediate_dim"', '"shared_expert_hidden_dim"')
        text = text.replace('"intermediate_dim"', '"hidden_dim"')
        text = re.sub(r'"top_k"(\s*:)', r'"k"\1', text)  # the key, not the router's name
        assert '"norm_epsilon"' in text and '"layer_norm_epsilon"' not in text
        assert '"num_blocks"' in text and '"k"' in text and '"intermediate_dim"' not in text
        return text

    rewrite_keras_config(path, old_path, with_0_1_names)
    loaded = keras.saving.load_model(old_path)
    assert loaded.backbone.rope_max_wavelength == 5000
    assert loaded.backbone.num_layers == 2
    np.testing.assert_allclose(to_numpy(loaded(tokens)), expected, rtol=1e-6, atol=1e-6)

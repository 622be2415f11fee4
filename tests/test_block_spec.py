"""BlockSpec: JSON round trips and validation before any weight exists."""

import json

import pytest

from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerBlock
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec
from keras_brainformer.models import dense_transformer_layer
from keras_brainformer.models import glam_layer_pair
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config


def brainformer_like_spec():
    return BlockSpec(
        [
            AttentionSpec(num_heads=4),
            MoESpec(8, 64, router="expert_choice", capacity_factor=1.0),
            FeedForwardSpec(48, activation="geglu"),
            MoESpec(8, 32, activation="relu", top_k=1, capacity_factor=None),
            AttentionSpec(num_heads=3, head_dim=8),
            MoESpec(8, 64, batch_prioritized=True, z_loss_weight=1e-3, jitter=0.01),
        ]
    )


def test_json_round_trip_is_exact():
    spec = brainformer_like_spec()
    text = spec.to_json()
    assert BlockSpec.from_json(text) == spec
    assert json.loads(text)["sublayers"][2] == {
        "kind": "ffn",
        "intermediate_dim": 48,
        "activation": "gated_gelu",  # aliases are canonicalised
    }
    assert BlockSpec.from_dict(json.loads(text)).to_dict() == spec.to_dict()


def test_named_specs_are_just_specs():
    glam = glam_layer_pair(num_heads=4, intermediate_dim=64, num_experts=8)
    assert [s.kind for s in glam.sublayers] == ["attention", "moe", "attention", "ffn"]
    # GLaM's recipe: plain GELU experts, gated GELU dense FFN, top-2 with a
    # load-balance loss; the glam_* presets are built from it.
    moe, ffn = glam.sublayers[1], glam.sublayers[3]
    assert (moe.top_k, moe.activation, ffn.activation) == (2, "gelu", "gated_gelu")
    assert (moe.capacity_factor, moe.load_balance_loss_weight) == (2.0, 0.01)
    ec = glam_layer_pair(4, 64, 8, router="expert_choice")
    assert ec.sublayers[1].router == "expert_choice"
    preset = get_preset_config("glam_tiny")
    assert BlockSpec.from_dict(preset["blocks"]).to_dict() == glam_layer_pair(
        5, 280, 8, head_dim=14).to_dict()
    with pytest.raises(TypeError, match="expert_activation"):
        glam_layer_pair(4, 64, 8, activation="gelu")
    dense = dense_transformer_layer(num_heads=4, intermediate_dim=64)
    assert [s.kind for s in dense.sublayers] == ["attention", "ffn"]
    assert glam.count("moe") == 1 and dense.count("moe") == 0


def test_experts_per_token():
    assert MoESpec(8, 4, top_k=2).experts_per_token == 2
    assert MoESpec(8, 4, router="expert_choice", capacity_factor=1.5).experts_per_token == 1.5


def test_spec_defaults_are_the_layers_defaults():
    """One source of truth: a spec left at its defaults builds exactly the
    layer (and router) built directly with theirs."""
    from keras_brainformer.layers import ExpertChoiceRouter
    from keras_brainformer.layers import MoEFeedForward
    from keras_brainformer.layers import TopKRouter

    assert MoESpec(4, 8).capacity_factor == TopKRouter(4).capacity_factor == 1.25
    assert (
        MoESpec(4, 8, router="expert_choice").capacity_factor
        == ExpertChoiceRouter(4).capacity_factor
        == 2.0
    )
    for router in ("top_k", "expert_choice"):
        block = BrainformerBlock(BlockSpec([MoESpec(4, 8, router=router)]))
        direct = MoEFeedForward(4, 8, router=router)
        built = block.moe_layers[0]
        ignore = {"name"}
        assert {k: v for k, v in built.get_config().items() if k not in ignore} == {
            k: v for k, v in direct.get_config().items() if k not in ignore
        }
        assert {k: v for k, v in built.router.get_config().items() if k not in ignore} == {
            k: v for k, v in direct.router.get_config().items() if k not in ignore
        }


def test_a_moe_spec_is_the_layer_s_flat_config():
    """`MoESpec`'s fields are `MoEFeedForward`'s config (but for what the
    block sets), and the layer is built from them as they are."""
    import dataclasses

    spec = MoESpec(4, 8, top_k=1, capacity_factor=None, eval_capacity_factor=2.0,
                   load_balance_loss_weight=0.02, z_loss_weight=1e-3, jitter=0.01,
                   batch_prioritized=True, normalize_gates=True, group_size=4)
    fields = {f.name for f in dataclasses.fields(MoESpec)}
    assert spec.layer_kwargs() == {name: getattr(spec, name) for name in fields}
    config = BrainformerBlock(BlockSpec([spec])).moe_layers[0].get_config()
    assert set(config) - {"name", "trainable", "dtype", "kernel_initializer"} == fields
    assert {name: config[name] for name in fields} == spec.layer_kwargs()


def test_every_moe_and_router_option_is_reachable_from_a_spec():
    spec = MoESpec(
        4, 8, top_k=1, normalize_gates=True, inference_routing="as_trained",
        load_balance_loss_mode="pooled", dispatch="one_hot", dropless_impl="slots",
        dropless_block_size=16, capacity_factor=None,
    )
    layer = BrainformerBlock(BlockSpec([spec])).moe_layers[0]
    assert (layer.dispatch, layer.dropless_impl, layer.dropless_block_size) == (
        "one_hot", "slots", 16
    )
    router = layer.router
    assert router.normalize_gates is True and router.top_k == 1
    assert router.inference_routing == "as_trained"
    assert router.load_balance_loss_mode == "pooled"
    assert router.capacity_factor is None
    # A spec dict written by 0.1 (`hidden_dim`, before these fields existed)
    # loads, with the defaults.
    old = {"kind": "moe", "num_experts": 4, "hidden_dim": 8, "router": "expert_choice",
           "capacity_factor": 1.0}
    loaded = BlockSpec([old]).sublayers[0]
    assert loaded == MoESpec(4, 8, router="expert_choice", capacity_factor=1.0)
    assert BlockSpec.from_json(BlockSpec([spec]).to_json()).sublayers[0] == spec


def test_block_config_round_trip():
    block = BrainformerBlock(brainformer_like_spec(), norm="layer")
    clone = BrainformerBlock.from_config(block.get_config())
    assert clone.spec == block.spec
    assert clone.get_config() == block.get_config()


@pytest.mark.parametrize(
    "build,field",
    [
        (lambda: BlockSpec([]), "sublayers"),
        (lambda: BlockSpec("attention"), "sublayers"),
        (lambda: BlockSpec([{"kind": "conv"}]), "kind"),
        (lambda: BlockSpec([{"kind": "ffn", "intermediate_dim": 8, "width": 2}]), "width"),
        (lambda: BlockSpec([{"kind": "ffn", "intermediate_dim": 0}]), "intermediate_dim"),
        (lambda: BlockSpec([{"kind": "attention", "num_heads": -2}]), "num_heads"),
        (lambda: AttentionSpec(num_heads=2.5), "num_heads"),
        (lambda: AttentionSpec(num_heads=2, head_dim=7), "head_dim"),
        (lambda: FeedForwardSpec(8, activation="tanh"), "activation"),
        (lambda: MoESpec(4, 8, top_k=5), "k"),
        (lambda: MoESpec(4, 8, capacity_factor=0), "capacity_factor"),
        (lambda: MoESpec(4, 8, capacity_factor=-1.0), "capacity_factor"),
        (lambda: MoESpec(4, 8, router="expert_choice", capacity_factor=None), "capacity_factor"),
        (lambda: MoESpec(4, 8, eval_capacity_factor=0.0), "eval_capacity_factor"),
        (lambda: MoESpec(4, 8, router="hash"), "router"),
        (lambda: MoESpec(0, 8), "num_experts"),
        (lambda: MoESpec(4, 8, load_balance_loss_weight=-0.1), "load_balance_loss_weight"),
        (lambda: MoESpec(4, 8, jitter=1.5), "jitter"),
        (
            lambda: MoESpec(4, 8, router="expert_choice", batch_prioritized=True),
            "batch_prioritized",
        ),
        (lambda: BlockSpec.from_dict({"layers": []}), "sublayers"),
        (lambda: MoESpec(4, 8, router="expert_choice", normalize_gates=True), "normalize_gates"),
        (
            lambda: MoESpec(4, 8, router="expert_choice", top_k=1),
            r"`top_k=1` applies only to router='top_k'. Received: router='expert_choice'",
        ),
        (lambda: MoESpec(4, 8, normalize_gates="yes"), "normalize_gates"),
        (lambda: MoESpec(4, 8, inference_routing="leaky"), "inference_routing"),
        (lambda: MoESpec(4, 8, load_balance_loss_mode="sum"), "load_balance_loss_mode"),
        (lambda: MoESpec(4, 8, dispatch="dense"), "dispatch"),
        (lambda: MoESpec(4, 8, dropless_impl="megablocks"), "dropless_impl"),
        (lambda: MoESpec(4, 8, dropless_block_size=0), "dropless_block_size"),
    ],
)
def test_invalid_specs_raise_naming_the_field(build, field):
    with pytest.raises((ValueError, TypeError), match=field):
        build()


def test_nested_errors_say_which_sublayer():
    with pytest.raises(ValueError, match=r"sublayers\[1\].*k"):
        BlockSpec(
            [{"kind": "attention"},
             {"kind": "moe", "num_experts": 2, "intermediate_dim": 4, "top_k": 3}]
        )


def test_backbone_rejects_heads_not_dividing_model_dim_before_building():
    spec = BlockSpec([AttentionSpec(num_heads=3), FeedForwardSpec(8)])
    with pytest.raises(ValueError, match="num_heads"):
        BrainformerBackbone(vocabulary_size=16, hidden_dim=16, blocks=spec)
    # With an explicit head_dim the heads are decoupled from the model width.
    ok = BlockSpec([AttentionSpec(num_heads=3, head_dim=4), FeedForwardSpec(8)])
    odd = BlockSpec([AttentionSpec(num_heads=4), FeedForwardSpec(8)])  # head dim 3
    with pytest.raises(ValueError, match="even"):
        BrainformerBackbone(vocabulary_size=16, hidden_dim=12, blocks=odd)
    BrainformerBackbone(vocabulary_size=16, hidden_dim=16, blocks=ok)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"vocabulary_size": 0}, "vocabulary_size"),
        ({"hidden_dim": -4}, "hidden_dim"),
        ({"num_layers": 0}, "num_layers"),
        ({"blocks": []}, "blocks"),
        ({"norm": "batch"}, "norm"),
        ({"dropout": 1.0}, "dropout"),
        ({"max_sequence_length": 0}, "max_sequence_length"),
        ({"rope_max_wavelength": 0}, "rope_max_wavelength"),
        ({"tie_embeddings": "no"}, "tie_embeddings"),
    ],
)
def test_backbone_bad_arguments(kwargs, field):
    args = {
        "vocabulary_size": 16,
        "hidden_dim": 8,
        "blocks": dense_transformer_layer(2, 16),
        **kwargs,
    }
    with pytest.raises((ValueError, TypeError), match=field):
        BrainformerBackbone(**args)


def test_layer_level_arguments_are_validated():
    from keras_brainformer.layers import MoEFeedForward
    from keras_brainformer.layers import TopKRouter
    from keras_brainformer.layers.normalization import make_norm
    from keras_brainformer.zoo import count_parameters

    with pytest.raises(TypeError, match="batch_prioritized"):
        TopKRouter(4, batch_prioritized="no")
    with pytest.raises(TypeError, match="seed"):
        TopKRouter(4, seed="abc")
    with pytest.raises(ValueError, match="layer_norm_epsilon"):
        make_norm("rms", -1.0, "norm")
    with pytest.raises(TypeError, match="router_kwargs"):
        MoEFeedForward(4, 8, router_kwargs=[("k", 1)])
    with pytest.raises(TypeError, match="router_kwargs"):
        MoEFeedForward.from_config({"num_experts": 4, "intermediate_dim": 8,
                                    "router_kwargs": [("k", 1)]})
    with pytest.raises(ValueError, match="num_experts"):
        MoEFeedForward.from_config({"num_experts": 4, "intermediate_dim": 8,
                                    "router_kwargs": {"num_experts": 8}})
    with pytest.raises(ValueError, match="num_experts"):
        MoEFeedForward(4, 8, router=TopKRouter(8))
    with pytest.raises(ValueError, match="num_layers"):
        count_parameters(
            {"vocabulary_size": 8, "hidden_dim": 4, "num_layers": 0,
             "blocks": dense_transformer_layer(2, 8).to_dict()}
        )

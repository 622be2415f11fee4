"""Qwen-MoE's shared expert (`shared_expert_intermediate_dim`): a dense FFN every
token goes through, scaled by a sigmoid gate, added to the routed experts.
Equal to keras-hub's `QwenSparseMoeBlock`; off by default (nothing changes);
in specs, counts, the layout map, saving, LoRA, int8 and causal inference."""

import json

import keras
import numpy as np
import pytest
from conftest import inference_call
from conftest import to_numpy

from keras_brainformer.distribution.memory_plan import activation_bytes
from keras_brainformer.distribution.memory_plan import shard_weights
from keras_brainformer.distribution.step_time import step_terms
from keras_brainformer.layers import FeedForward
from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec
from keras_brainformer.models.brainformer.block_spec import sublayer_from_dict
from keras_brainformer.models.brainformer.block_spec import sublayer_to_dict
from keras_brainformer.models.brainformer.brainformer_layout_map import get_layout_map
from keras_brainformer.models.brainformer.brainformer_layout_map import match_rule
from keras_brainformer.upstream_private import QwenSparseMoeBlock
from keras_brainformer.zoo.parameter_count import count_parameters
from keras_brainformer.zoo.parameter_count import sublayer_parameters
from keras_brainformer.zoo.weight_specs import weight_specs

D, E, H, HS, K = 8, 4, 6, 10, 2
VOCAB, T = 64, 12


def _x(shape=(2, 5, D), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _copy_from_qwen(ours, ref):
    """Copies a built `QwenSparseMoeBlock`'s weights into our layer. Qwen's
    experts keep `[gate | up]` in one `[E, d, 2h]` kernel; ours computes
    `act(x @ w_gate) * (x @ w_in)`."""
    h = ours.intermediate_dim
    ours.router.kernel.assign(ref._sparse_feedforward_gate_dense.kernel)
    gate_up = to_numpy(ref.expert_bank._expert_feedforward_gate_dense)
    ours.experts.w_gate.assign(gate_up[..., :h])
    ours.experts.w_in.assign(gate_up[..., h:])
    ours.experts.w_out.assign(ref.expert_bank._expert_feedforward_output_dense)
    mlp = ref.shared_expert_dense
    ours.shared_expert.w_gate.assign(mlp._feedforward_gate_dense.kernel)
    ours.shared_expert.w_in.assign(mlp._feedforward_intermediate_dense.kernel)
    ours.shared_expert.w_out.assign(mlp._feedforward_output_dense.kernel)
    ours.shared_expert_gate.assign(ref.shared_expert_gate_dense.kernel)


DROPLESS_IMPLS = [
    "slots",
    "blocks",
    pytest.param("ragged", marks=pytest.mark.skipif(
        keras.config.backend() != "jax", reason="the ragged path is JAX only")),
]


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dropless_impl", DROPLESS_IMPLS)
def test_equals_keras_hub_qwen_sparse_moe_block(normalize, dropless_impl):
    x = _x()
    ref = QwenSparseMoeBlock(
        hidden_dim=D, moe_intermediate_dim=H, shared_expert_intermediate_dim=HS,
        num_experts=E, top_k=K, norm_top_k_prob=normalize,
    )
    ref.build(x.shape)
    ours = MoEFeedForward(
        E, H, router="top_k",
        top_k=K, capacity_factor=None, normalize_gates=normalize,
        activation="gated_silu", dropless_impl=dropless_impl, shared_expert_intermediate_dim=HS,
    )
    ours.build(x.shape)
    _copy_from_qwen(ours, ref)
    expected = to_numpy(ref(x)[0])
    for training in (False, True):  # dropless: training routes the same way
        np.testing.assert_allclose(
            to_numpy(ours(x, training=training)), expected, rtol=1e-5, atol=1e-5
        )
    # The shared expert is not a no-op here: without it the outputs differ.
    assert np.abs(to_numpy(ours._routed(x, None, False, None)) - expected).max() > 1e-3


def test_one_hot_dispatch_and_capacity_dropping_add_the_same_shared_expert():
    x = _x((2, 8, D))
    kwargs = dict(router="top_k", top_k=1, capacity_factor=0.5,
                  shared_expert_intermediate_dim=HS)
    index = MoEFeedForward(E, H, **kwargs)
    index.build(x.shape)
    one_hot = MoEFeedForward(E, H, dispatch="one_hot", **kwargs)
    one_hot.build(x.shape)
    one_hot.set_weights(index.get_weights())
    for training in (False, True):
        np.testing.assert_allclose(
            to_numpy(one_hot(x, training=training)), to_numpy(index(x, training=training)),
            rtol=1e-6, atol=1e-6,
        )
    # out = routed + shared_expert(x) * sigmoid(x @ gate), sigmoid in float32.
    gate = 1 / (1 + np.exp(-(x @ to_numpy(index.shared_expert_gate))))
    shared = to_numpy(index.shared_expert(x)) * gate
    np.testing.assert_allclose(
        to_numpy(index(x)), to_numpy(index._routed(x, None, False, None)) + shared,
        rtol=1e-6, atol=1e-6,
    )


def test_mixed_precision_computes_in_bfloat16_with_a_float32_gate_weight():
    x = _x()
    layer = MoEFeedForward(E, H, shared_expert_intermediate_dim=HS, dtype="mixed_bfloat16")
    y = layer(x)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.shared_expert_gate.dtype) == "float32"
    reference = MoEFeedForward(E, H, shared_expert_intermediate_dim=HS)
    reference.build(x.shape)
    reference.set_weights(layer.get_weights())
    np.testing.assert_allclose(
        to_numpy(y).astype("float32"), to_numpy(reference(x)), rtol=0.05, atol=0.05
    )


def test_none_is_the_layer_without_a_shared_expert():
    x = _x()
    keras.utils.set_random_seed(3)
    default = MoEFeedForward(E, H)
    default.build(x.shape)
    keras.utils.set_random_seed(3)
    explicit = MoEFeedForward(E, H, shared_expert_intermediate_dim=None)
    explicit.build(x.shape)
    assert default.shared_expert is None
    paths = [w.path.split("/", 1)[1] for w in default.weights]
    assert paths == [w.path.split("/", 1)[1] for w in explicit.weights]
    assert not any("shared" in p for p in paths)
    for a, b in zip(default.get_weights(), explicit.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(to_numpy(default(x)), to_numpy(explicit(x)))
    # A layer with the shared expert computes the same routed part, bit for bit.
    shared = MoEFeedForward(E, H, shared_expert_intermediate_dim=HS)
    shared.build(x.shape)
    for variable, value in zip(default.weights, shared.weights[1:]):  # gate first
        assert variable.path.split("/", 1)[1] == value.path.split("/", 1)[1]
        variable.assign(value)
    np.testing.assert_array_equal(
        to_numpy(default(x)), to_numpy(shared._routed(x, None, False, None))
    )
    # Configs: the key is there (None); a config without it (saved before the
    # option existed) builds the same layer.
    config = default.get_config()
    assert config["shared_expert_intermediate_dim"] is None
    del config["shared_expert_intermediate_dim"]
    assert MoEFeedForward.from_config(config).shared_expert is None


def test_layer_config_round_trip_and_bad_values():
    layer = MoEFeedForward(E, H, activation="gated_silu", shared_expert_intermediate_dim=HS)
    config = layer.get_config()
    assert config["shared_expert_intermediate_dim"] == HS
    clone = MoEFeedForward.from_config(json.loads(json.dumps(config)))
    assert isinstance(clone.shared_expert, FeedForward)
    assert clone.shared_expert.intermediate_dim == HS
    assert clone.shared_expert.activation == "gated_silu"
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError),
                       (True, TypeError), ("8", TypeError)):
        with pytest.raises(
            error,
            match=rf"`shared_expert_intermediate_dim` must be a positive integer or None\. "
                  rf"Received: shared_expert_intermediate_dim={bad!r}",
        ):
            MoEFeedForward(E, H, shared_expert_intermediate_dim=bad)


def test_spec_json_round_trip_defaults_and_bad_values():
    spec = MoESpec(E, H, activation="swiglu", shared_expert_intermediate_dim=HS)
    assert spec.layer_kwargs()["shared_expert_intermediate_dim"] == HS
    block = BlockSpec([AttentionSpec(2), spec])
    assert BlockSpec.from_json(block.to_json()) == block
    assert sublayer_to_dict(spec)["shared_expert_intermediate_dim"] == HS
    # Off (the default): not written, so configs saved before the option
    # existed are unchanged; dicts without the key read as None.
    plain = MoESpec(E, H)
    assert plain.shared_expert_intermediate_dim is None
    assert plain.layer_kwargs()["shared_expert_intermediate_dim"] is None
    assert "shared_expert_intermediate_dim" not in sublayer_to_dict(plain)
    assert sublayer_from_dict(sublayer_to_dict(plain)) == plain
    assert sublayer_from_dict(
        {**sublayer_to_dict(plain), "shared_expert_intermediate_dim": None}
    ) == plain
    for bad, error in ((0, ValueError), (-1, ValueError), (1.5, TypeError), (False, TypeError)):
        with pytest.raises(error, match=r"`shared_expert_intermediate_dim` must be a positive "
                                        rf"integer or None\. Received: "
                                        rf"shared_expert_intermediate_dim={bad!r}"):
            MoESpec(E, H, shared_expert_intermediate_dim=bad)
    bad_dict = {**sublayer_to_dict(plain), "shared_expert_intermediate_dim": 0}
    with pytest.raises(ValueError, match=r"In `sublayers\[1\]` \(moe\).*=0"):
        BlockSpec([AttentionSpec(2), bad_dict])


def _spec(**moe):
    moe = {"top_k": K, "capacity_factor": 1.25, "activation": "gated_silu",
           "shared_expert_intermediate_dim": HS, **moe}
    return BlockSpec([AttentionSpec(2), MoESpec(E, H, **moe), FeedForwardSpec(16)])


def _config(**moe):
    return {"vocabulary_size": VOCAB, "hidden_dim": D, "blocks": _spec(**moe).to_dict(),
            "num_layers": 2, "max_sequence_length": 32}


def _inputs(seed=0):
    tokens = np.random.default_rng(seed).integers(0, VOCAB, (2, T)).astype("int32")
    return {"token_ids": tokens, "padding_mask": np.ones((2, T), "int32")}


def test_parameter_counts_and_weight_specs_match_a_built_backbone():
    config = _config()
    backbone = BrainformerBackbone(**config)
    specs = weight_specs(config)
    assert [(p, s.shape) for p, s in specs.items()] == [
        (w.path, tuple(w.shape)) for w in backbone.weights
    ]
    counts = count_parameters(config)
    trainable = sum(int(np.prod(w.shape)) for w in backbone.trainable_weights)
    assert counts["total"] == trainable
    statistics = sum(int(np.prod(w.shape)) for w in backbone.non_trainable_weights)
    assert backbone.count_params() == counts["total"] + statistics
    # The shared expert and its gate run for every token: activated in full.
    sub = _spec().sublayers[1]
    total, activated = sublayer_parameters(sub, D)
    plain_total, plain_activated = sublayer_parameters(
        MoESpec(E, H, top_k=K, activation="gated_silu"), D
    )
    shared = 3 * D * HS + D
    assert total - plain_total == shared
    assert activated - plain_activated == pytest.approx(shared)
    without = count_parameters(_config(shared_expert_intermediate_dim=None))
    assert counts["total"] - without["total"] == 2 * shared
    assert counts["activated"] - without["activated"] == 2 * shared


def test_layout_map_splits_the_shared_expert_like_a_dense_ffn_and_the_planners_see_it():
    config = _config()
    mesh = keras.distribution.DeviceMesh((1, 1, 1), ("batch", "expert", "model"),
                                         keras.distribution.list_devices()[:1])
    layout_map = get_layout_map(mesh, fsdp=True)
    shared = [p for p in weight_specs(config) if "shared_expert" in p]
    assert len(shared) == 2 * 4
    for path in weight_specs(config):
        assert len(match_rule(path)) == 1, (path, match_rule(path))
        assert layout_map[path] is not None, path
    assert layout_map["block_1/1_moe/shared_expert/w_in"].axes == ("batch", "model")
    assert layout_map["block_1/1_moe/shared_expert/w_gate"].axes == ("batch", "model")
    assert layout_map["block_1/1_moe/shared_expert/w_out"].axes == ("model", "batch")
    assert layout_map["block_1/1_moe/shared_expert_gate"].axes == (None, None)
    # On a model=2 mesh the hidden width is split, the gate replicated.
    shards = shard_weights(config, "batch=1,model=2")
    assert shards["block_0/1_moe/shared_expert/w_in"].local_shape == (D, HS // 2)
    assert shards["block_0/1_moe/shared_expert/w_out"].local_shape == (HS // 2, D)
    assert shards["block_0/1_moe/shared_expert_gate"].local_shape == (D, 1)
    # The activation estimate and the step-time model count its work.
    base = _config(shared_expert_intermediate_dim=None)
    with_shared = activation_bytes(config, "batch=1", batch_size=2, sequence_length=T)
    without = activation_bytes(base, "batch=1", batch_size=2, sequence_length=T)
    assert with_shared["moe experts"] > without["moe experts"]
    names = [t.name for t in step_terms(config, "batch=1", batch_size=2, sequence_length=T)]
    assert "block_0/1_moe shared expert in" in names


def test_lora_and_int8_adapters_and_scales_match_one_rule():
    backbone = BrainformerBackbone(**dict(_config(), num_layers=1))
    backbone.quantize("int8")
    backbone.enable_lora(2)
    added = [w.path for w in backbone.weights if "shared_expert/" in w.path]
    assert {p.rsplit("/", 1)[1] for p in added} >= {"w_in_scale", "w_in_lora_a", "w_out_lora_b"}
    for variable in backbone.weights:
        assert len(match_rule(variable.path)) == 1, (variable.path, match_rule(variable.path))


def test_backbone_save_reload_lora_int8_and_causal_inference(tmp_path):
    keras.utils.set_random_seed(0)
    backbone = BrainformerBackbone(**_config())
    inputs = _inputs()
    run = inference_call(backbone)
    y = to_numpy(run(inputs))

    # Save and reload: same config, same outputs.
    path = str(tmp_path / "shared.keras")
    backbone.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_config() == backbone.get_config()
    np.testing.assert_array_equal(to_numpy(inference_call(loaded)(inputs)), y)

    # Causal inference routing (the default; the spec's training routing
    # drops tokens at capacity 1.25): position t ignores later tokens.
    for t in (0, 6, T - 2):
        changed = {**inputs, "token_ids": inputs["token_ids"].copy()}
        changed["token_ids"][:, t + 1 :] = (changed["token_ids"][:, t + 1 :] + 7) % VOCAB
        y2 = to_numpy(run(changed))
        np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
        assert np.abs(y2[:, t + 1] - y[:, t + 1]).max() > 0

    # LoRA reaches the shared experts (layers named "shared_expert").
    assert "shared_expert" in backbone.default_lora_layer_names()
    backbone.enable_lora(2)
    shared = [moe.shared_expert for moe in backbone.moe_layers]
    assert len(shared) == 2 and all(layer.lora_enabled for layer in shared)
    trainable = {w.path for w in backbone.trainable_weights}
    assert "block_0/1_moe/shared_expert/w_in_lora_a" in trainable
    assert "block_0/1_moe/shared_expert/w_in" not in trainable
    assert "block_0/1_moe/shared_expert_gate" not in trainable  # frozen like routers

    # int8 reaches them too, and the model still computes nearly the same.
    loaded.quantize("int8")
    assert all(m.shared_expert.quantization_mode == "int8" for m in loaded.moe_layers)
    assert str(loaded.moe_layers[0].shared_expert.w_in.dtype) == "int8"
    q = to_numpy(loaded(inputs))
    assert np.all(np.isfinite(q))
    assert 0 < np.abs(q - y).max() / np.abs(y).max() < 0.15
    # A saved quantized model reloads quantized, with the same outputs.
    loaded.save(str(tmp_path / "int8.keras"))
    reloaded = keras.saving.load_model(str(tmp_path / "int8.keras"))
    assert all(m.shared_expert.quantization_mode == "int8" for m in reloaded.moe_layers)
    np.testing.assert_allclose(to_numpy(reloaded(inputs)), q, rtol=1e-6, atol=1e-6)

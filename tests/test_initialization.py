"""Every weight draws its own initial values (an unseeded Keras initializer
object reused for two same-shaped weights would give them equal values), and
every expert starts at the scale of the FFN it is."""

import keras
import numpy as np
import pytest
from conftest import to_numpy

from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.layers import ExpertBank
from keras_brainformer.layers import ExpertChoiceRouter
from keras_brainformer.layers import FeedForward
from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import TopKRouter
from keras_brainformer.layers.initializers import expert_initializer
from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec


def _distinct(*weights):
    arrays = [to_numpy(w).ravel() for w in weights]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            n = min(arrays[i].size, arrays[j].size)
            assert not np.array_equal(arrays[i][:n], arrays[j][:n]), (i, j)


def test_attention_projections_differ():
    attn = CausalSelfAttention(num_heads=2)
    attn.build((None, None, 8))
    _distinct(attn.w_query, attn.w_key, attn.w_value, attn.w_output)


def test_gated_ffn_weights_differ():
    ffn = FeedForward(16, activation="swiglu")
    ffn.build((None, None, 8))
    _distinct(ffn.w_in, ffn.w_gate, ffn.w_out)


def test_same_shaped_sublayers_of_a_block_differ_and_untied_output_embedding():
    spec = BlockSpec(
        [
            AttentionSpec(num_heads=2),
            MoESpec(4, 16, activation="gated_gelu"),
            FeedForwardSpec(16),
            AttentionSpec(num_heads=2),
            MoESpec(4, 16, activation="gated_gelu"),
            FeedForwardSpec(16),
        ]
    )
    backbone = BrainformerBackbone(
        vocabulary_size=32, hidden_dim=8, blocks=spec, num_layers=2, tie_embeddings=False
    )
    sub = [b.sublayers for b in backbone.transformer_blocks]
    _distinct(sub[0][0].w_query, sub[0][3].w_query, sub[1][0].w_query)
    _distinct(sub[0][1].experts.w_in, sub[0][1].experts.w_gate, sub[0][4].experts.w_in)
    _distinct(sub[0][1].router.kernel, sub[0][4].router.kernel)
    _distinct(sub[0][2].w_in, sub[0][5].w_in)
    embedding = backbone.token_embedding
    _distinct(embedding.embeddings, embedding.reverse_embeddings)


# Each expert starts as the FFN it is (issue 33): Keras' variance-scaling
# initializers count the expert axis of `[E, d, h]` into both fans, which
# started every expert sqrt(E) times smaller than a dense FFN of its shape.
D, H = 120, 480


def _dense_std(activation):
    ffn = FeedForward(H, activation=activation)
    ffn.build((None, None, D))
    return {"w_in": to_numpy(ffn.w_in).std(), "w_out": to_numpy(ffn.w_out).std()}


@pytest.mark.parametrize("num_experts", [1, 2, 8, 32])
@pytest.mark.parametrize("activation", ["gelu", "gated_gelu"])
def test_every_expert_starts_with_the_scale_of_a_dense_ffn(num_experts, activation):
    bank = ExpertBank(num_experts, H, activation=activation)
    bank.build((num_experts, None, D))
    dense = _dense_std(activation)
    names = ("w_in", "w_gate", "w_out") if activation == "gated_gelu" else ("w_in", "w_out")
    for name in names:
        weights = to_numpy(getattr(bank, name))
        for expert in range(num_experts):
            np.testing.assert_allclose(
                weights[expert].std(), dense["w_out" if name == "w_out" else "w_in"],
                rtol=0.05, err_msg=f"{name} of expert {expert} of {num_experts}",
            )
    if num_experts > 1:
        _distinct(*to_numpy(bank.w_in))


@pytest.mark.parametrize(
    "initializer",
    ["glorot_uniform", "he_normal", "lecun_uniform",
     keras.initializers.VarianceScaling(0.1, "fan_in", "truncated_normal")],
)
def test_expert_initializer_gives_each_slice_the_fans_of_its_own_matrix(initializer):
    expected = to_numpy(keras.initializers.get(initializer)((D, H))).std()
    drawn = to_numpy(expert_initializer(initializer, 16)((16, D, H)))
    np.testing.assert_allclose(drawn.std(axis=(1, 2)), expected, rtol=0.06)


def test_orthogonal_experts_are_each_orthogonal():
    w = to_numpy(expert_initializer("orthogonal", 4)((4, 16, 8)))
    for expert in w:
        np.testing.assert_allclose(expert.T @ expert, np.eye(8), atol=1e-5)
    _distinct(*w)


def test_moe_layer_experts_lora_and_int8_keep_the_per_expert_scale():
    dense = _dense_std("gelu")["w_in"]
    moe = MoEFeedForward(num_experts=8, intermediate_dim=H, top_k=2)
    moe.build((2, 16, D))
    np.testing.assert_allclose(to_numpy(moe.experts.w_in).std(axis=(1, 2)), dense, rtol=0.05)
    # LoRA leaves the frozen expert kernels as drawn; int8 keeps them within
    # its rounding (one scale per expert and output channel).
    lora = MoEFeedForward.from_config(moe.get_config())
    lora.build((2, 16, D))
    lora.set_weights(moe.get_weights())
    lora.experts.enable_lora(4)
    np.testing.assert_array_equal(to_numpy(lora.experts.w_in), to_numpy(moe.experts.w_in))
    quantized = MoEFeedForward.from_config(moe.get_config())
    quantized.build((2, 16, D))
    quantized.set_weights(moe.get_weights())
    quantized.experts.quantize("int8")
    x = np.random.default_rng(0).normal(size=(2, 16, D)).astype("float32")
    np.testing.assert_allclose(
        to_numpy(quantized(x)), to_numpy(moe(x)), atol=0.02 * np.abs(to_numpy(moe(x))).max()
    )


def test_a_glam_preset_starts_its_experts_like_its_dense_ffns():
    backbone = BrainformerBackbone.from_preset("glam_tiny")
    experts, dense = [], []
    for block in backbone.transformer_blocks:
        for sublayer in block.sublayers:
            if isinstance(sublayer, MoEFeedForward):
                w = to_numpy(sublayer.experts.w_in)
                experts.append(w.std(axis=(1, 2)) * np.sqrt(w.shape[1] + w.shape[2]))
            elif isinstance(sublayer, FeedForward):
                w = to_numpy(sublayer.w_in)
                dense.append(w.std() * np.sqrt(w.shape[0] + w.shape[1]))
    # Glorot: std * sqrt(fan_in + fan_out) = sqrt(2) for every matrix, expert or not.
    assert experts and dense
    np.testing.assert_allclose(np.concatenate(experts), np.sqrt(2), rtol=0.1)
    np.testing.assert_allclose(dense, np.sqrt(2), rtol=0.1)


@pytest.mark.parametrize("router_cls", [TopKRouter, ExpertChoiceRouter])
def test_router_kernel_starts_like_gshards_gate(router_cls):
    # std 1/sqrt(d) (GShard); Switch's scale 0.1 before issue 33 gave 0.32/sqrt(d).
    d = 256
    router = router_cls(num_experts=64)
    router.build((1, 8, d))
    np.testing.assert_allclose(to_numpy(router.kernel).std(), 1 / np.sqrt(d), rtol=0.03)
    small = router_cls(
        num_experts=64,
        kernel_initializer=keras.initializers.VarianceScaling(0.1, "fan_in", "truncated_normal"),
    )
    small.build((1, 8, d))
    np.testing.assert_allclose(to_numpy(small.kernel).std(), np.sqrt(0.1 / d), rtol=0.03)
    restored = router_cls.from_config(small.get_config())
    assert restored.kernel_initializer.get_config()["scale"] == 0.1

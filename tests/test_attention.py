"""CausalSelfAttention and the block's KV-cache path."""

import numpy as np
import pytest
from conftest import inference_call
from conftest import to_numpy
from keras import ops

from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBlock
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec


def test_attention_is_causal():
    layer = CausalSelfAttention(num_heads=4)
    x = np.random.default_rng(0).normal(size=(2, 10, 16)).astype("float32")
    y = to_numpy(layer(x))
    for t in range(9):
        x2 = x.copy()
        x2[:, t + 1 :] += 1.0
        y2 = to_numpy(layer(x2))
        np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
        assert np.abs(y2[:, t + 1 :] - y[:, t + 1 :]).max() > 1e-4


def test_first_position_attends_only_to_itself():
    layer = CausalSelfAttention(num_heads=2)
    x = np.random.default_rng(1).normal(size=(1, 5, 8)).astype("float32")
    layer(x)
    v = np.einsum("btd,dhk->bthk", x, to_numpy(layer.w_value))
    expected = np.einsum("bthk,hkd->btd", v[:, :1], to_numpy(layer.w_output))
    np.testing.assert_allclose(to_numpy(layer(x))[:, :1], expected, rtol=1e-5, atol=1e-6)


def test_padding_keys_are_ignored():
    layer = CausalSelfAttention(num_heads=2)
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, 6, 8)).astype("float32")
    mask = np.array([[0, 1, 1, 1, 1, 1]], "int32")  # left padding
    y = to_numpy(layer(x, padding_mask=mask))
    x2 = x.copy()
    x2[:, 0] = rng.normal(size=8)
    np.testing.assert_allclose(to_numpy(layer(x2, padding_mask=mask))[:, 1:], y[:, 1:], atol=1e-6)


@pytest.mark.parametrize("num_heads,head_dim", [(3, None), (3, 6)])
def test_cached_decoding_matches_full_forward(num_heads, head_dim):
    layer = CausalSelfAttention(num_heads=num_heads, head_dim=head_dim)
    x = np.random.default_rng(3).normal(size=(2, 7, 12)).astype("float32")
    full = to_numpy(layer(x))
    hd = head_dim or 12 // num_heads
    cache = np.zeros((2, 2, 7, num_heads, hd), "float32")
    # Prefill 3 tokens at once, then one token at a time.
    out, cache = layer(x[:, :3], cache=cache, cache_update_index=0)
    outs = [to_numpy(out)]
    for t in range(3, 7):
        out, cache = layer(x[:, t : t + 1], cache=cache, cache_update_index=t)
        outs.append(to_numpy(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_block_cache_path_matches_full_forward():
    spec = BlockSpec(
        [
            AttentionSpec(num_heads=2),
            MoESpec(4, 16, top_k=2, capacity_factor=None),
            AttentionSpec(num_heads=3, head_dim=6),
            FeedForwardSpec(16, activation="gated_relu"),
        ]
    )
    block = BrainformerBlock(spec)
    run = inference_call(block)
    x = np.random.default_rng(4).normal(size=(2, 6, 8)).astype("float32")
    full = to_numpy(run(x))
    cache = [
        ops.zeros((2, 2, 6, 2, 4)),
        ops.zeros((2, 2, 6, 3, 6)),
    ]
    outs = []
    for t in range(6):
        out, cache = run(x[:, t : t + 1], cache=cache, cache_update_index=t)
        outs.append(to_numpy(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_heads"):
        CausalSelfAttention(num_heads=0)
    with pytest.raises(ValueError, match="num_heads"):
        CausalSelfAttention(num_heads=3)(np.ones((1, 2, 8), "float32"))
    with pytest.raises(ValueError, match="even"):
        CausalSelfAttention(num_heads=2, head_dim=5)
    with pytest.raises(ValueError, match="even"):
        CausalSelfAttention(num_heads=4)(np.ones((1, 2, 12), "float32"))
    with pytest.raises(ValueError, match="cache_update_index"):
        CausalSelfAttention(num_heads=2)(
            np.ones((1, 2, 8), "float32"), cache=np.zeros((1, 2, 2, 2, 4), "float32")
        )


def test_block_cache_path_with_padding_mask_over_the_cache():
    spec = BlockSpec([AttentionSpec(num_heads=2), MoESpec(4, 16, capacity_factor=None)])
    block = BrainformerBlock(spec)
    run = inference_call(block)
    x = np.random.default_rng(5).normal(size=(2, 6, 8)).astype("float32")
    mask = np.ones((2, 6), "int32")
    mask[1, 4:] = 0
    full = to_numpy(run(x, padding_mask=mask))
    cache = [ops.zeros((2, 2, 6, 2, 4))]
    out, cache = run(x[:, :4], padding_mask=mask, cache=cache, cache_update_index=0)
    outs = [to_numpy(out)]
    for t in range(4, 6):
        out, cache = run(x[:, t : t + 1], padding_mask=mask, cache=cache, cache_update_index=t)
        outs.append(to_numpy(out))
    cached = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(cached[0], full[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached[1, :4], full[1, :4], rtol=1e-5, atol=1e-5)


def test_cached_decoding_of_expert_choice_equals_the_causal_full_pass():
    """A decoding step routes its token alone; the causal inference routing
    (default) does the same in a full pass, so the two agree. The training
    scheme at inference (`as_trained`) ranks tokens across the sequence and
    does not."""
    spec = BlockSpec([AttentionSpec(num_heads=2), MoESpec(4, 16, router="expert_choice")])
    block = BrainformerBlock(spec)
    run = inference_call(block)
    x = np.random.default_rng(6).normal(size=(1, 8, 8)).astype("float32")
    full = to_numpy(run(x))
    cache = [ops.zeros((1, 2, 8, 2, 4))]
    outs = []
    for t in range(8):
        out, cache = run(x[:, t : t + 1], cache=cache, cache_update_index=t)
        outs.append(to_numpy(out))
    cached = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
    block.moe_layers[0].inference_routing = "as_trained"
    assert np.abs(cached - to_numpy(inference_call(block)(x))).max() > 1e-3


# --- Primer's multi-dconv-head attention (depthwise_conv_kernel) -------------


def _randomize_conv(layer, seed=0, scale=0.5):
    """Replaces the near-identity conv taps by random ones, so tests see the
    convolution mix positions."""
    rng = np.random.default_rng(seed)
    for w in (layer.conv_query, layer.conv_key, layer.conv_value):
        w.assign(rng.normal(scale=scale, size=tuple(w.shape)).astype("float32"))


def _numpy_rope(x, start=0, max_wavelength=10000):
    """keras_hub's RotaryEmbedding on `[B, T, H, hd]` (halves rotated)."""
    hd = x.shape[-1]
    inv_freq = max_wavelength ** (-np.arange(0, hd, 2, dtype="float64") / hd)
    freqs = np.outer(np.arange(x.shape[1]) + start, inv_freq)
    emb = np.concatenate((freqs, freqs), axis=-1)[None, :, None, :]
    x1, x2 = np.split(x, 2, axis=-1)
    return x * np.cos(emb) + np.concatenate((-x2, x1), axis=-1) * np.sin(emb)


def _numpy_causal_conv(x, w):
    """out[t] = sum_j w[K-1-j] * x[t-j], zeros before t=0; x `[B, T, ...]`."""
    K = w.shape[0]
    out = np.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(K):
            if t - j >= 0:
                out[:, t] += w[K - 1 - j] * x[:, t - j]
    return out


def test_causal_depthwise_conv_by_hand():
    from keras_brainformer.layers.causal_self_attention import causal_depthwise_conv

    # One channel, taps (a, b, c) = (w[0], w[1], w[2]) on (t-2, t-1, t).
    x = np.array([1.0, 2.0, 3.0, 4.0], "float32").reshape(1, 1, 4, 1)
    w = np.array([100.0, 10.0, 1.0], "float32").reshape(1, 3, 1)
    window = np.pad(x, ((0, 0), (0, 0), (2, 0), (0, 0)))
    out = to_numpy(causal_depthwise_conv(window, w, 4)).ravel()
    # t=0: 1; t=1: 2 + 10*1; t=2: 3 + 10*2 + 100*1; t=3: 4 + 30 + 200.
    np.testing.assert_array_equal(out, [1.0, 12.0, 123.0, 234.0])


def test_depthwise_conv_attention_matches_numpy_reference():
    layer = CausalSelfAttention(num_heads=2, head_dim=4, depthwise_conv_kernel=3)
    rng = np.random.default_rng(10)
    x = rng.normal(size=(2, 5, 6)).astype("float32")
    layer.build(x.shape)
    _randomize_conv(layer, seed=11)
    assert [w.path.split("/")[-1] for w in layer.weights][-3:] == [
        "conv_query", "conv_key", "conv_value"
    ]
    w = {name: to_numpy(getattr(layer, name)).astype("float64") for name in (
        "w_query", "w_key", "w_value", "w_output",
        "conv_query", "conv_key", "conv_value")}
    x64 = x.astype("float64")
    q = _numpy_causal_conv(np.einsum("btd,dhk->bthk", x64, w["w_query"]), w["conv_query"])
    k = _numpy_causal_conv(np.einsum("btd,dhk->bthk", x64, w["w_key"]), w["conv_key"])
    v = _numpy_causal_conv(np.einsum("btd,dhk->bthk", x64, w["w_value"]), w["conv_value"])
    q, k = _numpy_rope(q), _numpy_rope(k)
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(4)
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bhqs,bshk,hkd->bqd", probs, v, w["w_output"])
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-4, atol=1e-5)


def test_depthwise_conv_starts_near_identity():
    layer = CausalSelfAttention(num_heads=2, depthwise_conv_kernel=3)
    layer.build((1, 4, 8))
    for w in (layer.conv_query, layer.conv_key, layer.conv_value):
        w = to_numpy(w)
        assert w.shape == (3, 2, 4)
        np.testing.assert_allclose(w[-1], 1.0, atol=0.02)
        np.testing.assert_allclose(w[:-1], 0.0, atol=0.02)
    # Each weight draws its own noise.
    assert not np.array_equal(to_numpy(layer.conv_query), to_numpy(layer.conv_key))


def test_depthwise_conv_attention_is_causal():
    layer = CausalSelfAttention(num_heads=2, depthwise_conv_kernel=3)
    x = np.random.default_rng(12).normal(size=(2, 8, 8)).astype("float32")
    layer.build(x.shape)
    _randomize_conv(layer, seed=13)
    y = to_numpy(layer(x))
    for t in range(7):
        x2 = x.copy()
        x2[:, t + 1 :] += 1.0
        y2 = to_numpy(layer(x2))
        np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
        assert np.abs(y2[:, t + 1 :] - y[:, t + 1 :]).max() > 1e-4


def test_depthwise_conv_mixes_previous_positions():
    """The conv makes position t depend on raw inputs t-1, t-2 even through
    the query (the first position's output changes with K=1 vs K=3)."""
    x = np.random.default_rng(14).normal(size=(1, 4, 8)).astype("float32")
    off = CausalSelfAttention(num_heads=2)
    on = CausalSelfAttention(num_heads=2, depthwise_conv_kernel=3)
    off.build(x.shape)
    on.build(x.shape)
    on.set_weights(off.get_weights() + [np.zeros((3, 2, 4), "float32")] * 3)
    # Only the current tap: identical to no conv.
    ident = np.zeros((3, 2, 4), "float32")
    ident[-1] = 1.0
    for w in (on.conv_query, on.conv_key, on.conv_value):
        w.assign(ident)
    np.testing.assert_allclose(to_numpy(on(x)), to_numpy(off(x)), rtol=1e-5, atol=1e-6)
    _randomize_conv(on, seed=15)
    assert np.abs(to_numpy(on(x)) - to_numpy(off(x))).max() > 1e-3


def _compiled(fn):
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(fn)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn)
    return fn


@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
@pytest.mark.parametrize("compiled", [False, True])
def test_depthwise_conv_cached_decoding_matches_full_forward(kernel, compiled):
    layer = CausalSelfAttention(num_heads=3, head_dim=4, depthwise_conv_kernel=kernel)
    x = np.random.default_rng(16).normal(size=(2, 9, 12)).astype("float32")
    layer.build(x.shape)
    _randomize_conv(layer, seed=17)
    full = to_numpy(layer(x))
    shape = layer.cache_shape(2, 9)
    if kernel >= 2:
        assert shape == (2, 5, 9 + kernel - 1, 3, 4)
    else:
        assert shape == (2, 2, 9, 3, 4)

    def step(tokens, cache, index):
        return layer(tokens, cache=cache, cache_update_index=index)

    step = _compiled(step) if compiled else step
    cache = ops.zeros(shape)
    # Prefill 3 tokens, a chunk of 2, then one token at a time.
    outs = []
    for start, stop in [(0, 3), (3, 5), (5, 6), (6, 7), (7, 8), (8, 9)]:
        index = ops.convert_to_tensor(start, "int32") if compiled else start
        out, cache = step(x[:, start:stop], cache, index)
        outs.append(to_numpy(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    if kernel >= 2:
        # The first K - 1 slots stay zero; raw projections follow at p + K - 1.
        cache = to_numpy(cache)
        np.testing.assert_array_equal(cache[:, :, : kernel - 1], 0.0)
        raw_v = np.einsum("btd,dhk->bthk", x, to_numpy(layer.w_value))
        np.testing.assert_allclose(cache[:, 4, kernel - 1 :], raw_v, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_ignores_left_padding():
    """Padding projections are zeroed before the conv: a left-padded sequence
    gives the unpadded sequence's outputs (RoPE is relative), cached or not."""
    layer = CausalSelfAttention(num_heads=2, depthwise_conv_kernel=3)
    rng = np.random.default_rng(18)
    x = rng.normal(size=(1, 5, 8)).astype("float32")
    layer.build(x.shape)
    _randomize_conv(layer, seed=19)
    expected = to_numpy(layer(x))
    padded = np.concatenate((rng.normal(size=(1, 2, 8)).astype("float32"), x), axis=1)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1]], "int32")
    y = to_numpy(layer(padded, padding_mask=mask))
    np.testing.assert_allclose(y[:, 2:], expected, rtol=1e-4, atol=1e-5)
    cache = ops.zeros(layer.cache_shape(1, 7))
    out, cache = layer(padded[:, :4], padding_mask=mask, cache=cache, cache_update_index=0)
    outs = [to_numpy(out)]
    for t in range(4, 7):
        out, cache = layer(
            padded[:, t : t + 1], padding_mask=mask, cache=cache, cache_update_index=t
        )
        outs.append(to_numpy(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1)[:, 2:], expected, rtol=1e-4, atol=1e-5)


def test_block_cache_path_with_depthwise_conv():
    spec = BlockSpec(
        [
            AttentionSpec(num_heads=2, depthwise_conv_kernel=3),
            MoESpec(4, 16, top_k=2, capacity_factor=None),
            AttentionSpec(num_heads=2),
        ]
    )
    block = BrainformerBlock(spec)
    x = np.random.default_rng(20).normal(size=(2, 6, 8)).astype("float32")
    block.build(x.shape)
    attn = block.attention_layers
    assert attn[0].depthwise_conv_kernel == 3 and attn[1].depthwise_conv_kernel == 0
    _randomize_conv(attn[0], seed=21)
    run = inference_call(block)
    full = to_numpy(run(x))
    cache = [ops.zeros(layer.cache_shape(2, 6)) for layer in attn]
    assert [tuple(c.shape) for c in cache] == [(2, 5, 8, 2, 4), (2, 2, 6, 2, 4)]
    out, cache = run(x[:, :2], cache=cache, cache_update_index=0)
    outs = [to_numpy(out)]
    for t in range(2, 6):
        out, cache = run(x[:, t : t + 1], cache=cache, cache_update_index=t)
        outs.append(to_numpy(out))
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)


def test_depthwise_conv_config_round_trip():
    layer = CausalSelfAttention(num_heads=2, head_dim=4, depthwise_conv_kernel=3, name="a")
    x = np.random.default_rng(22).normal(size=(1, 4, 6)).astype("float32")
    y = to_numpy(layer(x))
    config = layer.get_config()
    assert config["depthwise_conv_kernel"] == 3
    clone = CausalSelfAttention.from_config(config)
    assert clone.get_config() == config
    clone.build(x.shape)
    assert len(clone.weights) == 7
    clone.set_weights(layer.get_weights())
    np.testing.assert_allclose(to_numpy(clone(x)), y, rtol=1e-6, atol=1e-6)
    default = CausalSelfAttention(num_heads=2).get_config()
    assert default["depthwise_conv_kernel"] == 0
    # Configs saved before the argument existed still load, with the conv off.
    del default["depthwise_conv_kernel"]
    assert CausalSelfAttention.from_config(default).depthwise_conv_kernel == 0


def test_cache_shape():
    assert CausalSelfAttention(num_heads=4, head_dim=6).cache_shape(2, 10) == (2, 2, 10, 4, 6)
    assert CausalSelfAttention(
        num_heads=4, head_dim=6, depthwise_conv_kernel=3
    ).cache_shape(2, 10) == (2, 5, 12, 4, 6)
    layer = CausalSelfAttention(num_heads=4)
    with pytest.raises(ValueError, match="build"):
        layer.cache_shape(2, 10)
    layer.build((2, 10, 32))
    assert layer.cache_shape(2, 10) == (2, 2, 10, 4, 8)


@pytest.mark.parametrize(
    "value,error",
    [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("3", TypeError), (None, TypeError)],
)
def test_bad_depthwise_conv_kernel(value, error):
    with pytest.raises(error, match="depthwise_conv_kernel"):
        CausalSelfAttention(num_heads=2, depthwise_conv_kernel=value)
    with pytest.raises(error, match="depthwise_conv_kernel"):
        AttentionSpec(num_heads=2, depthwise_conv_kernel=value)
    with pytest.raises(error, match="depthwise_conv_kernel"):
        BlockSpec([{"kind": "attention", "num_heads": 2, "depthwise_conv_kernel": value}])


def test_cache_with_the_wrong_layout_is_refused():
    layer = CausalSelfAttention(num_heads=2, depthwise_conv_kernel=3)
    with pytest.raises(ValueError, match="cache_shape"):
        layer(np.ones((1, 2, 8), "float32"), cache=np.zeros((1, 2, 4, 2, 4), "float32"),
              cache_update_index=0)


def test_attention_spec_depthwise_conv_serialisation():
    spec = BlockSpec([AttentionSpec(num_heads=2, depthwise_conv_kernel=3)])
    assert BlockSpec.from_json(spec.to_json()) == spec
    assert spec.to_dict()["sublayers"][0]["depthwise_conv_kernel"] == 3
    # Dicts written before the field existed still load, with the conv off.
    old = BlockSpec.from_dict(
        {"sublayers": [{"kind": "attention", "num_heads": 2, "head_dim": None}]}
    )
    assert old.sublayers[0].depthwise_conv_kernel == 0


def test_parameter_count_with_depthwise_conv_equals_built_model():
    from keras_brainformer.models import BrainformerBackbone
    from keras_brainformer.zoo import count_parameters

    primer = BlockSpec(
        [
            AttentionSpec(num_heads=2, depthwise_conv_kernel=3),
            FeedForwardSpec(24, activation="squared_relu"),
            AttentionSpec(num_heads=3, head_dim=6, depthwise_conv_kernel=2),
            MoESpec(4, 16, top_k=2),
        ]
    )
    backbone = BrainformerBackbone(
        vocabulary_size=32, hidden_dim=16, blocks=primer, num_layers=2
    )
    counts = count_parameters(backbone.get_config())
    # Trainable weights: `count_params()` would add the routers' non-trainable
    # statistics variables.
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_variables)
    assert counts["total"] == trainable
    no_conv = count_parameters(
        BrainformerBackbone(
            vocabulary_size=32, hidden_dim=16, num_layers=2, blocks=BlockSpec(
                [AttentionSpec(num_heads=2), FeedForwardSpec(24, activation="squared_relu"),
                 AttentionSpec(num_heads=3, head_dim=6), MoESpec(4, 16, top_k=2)]
            )
        ).get_config()
    )
    assert counts["total"] - no_conv["total"] == 2 * (3 * 3 * 2 * 8 + 3 * 2 * 3 * 6)


@pytest.mark.parametrize("conv", [0, 3])
def test_keras_dot_product_attention_path_equals_ours(conv, monkeypatch):
    """On GPU/TPU attention runs through `keras.ops.dot_product_attention`
    (fused kernels); forced here on CPU, it gives our core's outputs: full
    pass with left padding, and cached decoding (a query offset), Primer's
    convolution included."""
    import keras_brainformer.layers.causal_self_attention as attention

    layer = CausalSelfAttention(num_heads=3, head_dim=6, depthwise_conv_kernel=conv)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2, 6, 12)).astype("float32")
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], "int32")
    ours = to_numpy(layer(x, padding_mask=mask))
    cache = np.zeros(layer.cache_shape(2, 6), "float32")
    ours_step, _ = layer(x[:, :4], padding_mask=mask, cache=cache, cache_update_index=0)
    assert not attention.uses_keras_attention()  # this CPU keeps ours (faster here)

    monkeypatch.setattr(attention, "uses_keras_attention", lambda: True)
    np.testing.assert_allclose(
        to_numpy(layer(x, padding_mask=mask)), ours, rtol=1e-5, atol=1e-6
    )
    keras_step, _ = layer(x[:, :4], padding_mask=mask, cache=cache, cache_update_index=0)
    np.testing.assert_allclose(to_numpy(keras_step), to_numpy(ours_step), rtol=1e-5, atol=1e-6)

"""The attention variants of the Mixtral / Qwen-MoE / Qwen3-MoE families:
grouped-query attention, sliding windows, linear RoPE scaling, Q/K/V biases
and per-head Q/K RMS norms — against an independent NumPy reference, under
cached decoding, in specs, backbones, saving, LoRA/int8 and the layout map."""

import json

import keras
import numpy as np
import pytest
from conftest import inference_call
from conftest import to_numpy

from keras_brainformer.distribution.memory_plan import shard_weights
from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import MoESpec
from keras_brainformer.models.brainformer.brainformer_layout_map import get_layout_map
from keras_brainformer.models.brainformer.brainformer_layout_map import match_rule
from keras_brainformer.zoo.weight_specs import weight_specs

EPS = 1e-6


def numpy_attention(x, w, num_heads, kv_heads, head_dim, *, window=None, bias=False,
                    qk_norm=False, scaling=1.0, wavelength=10000, mask=None):
    """Independent reference: keras-hub's Mixtral/Qwen attention maths
    (`ops.repeat` of the key/value heads, RoPE with frequencies / scaling,
    per-head RMS norm before RoPE, `i - j < window`), float64."""
    x = x.astype("float64")
    q = np.einsum("btd,dhk->bthk", x, w["w_query"])
    k = np.einsum("btd,dhk->bthk", x, w["w_key"])
    v = np.einsum("btd,dhk->bthk", x, w["w_value"])
    if bias:
        q, k, v = q + w["b_query"], k + w["b_key"], v + w["b_value"]
    if qk_norm:
        def rms(t, g):
            return t / np.sqrt(np.mean(t**2, axis=-1, keepdims=True) + EPS) * g
        q, k = rms(q, w["query_norm"]), rms(k, w["key_norm"])
    T = x.shape[1]
    inv_freq = wavelength ** (-np.arange(0, head_dim, 2) / head_dim) / scaling
    emb = np.outer(np.arange(T), inv_freq)
    emb = np.concatenate((emb, emb), axis=-1)[None, :, None, :]

    def rope(t):
        t1, t2 = np.split(t, 2, axis=-1)
        return t * np.cos(emb) + np.concatenate((-t2, t1), axis=-1) * np.sin(emb)

    q, k = rope(q), rope(k)
    k = np.repeat(k, num_heads // kv_heads, axis=2)
    v = np.repeat(v, num_heads // kv_heads, axis=2)
    scores = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(head_dim)
    i, j = np.arange(T)[:, None], np.arange(T)[None, :]
    allowed = i >= j
    if window is not None:
        allowed = allowed & (i - j < window)
    allowed = np.broadcast_to(allowed, scores.shape)
    if mask is not None:
        allowed = allowed & mask.astype(bool)[:, None, None, :]
    scores = np.where(allowed, scores, -1e30)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhqs,bshk->bqhk", probs, v)
    return np.einsum("bqhk,hkd->bqd", out, w["w_output"])


def randomize(layer, seed=0):
    """Random values for every weight (biases and norm scales far from their
    zero/one init), returned as float64 arrays by name."""
    rng = np.random.default_rng(seed)
    values = {}
    for variable in layer.weights:
        name = variable.path.split("/")[-1]
        value = rng.normal(scale=0.4, size=tuple(variable.shape))
        if name.endswith("_norm"):
            value = 1.0 + value
        variable.assign(value.astype("float32"))
        values[name] = value.astype("float32").astype("float64")
    return values


VARIANTS = {
    "gqa": dict(num_key_value_heads=2),
    "mqa": dict(num_key_value_heads=1),
    "window": dict(sliding_window=3),
    "bias": dict(use_qkv_bias=True),
    "qk_norm": dict(qk_norm=True),
    "rope_scaling": dict(rope_scaling_factor=4.0),
    "all": dict(num_key_value_heads=2, sliding_window=4, use_qkv_bias=True, qk_norm=True,
                rope_scaling_factor=2.0),
}


def make_layer(kwargs, heads=4, head_dim=6):
    return CausalSelfAttention(num_heads=heads, head_dim=head_dim, layer_norm_epsilon=EPS, **kwargs)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_matches_numpy_reference(variant):
    kwargs = VARIANTS[variant]
    layer = make_layer(kwargs)
    x = np.random.default_rng(1).normal(size=(2, 7, 12)).astype("float32")
    mask = np.array([[0, 0, 1, 1, 1, 1, 1], [1] * 7], "int32")
    layer(x)
    w = randomize(layer)
    expected = numpy_attention(
        x, w, 4, kwargs.get("num_key_value_heads") or 4, 6,
        window=kwargs.get("sliding_window"), bias=kwargs.get("use_qkv_bias", False),
        qk_norm=kwargs.get("qk_norm", False), scaling=kwargs.get("rope_scaling_factor", 1.0),
        mask=mask,
    )
    got = to_numpy(layer(x, padding_mask=mask))
    # Left-padding rows: only real query positions are defined.
    np.testing.assert_allclose(got[0, 2:], expected[0, 2:], rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(got[1], expected[1], rtol=2e-4, atol=2e-5)


def test_grouped_query_heads_equal_repeated_full_heads():
    """GQA is MHA whose key/value projections repeat each KV head over its
    group (query head h reads KV head h // groups)."""
    x = np.random.default_rng(2).normal(size=(2, 6, 12)).astype("float32")
    gqa = make_layer(dict(num_key_value_heads=2))
    gqa(x)
    randomize(gqa, seed=3)
    full = make_layer({})
    full(x)
    for name in ("w_query", "w_output"):
        getattr(full, name).assign(getattr(gqa, name))
    for name in ("w_key", "w_value"):
        getattr(full, name).assign(np.repeat(to_numpy(getattr(gqa, name)), 2, axis=1))
    np.testing.assert_allclose(to_numpy(gqa(x)), to_numpy(full(x)), rtol=1e-5, atol=1e-6)
    assert gqa.cache_shape(3, 10) == (3, 2, 10, 2, 6)
    assert tuple(gqa.w_key.shape) == (12, 2, 6) and tuple(gqa.w_query.shape) == (12, 4, 6)


def windowed_and_plain(window, x, seed=None):
    """A layer with `sliding_window=window` (random weights when `seed` is
    given) and one without a window holding the same weights."""
    windowed = make_layer(dict(sliding_window=window))
    windowed(x)
    if seed is not None:
        randomize(windowed, seed=seed)
    plain = make_layer({})
    plain(x)
    plain.set_weights(windowed.get_weights())
    return windowed, plain


def test_window_covering_the_sequence_is_full_attention():
    x = np.random.default_rng(4).normal(size=(2, 6, 12)).astype("float32")
    windowed, plain = windowed_and_plain(6, x)
    np.testing.assert_array_equal(to_numpy(windowed(x)), to_numpy(plain(x)))
    narrow = make_layer(dict(sliding_window=2))
    narrow(x)
    narrow.set_weights(windowed.get_weights())
    assert np.abs(to_numpy(narrow(x))[:, 2:] - to_numpy(plain(x))[:, 2:]).max() > 1e-3


def test_sliding_window_sees_exactly_the_last_positions():
    """RoPE is relative, so with a window of w the last position's output is
    full attention over the last w tokens alone."""
    x = np.random.default_rng(5).normal(size=(1, 9, 12)).astype("float32")
    windowed, plain = windowed_and_plain(4, x, seed=6)
    np.testing.assert_allclose(
        to_numpy(windowed(x))[:, -1], to_numpy(plain(x[:, -4:]))[:, -1], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("variant", ["gqa", "all"])
def test_cached_decoding_equals_the_full_pass(variant):
    layer = make_layer(VARIANTS[variant])
    x = np.random.default_rng(7).normal(size=(2, 8, 12)).astype("float32")
    mask = np.array([[0, 1, 1, 1, 1, 1, 1, 1], [1] * 8], "int32")
    layer(x)
    randomize(layer, seed=8)
    full = to_numpy(layer(x, padding_mask=mask))
    cache = np.zeros(layer.cache_shape(2, 8), "float32")
    prefix, cache = layer(x[:, :5], padding_mask=mask, cache=cache, cache_update_index=0)
    steps = [to_numpy(prefix)]
    for t in range(5, 8):
        out, cache = layer(x[:, t : t + 1], padding_mask=mask, cache=cache, cache_update_index=t)
        steps.append(to_numpy(out))
    np.testing.assert_allclose(np.concatenate(steps, 1)[0, 1:], full[0, 1:], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(steps, 1)[1], full[1], rtol=1e-4, atol=1e-5)


def test_keras_dot_product_attention_path_equals_ours_with_variants(monkeypatch):
    import keras_brainformer.layers.causal_self_attention as attention

    layer = make_layer(VARIANTS["all"])
    x = np.random.default_rng(9).normal(size=(2, 6, 12)).astype("float32")
    mask = np.array([[0, 0, 1, 1, 1, 1], [1] * 6], "int32")
    layer(x)
    randomize(layer, seed=10)
    ours = to_numpy(layer(x, padding_mask=mask))
    monkeypatch.setattr(attention, "uses_keras_attention", lambda: True)
    np.testing.assert_allclose(
        to_numpy(layer(x, padding_mask=mask))[:, 2:], ours[:, 2:], rtol=1e-5, atol=1e-6
    )


def test_attention_variants_are_causal():
    layer = make_layer(VARIANTS["all"])
    x = np.random.default_rng(11).normal(size=(1, 8, 12)).astype("float32")
    y = to_numpy(layer(x))
    for t in range(7):
        x2 = x.copy()
        x2[:, t + 1 :] += 1.0
        np.testing.assert_array_equal(to_numpy(layer(x2))[:, : t + 1], y[:, : t + 1])


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_key_value_heads=0), "num_key_value_heads"),
        (dict(num_key_value_heads=2, depthwise_conv_kernel=3), "num_key_value_heads"),
        (dict(sliding_window=0), "sliding_window"),
        (dict(sliding_window=2.5), "sliding_window"),
        (dict(use_qkv_bias="yes"), "use_qkv_bias"),
        (dict(qk_norm=1), "qk_norm"),
        (dict(rope_scaling_factor=0.5), "rope_scaling_factor"),
        (dict(rope_scaling_factor=float("nan")), "rope_scaling_factor"),
        (dict(rope_scaling_factor=float("inf")), "rope_scaling_factor"),
        (dict(rope_scaling_factor=True), "rope_scaling_factor"),
        (dict(layer_norm_epsilon=-1.0), "layer_norm_epsilon"),
    ],
)
def test_bad_layer_arguments_name_the_field(kwargs, field):
    with pytest.raises((TypeError, ValueError), match=field):
        CausalSelfAttention(num_heads=4, **kwargs)


@pytest.mark.parametrize(
    "fields,name",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(num_key_value_heads=2, depthwise_conv_kernel=3), "num_key_value_heads"),
        (dict(sliding_window=-4), "sliding_window"),
        (dict(qkv_bias=None), "qkv_bias"),
        (dict(qk_norm="true"), "qk_norm"),
    ],
)
def test_bad_spec_fields_name_the_field(fields, name):
    with pytest.raises((TypeError, ValueError), match=name):
        AttentionSpec(num_heads=4, **fields)
    with pytest.raises((TypeError, ValueError), match=name):
        BlockSpec.from_dict({"sublayers": [{"kind": "attention", "num_heads": 4, **fields}]})


def test_spec_round_trip_and_old_dicts():
    spec = AttentionSpec(num_heads=4, num_key_value_heads=2, sliding_window=16, qkv_bias=True,
                         qk_norm=True)
    block = BlockSpec([spec, MoESpec(4, 16)])
    assert BlockSpec.from_json(block.to_json()) == block
    assert spec.kv_heads == 2 and AttentionSpec(num_heads=4).kv_heads == 4
    old = BlockSpec.from_dict({"sublayers": [{"kind": "attention", "num_heads": 4}]})
    assert old.sublayers[0] == AttentionSpec(num_heads=4)
    with pytest.raises(ValueError, match="rope_scaling_factor"):
        BrainformerBackbone(vocabulary_size=8, hidden_dim=8, blocks=block,
                            rope_scaling_factor=0.0)


QWEN_LIKE = BlockSpec(
    [
        AttentionSpec(num_heads=4, head_dim=4, num_key_value_heads=2, qkv_bias=True,
                      qk_norm=True, sliding_window=5),
        MoESpec(4, 16, top_k=2, capacity_factor=None, normalize_gates=False,
                activation="gated_silu"),
    ]
)


def qwen_like_backbone(seed=0):
    keras.utils.set_random_seed(seed)
    backbone = BrainformerBackbone(
        vocabulary_size=64, hidden_dim=16, blocks=QWEN_LIKE, num_layers=2,
        rope_scaling_factor=2.0, tie_embeddings=False, layer_norm_epsilon=1e-5,
    )
    for block in backbone.transformer_blocks:
        for layer in block.attention_layers:
            randomize(layer, seed=seed + 1)
    for w in backbone.token_embedding.weights:
        w.assign(to_numpy(w) * 25.0)
    return backbone


def inputs(batch=2, length=10, seed=12):
    ids = np.random.default_rng(seed).integers(1, 64, size=(batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def test_weight_specs_and_layout_map_cover_every_variant_weight():
    backbone = qwen_like_backbone()
    specs = weight_specs(backbone.get_config())
    assert {p: s.shape for p, s in specs.items()} == {
        v.path: tuple(v.shape) for v in backbone.weights
    }
    assert specs["block_0/0_attention/w_key"].shape == (16, 2, 4)
    assert specs["block_0/0_attention/b_key"].shape == (2, 4)
    assert specs["block_0/0_attention/query_norm"].shape == (4,)
    mesh = keras.distribution.DeviceMesh((1, 1, 1), ("batch", "expert", "model"),
                                         keras.distribution.list_devices()[:1])
    layout_map = get_layout_map(mesh)
    for path in specs:
        assert len(match_rule(path)) == 1, (path, match_rule(path))
        assert layout_map[path] is not None, path
    assert layout_map["block_0/0_attention/b_query"].axes == ("model", None)
    assert layout_map["block_0/0_attention/key_norm"].axes == (None,)


def test_backbone_with_variants_saves_reloads_and_adapts(tmp_path):
    backbone = qwen_like_backbone()
    x = inputs()
    before = to_numpy(inference_call(backbone)(x))
    path = str(tmp_path / "qwen_like.keras")
    backbone.save(path)
    restored = keras.saving.load_model(path)
    assert restored.get_config() == backbone.get_config()
    np.testing.assert_array_equal(to_numpy(inference_call(restored)(x)), before)
    # LoRA reaches the grouped key/value projections; int8 keeps the function.
    restored.enable_lora(2)
    attention = restored.transformer_blocks[0].attention_layers[0]
    assert tuple(attention.w_key_lora_b.shape) == (2, 8)
    np.testing.assert_allclose(to_numpy(inference_call(restored)(x)), before, atol=1e-5)
    backbone.quantize("int8")
    quantized = to_numpy(inference_call(backbone)(x))
    assert np.abs(quantized - before).max() < 0.1 * np.abs(before).max()


def test_causal_lm_with_variants_generates_like_full_passes():
    backbone = qwen_like_backbone()
    lm = BrainformerCausalLM(backbone)
    lm.compile(sampler="greedy")
    token_ids = np.zeros((2, 9), "int32")
    mask = np.zeros((2, 9), "int32")
    token_ids[0, :3], mask[0, :3] = [5, 9, 2], 1
    token_ids[1, :4], mask[1, :4] = [7, 1, 3, 8], 1
    out = to_numpy(lm.generate({"token_ids": token_ids, "padding_mask": mask},
                               stop_token_ids=None)["token_ids"])
    forward = inference_call(lm)
    expected = token_ids.copy()
    for index in range(3, 9):
        logits = to_numpy(forward({"token_ids": expected, "padding_mask": np.ones_like(expected)}))
        best = logits[:, index - 1].argmax(-1)
        expected[:, index] = np.where(mask[:, index].astype(bool), expected[:, index], best)
    np.testing.assert_array_equal(out, expected)
    assert json.loads(json.dumps(backbone.get_config()))["rope_scaling_factor"] == 2.0


def test_a_model_axis_that_does_not_divide_the_key_value_heads_is_refused_by_name():
    config = {"vocabulary_size": 64, "hidden_dim": 16, "blocks": QWEN_LIKE.to_dict(),
              "num_layers": 1}
    shards = shard_weights(config, {"batch": 1, "model": 2})
    assert shards["block_0/0_attention/w_key"].local_shape == (16, 1, 4)
    with pytest.raises(ValueError, match=r"block_0/0_attention/w_key.*'model' of size 4"):
        shard_weights(config, {"batch": 1, "model": 4})

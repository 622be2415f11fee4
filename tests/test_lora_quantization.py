"""LoRA adapters and int8 quantization reach attention, dense FFN and expert
kernels (`layers/adaptable_kernels.py`): exact maths on hand-checkable layers,
then every tiny family end to end (quantize, generate, save/load, LoRA fit)."""

import keras
import numpy as np
import pytest
from conftest import TINY_PRESETS
from conftest import to_numpy
from keras import ops
from keras_hub.layers import RotaryEmbedding

from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.layers import FeedForward
from keras_brainformer.layers.adaptable_kernels import AdaptableKernels
from keras_brainformer.layers.experts import ExpertBank
from keras_brainformer.layers.rotary import apply_rotary
from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone
from keras_brainformer.models.brainformer.brainformer_causal_lm import BrainformerCausalLM


def _ids(batch=2, length=12, vocab=200, seed=0):
    rng = np.random.RandomState(seed)
    return {
        "token_ids": rng.randint(1, vocab, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }


def _lm(preset):
    keras.utils.set_random_seed(7)
    return BrainformerCausalLM.from_preset(preset, preprocessor=None)


def _layers(model, cls=AdaptableKernels):
    return [
        layer for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, cls)
    ]


# --- RoPE as a function ------------------------------------------------------


@pytest.mark.parametrize("start", [0, 5])
def test_apply_rotary_equals_keras_hub_rotary_embedding(start):
    x = np.random.RandomState(0).randn(2, 7, 3, 8).astype("float32")
    expected = RotaryEmbedding(max_wavelength=500)(x, start_index=start)
    got = apply_rotary(x, start, 500)
    np.testing.assert_allclose(to_numpy(got), to_numpy(expected), atol=1e-6)


def test_attention_is_a_leaf_layer_so_model_quantize_reaches_it():
    attn = CausalSelfAttention(num_heads=2, dropout=0.1)
    attn.build((None, None, 8))
    assert list(attn._flatten_layers()) == [attn]


# --- exact maths on single layers ----------------------------------------------


def _reference_int8(x, w):
    """Keras' int8 scheme in NumPy: abs-max per input row and per weight
    output column, int matmul, rescale."""
    x_scale = 127.0 / (np.abs(x).max(axis=-1, keepdims=True) + 1e-7)
    w_scale = 127.0 / (np.abs(w).max(axis=-2, keepdims=True) + 1e-7)
    x_q = np.clip(np.round(x * x_scale), -127, 127)
    w_q = np.clip(np.round(w * w_scale), -127, 127)
    return (x_q @ w_q) / (x_scale * w_scale)


def test_int8_feed_forward_equals_numpy_reference_and_grad_uses_dequantized_kernel():
    rng = np.random.RandomState(1)
    x = rng.randn(3, 5, 6).astype("float32")
    ffn = FeedForward(intermediate_dim=10, activation="relu")
    ffn.build(x.shape)
    w_in, w_out = to_numpy(ffn.w_in), to_numpy(ffn.w_out)
    ffn.quantize("int8")
    assert ffn.quantization_mode == "int8"
    assert str(ffn.w_in.dtype) == "int8" and str(ffn.w_out.dtype) == "int8"
    assert not ffn.trainable_weights
    h = np.maximum(_reference_int8(x.reshape(-1, 6), w_in), 0)
    expected = _reference_int8(h, w_out).reshape(3, 5, 6)
    np.testing.assert_allclose(to_numpy(ffn(x)), expected, rtol=1e-5, atol=1e-5)
    # int8 rounding error is small against the float layer (a few %).
    float_out = np.maximum(x @ w_in, 0) @ w_out
    error = np.abs(expected - float_out).max() / np.abs(float_out).max()
    assert 0 < error < 0.05


def test_int8_gradient_with_respect_to_inputs_is_the_straight_through_one():
    if keras.backend.backend() not in ("jax", "tensorflow"):
        pytest.skip("gradient check written for jax and tensorflow")
    rng = np.random.RandomState(2)
    x = rng.randn(4, 6).astype("float32")
    ffn = FeedForward(intermediate_dim=5, activation="relu")
    ffn.build(x.shape)
    ffn.quantize("int8")
    w_in = to_numpy(ffn.w_in).astype("float32") / to_numpy(ffn.w_in_scale)[0]
    upstream = rng.randn(4, 5).astype("float32")

    def f(x):
        return ops.sum(ffn._project("w_in", x) * upstream)

    if keras.backend.backend() == "jax":
        import jax

        grad = jax.grad(f)(x)
    else:
        import tensorflow as tf

        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            y = f(xt)
        grad = tape.gradient(y, xt)
    np.testing.assert_allclose(to_numpy(grad), upstream @ w_in.T, rtol=1e-5, atol=1e-5)


def test_int8_expert_bank_scales_each_expert_on_its_own():
    rng = np.random.RandomState(3)
    bank = ExpertBank(num_experts=3, intermediate_dim=4, activation="relu")
    x = rng.randn(3, 2, 5, 6).astype("float32")
    bank.build(x.shape)
    # Expert 1 has weights 1000x larger: with a shared scale the other
    # experts would round to zero.
    bank.w_in.assign(to_numpy(bank.w_in) * np.array([1, 1000, 1])[:, None, None])
    w_in, w_out = to_numpy(bank.w_in), to_numpy(bank.w_out)
    bank.quantize("int8")
    assert tuple(bank.w_in_scale.shape) == (3, 1, 4)
    got = to_numpy(bank(x))
    xs = x.reshape(3, 10, 6)
    expected = np.stack(
        [
            _reference_int8(np.maximum(_reference_int8(xs[e], w_in[e]), 0), w_out[e])
            for e in range(3)
        ]
    ).reshape(x.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(got[0]).max() > 0 and np.abs(got[2]).max() > 0


def test_quantize_replaces_the_float_kernels_without_keeping_them_tracked():
    """`quantize` drops each float kernel through Keras' untracking (not
    `delattr`, whose per-variable `gc.collect()` made quantizing a tiny model
    take 16 s): the old variables must be gone from every weight list."""
    ffn = FeedForward(intermediate_dim=8, activation="gated_gelu")
    ffn.build((None, 4))
    old = {name: getattr(ffn, name) for name in ("w_in", "w_gate", "w_out")}
    ffn.quantize("int8")
    ids = {id(v) for v in ffn.weights + ffn.trainable_weights + ffn.non_trainable_weights}
    assert not ids & {id(v) for v in old.values()}
    paths = [v.path for v in ffn.weights]
    assert len(paths) == len(set(paths))
    for name in old:
        assert getattr(ffn, name).dtype == "int8"
        assert f"{name}_scale" in {p.rsplit("/", 1)[-1] for p in paths}
    assert ffn.trainable_weights == []


def _effective(layer, name):
    """`W + (alpha / r) A·B` in the kernel's own shape."""
    shape, batch_dims, in_dims = layer._kernel_specs[name]
    a = to_numpy(getattr(layer, f"{name}_lora_a"))
    b = to_numpy(getattr(layer, f"{name}_lora_b"))
    return to_numpy(getattr(layer, name)) + layer._lora_scale() * (a @ b).reshape(shape)


@pytest.mark.parametrize("kind", ["ffn", "experts", "attention"])
def test_lora_output_equals_layer_with_merged_kernels(kind):
    rng = np.random.RandomState(4)
    if kind == "ffn":
        layer, shape = FeedForward(intermediate_dim=8, activation="gated_gelu"), (2, 5, 6)
    elif kind == "experts":
        layer = ExpertBank(num_experts=3, intermediate_dim=8, activation="swiglu")
        shape = (3, 2, 4, 6)
    else:
        layer, shape = CausalSelfAttention(num_heads=2, depthwise_conv_kernel=3), (2, 5, 8)
    x = rng.randn(*shape).astype("float32")
    before = to_numpy(layer(x))
    layer.enable_lora(3, lora_alpha=6)
    # B starts at zero: the function is unchanged, only adapters train.
    np.testing.assert_allclose(to_numpy(layer(x)), before, atol=1e-6)
    trainable = {w.name for w in layer.trainable_weights}
    assert trainable == {
        f"{n}_lora_{p}" for n in layer._kernel_specs for p in "ab"
    } | ({"conv_query", "conv_key", "conv_value"} if kind == "attention" else set())
    for name in layer._kernel_specs:
        b = getattr(layer, f"{name}_lora_b")
        b.assign(rng.randn(*b.shape).astype("float32"))
    if kind == "experts":
        assert tuple(layer.w_in_lora_a.shape) == (3, 6, 3)
        assert tuple(layer.w_in_lora_b.shape) == (3, 3, 8)
    reference = layer.__class__.from_config(
        {**layer.get_config(), "lora_rank": None, "lora_alpha": None}
    )
    reference.build(x.shape)
    for name in layer._kernel_specs:
        getattr(reference, name).assign(_effective(layer, name))
    for name in ("conv_query", "conv_key", "conv_value"):
        if hasattr(layer, name):
            getattr(reference, name).assign(to_numpy(getattr(layer, name)))
    got, expected = to_numpy(layer(x)), to_numpy(reference(x))
    # float32 rounding relative to the output's scale (attention outputs
    # reach ~40 here, so a near-zero entry can differ by ~5e-5 in absolute
    # terms: A·B applied separately vs merged into W).
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_lora_and_quantize_errors_are_clear():
    ffn = FeedForward(intermediate_dim=4)
    with pytest.raises(ValueError, match="before it is built"):
        ffn.enable_lora(2)
    ffn.build((None, 3))
    with pytest.raises(ValueError, match="rank"):
        ffn.enable_lora(0)
    with pytest.raises(ValueError, match="lora_alpha"):
        ffn.enable_lora(2, lora_alpha=-1)
    ffn.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled"):
        ffn.enable_lora(2)
    with pytest.raises(NotImplementedError, match="int8"):
        ffn.quantize("int4")
    ffn.quantize("int8")
    with pytest.raises(ValueError, match="already quantized"):
        ffn.quantize("int8")
    with pytest.raises(ValueError, match="lora_alpha"):
        FeedForward(intermediate_dim=4, lora_alpha=2)


def test_single_layer_config_round_trip_keeps_lora_and_saved_kernels_are_merged(
    tmp_path,
):
    rng = np.random.RandomState(5)
    x = rng.randn(2, 4, 6).astype("float32")
    inputs = keras.Input((4, 6))
    model = keras.Model(inputs, FeedForward(intermediate_dim=8, name="ffn")(inputs))
    ffn = model.get_layer("ffn")
    ffn.enable_lora(2)
    ffn.w_in_lora_b.assign(rng.randn(2, 8).astype("float32"))
    expected = to_numpy(model(x))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    loaded_ffn = loaded.get_layer("ffn")
    assert loaded_ffn.lora_enabled and loaded_ffn.lora_rank == 2
    # The merged kernel holds the adaptation; B is reset to zero.
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, rtol=1e-5, atol=1e-5)
    assert not np.any(to_numpy(loaded_ffn.w_in_lora_b))


# --- every family ------------------------------------------------------------------


def _one_fast(presets, fast="brainformer1_tiny"):
    """brainformer1_tiny has every sublayer kind (attention, dense FFN,
    top-k and expert-choice MoE) in the fast tier; the other families run
    in the slow tier."""
    return [p if p == fast else pytest.param(p, marks=pytest.mark.slow) for p in presets]


@pytest.mark.parametrize("preset", _one_fast(TINY_PRESETS))
def test_quantize_int8_every_family(preset, tmp_path):
    lm = _lm(preset)
    x = _ids()
    before = to_numpy(lm.predict_on_batch(x))
    lm.quantize("int8")
    layers = _layers(lm.backbone)
    assert layers and all(layer.quantization_mode == "int8" for layer in layers)
    kinds = {type(layer).__name__ for layer in layers}
    if lm.backbone.moe_layers:
        assert "ExpertBank" in kinds
    for layer in layers:
        for name in layer._kernel_specs:
            assert str(getattr(layer, name).dtype) == "int8"
    embedding = lm.backbone.token_embedding
    assert embedding.quantization_mode == "int8"
    after = to_numpy(lm.predict_on_batch(x))
    assert np.all(np.isfinite(after))
    # Per token, the largest logit change relative to the largest logit.
    change = np.abs(after - before).max(-1).reshape(-1) / np.abs(before).max()
    assert change.max() > 0
    if lm.backbone.moe_layers:
        # int8 rounding can flip a token's discrete routing, which changes
        # that token's output wholesale (max 0.03-1.22 over seeds 7-12, with
        # the router scale before issue 33 too: 0.04-0.86); the typical token
        # keeps close: median 0.021-0.038 over the four MoE families and
        # seeds 7-12 (JAX).
        assert np.median(change) < 0.1, change
    else:
        # dense_tiny / primer_tiny, seeds 7-9: 0.034-0.066.
        assert change.max() < 0.25, change
    # Cached generation runs on the quantized kernels.
    out = lm.generate(
        {"token_ids": x["token_ids"][:1], "padding_mask": np.array([[1] * 4 + [0] * 8])},
        max_length=12,
        stop_token_ids=None,
    )
    assert np.all(to_numpy(out["token_ids"])[:, :4] == x["token_ids"][:1, :4])
    # A saved quantized model reloads quantized, with the same outputs.
    path = str(tmp_path / "q.keras")
    lm.save(path)
    loaded = keras.saving.load_model(path)
    assert all(layer.quantization_mode == "int8" for layer in _layers(loaded.backbone))
    np.testing.assert_allclose(
        to_numpy(loaded.predict_on_batch(x)), after, rtol=1e-5, atol=1e-5
    )


def _kernels(backbone):
    return {
        f"{layer.path}/{name}": to_numpy(getattr(layer, name))
        for layer in _layers(backbone)
        for name in layer._kernel_specs
    }


@pytest.mark.parametrize("preset", _one_fast(["brainformer1_tiny", "glam_tiny", "dense_tiny"]))
def test_backbone_enable_lora_trains_adapters_only_and_round_trips(preset, tmp_path):
    lm = _lm(preset)
    backbone = lm.backbone
    x = _ids()
    backbone.enable_lora(4)
    adapted = {type(layer).__name__ for layer in _layers(backbone) if layer.lora_enabled}
    expected = {"CausalSelfAttention", "FeedForward"}
    if backbone.moe_layers:
        expected.add("ExpertBank")
    assert adapted == expected
    assert all("_lora_" in w.path for w in backbone.trainable_weights)
    kernels = _kernels(backbone)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = lm.fit(x, x["token_ids"], epochs=6, verbose=0).history["loss"]
    assert history[-1] < history[0]
    for key, value in _kernels(backbone).items():
        np.testing.assert_array_equal(value, kernels[key], err_msg=key)
    tuned = to_numpy(lm.predict_on_batch(x))

    # Adapters alone, into a fresh copy of the base model.
    backbone.save_lora_weights(str(tmp_path / "a.lora.h5"))
    fresh = _lm(preset)
    fresh.backbone.load_lora_weights(str(tmp_path / "a.lora.h5"))
    np.testing.assert_allclose(
        to_numpy(fresh.predict_on_batch(x)), tuned, rtol=1e-4, atol=1e-5
    )
    # Whole model: saved merged, reloads without LoRA, same function.
    lm.save(str(tmp_path / "lm.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "lm.keras"))
    assert not any(layer.lora_enabled for layer in _layers(loaded.backbone))
    np.testing.assert_allclose(
        to_numpy(loaded.predict_on_batch(x)), tuned, rtol=1e-4, atol=1e-5
    )


def test_load_lora_weights_rejects_a_mismatched_file_before_assigning(tmp_path):
    lm = _lm("glam_tiny")
    lm.backbone.enable_lora(2)
    lm.backbone.save_lora_weights(str(tmp_path / "glam.lora.h5"))
    other = _lm("dense_tiny")
    other.backbone.enable_lora(2)
    before = {w.path: to_numpy(w) for w in other.backbone.trainable_weights}
    with pytest.raises(ValueError, match="does not match|shape"):
        other.backbone.load_lora_weights(str(tmp_path / "glam.lora.h5"))
    for w in other.backbone.trainable_weights:
        np.testing.assert_array_equal(to_numpy(w), before[w.path])
    with pytest.raises(ValueError, match="rank"):
        third = _lm("glam_tiny")
        third.backbone.enable_lora(3)
        third.backbone.load_lora_weights(str(tmp_path / "glam.lora.h5"))
    with pytest.raises(ValueError, match=r"\.lora\.h5"):
        lm.backbone.save_lora_weights(str(tmp_path / "x.h5"))


def test_lora_on_an_int8_model_trains_qlora_style():
    lm = _lm("glam_tiny")
    x = _ids()
    lm.quantize("int8")
    lm.backbone.enable_lora(4)
    assert all("_lora_" in w.path for w in lm.backbone.trainable_weights)
    kernels = _kernels(lm.backbone)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    history = lm.fit(x, x["token_ids"], epochs=6, verbose=0).history["loss"]
    assert np.all(np.isfinite(history)) and history[-1] < history[0]
    for key, value in _kernels(lm.backbone).items():
        np.testing.assert_array_equal(value, kernels[key], err_msg=key)


def test_backbone_default_lora_names_cover_every_adaptable_layer():
    keras.utils.set_random_seed(0)
    backbone = BrainformerBackbone.from_preset("brainformer1_tiny")
    names = set(backbone.default_lora_layer_names())
    assert names == {layer.name for layer in _layers(backbone)}
    assert "experts" in names


@pytest.mark.parametrize("tie", [True, False])
def test_int8_token_embedding_output_projection_matches_keras_and_passes_gradients(tie):
    from keras_brainformer.layers.reversible_embedding import ReversibleEmbedding

    rng = np.random.RandomState(6)
    h = rng.randn(2, 3, 4).astype("float32")
    ours = ReversibleEmbedding(input_dim=9, output_dim=4, tie_weights=tie)
    keras_layer = keras.layers.ReversibleEmbedding(input_dim=9, output_dim=4, tie_weights=tie)
    for layer in (ours, keras_layer):
        layer.build((None,))
    keras_layer.set_weights(ours.get_weights())
    ours.quantize("int8")
    keras_layer.quantize("int8", type_check=False)
    np.testing.assert_allclose(
        to_numpy(ours(h, reverse=True)), to_numpy(keras_layer(h, reverse=True)), atol=1e-5
    )
    if keras.backend.backend() == "jax":
        import jax

        grad = jax.grad(lambda h: ops.sum(ours(h, reverse=True) ** 2))(h)
        assert np.abs(to_numpy(grad)).max() > 0


def test_task_quantize_works_straight_after_from_preset_with_a_preprocessor():
    keras.utils.set_random_seed(0)
    lm = BrainformerCausalLM.from_preset("glam_tiny")
    assert lm.preprocessor is not None
    lm.quantize("int8")
    assert lm.backbone.token_embedding.quantization_mode == "int8"
    assert isinstance(lm.generate("def ", max_length=8), str)

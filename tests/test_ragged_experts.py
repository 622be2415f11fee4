"""The ragged (grouped-matmul) dropless path of MoEFeedForward equals the slot
path: outputs, auxiliary losses, router statistics and gradients; when it is
selected; its config and errors."""

import types

import keras
import numpy as np
import pytest
from conftest import MOE_PAIR_SHAPE
from conftest import assert_path_taken_and_equal_to_slots
from conftest import moe_pair
from conftest import moe_pair_inputs
from conftest import to_numpy

from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import ragged_experts

jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the ragged path is JAX only"
)

SHAPE = MOE_PAIR_SHAPE


def _pair(num_experts, router_kwargs, activation="gelu", group_size=None,
          router="top_k"):
    """A slot-path layer and a ragged-path layer with the same weights."""
    return moe_pair("ragged", num_experts, router_kwargs, activation, group_size, router)


_inputs = moe_pair_inputs


def _step(layer, x, mask, training):
    """Jitted `(loss, (y, losses, stats)), (weight grads, input grad)` of
    `sum(y²) + aux losses`, through `stateless_call`."""
    import jax

    non_trainable = [v.value for v in layer.non_trainable_variables]

    def loss_fn(trainable, x):
        y, new_non_trainable, losses = layer.stateless_call(
            trainable,
            non_trainable,
            x,
            padding_mask=mask,
            training=training,
            return_losses=True,
        )
        total = jax.numpy.sum(y**2) + sum(losses)
        return total, (y, losses, new_non_trainable)

    trainable = [v.value for v in layer.trainable_variables]
    fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
    return fn(trainable, x)


CASES = [
    # (E, router kwargs, activation, group_size)
    (2, {"k": 1, "capacity_factor": None}, "gelu", None),
    (4, {"k": 1, "capacity_factor": None}, "gated_silu", 8),
    (4, {"k": 2, "capacity_factor": None}, "gelu", 8),
    (4, {"k": 2, "capacity_factor": None}, "gated_gelu", None),
    (8, {"k": 2, "capacity_factor": None, "z_loss_weight": 1e-3}, "relu", 4),
    (8, {"k": 2, "capacity_factor": None, "normalize_gates": False}, "squared_relu", None),
]


@jax_only
@pytest.mark.parametrize("num_experts,router_kwargs,activation,group_size", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_ragged_equals_slots_outputs_losses_statistics_gradients(
    num_experts, router_kwargs, activation, group_size, training
):
    x, mask = _inputs()
    slots, ragged = _pair(num_experts, router_kwargs, activation, group_size)
    (loss_s, (y_s, losses_s, nt_s)), (g_s, gx_s) = _step(slots, x, mask, training)
    (loss_r, (y_r, losses_r, nt_r)), (g_r, gx_r) = _step(ragged, x, mask, training)

    y_s, y_r = to_numpy(y_s), to_numpy(y_r)
    np.testing.assert_allclose(y_r, y_s, rtol=1e-5, atol=1e-6)
    assert np.abs(y_s).max() > 0
    np.testing.assert_array_equal(y_r[1, 11:], 0.0)  # padding gets no expert output
    np.testing.assert_allclose(float(loss_r), float(loss_s), rtol=1e-5)
    assert len(losses_r) == len(losses_s) == (2 if training and "z_loss_weight" in router_kwargs
                                              else 1 if training else 0)
    for a, b in zip(losses_r, losses_s):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6)
    for a, b in zip(nt_r, nt_s):  # router statistics
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7)
    names = [v.path.split("/")[-2] + "/" + v.name for v in slots.trainable_variables]
    assert len(g_s) == len(g_r) == len(names)
    for name, a, b in zip(names, g_r, g_s):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-6,
                                   err_msg=name)
        assert np.abs(to_numpy(b)).max() > 0, name
    np.testing.assert_allclose(to_numpy(gx_r), to_numpy(gx_s), rtol=1e-4, atol=1e-6)


@jax_only
@pytest.mark.parametrize(
    "router,router_kwargs",
    [
        ("top_k", {"k": 2, "capacity_factor": 1.0}),
        ("expert_choice", {"capacity_factor": 2.0}),
    ],
)
def test_ragged_serves_causal_inference_routing(router, router_kwargs, monkeypatch):
    """The causal inference routing is dropless token choice: it takes the
    ragged path (even for routers that drop in training) and matches."""
    x, mask = _inputs(1)
    slots, ragged = _pair(4, router_kwargs, "gated_relu", router=router)
    assert_path_taken_and_equal_to_slots(
        monkeypatch, ragged_experts, "ragged_experts_combine", ragged, slots, x, mask
    )


def _forbid_ragged(monkeypatch):
    def fail(*args):
        raise AssertionError("the ragged path must not run here")

    monkeypatch.setattr(ragged_experts, "ragged_experts_combine", fail)


@jax_only
def test_routing_that_drops_keeps_the_slot_path(monkeypatch):
    x, mask = _inputs()
    _, ragged = _pair(4, {"k": 2, "capacity_factor": 1.0})
    _, reference = _pair(4, {"k": 2, "capacity_factor": None})
    _forbid_ragged(monkeypatch)
    ragged(x, padding_mask=mask, training=True)  # C < S: slots
    ragged(x, causal=False)  # as trained at inference: C < S: slots
    one_hot = MoEFeedForward.from_config(
        {**reference.get_config(), "dispatch": "one_hot"}
    )
    one_hot(x, training=True)  # the one-hot reference never goes ragged


@jax_only
@pytest.mark.parametrize("adapt", ["lora", "int8"])
def test_lora_or_quantized_bank_keeps_the_slot_path(adapt, monkeypatch):
    x, _ = _inputs()
    slots, ragged = _pair(4, {"k": 2, "capacity_factor": None})
    for layer in (slots, ragged):
        if adapt == "lora":
            layer.experts.enable_lora(2, b_initializer="ones")
        else:
            try:
                layer.experts.quantize("int8")
            except NotImplementedError as error:  # depends on the Keras version
                pytest.skip(f"int8 quantization unavailable: {error}")
    ragged.set_weights(slots.get_weights())
    assert not ragged_experts.bank_supports_ragged(ragged.experts)
    y_s = to_numpy(slots(x, training=True))
    _forbid_ragged(monkeypatch)
    np.testing.assert_allclose(to_numpy(ragged(x, training=True)), y_s, rtol=1e-6)


@pytest.mark.parametrize(
    "attribute,value", [("quantization_mode", "int8"), ("lora_enabled", True)]
)
def test_adapted_bank_is_never_read_raw(attribute, value, monkeypatch):
    """The selection itself: an int8 or LoRA bank never takes the ragged path,
    whatever `dropless_impl` says."""
    x, _ = _inputs()
    layer = MoEFeedForward(4, 8, router_kwargs={"capacity_factor": None},
                           dropless_impl="slots")
    layer.build(SHAPE)
    layer.dropless_impl = "ragged"  # skip the constructor's backend check
    routing = layer.router(x, training=True)
    assert layer._uses_ragged(routing, SHAPE[1])
    if attribute == "quantization_mode":  # a read-only Layer property
        monkeypatch.setattr(
            type(layer.experts), attribute, property(lambda self: value)
        )
    else:
        monkeypatch.setattr(layer.experts, attribute, value)
    assert not layer._uses_ragged(routing, SHAPE[1])


def test_bank_supports_ragged():
    plain = types.SimpleNamespace(quantization_mode=None)
    assert ragged_experts.bank_supports_ragged(plain)
    assert not ragged_experts.bank_supports_ragged(
        types.SimpleNamespace(quantization_mode="int8")
    )
    assert not ragged_experts.bank_supports_ragged(
        types.SimpleNamespace(quantization_mode=None, lora_enabled=True)
    )
    layer = MoEFeedForward(4, 8, router_kwargs={"capacity_factor": None})
    layer.build(SHAPE)
    assert ragged_experts.bank_supports_ragged(layer.experts)


@jax_only
def test_auto_picks_ragged_on_tpu_only(monkeypatch):
    import jax

    x, _ = _inputs()
    slots, _ = _pair(4, {"k": 2, "capacity_factor": None})
    auto = MoEFeedForward.from_config({**slots.get_config(), "dropless_impl": "auto"})
    auto.build(SHAPE)
    auto.set_weights(slots.get_weights())
    assert jax.default_backend() != "cpu" or not ragged_experts.ragged_is_default()
    for platform in ("cpu", "gpu", "cuda"):
        monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
        assert not ragged_experts.ragged_is_default()
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert ragged_experts.ragged_is_default()
    calls = []
    original = ragged_experts.ragged_experts_combine
    monkeypatch.setattr(
        ragged_experts,
        "ragged_experts_combine",
        lambda *a: calls.append(1) or original(*a),
    )
    y = to_numpy(auto(x, training=True))
    assert calls
    np.testing.assert_allclose(
        y, to_numpy(slots(x, training=True)), rtol=1e-5, atol=1e-6
    )
    with keras.distribution.DataParallel(devices=jax.devices()).scope():
        assert not ragged_experts.ragged_is_default()


def test_auto_is_slots_off_jax(monkeypatch):
    monkeypatch.setattr(keras.config, "backend", lambda: "tensorflow")
    assert not ragged_experts.ragged_is_default()


@jax_only
def test_ragged_under_mixed_bfloat16():
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, mask = _inputs()
    slots, ragged = _pair(4, {"k": 2, "capacity_factor": None}, "gated_silu")
    y_s = to_numpy(slots(x, padding_mask=mask, training=True)).astype("float32")
    y_r = ragged(x, padding_mask=mask, training=True)
    assert str(y_r.dtype) == "bfloat16"
    np.testing.assert_allclose(to_numpy(y_r).astype("float32"), y_s, rtol=2e-2, atol=2e-3)


def test_config_round_trip():
    for impl in ("auto", "slots") + (("ragged",) if keras.backend.backend() == "jax" else ()):
        layer = MoEFeedForward(4, 8, router_kwargs={"capacity_factor": None},
                               dropless_impl=impl)
        config = layer.get_config()
        assert config["dropless_impl"] == impl
        assert MoEFeedForward.from_config(config).dropless_impl == impl
    assert MoEFeedForward(4, 8).dropless_impl == "auto"
    restored = keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(
            MoEFeedForward(4, 8, dropless_impl="slots")
        )
    )
    assert restored.dropless_impl == "slots"


@pytest.mark.parametrize("value", ["grouped", "", None, 1])
def test_unknown_dropless_impl_is_rejected(value):
    with pytest.raises(ValueError, match="dropless_impl") as error:
        MoEFeedForward(4, 8, dropless_impl=value)
    message = str(error.value)
    assert repr(value) in message
    assert all(name in message for name in ("auto", "ragged", "slots"))


def test_ragged_off_jax_is_rejected(monkeypatch):
    if keras.backend.backend() == "jax":
        monkeypatch.setattr(keras.config, "backend", lambda: "tensorflow")
    with pytest.raises(ValueError, match="dropless_impl.*JAX") as error:
        MoEFeedForward(4, 8, dropless_impl="ragged")
    assert "'tensorflow'" in str(error.value) or keras.backend.backend() in str(error.value)

"""The ragged (grouped-matmul) dropless path of MoEFeedForward: when it is
selected (LoRA and int8 banks keep the slot path); its config and errors.
That it equals the slot path (outputs, auxiliary losses, router statistics
and gradients) is tested with the other dropless paths in
test_dropless_paths.py."""

import types

import keras
import numpy as np
import pytest
from conftest import MOE_PAIR_SHAPE
from conftest import moe_pair
from conftest import moe_pair_inputs
from conftest import to_numpy

from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import ragged_experts

jax_only = pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the ragged path is JAX only"
)

SHAPE = MOE_PAIR_SHAPE


def _pair(num_experts, router_options, activation="gelu", group_size=None,
          router="top_k"):
    """A slot-path layer and a ragged-path layer with the same weights."""
    return moe_pair("ragged", num_experts, router_options, activation, group_size, router)


_inputs = moe_pair_inputs


def _forbid_ragged(monkeypatch):
    def fail(*args):
        raise AssertionError("the ragged path must not run here")

    monkeypatch.setattr(ragged_experts, "ragged_experts_combine", fail)


@jax_only
@pytest.mark.parametrize("adapt", ["lora", "int8"])
def test_lora_or_quantized_bank_keeps_the_slot_path(adapt, monkeypatch):
    x, _ = _inputs()
    slots, ragged = _pair(4, {"top_k": 2, "capacity_factor": None})
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
    layer = MoEFeedForward(4, 8, capacity_factor=None,
                           dropless_impl="slots")
    layer.build(SHAPE)
    layer.dropless_impl = "ragged"  # skip the constructor's backend check
    routing = layer.router(x, training=True)
    assert layer.expert_path(routing, SHAPE[1], None) == "ragged"
    if attribute == "quantization_mode":  # a read-only Layer property
        monkeypatch.setattr(
            type(layer.experts), attribute, property(lambda self: value)
        )
    else:
        monkeypatch.setattr(layer.experts, attribute, value)
    assert layer.expert_path(routing, SHAPE[1], None) == "slots"


def test_bank_supports_ragged():
    plain = types.SimpleNamespace(quantization_mode=None)
    assert ragged_experts.bank_supports_ragged(plain)
    assert not ragged_experts.bank_supports_ragged(
        types.SimpleNamespace(quantization_mode="int8")
    )
    assert not ragged_experts.bank_supports_ragged(
        types.SimpleNamespace(quantization_mode=None, lora_enabled=True)
    )
    layer = MoEFeedForward(4, 8, capacity_factor=None)
    layer.build(SHAPE)
    assert ragged_experts.bank_supports_ragged(layer.experts)


@jax_only
def test_auto_picks_ragged_on_tpu_only(monkeypatch):
    import jax

    x, _ = _inputs()
    slots, _ = _pair(4, {"top_k": 2, "capacity_factor": None})
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


def test_config_round_trip():
    for impl in ("auto", "slots") + (("ragged",) if keras.backend.backend() == "jax" else ()):
        layer = MoEFeedForward(4, 8, capacity_factor=None,
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

"""MoEFeedForward: index dispatch == one-hot reference, sparsity, gradients,
padding, dtypes, serialisation."""

import json
import re

import keras
import numpy as np
import pytest
from conftest import compiled_call
from conftest import rewrite_keras_config
from conftest import to_numpy
from keras import ops

from keras_brainformer.layers import ExpertBank
from keras_brainformer.layers import ExpertChoiceRouter
from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import TopKRouter
from keras_brainformer.layers import dispatch as dispatch_lib
from keras_brainformer.layers.moe_feed_forward import ROUTER_OPTION_NAMES
from keras_brainformer.layers.routers import ROUTER_OPTIONS

ROUTER_CASES = [
    ("top_k", {"top_k": 1, "capacity_factor": 1.0}),
    ("top_k", {"top_k": 2, "capacity_factor": 1.25}),
    ("top_k", {"top_k": 2, "capacity_factor": 0.5}),
    ("top_k", {"top_k": 2, "capacity_factor": None}),
    ("top_k", {"top_k": 3, "capacity_factor": 1.0, "batch_prioritized": True}),
    ("expert_choice", {"capacity_factor": 1.0}),
    ("expert_choice", {"capacity_factor": 2.0}),
    ("expert_choice", {"capacity_factor": 0.25}),
]


def _pair(router, kwargs, activation="gelu", group_size=None, shape=(2, 16, 8)):
    layer = MoEFeedForward(
        num_experts=4,
        intermediate_dim=12,
        router=router,
        **kwargs,
        activation=activation,
        group_size=group_size,
    )
    layer.build(shape)
    reference = MoEFeedForward.from_config({**layer.get_config(), "dispatch": "one_hot"})
    reference.build(shape)
    reference.set_weights(layer.get_weights())
    return layer, reference


@pytest.mark.parametrize("router,kwargs", ROUTER_CASES)
@pytest.mark.parametrize("training", [False, True])
def test_index_dispatch_matches_one_hot_reference(router, kwargs, training):
    x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype("float32")
    mask = np.ones((2, 16), "int32")
    mask[1, 11:] = 0
    layer, reference = _pair(router, kwargs, activation="gated_silu", group_size=8)
    # Compiled on JAX (16 cases); the other tests here call the layer eagerly.
    y = to_numpy(compiled_call(layer, training)(x, padding_mask=mask))
    y_ref = to_numpy(compiled_call(reference, training)(x, padding_mask=mask))
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    assert np.abs(y).max() > 0


@pytest.mark.parametrize("router,kwargs", ROUTER_CASES[:2] + ROUTER_CASES[5:6])
def test_gradients_match_reference_and_reach_router_and_experts(router, kwargs):
    x = np.random.default_rng(1).normal(size=(2, 16, 8)).astype("float32")
    layer, reference = _pair(router, kwargs)

    def grads(model):
        if keras.backend.backend() == "jax":
            import jax

            def loss_fn(trainable, x):
                y, _ = model.stateless_call(
                    trainable, [v.value for v in model.non_trainable_variables], x
                )
                return ops.sum(ops.square(y))

            values = [v.value for v in model.trainable_variables]
            g, gx = jax.grad(loss_fn, argnums=(0, 1))(values, x)
        elif keras.backend.backend() == "torch":
            import torch

            xt = torch.tensor(x, requires_grad=True)
            loss = torch.sum(torch.square(model(xt)))
            variables = [v.value for v in model.trainable_variables]
            *g, gx = torch.autograd.grad(loss, variables + [xt])
        else:
            import tensorflow as tf

            xt = tf.constant(x)
            with tf.GradientTape() as tape:
                tape.watch(xt)
                loss = tf.reduce_sum(tf.square(model(xt)))
            *g, gx = tape.gradient(loss, model.trainable_variables + [xt])
        names = [v.path.split("/")[-2] + "/" + v.name for v in model.trainable_variables]
        return dict(zip(names, map(to_numpy, g))), to_numpy(gx)

    g, gx = grads(layer)
    g_ref, gx_ref = grads(reference)
    assert set(g) == {"router/kernel", "experts/w_in", "experts/w_out"}
    for name in g:
        np.testing.assert_allclose(g[name], g_ref[name], rtol=1e-4, atol=1e-6)
        assert np.abs(g[name]).max() > 0, name
    np.testing.assert_allclose(gx, gx_ref, rtol=1e-4, atol=1e-6)


class CountingExperts(ExpertBank):
    """Records the dispatched tensor so the test can check what experts see."""

    def call(self, x):
        self.seen = x
        return super().call(x)


def test_experts_only_see_routed_tokens():
    """Sparse for real: expert e's input rows are exactly the tokens routed to
    e (plus zero rows for empty slots), never the whole batch."""
    S, d, E = 16, 8, 4
    layer = MoEFeedForward(
        E,
        12,
        router="top_k",
        top_k=2,
        capacity_factor=1.0,
        inference_routing="as_trained",
    )
    layer.experts = CountingExperts(E, 12, name="experts")
    x = np.random.default_rng(2).normal(size=(1, S, d)).astype("float32")
    layer(x)
    seen = to_numpy(layer.experts.seen)  # [E, G, C, d], expert-major
    C = layer.router.capacity(S)
    assert seen.shape == (E, 1, C, d) and E * C == 2 * S  # k * S slots, not E * S
    routing = layer.router(x, training=False)
    slot_token = to_numpy(routing.slot_token)[0]
    for e in range(E):
        for c in range(C):
            t = slot_token[e, c]
            expected = x[0, t] if t < S else np.zeros(d)
            np.testing.assert_allclose(seen[e, 0, c], expected, rtol=1e-6)


def test_unrouted_tokens_get_zero_output():
    # Capacity 1 slot per expert: most tokens are dropped and must output 0.
    layer = MoEFeedForward(
        2,
        8,
        router="top_k",
        top_k=1,
        capacity_factor=0.1,
        inference_routing="as_trained",
    )
    x = np.random.default_rng(3).normal(size=(1, 10, 4)).astype("float32")
    y = to_numpy(layer(x))
    served = np.abs(y[0]).sum(-1) > 0
    assert served.sum() <= 2
    assert layer.router.routing_statistics()["dropped_fraction"] >= 0.8 - 1e-6


def test_padding_tokens_get_zero_output_and_do_not_change_real_tokens():
    layer = MoEFeedForward(4, 8, router="expert_choice", capacity_factor=1.0)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1, 8, 4)).astype("float32")
    mask = np.array([[1, 1, 1, 1, 1, 0, 0, 0]], "int32")
    y = to_numpy(layer(x, padding_mask=mask))
    np.testing.assert_array_equal(y[0, 5:], 0.0)
    x2 = x.copy()
    x2[0, 5:] = rng.normal(size=(3, 4))  # change only padding tokens
    np.testing.assert_allclose(to_numpy(layer(x2, padding_mask=mask))[0, :5], y[0, :5])


def test_group_size_splits_batch_into_groups():
    layer = MoEFeedForward(4, 8, router="top_k", group_size=4)
    x = np.random.default_rng(5).normal(size=(2, 6, 4)).astype("float32")
    layer(x)  # 12 tokens in 3 groups of 4
    with pytest.raises(ValueError, match="group_size"):
        layer(x[:, :5])  # 10 tokens, not divisible by 4


def test_mixed_bfloat16_keeps_router_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    layer = MoEFeedForward(4, 8, router="top_k")
    x = np.random.default_rng(6).normal(size=(2, 8, 4)).astype("float32")
    y = layer(ops.cast(x, "bfloat16"))
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert layer.router.kernel.dtype == "float32"
    assert layer.experts.w_in.dtype == "float32"  # float32 master weights
    logits = layer.router.router_logits(ops.cast(x, "bfloat16"))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    routing = layer.router(ops.cast(x, "bfloat16"))
    assert keras.backend.standardize_dtype(routing.slot_gate.dtype) == "float32"


def test_config_round_trip_reproduces_outputs():
    layer = MoEFeedForward(
        4,
        8,
        router=TopKRouter(4, top_k=1, capacity_factor=2.0, jitter=0.1, seed=3),
        activation="squared_relu",
    )
    x = np.random.default_rng(7).normal(size=(2, 8, 4)).astype("float32")
    y = to_numpy(layer(x))
    clone = MoEFeedForward.from_config(layer.get_config())
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    np.testing.assert_array_equal(to_numpy(clone(x)), y)
    assert clone.router.get_config() == layer.router.get_config()
    # A router of its own is its serialised self, without the router options.
    config = layer.get_config()
    assert isinstance(config["router"], dict) and not set(ROUTER_OPTION_NAMES) & set(config)


def test_router_options_are_the_layer_s_arguments():
    """The router's options are arguments of the layer (keras-hub's MoE
    layers take them so), in its config as they are; left unset, each is
    the router's own default."""
    assert set(ROUTER_OPTION_NAMES) == set(ROUTER_OPTIONS["top_k"]) | set(
        ROUTER_OPTIONS["expert_choice"]
    )
    default = MoEFeedForward(4, 8).router
    assert isinstance(default, TopKRouter)
    assert (default.top_k, default.capacity_factor, default.load_balance_loss_weight) == (
        2, 1.25, 0.01
    )
    ec = MoEFeedForward(4, 8, router="expert_choice").router
    assert isinstance(ec, ExpertChoiceRouter)
    assert (ec.capacity_factor, ec.load_balance_loss_weight) == (2.0, 0.0)
    options = {
        "top_k": 1, "capacity_factor": None, "eval_capacity_factor": 2.0,
        "load_balance_loss_weight": 0.02, "load_balance_loss_mode": "pooled",
        "z_loss_weight": 1e-3, "jitter": 0.01, "batch_prioritized": True,
        "normalize_gates": True, "inference_routing": "as_trained",
    }
    layer = MoEFeedForward(4, 8, **options)
    assert {name: getattr(layer.router, name) for name in options} == options
    config = layer.get_config()
    assert config["router"] == "top_k" and "router_kwargs" not in config
    assert {name: config[name] for name in ROUTER_OPTION_NAMES} == options
    clone = MoEFeedForward.from_config(config)
    assert clone.get_config() == config
    assert clone.router.get_config() == layer.router.get_config()
    assert clone.router.name == "router"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (
            {"router": "expert_choice", "top_k": 1},
            "`top_k=1` applies only to router='top_k'. Received: router='expert_choice'",
        ),
        (
            {"router": "expert_choice", "batch_prioritized": True},
            "`batch_prioritized=True` applies only to router='top_k'. "
            "Received: router='expert_choice'",
        ),
        (
            {"router": "expert_choice", "normalize_gates": False},
            "`normalize_gates=False` applies only to router='top_k'. "
            "Received: router='expert_choice'",
        ),
        (
            {"router": TopKRouter(4), "top_k": 1, "jitter": 0.1},
            "set them on the Router instance. Received: top_k=1, jitter=0.1",
        ),
        (
            {"router": ExpertChoiceRouter(4), "capacity_factor": 1.0},
            "Received: capacity_factor=1.0",
        ),
    ],
)
def test_router_options_the_router_does_not_take_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MoEFeedForward(4, 8, **kwargs)


def test_a_keras_file_with_the_router_serialised_loads_unchanged(tmp_path):
    """Every config written before the router options were arguments holds
    the router serialised beside `router_kwargs: None` (every `.keras` file
    so far): it loads, like today's, to the same outputs and the same weight
    paths (the router built in the layer's name scope)."""
    inputs = keras.Input((8, 4))
    layer = MoEFeedForward(4, 8, top_k=1, capacity_factor=2.0, name="moe")
    model = keras.Model(inputs, layer(inputs))
    x = np.random.default_rng(9).normal(size=(2, 8, 4)).astype("float32")
    expected = to_numpy(model(x))
    path, old_path = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(path)

    def with_the_router_serialised(text):
        config = json.loads(text)
        (moe,) = [c["config"] for c in config["config"]["layers"] if c["config"]["name"] == "moe"]
        assert moe["router"] == "top_k"
        for name in ROUTER_OPTION_NAMES:
            del moe[name]
        moe["router"] = keras.saving.serialize_keras_object(layer.router)
        moe["router_kwargs"] = None
        return json.dumps(config)

    rewrite_keras_config(path, old_path, with_the_router_serialised)
    paths = [v.path for v in model.weights]
    assert "moe/router/kernel" in paths
    for saved in (path, old_path):
        loaded = keras.saving.load_model(saved)
        np.testing.assert_array_equal(to_numpy(loaded(x)), expected)
        assert [v.path for v in loaded.weights] == paths
        assert loaded.get_layer("moe").router.get_config() == layer.router.get_config()


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"num_experts": 0, "intermediate_dim": 8}, "num_experts"),
        ({"num_experts": 4, "intermediate_dim": -1}, "intermediate_dim"),
        ({"num_experts": 4, "intermediate_dim": 8, "router": "hash"}, "router"),
        ({"num_experts": 4, "intermediate_dim": 8, "activation": "tanh"}, "activation"),
        ({"num_experts": 4, "intermediate_dim": 8, "dispatch": "dense"}, "dispatch"),
        ({"num_experts": 4, "intermediate_dim": 8, "group_size": 0}, "group_size"),
        ({"num_experts": 4, "intermediate_dim": 8, "top_k": 5}, "top_k"),
        (
            {"num_experts": 4, "intermediate_dim": 8, "router": TopKRouter(2)},
            "num_experts",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        MoEFeedForward(**kwargs)


def test_one_hot_mask_has_one_entry_per_kept_choice():
    layer = MoEFeedForward(
        4, 8, router="top_k", top_k=2, capacity_factor=0.75
    )
    x = np.random.default_rng(8).normal(size=(2, 8, 4)).astype("float32")
    layer.build(x.shape)
    routing = layer.router(ops.reshape(x, (2, 8, 4)))
    mask, gates = dispatch_lib.one_hot_dispatch_mask(routing, 8)
    mask = to_numpy(mask)
    keep = to_numpy(routing.token_keep)
    np.testing.assert_array_equal(mask.sum(axis=(2, 3)), keep.sum(-1))
    assert mask.sum(axis=1).max() <= 1  # a slot holds at most one token

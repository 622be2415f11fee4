"""Routing under pathological inputs: every token identical, one expert's
logits dominating, capacity 1. No NaN, no expert over capacity, the dropped
fraction reported exactly where it can be computed by hand, outputs finite."""

import numpy as np
import pytest
from keras import ops

from keras_brainformer.layers import MoEFeedForward

G, S, D, E = 2, 16, 8, 4
# capacity = round(cf * k * S / E), at least 1: cf = 1/16 gives C = 1 for
# k = 1 and 2 (and expert choice) at S=16, E=4.
TINY_CF = 1 / 16
ROUTERS = {
    "top_1": ("top_k", {"top_k": 1, "capacity_factor": TINY_CF}),
    "top_2": ("top_k", {"top_k": 2, "capacity_factor": TINY_CF}),
    "expert_choice": ("expert_choice", {"capacity_factor": TINY_CF}),
    "top_2_dropless": ("top_k", {"top_k": 2, "capacity_factor": None}),
}


def _moe(router):
    kind, kwargs = ROUTERS[router]
    kwargs = dict(kwargs, load_balance_loss_weight=0.01, z_loss_weight=0.001)
    moe = MoEFeedForward(E, 16, router=kind, **kwargs)
    moe.build((None, S, D))
    return moe


def _check(moe, x):
    groups = ops.convert_to_tensor(x)
    routing = moe.router(groups, training=True)
    slot_token = ops.convert_to_numpy(routing.slot_token)
    slot_gate = ops.convert_to_numpy(routing.slot_gate)
    assert slot_token.shape == (G, E, routing.capacity)
    assert np.all(np.isfinite(slot_gate)) and np.all(slot_gate >= 0)
    for g in range(G):
        for e in range(E):
            filled = slot_token[g, e][slot_token[g, e] < S]
            # Capacity is a shape, so it cannot be exceeded; what can go
            # wrong is a token twice in one expert, or a gate on an empty slot.
            assert len(set(filled.tolist())) == len(filled)
            assert np.all(slot_gate[g, e][slot_token[g, e] >= S] == 0)
    out = moe(x, training=True)
    assert np.all(np.isfinite(ops.convert_to_numpy(out)))
    assert all(np.isfinite(float(ops.convert_to_numpy(loss))) for loss in moe.losses)
    stats = moe.router.routing_statistics()
    assert all(np.isfinite(v) for k, v in stats.items() if k != "expert_load")
    assert 0.0 <= stats["dropped_fraction"] <= 1.0
    return routing, stats


@pytest.mark.parametrize("router", list(ROUTERS))
def test_identical_tokens(router):
    moe = _moe(router)
    x = np.ones((G, S, D), "float32")
    routing, stats = _check(moe, x)
    if router == "top_1":  # all 16 tokens want one expert with one slot
        assert routing.capacity == 1
        assert stats["dropped_fraction"] == pytest.approx(15 / 16)
    elif router == "top_2":  # 32 choices, two experts with one slot each
        assert stats["dropped_fraction"] == pytest.approx(30 / 32)
    elif router == "expert_choice":
        # Each expert takes one token; ties may pick the same or different
        # tokens, so between 12 and 15 of 16 tokens are left out.
        assert 12 / 16 <= stats["dropped_fraction"] <= 15 / 16
    else:  # dropless serves everyone
        assert stats["dropped_fraction"] == 0.0


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("scale", [1e3, 1e6])
def test_one_expert_dominates(router, scale):
    moe = _moe(router)
    kernel = np.zeros((D, E), "float32")
    kernel[:, 2] = scale  # expert 2's logit is scale * sum(x) for every token
    moe.router.kernel.assign(kernel)
    x = np.abs(np.random.default_rng(0).normal(size=(G, S, D))).astype("float32") + 0.1
    routing, stats = _check(moe, x)
    if router in ("top_1", "top_2"):
        # Expert 2 fills its single slot; every other choice of expert 2 is
        # dropped (top-2's second choices spread over the tied experts).
        load = stats["expert_load"]
        assert np.argmax(load) == 2 or router == "top_2"
        assert stats["dropped_fraction"] > 0.5


@pytest.mark.parametrize("router", ["top_2", "expert_choice"])
def test_padding_only_group_routes_nothing(router):
    moe = _moe(router)
    x = np.random.default_rng(1).normal(size=(G, S, D)).astype("float32")
    mask = np.zeros((G, S), "float32")
    mask[0] = 1.0  # group 1 is all padding
    routing = moe.router(ops.convert_to_tensor(x), token_mask=ops.convert_to_tensor(mask),
                         training=True)
    slot_token = ops.convert_to_numpy(routing.slot_token)
    assert np.all(slot_token[1] == S)  # no slot of the padded group is filled
    out = ops.convert_to_numpy(moe(x, padding_mask=mask, training=True))
    assert np.all(np.isfinite(out)) and np.all(out[1] == 0)

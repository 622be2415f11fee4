"""Which router settings are causal: changing token t+1 must leave outputs at
positions <= t unchanged. See the module docstring of layers/routers.py."""

import numpy as np
import pytest
from conftest import inference_call
from conftest import max_leak
from conftest import to_numpy

from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec

T, D = 16, 8


CAUSAL = [
    ("top_k", {"top_k": 2, "capacity_factor": None}),  # dropless
    ("top_k", {"top_k": 2, "capacity_factor": 4.0}),  # C = 2*16*4/4 >= S: nothing dropped
    ("top_k", {"top_k": 1, "capacity_factor": 0.5}),  # drops, but only by earlier tokens
]
NOT_CAUSAL = [
    ("top_k", {"top_k": 2, "capacity_factor": 0.5}),  # second choices wait for later firsts
    ("top_k", {"top_k": 1, "capacity_factor": 0.5, "batch_prioritized": True}),
    ("expert_choice", {"capacity_factor": 1.0}),
]
AS_TRAINED = {"inference_routing": "as_trained"}


@pytest.mark.parametrize("router,kwargs", CAUSAL)
def test_causal_router_settings(router, kwargs):
    layer = MoEFeedForward(4, 16, router=router, **kwargs, **AS_TRAINED)
    layer = inference_call(layer)
    x = np.random.default_rng(0).normal(size=(3, T, D)).astype("float32")
    for t in range(T - 1):
        assert max_leak(layer, x, t) == 0.0, t


@pytest.mark.parametrize("router,kwargs", NOT_CAUSAL)
def test_non_causal_router_settings_leak(router, kwargs):
    layer = MoEFeedForward(4, 16, router=router, **kwargs, **AS_TRAINED)
    layer = inference_call(layer)
    x = np.random.default_rng(0).normal(size=(3, T, D)).astype("float32")
    assert max(max_leak(layer, x, t) for t in range(T - 1)) > 1e-4


@pytest.mark.parametrize("router,kwargs", NOT_CAUSAL + CAUSAL)
def test_causal_inference_routing_is_exactly_causal(router, kwargs):
    # The default inference routing: every setting becomes causal.
    layer = MoEFeedForward(4, 16, router=router, **kwargs)
    layer = inference_call(layer)
    x = np.random.default_rng(0).normal(size=(3, T, D)).astype("float32")
    for t in range(T - 1):
        assert max_leak(layer, x, t) == 0.0, t


def test_causal_routing_of_expert_choice_is_top_round_cf_on_same_scores():
    # Expert choice with capacity factor 2 -> each token takes its top-2
    # experts by softmax score, gates = the raw scores (not renormalised).
    layer = MoEFeedForward(4, 16, router="expert_choice", capacity_factor=2.0)
    x = np.random.default_rng(5).normal(size=(2, T, D)).astype("float32")
    layer(x)
    router = layer.router
    r = router(x.reshape(-1, T, D))
    probs = to_numpy(keras_softmax(x.reshape(-1, T, D) @ to_numpy(router.kernel)))
    slot_token, slot_gate = to_numpy(r.slot_token), to_numpy(r.slot_gate)
    for g in range(2):
        for s in range(T):
            top2 = set(np.argsort(-probs[g, s])[:2])
            got = {e for e in range(4) if (slot_token[g, e] == s).any()}
            assert got == top2
            for e in top2:
                gate = slot_gate[g, e][slot_token[g, e] == s]
                np.testing.assert_allclose(gate, probs[g, s, e], rtol=1e-5)
    assert r.capacity == T  # dropless
    # The training scheme is unchanged.
    assert router(x.reshape(-1, T, D), training=True).capacity == 2 * T // 4


def keras_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(-1, keepdims=True)


def test_group_spanning_sequences_couples_them():
    # Top-1 with dropping in position order, one group of two sequences:
    # sequence 1 depends on sequence 0 (earlier in the group), not vice versa.
    # The router kernel sends a token with a large feature i to expert i.
    layer = MoEFeedForward(
        4,
        16,
        router="top_k",
        top_k=1,
        capacity_factor=0.5,
        **AS_TRAINED,
        group_size=2 * T,
    )
    layer.build((2, T, D))
    layer.router.kernel.assign(10.0 * np.eye(D, 4, dtype="float32"))
    rng = np.random.default_rng(1)
    x = 0.1 * rng.normal(size=(2, T, D)).astype("float32")
    x[:, :, 0] += 1.0  # everybody wants expert 0, which has C = 4 slots
    y = to_numpy(layer(x))
    assert np.abs(y[1]).max() == 0.0  # sequence 0 took every slot of expert 0
    x0 = x.copy()
    x0[0, :, 0] -= 1.0
    x0[0, :, 1] += 1.0  # sequence 0 moves to expert 1 ...
    y0 = to_numpy(layer(x0))
    assert np.abs(y0[1]).max() > 1e-4  # ... and sequence 1 now gets served
    x1 = x.copy()
    x1[1] = rng.normal(size=(T, D))
    np.testing.assert_array_equal(to_numpy(layer(x1))[0], y[0])


def test_dropless_backbone_is_exactly_causal():
    spec = BlockSpec(
        [
            AttentionSpec(num_heads=2),
            MoESpec(4, 16, top_k=2, capacity_factor=None),
            FeedForwardSpec(16),
            MoESpec(4, 16, top_k=1, capacity_factor=0.5),
        ]
    )
    backbone = BrainformerBackbone(vocabulary_size=50, hidden_dim=D, blocks=spec, num_layers=2)
    rng = np.random.default_rng(4)
    tokens = rng.integers(0, 50, (2, T)).astype("int32")
    mask = np.ones((2, T), "int32")
    y = to_numpy(backbone({"token_ids": tokens, "padding_mask": mask}))
    for t in (0, 5, T - 2):
        changed = tokens.copy()
        changed[:, t + 1] = (changed[:, t + 1] + 7) % 50
        y2 = to_numpy(backbone({"token_ids": changed, "padding_mask": mask}))
        np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
        assert np.abs(y2[:, t + 1] - y[:, t + 1]).max() > 0

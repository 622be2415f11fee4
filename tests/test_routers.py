"""Behavioural tests of the routers (`TopKRouter`, `ExpertChoiceRouter`).

Most cases are hand-built: the router is built with `d = num_experts` and its
kernel set to the identity (or a permutation), so the router logits of a token
are exactly the token vector we feed. Each token's probabilities and ranking
are therefore known, and the expected slot tables are written out by hand.
Random cases are checked against a small numpy reference implementation.
"""

import math
import re

import keras
import numpy as np
import pytest
from keras import ops

from keras_brainformer.layers.routers import ExpertChoiceRouter
from keras_brainformer.layers.routers import TopKRouter
from keras_brainformer.layers.routers import compute_capacity
from keras_brainformer.layers.routers import load_balance_loss
from keras_brainformer.layers.routers import router_z_loss

# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def to_np(x):
    return np.asarray(ops.convert_to_numpy(x))


def np_softmax(logits):
    logits = np.asarray(logits, np.float64)
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def np_logsumexp(logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1)
    return m + np.log(np.exp(logits - m[..., None]).sum(axis=-1))


def make_router(cls, num_experts, kernel=None, **kwargs):
    """A built router whose kernel is `kernel` (default: identity, so that
    logits == inputs). These tests check each scheme as trained, so the
    router keeps it at inference too unless a test asks otherwise."""
    kwargs.setdefault("inference_routing", "as_trained")
    router = cls(num_experts=num_experts, **kwargs)
    if kernel is None:
        kernel = np.eye(num_experts, dtype="float32")
    kernel = np.asarray(kernel, "float32")
    router.build((None, None, kernel.shape[0]))
    router.kernel.assign(kernel)
    return router


def route(router, logits, mask=None, training=False):
    x = np.asarray(logits, "float32")
    if x.ndim == 2:
        x = x[None]
    if mask is not None:
        mask = np.asarray(mask)
        if mask.ndim == 1:
            mask = mask[None]
    return router(x, token_mask=mask, training=training)


def ref_top_k(logits, mask, k, capacity, batch_prioritized, normalize):
    """Numpy reference of token-choice routing with priority dropping."""
    probs = np_softmax(logits)
    G, S, E = probs.shape
    experts = np.argsort(-probs, axis=-1, kind="stable")[..., :k]
    gates = np.take_along_axis(probs, experts, axis=-1)
    if normalize:
        gates = gates / gates.sum(axis=-1, keepdims=True)
    slot_token = np.full((G, E, capacity), S, np.int64)
    slot_gate = np.zeros((G, E, capacity))
    keep = np.zeros((G, S, k), bool)
    position = np.zeros((G, S, k), np.int64)
    for g in range(G):
        if batch_prioritized:
            confidence = np.where(mask[g] > 0, probs[g].max(-1), -1.0)
            order = np.argsort(-confidence, kind="stable")
        else:
            order = np.arange(S)
        count = np.zeros(E, np.int64)
        for j in range(k):  # all first choices, then all second choices, ...
            for s in order:
                if mask[g, s] <= 0:
                    continue
                e = experts[g, s, j]
                position[g, s, j] = count[e]
                count[e] += 1
                if position[g, s, j] < capacity:
                    keep[g, s, j] = True
                    slot_token[g, e, position[g, s, j]] = s
                    slot_gate[g, e, position[g, s, j]] = gates[g, s, j]
    return dict(
        slot_token=slot_token,
        slot_gate=slot_gate,
        token_expert=experts,
        token_gate=gates,
        token_keep=keep,
        token_position=position,
    )


def ref_expert_choice(logits, mask, capacity):
    probs = np_softmax(logits)
    G, S, E = probs.shape
    scores = np.where(mask[..., None] > 0, probs, -1.0)
    slot_token = np.full((G, E, capacity), S, np.int64)
    slot_gate = np.zeros((G, E, capacity))
    for g in range(G):
        for e in range(E):
            best = np.argsort(-scores[g, :, e], kind="stable")[:capacity]
            for c, s in enumerate(best):
                if scores[g, s, e] >= 0:
                    slot_token[g, e, c] = s
                    slot_gate[g, e, c] = scores[g, s, e]
    return slot_token, slot_gate


def same_slots(slot_token, slot_gate, expected_token, expected_gate, rtol=1e-5):
    """Same set of (token, gate) per expert, in any slot order."""
    slot_token, slot_gate = to_np(slot_token), to_np(slot_gate)
    expected_token = np.asarray(expected_token)
    expected_gate = np.asarray(expected_gate)
    if slot_token.shape != expected_token.shape:
        return False
    order = np.argsort(slot_token, axis=-1, kind="stable")
    expected_order = np.argsort(expected_token, axis=-1, kind="stable")
    tokens = np.take_along_axis(slot_token, order, -1)
    expected_tokens = np.take_along_axis(expected_token, expected_order, -1)
    gates = np.take_along_axis(slot_gate, order, -1)
    expected_gates = np.take_along_axis(expected_gate, expected_order, -1)
    return bool(
        np.array_equal(tokens, expected_tokens)
        and np.allclose(gates, expected_gates, rtol=rtol, atol=1e-7)
    )


def check_slot_table_consistency(r, group_size):
    """The slot table and the per-token choices describe the same routing,
    no expert exceeds its capacity and no token sits twice in one expert."""
    slot_token, slot_gate = to_np(r.slot_token), to_np(r.slot_gate)
    G, E, C = slot_token.shape
    assert C == r.capacity
    filled = slot_token < group_size
    np.testing.assert_array_equal(slot_gate[~filled], 0.0)
    for g in range(G):
        for e in range(E):
            tokens = slot_token[g, e][filled[g, e]]
            assert len(tokens) <= C
            assert len(set(tokens.tolist())) == len(tokens)
    if r.token_expert is None:
        return
    expert, position = to_np(r.token_expert), to_np(r.token_position)
    gate, keep = to_np(r.token_gate), to_np(r.token_keep)
    assert int(filled.sum()) == int(keep.sum())
    for g, s, j in zip(*np.nonzero(keep)):
        e, p = expert[g, s, j], position[g, s, j]
        assert p < C
        assert slot_token[g, e, p] == s
        np.testing.assert_allclose(slot_gate[g, e, p], gate[g, s, j], rtol=1e-6)


# ---------------------------------------------------------------------------
# Capacity
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "num_tokens, group_size, capacity_factor, num_experts, expected",
    [
        (8, 8, 1.0, 4, 2),  # top-1: 8 / 4
        (16, 8, 1.0, 4, 4),  # top-2: 2 * 8 / 4
        (8, 8, 1.25, 4, 3),  # ceil(2.5)
        (6, 6, 1.0, 4, 2),  # ceil(1.5)
        (16, 8, 1.5, 4, 6),
        (8, 8, 0.1, 4, 1),  # at least 1
        (8, 8, 0.01, 64, 1),
        (16, 8, 4.0, 4, 8),  # at most group_size (ceil(16) -> 8)
        (8, 8, 100.0, 2, 8),
        (8, 8, None, 4, 8),  # dropless
        (16, 8, None, 4, 8),
        (10, 10, 1.1, 11, 1),  # 10 * 1.1 / 11 = 1.0000000000000002 in floats
    ],
)
def test_compute_capacity(num_tokens, group_size, capacity_factor, num_experts, expected):
    got = compute_capacity(num_tokens, group_size, capacity_factor, num_experts)
    assert got == expected
    assert isinstance(got, int)


def test_top_k_capacity_train_vs_eval_factor():
    router = TopKRouter(4, top_k=2, capacity_factor=1.0, eval_capacity_factor=1.5)
    assert router.capacity(8, training=True) == 4  # ceil(2 * 8 * 1.0 / 4)
    assert router.capacity(8, training=False) == 6  # ceil(2 * 8 * 1.5 / 4)
    assert router.capacity(8) == 6  # default is inference
    same = TopKRouter(4, top_k=1, capacity_factor=1.25)
    assert same.eval_capacity_factor == 1.25
    assert same.capacity(8, training=True) == same.capacity(8, training=False) == 3


def test_top_k_dropless_capacity_is_group_size():
    router = TopKRouter(4, top_k=2, capacity_factor=None)
    assert router.capacity(8, training=True) == 8
    assert router.capacity(8, training=False) == 8
    # Dropless only at inference.
    router = TopKRouter(4, top_k=1, capacity_factor=1.0, eval_capacity_factor=None)
    assert router.capacity(8, training=True) == 2
    assert router.capacity(8, training=False) == 8


def test_top_k_capacity_bounds():
    assert TopKRouter(8, top_k=1, capacity_factor=0.1).capacity(4) == 1
    assert TopKRouter(2, top_k=2, capacity_factor=3.0).capacity(4) == 4


def test_expert_choice_capacity():
    router = ExpertChoiceRouter(4, capacity_factor=2.0, eval_capacity_factor=1.0)
    assert router.capacity(8, training=True) == 4  # ceil(8 * 2 / 4)
    assert router.capacity(8, training=False) == 2
    assert ExpertChoiceRouter(4, capacity_factor=1.2).capacity(5) == 2  # ceil(1.5)
    assert ExpertChoiceRouter(4, capacity_factor=0.1).capacity(8) == 1
    assert ExpertChoiceRouter(2, capacity_factor=100.0).capacity(8) == 8


def test_call_uses_training_or_eval_capacity():
    router = make_router(TopKRouter, 4, top_k=2, capacity_factor=1.0, eval_capacity_factor=1.5)
    logits = np.random.default_rng(0).normal(size=(2, 8, 4))
    r = route(router, logits, training=True)
    assert r.capacity == 4
    assert tuple(r.slot_token.shape) == (2, 4, 4)
    assert tuple(r.slot_gate.shape) == (2, 4, 4)
    r = route(router, logits, training=False)
    assert r.capacity == 6
    assert tuple(r.slot_token.shape) == (2, 4, 6)

    ec = make_router(ExpertChoiceRouter, 4, capacity_factor=2.0, eval_capacity_factor=1.0)
    assert tuple(route(ec, logits, training=True).slot_token.shape) == (2, 4, 4)
    assert tuple(route(ec, logits, training=False).slot_token.shape) == (2, 4, 2)


# ---------------------------------------------------------------------------
# Top-1 (Switch)
# ---------------------------------------------------------------------------

# E = 4, S = 6; first choices [0, 1, 0, 0, 3, 1]. With capacity_factor 1.0,
# C = ceil(6 / 4) = 2: token 3 is the third token of expert 0 and is dropped.
SWITCH_LOGITS = np.array(
    [
        [2.0, 0.5, 0.0, 0.0],
        [0.0, 1.5, 0.3, 0.0],
        [1.0, 0.0, 0.0, 0.2],
        [3.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.1, 2.5],
        [0.4, 2.2, 0.0, 0.0],
    ],
    "float32",
)


def test_switch_routes_to_argmax_and_drops_later_tokens():
    router = make_router(TopKRouter, 4, top_k=1, capacity_factor=1.0)
    r = route(router, SWITCH_LOGITS)
    probs = np_softmax(SWITCH_LOGITS)
    assert r.capacity == 2
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[0, 2], [1, 5], [6, 6], [4, 6]])
    np.testing.assert_array_equal(to_np(r.token_expert)[0, :, 0], [0, 1, 0, 0, 3, 1])
    np.testing.assert_array_equal(to_np(r.token_position)[0, :, 0], [0, 0, 1, 2, 0, 1])
    np.testing.assert_array_equal(
        to_np(r.token_keep)[0, :, 0], [True, True, True, False, True, True]
    )
    # Gates are the router probabilities themselves (no renormalisation).
    expected_gate = np.array(
        [[probs[0, 0], probs[2, 0]], [probs[1, 1], probs[5, 1]], [0, 0], [probs[4, 3], 0]]
    )
    np.testing.assert_allclose(to_np(r.slot_gate)[0], expected_gate, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(to_np(r.token_gate)[0, :, 0], probs.max(-1), rtol=1e-6)
    # The dropped token sits in no slot.
    assert 3 not in to_np(r.slot_token).tolist()
    assert keras.backend.standardize_dtype(r.slot_token.dtype) == "int32"
    check_slot_table_consistency(r, 6)


def test_switch_statistics():
    router = make_router(TopKRouter, 4, top_k=1, capacity_factor=1.0)
    route(router, SWITCH_LOGITS)
    stats = router.routing_statistics()
    load = np.array([2, 2, 0, 1]) / 5
    probs = np_softmax(SWITCH_LOGITS)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    assert stats["dropped_fraction"] == pytest.approx(1 / 6, rel=1e-6)
    np.testing.assert_allclose(stats["expert_load"], load, rtol=1e-6)
    assert sum(stats["expert_load"]) == pytest.approx(1.0, rel=1e-6)
    assert stats["load_cv"] == pytest.approx(load.std() / load.mean(), rel=1e-5)
    assert stats["router_entropy"] == pytest.approx(entropy, rel=1e-5)


def test_switch_enough_capacity_drops_nothing():
    router = make_router(TopKRouter, 4, top_k=1, capacity_factor=2.0)  # C = 3
    r = route(router, SWITCH_LOGITS)
    np.testing.assert_array_equal(
        to_np(r.slot_token)[0], [[0, 2, 3], [1, 5, 6], [6, 6, 6], [4, 6, 6]]
    )
    assert router.routing_statistics()["dropped_fraction"] == 0.0


def test_switch_dropless_keeps_every_token():
    router = make_router(TopKRouter, 4, top_k=1, capacity_factor=None)
    logits = np.array([[3.0, 0.0, 0.0, 0.0]] * 5 + [[0.0, 0.0, 0.0, 1.0]], "float32")
    r = route(router, logits, training=True)
    assert r.capacity == 6
    np.testing.assert_array_equal(
        to_np(r.slot_token)[0],
        [[0, 1, 2, 3, 4, 6], [6] * 6, [6] * 6, [5, 6, 6, 6, 6, 6]],
    )
    assert to_np(r.token_keep).all()
    assert router.routing_statistics()["dropped_fraction"] == 0.0
    np.testing.assert_allclose(
        router.routing_statistics()["expert_load"], [5 / 6, 0, 0, 1 / 6], rtol=1e-6
    )


def test_kernel_is_used_permutation():
    # Kernel = permutation matrix: input feature i feeds expert perm[i].
    perm = [2, 0, 3, 1]
    kernel = np.zeros((4, 4), "float32")
    for i, e in enumerate(perm):
        kernel[i, e] = 1.0
    router = make_router(TopKRouter, 4, kernel=kernel, top_k=1, capacity_factor=1.0)  # C = 2
    x = 2.0 * np.eye(4, dtype="float32")[[0, 1, 2, 3, 0, 2]]
    r = route(router, x)
    np.testing.assert_array_equal(to_np(r.token_expert)[0, :, 0], [2, 0, 3, 1, 2, 3])
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[1, 6], [3, 6], [0, 4], [2, 5]])
    np.testing.assert_allclose(to_np(router.router_logits(x[None]))[0], x @ kernel, rtol=0, atol=0)


def test_switch_normalize_gates_true_gives_unit_gates():
    router = make_router(TopKRouter, 4, top_k=1, capacity_factor=None, normalize_gates=True)
    r = route(router, SWITCH_LOGITS)
    np.testing.assert_allclose(to_np(r.token_gate), 1.0, rtol=1e-6)
    gates = to_np(r.slot_gate)
    filled = to_np(r.slot_token) < 6
    np.testing.assert_allclose(gates[filled], 1.0, rtol=1e-6)


# ---------------------------------------------------------------------------
# Top-2 gates and priority
# ---------------------------------------------------------------------------


def test_top2_gates_renormalised_to_sum_one():
    router = make_router(TopKRouter, 4, top_k=2, capacity_factor=None)
    r = route(router, SWITCH_LOGITS)
    probs = np_softmax(SWITCH_LOGITS)
    top2 = -np.sort(-probs, axis=-1)[:, :2]
    np.testing.assert_allclose(
        to_np(r.token_gate)[0], top2 / top2.sum(-1, keepdims=True), rtol=1e-6
    )
    np.testing.assert_allclose(to_np(r.token_gate).sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(to_np(r.token_expert)[0], np.argsort(-probs, axis=-1)[:, :2])
    # Dropless top-2: every token sits in exactly two slots, gates sum to 1.
    slot_token, slot_gate = to_np(r.slot_token)[0], to_np(r.slot_gate)[0]
    for s in range(6):
        assert (slot_token == s).sum() == 2
        assert slot_gate[slot_token == s].sum() == pytest.approx(1.0, rel=1e-6)
    check_slot_table_consistency(r, 6)


def test_top2_without_normalisation_keeps_raw_probabilities():
    router = make_router(TopKRouter, 4, top_k=2, capacity_factor=None, normalize_gates=False)
    r = route(router, SWITCH_LOGITS)
    probs = np_softmax(SWITCH_LOGITS)
    np.testing.assert_allclose(to_np(r.token_gate)[0], -np.sort(-probs, axis=-1)[:, :2], rtol=1e-6)


def test_top2_all_first_choices_before_any_second_choice():
    # E = 3, S = 3, k = 2, C = ceil(2 * 3 * 1.0 / 3) = 2.
    # token 0: (0, 1); token 1: (1, 2); token 2: (1, 2).
    # Expert 1 receives the first choices of tokens 1 and 2 before token 0's
    # second choice, which is therefore dropped although token 0 comes first.
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 3.0, 1.5]], "float32")
    router = make_router(TopKRouter, 3, top_k=2, capacity_factor=1.0)
    r = route(router, logits)
    probs = np_softmax(logits)
    assert r.capacity == 2
    np.testing.assert_array_equal(to_np(r.token_expert)[0], [[0, 1], [1, 2], [1, 2]])
    np.testing.assert_array_equal(to_np(r.token_position)[0], [[0, 2], [0, 0], [1, 1]])
    np.testing.assert_array_equal(
        to_np(r.token_keep)[0], [[True, False], [True, True], [True, True]]
    )
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[0, 3], [1, 2], [1, 2]])
    # Token 0 keeps its (renormalised) first-choice gate only.
    g0 = probs[0, 0] / (probs[0, 0] + probs[0, 1])
    g1 = probs[1, [1, 2]] / probs[1, [1, 2]].sum()
    g2 = probs[2, [1, 2]] / probs[2, [1, 2]].sum()
    np.testing.assert_allclose(
        to_np(r.slot_gate)[0],
        [[g0, 0.0], [g1[0], g2[0]], [g1[1], g2[1]]],
        rtol=1e-6,
    )
    stats = router.routing_statistics()
    assert stats["dropped_fraction"] == pytest.approx(1 / 6, rel=1e-6)
    np.testing.assert_allclose(stats["expert_load"], [0.2, 0.4, 0.4], rtol=1e-6)
    check_slot_table_consistency(r, 3)


# ---------------------------------------------------------------------------
# Batch-prioritized routing
# ---------------------------------------------------------------------------


def test_batch_prioritized_confident_tokens_win():
    # Top-1 confidences of SWITCH_LOGITS: expert 0 gets tokens 0 (0.67),
    # 2 (0.46), 3 (0.81); expert 1 gets tokens 1 (0.57) and 5 (0.72).
    probs = np_softmax(SWITCH_LOGITS)
    conf = probs.max(-1)
    assert conf[3] > conf[0] > conf[2] and conf[5] > conf[1]
    router = make_router(TopKRouter, 4, top_k=1, capacity_factor=1.0, batch_prioritized=True)
    r = route(router, SWITCH_LOGITS)
    # Token 3 (most confident) now wins a slot and the later-but-less-sure
    # token 2 is dropped instead; slots are filled in confidence order.
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[3, 0], [5, 1], [6, 6], [4, 6]])
    np.testing.assert_array_equal(to_np(r.token_position)[0, :, 0], [1, 1, 2, 0, 0, 0])
    np.testing.assert_array_equal(
        to_np(r.token_keep)[0, :, 0], [True, True, False, True, True, True]
    )
    np.testing.assert_allclose(to_np(r.slot_gate)[0, 0], [probs[3, 0], probs[0, 0]], rtol=1e-6)
    assert router.routing_statistics()["dropped_fraction"] == pytest.approx(1 / 6, rel=1e-6)
    check_slot_table_consistency(r, 6)


def test_batch_prioritized_last_token_can_beat_first():
    # Every token wants expert 0 (C = 1); the last one is the most confident.
    logits = np.array([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [4.0, 0.0]], "float32")
    by_position = make_router(TopKRouter, 2, top_k=1, capacity_factor=0.5)
    by_confidence = make_router(TopKRouter, 2, top_k=1, capacity_factor=0.5, batch_prioritized=True)
    assert to_np(route(by_position, logits).slot_token)[0].tolist() == [[0], [4]]
    assert to_np(route(by_confidence, logits).slot_token)[0].tolist() == [[3], [4]]
    # A padded token never wins, however confident.
    r = route(by_confidence, logits, mask=[1, 1, 1, 0])
    assert to_np(r.slot_token)[0].tolist() == [[1], [4]]


def test_batch_prioritized_top2_still_serves_first_choices_first():
    # E = 2, S = 3, k = 2, C = ceil(2 * 3 * 0.5 / 2) = 2. Tokens 0 and 1
    # choose expert 1 first; token 2 chooses expert 0 first and expert 1
    # second. Confidences: token 2 (0.99) > token 1 (0.88) > token 0 (0.73).
    logits = np.array([[0.0, 1.0], [0.0, 2.0], [5.0, 0.0]], "float32")
    router = make_router(TopKRouter, 2, top_k=2, capacity_factor=0.5, batch_prioritized=True)
    r = route(router, logits)
    assert r.capacity == 2
    # Token 2 is the most confident, but its second choice (expert 1) comes
    # after the first choices of tokens 0 and 1 and is dropped. Among second
    # choices, token 1 (more confident) takes expert 0's last slot before
    # token 0.
    np.testing.assert_array_equal(
        to_np(r.token_keep)[0], [[True, False], [True, True], [True, False]]
    )
    np.testing.assert_array_equal(to_np(r.token_position)[0], [[1, 2], [0, 1], [0, 2]])
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[2, 1], [1, 0]])
    check_slot_table_consistency(r, 3)
    # In position order token 0's second choice gets that slot instead.
    by_position = make_router(TopKRouter, 2, top_k=2, capacity_factor=0.5)
    r = route(by_position, logits)
    np.testing.assert_array_equal(
        to_np(r.token_keep)[0], [[True, True], [True, False], [True, False]]
    )
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[2, 0], [0, 1]])


# ---------------------------------------------------------------------------
# Padding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_prioritized", [False, True])
def test_padding_never_occupies_a_slot(batch_prioritized):
    # All four tokens want expert 0; C = ceil(4 * 1.0 / 2) = 2.
    logits = np.array([[3.0, 0.0], [2.0, 0.0], [1.0, 0.0], [0.5, 0.0]], "float32")
    router = make_router(
        TopKRouter, 2, top_k=1, capacity_factor=1.0, batch_prioritized=batch_prioritized
    )
    r = route(router, logits)
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[0, 1], [4, 4]])
    assert router.routing_statistics()["dropped_fraction"] == pytest.approx(0.5)

    r = route(router, logits, mask=np.array([0, 1, 0, 1], "float32"))
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[1, 3], [4, 4]])
    np.testing.assert_array_equal(to_np(r.token_keep)[0, :, 0], [False, True, False, True])
    stats = router.routing_statistics()
    assert stats["dropped_fraction"] == 0.0  # padding is not "dropped"
    np.testing.assert_allclose(stats["expert_load"], [1.0, 0.0])
    # Entropy is averaged over real tokens only.
    probs = np_softmax(logits)
    entropy = -(probs * np.log(probs)).sum(-1)
    assert stats["router_entropy"] == pytest.approx(entropy[[1, 3]].mean(), rel=1e-5)

    # A boolean mask works too, and one real token dropped of three -> 1/3.
    r = route(router, logits, mask=np.array([True, False, True, True]))
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[0, 2], [4, 4]])
    assert router.routing_statistics()["dropped_fraction"] == pytest.approx(1 / 3, rel=1e-6)


def test_padding_top2_frees_capacity_for_real_tokens():
    # Without the mask, the padded token 0 would take expert 1's slot first.
    logits = np.array([[0.0, 2.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]], "float32")
    router = make_router(TopKRouter, 2, top_k=2, capacity_factor=0.5)  # C = 2
    r = route(router, logits)
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[2, 3], [0, 1]])
    r = route(router, logits, mask=[0, 1, 1, 1])
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[2, 3], [1, 2]])
    keep = to_np(r.token_keep)[0]
    assert not keep[0].any()
    # 6 real choices, 4 slots -> 2 dropped.
    assert router.routing_statistics()["dropped_fraction"] == pytest.approx(2 / 6, rel=1e-6)


# ---------------------------------------------------------------------------
# Random cases against the numpy reference
# ---------------------------------------------------------------------------

TOP_K_CASES = [
    # (k, capacity_factor, batch_prioritized, padded)
    (1, 1.0, False, False),
    (1, 0.5, False, True),
    (1, 1.0, True, True),
    (1, None, True, False),
    (2, 1.0, False, False),
    (2, 0.75, False, True),
    (2, 1.0, True, False),
    (2, 0.5, True, True),
    (3, 1.0, False, True),
    (3, None, False, True),
]


@pytest.mark.parametrize("k, capacity_factor, batch_prioritized, padded", TOP_K_CASES)
def test_top_k_matches_numpy_reference(k, capacity_factor, batch_prioritized, padded):
    G, S, E = 2, 8, 4
    rng = np.random.default_rng(1000 * k + 10 * int(batch_prioritized) + int(padded))
    logits = (1.5 * rng.normal(size=(G, S, E))).astype("float32")
    # Group 1: every token prefers expert 0 (heavy contention).
    logits[1, :, 0] += 3.0
    mask = np.ones((G, S), "float32")
    if padded:
        mask = (rng.random((G, S)) > 0.3).astype("float32")
    router = make_router(
        TopKRouter,
        E,
        top_k=k,
        capacity_factor=capacity_factor,
        batch_prioritized=batch_prioritized,
    )
    r = route(router, logits, mask=mask if padded else None)
    C = compute_capacity(k * S, S, capacity_factor, E)
    assert r.capacity == C
    ref = ref_top_k(logits, mask, k, C, batch_prioritized, normalize=k > 1)
    np.testing.assert_array_equal(to_np(r.slot_token), ref["slot_token"])
    np.testing.assert_allclose(to_np(r.slot_gate), ref["slot_gate"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(to_np(r.token_expert), ref["token_expert"])
    np.testing.assert_array_equal(to_np(r.token_keep), ref["token_keep"])
    real = mask > 0
    np.testing.assert_array_equal(to_np(r.token_position)[real], ref["token_position"][real])
    check_slot_table_consistency(r, S)
    # Statistics.
    stats = router.routing_statistics()
    choices = mask.sum() * k
    assert stats["dropped_fraction"] == pytest.approx(
        1 - ref["token_keep"].sum() / choices, abs=1e-6
    )
    per_expert = (ref["slot_token"] < S).sum(axis=(0, 2))
    np.testing.assert_allclose(stats["expert_load"], per_expert / per_expert.sum(), rtol=1e-6)
    assert sum(stats["expert_load"]) == pytest.approx(1.0, rel=1e-6)
    if capacity_factor is None:
        assert stats["dropped_fraction"] == 0.0


def test_groups_are_routed_independently():
    E, S = 2, 4
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]], "float32")
    crowded = np.array([[5.0, 0.0]] * S, "float32")
    router = make_router(TopKRouter, E, top_k=1, capacity_factor=1.0)
    alone = to_np(route(router, logits).slot_token)[0]
    both = to_np(route(router, np.stack([logits, crowded])).slot_token)
    np.testing.assert_array_equal(both[0], alone)
    np.testing.assert_array_equal(alone, [[0, 2], [1, 3]])
    np.testing.assert_array_equal(both[1], [[0, 1], [4, 4]])  # token indices are per group


# ---------------------------------------------------------------------------
# Expert choice
# ---------------------------------------------------------------------------

# E = 3, S = 5, capacity_factor 1.2 -> C = ceil(5 * 1.2 / 3) = 2.
# Column top-2: expert 0 -> tokens 0, 1; expert 1 -> tokens 3, 1;
# expert 2 -> tokens 4, 3. Token 1 gets two experts, token 2 none.
EC_LOGITS = np.array(
    [
        [4.0, 0.0, 0.0],
        [3.0, 3.0, 0.0],
        [1.0, 1.0, -1.0],
        [0.0, 4.0, 2.0],
        [0.0, 0.0, 2.0],
    ],
    "float32",
)


def test_expert_choice_each_expert_takes_its_top_c_tokens():
    router = make_router(ExpertChoiceRouter, 3, capacity_factor=1.2)
    r = route(router, EC_LOGITS)
    probs = np_softmax(EC_LOGITS)
    assert r.capacity == 2
    assert r.token_expert is None and r.token_keep is None
    expected_tokens = [[0, 1], [3, 1], [4, 3]]  # by decreasing score
    np.testing.assert_array_equal(to_np(r.slot_token)[0], expected_tokens)
    expected_gates = [[probs[s, e] for s in expected_tokens[e]] for e in range(3)]
    np.testing.assert_allclose(to_np(r.slot_gate)[0], expected_gates, rtol=1e-6)
    # Each expert column's chosen tokens are exactly its top-C scores.
    for e in range(3):
        assert set(expected_tokens[e]) == set(np.argsort(-probs[:, e])[:2].tolist())
    # Token 1 reaches two experts, token 2 none: 1 of 5 tokens dropped.
    slot_token = to_np(r.slot_token)[0]
    assert (slot_token == 1).sum() == 2
    assert (slot_token == 2).sum() == 0
    stats = router.routing_statistics()
    assert stats["dropped_fraction"] == pytest.approx(1 / 5, rel=1e-6)
    np.testing.assert_allclose(stats["expert_load"], [1 / 3] * 3, rtol=1e-6)
    assert stats["load_cv"] == pytest.approx(0.0, abs=1e-6)
    entropy = -(probs * np.log(probs)).sum(-1).mean()
    assert stats["router_entropy"] == pytest.approx(entropy, rel=1e-5)
    check_slot_table_consistency(r, 5)


def test_expert_choice_padded_tokens_not_taken_when_enough_real_tokens():
    router = make_router(ExpertChoiceRouter, 3, capacity_factor=1.2)
    # Mask out tokens 0 and 3, the favourites of experts 0, 1 and 2.
    r = route(router, EC_LOGITS, mask=[0, 1, 1, 0, 1])
    probs = np_softmax(EC_LOGITS)
    assert same_slots(
        r.slot_token,
        r.slot_gate,
        [[[1, 2], [1, 2], [4, 2]]],
        [[[probs[1, 0], probs[2, 0]], [probs[1, 1], probs[2, 1]], [probs[4, 2], probs[2, 2]]]],
    )
    assert not np.isin(to_np(r.slot_token), [0, 3]).any()
    stats = router.routing_statistics()
    assert stats["dropped_fraction"] == 0.0  # every real token is served


def test_expert_choice_too_few_real_tokens_leaves_slots_empty():
    router = make_router(ExpertChoiceRouter, 3, capacity_factor=1.2)  # C = 2
    r = route(router, EC_LOGITS, mask=[0, 0, 1, 0, 0])
    probs = np_softmax(EC_LOGITS)
    np.testing.assert_array_equal(to_np(r.slot_token)[0], [[2, 5], [2, 5], [2, 5]])
    np.testing.assert_allclose(
        to_np(r.slot_gate)[0],
        [[probs[2, 0], 0], [probs[2, 1], 0], [probs[2, 2], 0]],
        rtol=1e-6,
    )
    stats = router.routing_statistics()
    assert stats["dropped_fraction"] == 0.0
    np.testing.assert_allclose(stats["expert_load"], [1 / 3] * 3, rtol=1e-6)


@pytest.mark.parametrize("capacity_factor, padded", [(1.0, False), (2.0, True), (0.5, True)])
def test_expert_choice_matches_numpy_reference(capacity_factor, padded):
    G, S, E = 2, 8, 4
    rng = np.random.default_rng(int(10 * capacity_factor) + int(padded))
    logits = (1.5 * rng.normal(size=(G, S, E))).astype("float32")
    mask = np.ones((G, S), "float32")
    if padded:
        mask[0, [1, 4, 7]] = 0.0
        mask[1, :6] = 0.0  # 2 real tokens only
    router = make_router(ExpertChoiceRouter, E, capacity_factor=capacity_factor)
    r = route(router, logits, mask=mask if padded else None, training=True)
    C = compute_capacity(S, S, capacity_factor, E)
    assert r.capacity == C
    slot_token, slot_gate = ref_expert_choice(logits, mask, C)
    assert same_slots(r.slot_token, r.slot_gate, slot_token, slot_gate)
    check_slot_table_consistency(r, S)
    served = np.zeros((G, S), bool)
    for g in range(G):
        served[g, slot_token[g][slot_token[g] < S]] = True
    stats = router.routing_statistics()
    assert stats["dropped_fraction"] == pytest.approx(
        1 - (served & (mask > 0)).sum() / mask.sum(), abs=1e-6
    )
    per_expert = (slot_token < S).sum(axis=(0, 2))
    np.testing.assert_allclose(stats["expert_load"], per_expert / per_expert.sum(), rtol=1e-6)


# ---------------------------------------------------------------------------
# Auxiliary losses
# ---------------------------------------------------------------------------


def np_load_balance_loss(probs, first_choice, mask):
    probs = np.asarray(probs, np.float64)
    E = probs.shape[-1]
    count = max(mask.sum(), 1.0)
    f = np.array([((first_choice == e) * mask).sum() for e in range(E)]) / count
    P = (probs * mask[..., None]).sum(axis=(0, 1)) / count
    return E * (f * P).sum()


def test_load_balance_loss_hand_computed():
    probs = np.array(
        [[[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]], "float32"
    )
    first = np.array([[0, 0, 1, 2]], "int32")
    mask = np.ones((1, 4), "float32")
    # f = [1/2, 1/4, 1/4], P = [0.4, 0.375, 0.225] -> 3 * 0.35 = 1.05.
    got = float(to_np(load_balance_loss(probs, first, mask)))
    assert got == pytest.approx(1.05, rel=1e-6)
    # With the last token padded: f = [2/3, 1/3, 0], P = [1.4, 1.3, 0.3] / 3.
    mask = np.array([[1, 1, 1, 0]], "float32")
    expected = 3 * (2 / 3 * 1.4 / 3 + 1 / 3 * 1.3 / 3)
    got = float(to_np(load_balance_loss(probs, first, mask)))
    assert got == pytest.approx(expected, rel=1e-6)
    assert got == pytest.approx(np_load_balance_loss(probs, first, mask), rel=1e-6)


def test_load_balance_loss_is_one_under_perfect_balance():
    E, S = 4, 8
    uniform = np.full((2, S, E), 1 / E, "float32")
    balanced = np.tile(np.arange(S) % E, (2, 1)).astype("int32")
    mask = np.ones((2, S), "float32")
    assert float(to_np(load_balance_loss(uniform, balanced, mask))) == pytest.approx(1.0)
    # Confident but balanced routing is also 1; all to one expert is E.
    one_hot = np.eye(E, dtype="float32")[balanced]
    assert float(to_np(load_balance_loss(one_hot, balanced, mask))) == pytest.approx(1.0)
    collapsed = np.zeros((2, S), "int32")
    peaked = np.eye(E, dtype="float32")[collapsed]
    assert float(to_np(load_balance_loss(peaked, collapsed, mask))) == pytest.approx(E)


def test_load_balance_loss_per_group_sees_what_pooling_hides():
    """E=2, top-1, two groups of 4 tokens: group 0 routed entirely to expert
    0 (p=0.88), group 1 entirely to expert 1. Pooled over the batch, f and P
    are balanced (loss 1.0, the balanced value) although every group is
    collapsed; per group (GShard's Algorithm 1, the default) each group's
    loss is E·1·0.88 = 1.76."""
    probs = np.array([[[0.88, 0.12]] * 4, [[0.12, 0.88]] * 4], "float32")
    first = probs.argmax(-1).astype("int32")
    mask = np.ones((2, 4), "float32")
    pooled = float(to_np(load_balance_loss(probs, first, mask, mode="pooled")))
    per_group = float(to_np(load_balance_loss(probs, first, mask)))
    assert pooled == pytest.approx(1.0, rel=1e-6)
    assert per_group == pytest.approx(1.76, rel=1e-6)
    assert pooled == pytest.approx(np_load_balance_loss(probs, first, mask), rel=1e-6)
    # An all-padding group is left out of the mean (not counted as 0).
    probs3 = np.concatenate([probs, np.full((1, 4, 2), 0.5, "float32")])
    first3 = np.concatenate([first, np.zeros((1, 4), "int32")])
    mask3 = np.concatenate([mask, np.zeros((1, 4), "float32")])
    assert float(to_np(load_balance_loss(probs3, first3, mask3))) == pytest.approx(1.76, rel=1e-6)
    # One group: both forms agree.
    one = float(to_np(load_balance_loss(probs[:1], first[:1], mask[:1])))
    assert one == pytest.approx(float(to_np(load_balance_loss(probs[:1], first[:1], mask[:1],
                                                                mode="pooled"))), rel=1e-6)
    with pytest.raises(ValueError, match="mode"):
        load_balance_loss(probs, first, mask, mode="mean")


def test_router_load_balance_loss_mode_is_configurable_and_serialized():
    router = TopKRouter(num_experts=2, top_k=1, load_balance_loss_weight=1.0, capacity_factor=None)
    assert router.load_balance_loss_mode == "per_group"
    pooled = TopKRouter(num_experts=2, top_k=1, load_balance_loss_weight=1.0, capacity_factor=None,
                        load_balance_loss_mode="pooled")
    assert TopKRouter.from_config(pooled.get_config()).load_balance_loss_mode == "pooled"
    with pytest.raises(ValueError, match="load_balance_loss_mode.*'mean'"):
        TopKRouter(num_experts=2, load_balance_loss_mode="mean")
    # The added loss uses the mode: the collapsed-groups batch above.
    x = np.array([[[2.0, 0.0]] * 4, [[0.0, 2.0]] * 4], "float32")
    for r, expected in ((router, "per_group"), (pooled, "pooled")):
        r.build((None, None, 2))
        r.kernel.assign(np.eye(2, dtype="float32"))
        r(x, training=True)
        probs = np_softmax(x)
        want = float(to_np(load_balance_loss(probs.astype("float32"),
                                             probs.argmax(-1).astype("int32"),
                                             np.ones((2, 4), "float32"), mode=expected)))
        assert float(to_np(r.losses[0])) == pytest.approx(want, rel=1e-5)


def test_router_z_loss_hand_computed():
    logits = np.zeros((1, 2, 4), "float32")
    got = float(to_np(router_z_loss(logits, np.ones((1, 2), "float32"))))
    assert got == pytest.approx(math.log(4) ** 2, rel=1e-6)
    logits = SWITCH_LOGITS[None]
    mask = np.array([[1, 0, 1, 1, 0, 1]], "float32")
    z2 = np_logsumexp(logits) ** 2
    got = float(to_np(router_z_loss(logits, mask)))
    assert got == pytest.approx((z2 * mask).sum() / mask.sum(), rel=1e-6)
    got = float(to_np(router_z_loss(logits, np.ones((1, 6), "float32"))))
    assert got == pytest.approx(z2.mean(), rel=1e-6)


def test_router_adds_weighted_losses_in_training_only():
    lb_weight, z_weight = 0.25, 0.1
    router = make_router(
        TopKRouter,
        4,
        top_k=2,
        capacity_factor=1.0,
        load_balance_loss_weight=lb_weight,
        z_loss_weight=z_weight,
    )
    mask = np.array([1, 1, 0, 1, 1, 1], "float32")
    probs = np_softmax(SWITCH_LOGITS)[None]
    first = probs.argmax(-1)
    lb = np_load_balance_loss(probs, first, mask[None])
    z = (np_logsumexp(SWITCH_LOGITS) ** 2 * mask).sum() / mask.sum()

    route(router, SWITCH_LOGITS, mask=mask, training=True)
    losses = sorted(float(to_np(x)) for x in router.losses)
    assert len(losses) == 2
    np.testing.assert_allclose(losses, sorted([lb_weight * lb, z_weight * z]), rtol=1e-5)

    # Inference: no losses (and the list from the previous call is cleared).
    route(router, SWITCH_LOGITS, mask=mask, training=False)
    assert router.losses == []

    # Another training call: exactly two losses again, not accumulated.
    route(router, SWITCH_LOGITS, mask=mask, training=True)
    assert len(router.losses) == 2


def test_router_losses_each_weight_independently():
    only_lb = make_router(TopKRouter, 4, top_k=1, load_balance_loss_weight=0.5, z_loss_weight=0.0)
    route(only_lb, SWITCH_LOGITS, training=True)
    probs = np_softmax(SWITCH_LOGITS)[None]
    lb = np_load_balance_loss(probs, probs.argmax(-1), np.ones((1, 6)))
    assert [float(to_np(x)) for x in only_lb.losses] == pytest.approx([0.5 * lb], rel=1e-5)

    only_z = make_router(ExpertChoiceRouter, 4, load_balance_loss_weight=0.0, z_loss_weight=2.0)
    route(only_z, SWITCH_LOGITS, training=True)
    z = (np_logsumexp(SWITCH_LOGITS) ** 2).mean()
    assert [float(to_np(x)) for x in only_z.losses] == pytest.approx([2.0 * z], rel=1e-5)

    none = make_router(TopKRouter, 4, top_k=1, load_balance_loss_weight=0.0, z_loss_weight=0.0)
    route(none, SWITCH_LOGITS, training=True)
    assert none.losses == []


def test_default_loss_weights():
    assert TopKRouter(4).load_balance_loss_weight == 0.01
    assert TopKRouter(4).z_loss_weight == 0.0
    assert ExpertChoiceRouter(4).load_balance_loss_weight == 0.0
    ec = make_router(ExpertChoiceRouter, 4)
    route(ec, SWITCH_LOGITS, training=True)
    assert ec.losses == []


# ---------------------------------------------------------------------------
# Precision
# ---------------------------------------------------------------------------


def test_router_math_is_float32_under_mixed_precision():
    kernel = np.array([[1 / 3, 0.1, 0.7], [0.2, 1 / 7, 0.9], [0.3, 0.6, 1 / 9]], "float32")
    # Inputs exactly representable in bfloat16, so only the kernel and the
    # router maths could lose precision.
    x = np.array([[[1.0, 0.5, 2.0], [0.25, 1.0, 0.0]]], "float32")
    router = make_router(
        TopKRouter, 3, kernel=kernel, top_k=1, capacity_factor=None, dtype="mixed_bfloat16"
    )
    assert router.compute_dtype == "bfloat16"
    assert router.kernel.dtype == "float32"
    np.testing.assert_array_equal(to_np(router.kernel), kernel)
    logits = router.router_logits(x)
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"
    r = router(x)
    assert keras.backend.standardize_dtype(r.slot_gate.dtype) == "float32"
    assert keras.backend.standardize_dtype(r.token_gate.dtype) == "float32"
    exact = np_softmax(x[0] @ kernel.astype(np.float64)).max(-1)
    gates = to_np(r.token_gate)[0, :, 0]
    np.testing.assert_allclose(gates, exact, rtol=2e-6)
    # A bfloat16 kernel would have been visibly off.
    kernel_bf16 = to_np(ops.cast(ops.cast(kernel, "bfloat16"), "float32"))
    rounded = np_softmax(x[0] @ kernel_bf16.astype(np.float64)).max(-1)
    assert np.abs(rounded - exact).max() > 1e-4


def test_pure_bfloat16_policy_stores_bfloat16_and_computes_float32():
    """A pure policy is respected by every variable (keras-hub's precision
    contract); the logits, softmax and gates are still float32 maths on the
    stored (rounded) kernel."""
    kernel = np.array([[1 / 3, 0.1, 0.7], [0.2, 1 / 7, 0.9], [0.3, 0.6, 1 / 9]], "float32")
    x = np.array([[[1.0, 0.5, 2.0], [0.25, 1.0, 0.0]]], "float32")
    router = make_router(
        TopKRouter, 3, kernel=kernel, top_k=1, capacity_factor=None, dtype="bfloat16"
    )
    assert router.kernel.dtype == "bfloat16"
    for v in (router.dropped_fraction, router.expert_load, router.load_cv, router.router_entropy):
        assert v.dtype == "bfloat16"
    kernel_bf16 = to_np(ops.cast(ops.cast(kernel, "bfloat16"), "float32"))
    np.testing.assert_array_equal(to_np(ops.cast(router.kernel, "float32")), kernel_bf16)
    r = router(x)
    assert keras.backend.standardize_dtype(r.token_gate.dtype) == "float32"
    rounded = np_softmax(x[0] @ kernel_bf16.astype(np.float64)).max(-1)
    np.testing.assert_allclose(to_np(r.token_gate)[0, :, 0], rounded, rtol=2e-6)


def test_statistics_are_float32_variables():
    router = make_router(TopKRouter, 4, top_k=1, dtype="mixed_bfloat16")
    for v in (router.dropped_fraction, router.expert_load, router.load_cv, router.router_entropy):
        assert v.dtype == "float32"
        assert not v.trainable
    assert [v.name for v in router.trainable_variables] == ["kernel"]


# ---------------------------------------------------------------------------
# Jitter
# ---------------------------------------------------------------------------


def test_jitter_is_bounded_multiplicative_noise_in_training():
    jitter = 0.2
    router = make_router(TopKRouter, 4, jitter=jitter, seed=1)
    x = np.ones((2, 8, 4), "float32")
    noisy = to_np(router.router_logits(x, training=True))
    assert noisy.min() >= 1 - jitter - 1e-6
    assert noisy.max() <= 1 + jitter + 1e-6
    assert noisy.std() > 0.05  # U(0.8, 1.2) has std 0.115
    # Each call draws fresh noise.
    again = to_np(router.router_logits(x, training=True))
    assert not np.array_equal(noisy, again)


def test_jitter_does_nothing_at_inference():
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(2, 8, 4)).astype("float32")
    jittery = make_router(TopKRouter, 4, top_k=1, capacity_factor=0.5, jitter=0.5, seed=0)
    plain = make_router(TopKRouter, 4, top_k=1, capacity_factor=0.5)
    np.testing.assert_array_equal(to_np(jittery.router_logits(logits)), logits)
    a, b = route(jittery, logits), route(plain, logits)
    np.testing.assert_array_equal(to_np(a.slot_token), to_np(b.slot_token))
    np.testing.assert_array_equal(to_np(a.slot_gate), to_np(b.slot_gate))


@pytest.mark.parametrize("cls", [TopKRouter, ExpertChoiceRouter])
def test_same_seed_same_routing_in_training(cls):
    # Near-ties everywhere so that the noise decides the routing.
    rng = np.random.default_rng(7)
    x = (1.0 + 0.01 * rng.normal(size=(2, 8, 4))).astype("float32")

    def run(seed):
        router = make_router(cls, 4, capacity_factor=1.0, jitter=0.3, seed=seed)
        r = route(router, x, training=True)
        return to_np(r.slot_token), to_np(r.slot_gate)

    plain = route(make_router(cls, 4, capacity_factor=1.0), x, training=True)
    a, b, c = run(42), run(42), run(43)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    assert not np.array_equal(a[0], to_np(plain.slot_token))


# ---------------------------------------------------------------------------
# Arguments and config
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, error, field",
    [
        (TopKRouter, dict(num_experts=4, top_k=5), ValueError, "top_k"),
        (TopKRouter, dict(num_experts=4, top_k=0), ValueError, "top_k"),
        (TopKRouter, dict(num_experts=4, top_k=-1), ValueError, "top_k"),
        (TopKRouter, dict(num_experts=4, top_k=1.5), TypeError, "top_k"),
        (TopKRouter, dict(num_experts=4, top_k=True), TypeError, "top_k"),
        (TopKRouter, dict(num_experts=0), ValueError, "num_experts"),
        (ExpertChoiceRouter, dict(num_experts=-2), ValueError, "num_experts"),
        (TopKRouter, dict(num_experts=4, capacity_factor=0.0), ValueError, "capacity_factor"),
        (TopKRouter, dict(num_experts=4, capacity_factor=-1.0), ValueError, "capacity_factor"),
        (
            TopKRouter,
            dict(num_experts=4, capacity_factor=float("inf")),
            ValueError,
            "capacity_factor",
        ),
        (TopKRouter, dict(num_experts=4, capacity_factor="1"), TypeError, "capacity_factor"),
        (
            TopKRouter,
            dict(num_experts=4, eval_capacity_factor=0),
            ValueError,
            "eval_capacity_factor",
        ),
        (
            ExpertChoiceRouter,
            dict(num_experts=4, capacity_factor=None),
            ValueError,
            "capacity_factor",
        ),
        (
            ExpertChoiceRouter,
            dict(num_experts=4, capacity_factor=0.0),
            ValueError,
            "capacity_factor",
        ),
        (
            ExpertChoiceRouter,
            dict(num_experts=4, eval_capacity_factor=None),
            ValueError,
            "eval_capacity_factor",
        ),
        (
            TopKRouter,
            dict(num_experts=4, load_balance_loss_weight=-0.01),
            ValueError,
            "load_balance_loss_weight",
        ),
        (
            ExpertChoiceRouter,
            dict(num_experts=4, load_balance_loss_weight=-1),
            ValueError,
            "load_balance_loss_weight",
        ),
        (TopKRouter, dict(num_experts=4, z_loss_weight=-1e-3), ValueError, "z_loss_weight"),
        (
            TopKRouter,
            dict(num_experts=4, z_loss_weight=float("nan")),
            ValueError,
            "z_loss_weight",
        ),
        (TopKRouter, dict(num_experts=4, jitter=1.0), ValueError, "jitter"),
        (TopKRouter, dict(num_experts=4, jitter=1.5), ValueError, "jitter"),
        (ExpertChoiceRouter, dict(num_experts=4, jitter=-0.1), ValueError, "jitter"),
        (TopKRouter, dict(num_experts=4, normalize_gates="yes"), TypeError, "normalize_gates"),
    ],
)
def test_invalid_arguments(cls, kwargs, error, field):
    with pytest.raises(error, match=re.escape(f"`{field}`")):
        cls(**kwargs)


def test_valid_edge_arguments():
    assert TopKRouter(4, top_k=4).top_k == 4
    assert TopKRouter(4, jitter=0.0).seed_generator is None
    assert TopKRouter(4, jitter=0.999).jitter == 0.999
    assert TopKRouter(4, capacity_factor=None).eval_capacity_factor is None


@pytest.mark.parametrize(
    "router",
    [
        TopKRouter(
            4,
            top_k=2,
            capacity_factor=1.5,
            eval_capacity_factor=None,
            normalize_gates=False,
            batch_prioritized=True,
            load_balance_loss_weight=0.02,
            z_loss_weight=1e-3,
            jitter=0.1,
            seed=3,
        ),
        ExpertChoiceRouter(4, capacity_factor=1.0, eval_capacity_factor=2.0, z_loss_weight=1e-3),
    ],
    ids=["top_k", "expert_choice"],
)
def test_config_round_trip(router):
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(router))
    assert type(restored) is type(router)
    assert restored.get_config() == router.get_config()
    for name in ("capacity_factor", "eval_capacity_factor", "jitter", "seed"):
        assert getattr(restored, name) == getattr(router, name)


def test_nonbinary_token_mask_means_real_token():
    """Any nonzero mask value marks a real token (0.5 or 2 must route as 1)."""
    kernel = np.eye(2, dtype="float32")
    x = np.array([[[3, 0], [2, 0], [1, 0], [0.5, 0]]], "float32")
    for value in (0.5, 2.0):
        router = make_router(TopKRouter, 2, kernel=kernel, top_k=1, capacity_factor=1.0)
        r = router(x, token_mask=np.array([[1, value, 1, 1]], "float32"))
        np.testing.assert_array_equal(to_np(r.slot_token)[0], [[0, 1], [4, 4]])
        assert np.isclose(router.routing_statistics()["dropped_fraction"], 0.5)


@pytest.mark.parametrize("cls", [TopKRouter, ExpertChoiceRouter])
def test_all_padding_batch_reports_nothing_dropped(cls):
    router = make_router(cls, 2, kernel=np.eye(2, dtype="float32"), capacity_factor=1.0)
    x = np.ones((1, 4, 2), "float32")
    r = router(x, token_mask=np.zeros((1, 4), "float32"))
    assert (to_np(r.slot_token) == 4).all()
    assert router.routing_statistics()["dropped_fraction"] == 0.0

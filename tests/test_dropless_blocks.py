"""The block-sparse dropless path of MoEFeedForward (`dropless_impl="blocks"`):
its block layout; when "auto" selects it; the JAX fast path against the
portable one; its config. That it equals the slot path (outputs, auxiliary
losses, router statistics and gradients, on every backend, LoRA and int8
banks included) is tested with the other dropless paths in
test_dropless_paths.py."""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import MOE_PAIR_SHAPE
from conftest import moe_pair
from conftest import moe_pair_inputs
from conftest import to_numpy
from keras import ops

from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import dropless_blocks

SHAPE = MOE_PAIR_SHAPE


def _pair(num_experts, router_options, activation="gelu", group_size=None,
          router="top_k", block_size=None):
    """A slot-path layer and a block-path layer with the same weights."""
    return moe_pair("blocks", num_experts, router_options, activation, group_size, router,
                    dropless_block_size=block_size)


_inputs = moe_pair_inputs


def test_block_layout_is_a_static_bound_and_sparse():
    """Every kept choice gets exactly one row, in a block of its expert; a
    padding token gets none; blocks are expert-sorted, the used ones first."""
    rng = np.random.default_rng(3)
    G, S, k, E, b = 3, 10, 2, 5, 4
    probs = rng.random((G, S, E)).astype("float32")
    expert = np.argsort(-probs, axis=-1)[..., :k].astype("int32")
    keep = np.ones((G, S, k), bool)
    keep[2, 7:] = False
    # The router's positions: choice-major running count per (group, expert).
    position = np.zeros((G, S, k), "int32")
    for g in range(G):
        count = np.zeros(E, int)
        for j in range(k):
            for s in range(S):
                if keep[g, s, j]:
                    position[g, s, j] = count[expert[g, s, j]]
                    count[expert[g, s, j]] += 1
    choice_row, row_choice, block_expert, blocks = (
        to_numpy(t) for t in dropless_blocks.block_routing(expert, position, keep, E, b)
    )
    n = dropless_blocks.num_blocks(G * S * k, E, b)
    assert row_choice.shape == (n * b,) and block_expert.shape == (n,)
    flat_expert, flat_keep = expert.reshape(-1), keep.reshape(-1)
    np.testing.assert_array_equal(choice_row < 0, ~flat_keep)  # padding: no row
    for c in np.flatnonzero(flat_keep):
        row = choice_row[c]
        assert row_choice[row] == c  # one row each, and back
        assert block_expert[row // b] == flat_expert[c]  # in its expert's block
        assert row // b < blocks.sum()
    assert (row_choice >= 0).sum() == flat_keep.sum()
    assert np.all(np.diff(block_expert) >= 0)
    np.testing.assert_array_equal(
        np.bincount(block_expert[: blocks.sum()], minlength=E), blocks)
    np.testing.assert_array_equal(blocks, -(-np.bincount(flat_expert[flat_keep], minlength=E)
                                            // b))


def test_num_blocks_and_block_size():
    assert dropless_blocks.num_blocks(8192, 32, 64) == (8192 + 32 * 63) // 64
    assert dropless_blocks.num_blocks(4, 8, 16) == 4  # at most one per choice
    assert dropless_blocks.num_blocks(1, 8, 1) == 1
    assert dropless_blocks.block_size(2, 64) == 1  # decoding: one row per choice
    for rows, experts in [(8192, 32), (32768, 64), (8192, 8)]:
        b = dropless_blocks.block_size(rows, experts)
        assert b in dropless_blocks.BLOCK_SIZES
        cost = dropless_blocks.modelled_cost(rows, experts, b)
        assert cost == min(dropless_blocks.modelled_cost(rows, experts, c)
                           for c in dropless_blocks.BLOCK_SIZES)


def test_auto_rule(monkeypatch):
    """"auto" takes the blocks where the cost model says they pay (many
    experts per choice), the slot path otherwise and under a distribution."""
    assert dropless_blocks.blocks_pay(4096, 2, 32)
    assert not dropless_blocks.blocks_pay(4096, 2, 2)  # E = k: slots are exact
    x, mask = _inputs()
    slots, auto = _pair(8, {"top_k": 1, "capacity_factor": None})
    auto = MoEFeedForward.from_config({**slots.get_config(), "dropless_impl": "auto"})
    auto.build(SHAPE)
    auto.set_weights(slots.get_weights())
    routing = auto.router(x, training=True)
    T = SHAPE[0] * SHAPE[1]
    expected = "blocks" if dropless_blocks.blocks_pay(T, 1, 8) else "slots"
    assert auto.expert_path(routing, SHAPE[1], T) == expected
    monkeypatch.setattr(dropless_blocks, "blocks_pay", lambda *a: True)
    assert auto.expert_path(routing, SHAPE[1], T) == "blocks"
    assert auto.expert_path(routing, SHAPE[1], None) == "slots"  # unknown T
    np.testing.assert_allclose(
        to_numpy(auto(x, padding_mask=mask, training=True)),
        to_numpy(slots(x, padding_mask=mask, training=True)), rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(dropless_blocks, "blocks_pay", lambda *a: False)
    assert auto.expert_path(routing, SHAPE[1], T) == "slots"


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="keras.distribution is JAX")
def test_distribution_falls_back_to_slots(monkeypatch):
    """Under a keras.distribution "auto" keeps the slot path, and an
    expert-parallel layout (dispatched tensors split on an expert axis)
    makes even "blocks" use it."""
    import jax

    from keras_brainformer.models.brainformer.brainformer_layout_map import get_layout_map

    x, _ = _inputs()
    slots, blocks = _pair(4, {"top_k": 2, "capacity_factor": None})
    auto = MoEFeedForward.from_config({**slots.get_config(), "dropless_impl": "auto"})
    auto.build(SHAPE)
    routing = blocks.router(x, training=True)
    T = SHAPE[0] * SHAPE[1]
    monkeypatch.setattr(dropless_blocks, "blocks_pay", lambda *a: True)
    devices = jax.devices()[:1]
    with keras.distribution.DataParallel(devices=devices).scope():
        assert auto.expert_path(routing, SHAPE[1], T) == "slots"
        assert blocks.expert_path(routing, SHAPE[1], T) == "blocks"
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "expert"), devices)
    layout_map = get_layout_map(mesh)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map)
    monkeypatch.setattr(type(blocks), "path", property(lambda self: "block_0/1_moe"))
    with distribution.scope():
        assert blocks._expert_parallel()
        assert blocks.expert_path(routing, SHAPE[1], T) == "slots"


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="the fast path is JAX")
@pytest.mark.parametrize("activation", ["gelu", "gated_silu"])
def test_jax_fast_path_equals_portable_path(activation):
    import jax

    x, mask = _inputs(4)
    _, blocks = _pair(8, {"top_k": 2, "capacity_factor": None}, activation, block_size=4)
    routing = blocks.router(ops.reshape(x, (-1, 16, 8)), training=True)
    choice_row, row_choice, block_expert, counts = dropless_blocks.block_routing(
        routing.token_expert, routing.token_position, routing.token_keep, 8, 4)
    row_token = to_numpy(row_choice) // 2
    rows = ops.reshape(
        ops.take(ops.reshape(x, (-1, 8)), np.maximum(row_token, 0), axis=0), (-1, 4, 8)
    ) * ops.reshape(ops.cast(row_choice >= 0, "float32"), (-1, 4, 1))
    names = ["w_in", "w_gate", "w_out"] if blocks.experts.gated else ["w_in", "w_out"]
    bank = blocks.experts

    def run(fn):
        variables = [getattr(bank, name) for name in names]

        def loss(weights, rows):
            with keras.StatelessScope(state_mapping=list(zip(variables, weights))):
                out = fn(bank, rows, block_expert, counts)
            return jax.numpy.sum(out * out), out

        weights = [v.value for v in variables]
        return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(weights, rows)

    (_, out_fast), (g_fast, gx_fast) = run(
        lambda bank, rows, e, blocks: dropless_blocks.jax_expert_blocks(bank, rows, blocks))
    (_, out_ref), (g_ref, gx_ref) = run(
        lambda bank, rows, e, blocks: bank.call_blocks(rows, e))
    np.testing.assert_allclose(to_numpy(out_fast), to_numpy(out_ref), rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_ref):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(to_numpy(gx_fast), to_numpy(gx_ref), rtol=1e-4, atol=1e-6)


def test_config_round_trip():
    layer = MoEFeedForward(4, 8, capacity_factor=None,
                           dropless_impl="blocks", dropless_block_size=32)
    config = layer.get_config()
    assert config["dropless_impl"] == "blocks" and config["dropless_block_size"] == 32
    restored = MoEFeedForward.from_config(config)
    assert (restored.dropless_impl, restored.dropless_block_size) == ("blocks", 32)
    assert MoEFeedForward(4, 8).get_config()["dropless_block_size"] is None


@pytest.mark.parametrize("value", [0, -4, 2.5, "64", True])
def test_bad_block_size_is_rejected(value):
    with pytest.raises((ValueError, TypeError), match="dropless_block_size") as error:
        MoEFeedForward(4, 8, dropless_block_size=value)
    assert repr(value) in str(error.value)
    assert "positive integer" in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend,extra,expected",
    [
        ("jax", [], "| T | k | E | b |"),
        ("tensorflow", [], "| T | k | E | b |"),
        ("jax", ["--preset", "glam_tiny", "--batch", "2"], "causal (auto) / as_trained"),
    ],
)
def test_benchmark_quick_mode_runs(backend, extra, expected):
    root = pathlib.Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    result = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "dropless_blocks.py"), "--quick",
         "--backend", backend, *extra],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout

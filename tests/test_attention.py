"""CausalSelfAttention and the block's KV-cache path."""

import numpy as np
import pytest
from conftest import to_numpy
from keras import ops

from keras_brainformer.layers import AttentionSpec
from keras_brainformer.layers import BlockSpec
from keras_brainformer.layers import BrainformerBlock
from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.layers import FeedForwardSpec
from keras_brainformer.layers import MoESpec


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
            MoESpec(4, 16, k=2, capacity_factor=None),
            AttentionSpec(num_heads=3, head_dim=6),
            FeedForwardSpec(16, activation="gated_relu"),
        ]
    )
    block = BrainformerBlock(spec)
    x = np.random.default_rng(4).normal(size=(2, 6, 8)).astype("float32")
    full = to_numpy(block(x))
    cache = [
        ops.zeros((2, 2, 6, 2, 4)),
        ops.zeros((2, 2, 6, 3, 6)),
    ]
    outs = []
    for t in range(6):
        out, cache = block(x[:, t : t + 1], cache=cache, cache_update_index=t)
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
    x = np.random.default_rng(5).normal(size=(2, 6, 8)).astype("float32")
    mask = np.ones((2, 6), "int32")
    mask[1, 4:] = 0
    full = to_numpy(block(x, padding_mask=mask))
    cache = [ops.zeros((2, 2, 6, 2, 4))]
    out, cache = block(x[:, :4], padding_mask=mask, cache=cache, cache_update_index=0)
    outs = [to_numpy(out)]
    for t in range(4, 6):
        out, cache = block(x[:, t : t + 1], padding_mask=mask, cache=cache, cache_update_index=t)
        outs.append(to_numpy(out))
    cached = np.concatenate(outs, axis=1)
    np.testing.assert_allclose(cached[0], full[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cached[1, :4], full[1, :4], rtol=1e-5, atol=1e-5)


def test_cached_decoding_differs_from_full_pass_for_expert_choice():
    """Documented limitation: a decoding step routes its token alone, so a
    router that ranks tokens across the group behaves differently."""
    spec = BlockSpec([AttentionSpec(num_heads=2), MoESpec(4, 16, router="expert_choice")])
    block = BrainformerBlock(spec)
    x = np.random.default_rng(6).normal(size=(1, 8, 8)).astype("float32")
    full = to_numpy(block(x))
    cache = [ops.zeros((1, 2, 8, 2, 4))]
    outs = []
    for t in range(8):
        out, cache = block(x[:, t : t + 1], cache=cache, cache_update_index=t)
        outs.append(to_numpy(out))
    assert np.abs(np.concatenate(outs, axis=1) - full).max() > 1e-3

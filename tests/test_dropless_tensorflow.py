"""The TensorFlow fast path of the block-sparse dropless experts
(`dropless_blocks.tf_expert_blocks`): plain banks take it; its block size
follows its cost model; it equals the portable block path
(`ExpertBank.call_blocks`) with experts that have no blocks and unused
trailing blocks, one block per matmul and in runs of blocks; inference is
exactly causal, the training step causal up to rounding. That it equals the
slot path (outputs, auxiliary losses, router statistics and gradients w.r.t.
inputs and weights, eagerly and XLA-compiled, for top-1, top-2 and top-k = E
with a padding mask) and that LoRA and int8 banks fall back to the portable
path is tested with the other dropless paths in test_dropless_paths.py
(`tf_blocks`)."""

import keras
import numpy as np
import pytest
from conftest import max_leak
from conftest import moe_pair
from conftest import to_numpy

from keras_brainformer.layers import dropless_blocks

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the TensorFlow fast path"
)


def _close(actual, expected, rtol, err_msg=""):
    actual, expected = to_numpy(actual), to_numpy(expected)
    # Summation order differs: tolerances relative to the largest entry.
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=1e-6 * max(1.0, np.abs(expected).max()),
        err_msg=err_msg,
    )


def test_plain_bank_takes_the_fast_path():
    _, blocks = moe_pair("blocks", 4, {"top_k": 2, "capacity_factor": None})
    assert dropless_blocks.fast_expert_blocks(blocks.experts) is dropless_blocks.tf_expert_blocks


def test_block_size_follows_the_paths_cost_model():
    """A training step multiplies runs of blocks (`chunk_rows`), so its
    blocks cost `TF_CHUNKED_BLOCK_COST_ROWS` beyond their rows and the layer
    picks smaller ones; inference (one block per matmul) and a LoRA bank
    (portable path) keep `BLOCK_COST_ROWS`."""
    _, plain = moe_pair("auto", 32, {"top_k": 2, "capacity_factor": None})
    _, lora = moe_pair("auto", 32, {"top_k": 2, "capacity_factor": None})
    lora.experts.enable_lora(2)
    chunked, one = dropless_blocks.TF_CHUNKED_BLOCK_COST_ROWS, dropless_blocks.BLOCK_COST_ROWS
    assert dropless_blocks.chunk_rows(plain.experts, True) == dropless_blocks.TF_CHUNK_ROWS
    for bank, training in ((plain.experts, False), (plain.experts, None),
                           (lora.experts, True)):
        assert dropless_blocks.chunk_rows(bank, training) is None
        assert dropless_blocks.block_cost_rows(bank, training) == one
    assert dropless_blocks.block_cost_rows(plain.experts, True) == chunked
    assert plain._block_size(4096, 2, training=True) == 32
    assert plain._block_size(4096, 2) == lora._block_size(4096, 2, training=True) == 128


def test_training_step_is_causal_up_to_rounding_and_inference_exactly(monkeypatch):
    """Dropless top-2 on the fast path: inference multiplies one `b`-row
    block at a time (a token's output does not depend on the later tokens,
    to the bit); the training step's runs of blocks follow the routing, so
    only rounding may move (far below the 1e-4 of a real leak)."""
    import tensorflow as tf

    _, layer = moe_pair("blocks", 4, {"top_k": 2, "capacity_factor": None}, "gelu",
                        dropless_block_size=2)
    runs = []
    original = dropless_blocks.tf_expert_blocks
    monkeypatch.setattr(dropless_blocks, "tf_expert_blocks",
                        lambda *a: runs.append(a[3]) or original(*a))
    x = np.random.default_rng(0).normal(size=(2, 16, 8)).astype("float32")
    for training, chunk_rows in ((False, None), (True, dropless_blocks.TF_CHUNK_ROWS)):
        runs.clear()
        forward = tf.function(lambda x, t=training: layer(x, training=t), jit_compile=True)
        leaks = [max_leak(forward, x, t) for t in range(15)]
        if training:
            assert max(leaks) < 1e-6, leaks
        else:
            assert max(leaks) == 0.0, leaks
        assert runs and set(runs) == {chunk_rows}, (training, runs)


@pytest.mark.parametrize("chunk_rows", [None, 8, 16], ids=["blocks", "runs8", "runs16"])
@pytest.mark.parametrize("activation", ["gelu", "gated_silu"])
def test_fast_path_equals_portable_path_with_empty_experts(activation, chunk_rows):
    """Against `ExpertBank.call_blocks` on a layout where some experts have
    no blocks, one has several and the last blocks are unused, compiled;
    one block per matmul and runs of up to 2 and 4 blocks."""
    import tensorflow as tf

    _, blocks = moe_pair("blocks", 6, {"top_k": 1, "capacity_factor": None}, activation)
    bank = blocks.experts
    # 9 used blocks of 12; expert 1's 6 blocks take the largest run twice.
    counts = np.array([0, 6, 0, 1, 2, 0], "int32")
    used = np.repeat(np.arange(6), counts)
    block_expert = np.concatenate([used, np.full(3, 5)]).astype("int32")
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(12, 4, 8)).astype("float32")
    rows[len(used):] = 0.0  # unused blocks hold zero rows
    rows[2, 3:] = 0.0  # and part-filled blocks zero rows
    names = ["w_in", "w_gate", "w_out"] if bank.gated else ["w_in", "w_out"]
    weights = [getattr(bank, name) for name in names]

    @tf.function(jit_compile=True)
    def run(fast, rows):
        with tf.GradientTape() as tape:
            tape.watch(rows)
            if fast:
                out = dropless_blocks.tf_expert_blocks(bank, rows, counts, chunk_rows)
            else:
                out = bank.call_blocks(rows, block_expert)
            loss = tf.reduce_sum(out * out * tf.range(1.0, 13.0)[:, None, None])
        grads = tape.gradient(loss, [w.value for w in weights] + [rows])
        return out, [tf.convert_to_tensor(g) for g in grads]

    out_fast, g_fast = run(True, tf.constant(rows))
    out_ref, g_ref = run(False, tf.constant(rows))
    _close(out_fast, out_ref, 1e-5)
    np.testing.assert_array_equal(to_numpy(out_fast)[len(used):], 0.0)
    for name, a, b in zip(names + ["rows"], g_fast, g_ref):
        _close(a, b, 1e-4, err_msg=name)
    for name, g in zip(names, g_fast):  # experts without blocks: zero gradient
        np.testing.assert_array_equal(to_numpy(g)[[0, 2]], 0.0, err_msg=name)

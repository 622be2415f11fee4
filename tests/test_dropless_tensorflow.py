"""The TensorFlow fast path of the block-sparse dropless experts
(`dropless_blocks.tf_expert_blocks`) equals the slot path: outputs,
auxiliary losses, router statistics and gradients w.r.t. inputs and weights,
eagerly and XLA-compiled, for top-1, top-2 and top-k = E with a padding
mask; it equals the portable block path (`ExpertBank.call_blocks`) with
experts that have no blocks and unused trailing blocks, one block per matmul
and in runs of blocks; LoRA and int8 banks fall back to the portable path;
inference is exactly causal, the training step causal up to rounding."""

import keras
import numpy as np
import pytest
from conftest import assert_path_taken_and_equal_to_slots
from conftest import max_leak
from conftest import moe_pair
from conftest import moe_pair_inputs
from conftest import to_numpy
from keras import ops

from keras_brainformer.layers import dropless_blocks

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the TensorFlow fast path"
)


def _spy(monkeypatch, name, fail=False):
    """Counts calls of `dropless_blocks.<name>` (or fails on one)."""
    calls = []
    original = getattr(dropless_blocks, name)

    def spy(*args):
        if fail:
            raise AssertionError(f"{name} must not run here")
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(dropless_blocks, name, spy)
    return calls


def _step(layer, x, mask, training, compiled):
    """`(loss, y, aux losses, new non-trainables, weight grads, input grad)`
    of `sum(y²) + aux losses` through `stateless_call`, eagerly or in a
    `tf.function(jit_compile=True)` (as `Model.fit` compiles it)."""
    import tensorflow as tf

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def step(trainable, x):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            tape.watch(x)
            y, new_non_trainable, losses = layer.stateless_call(
                trainable, non_trainable, x, padding_mask=mask, training=training,
                return_losses=True,
            )
            total = ops.sum(ops.square(y)) + sum(losses)
        grads, grad_x = tape.gradient(total, (trainable, x))
        grads = [tf.convert_to_tensor(g) for g in grads]
        return total, y, losses, new_non_trainable, grads, grad_x

    if compiled:
        step = tf.function(step, jit_compile=True)
    return step(trainable, tf.constant(x))


def _close(actual, expected, rtol, err_msg=""):
    actual, expected = to_numpy(actual), to_numpy(expected)
    # Summation order differs: tolerances relative to the largest entry.
    np.testing.assert_allclose(
        actual, expected, rtol=rtol, atol=1e-6 * max(1.0, np.abs(expected).max()),
        err_msg=err_msg,
    )


def assert_same_step(slots, blocks, x, mask, training, compiled):
    loss_s, y_s, losses_s, nt_s, g_s, gx_s = _step(slots, x, mask, training, compiled)
    loss_b, y_b, losses_b, nt_b, g_b, gx_b = _step(blocks, x, mask, training, compiled)
    _close(y_b, y_s, 1e-5)
    assert np.abs(to_numpy(y_s)).max() > 0
    np.testing.assert_array_equal(to_numpy(y_b)[1, 11:], 0.0)  # padding: no expert output
    np.testing.assert_allclose(float(loss_b), float(loss_s), rtol=1e-5)
    assert len(losses_b) == len(losses_s) == (1 if training else 0) + (
        training and slots.router.z_loss_weight > 0
    )
    for a, b in zip(losses_b, losses_s):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6)
    assert len(nt_b) == len(nt_s)
    for a, b in zip(nt_b, nt_s):  # router statistics
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7)
    names = [v.path for v in slots.trainable_variables]
    assert len(g_s) == len(g_b) == len(names)
    for name, a, b in zip(names, g_b, g_s):
        _close(a, b, 1e-4, err_msg=name)
        assert np.abs(to_numpy(b)).max() > 0, name
    _close(gx_b, gx_s, 1e-4)


CASES = [
    # (E, router kwargs, activation, block size, training)
    (4, {"k": 1, "capacity_factor": None}, "gelu", 3, True),  # top-1
    (8, {"k": 2, "capacity_factor": None, "z_loss_weight": 1e-3}, "gated_silu", 2, True),
    (4, {"k": 4, "capacity_factor": None}, "relu", 4, True),  # top-k = E
    (8, {"k": 2, "capacity_factor": None}, "gated_gelu", 1, False),
]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "xla"])
@pytest.mark.parametrize("num_experts,router_kwargs,activation,block_size,training", CASES)
def test_fast_path_equals_slots(num_experts, router_kwargs, activation, block_size,
                                training, compiled, monkeypatch):
    x, mask = moe_pair_inputs()
    slots, blocks = moe_pair("blocks", num_experts, router_kwargs, activation,
                             dropless_block_size=block_size)
    calls = _spy(monkeypatch, "tf_expert_blocks")
    assert_same_step(slots, blocks, x, mask, training, compiled)
    assert calls, "the TensorFlow fast path did not run"


@pytest.mark.parametrize(
    "router,router_kwargs",
    [("top_k", {"k": 2, "capacity_factor": 1.0}), ("expert_choice", {"capacity_factor": 2.0})],
)
def test_fast_path_serves_causal_inference_routing(router, router_kwargs, monkeypatch):
    x, mask = moe_pair_inputs(1)
    slots, blocks = moe_pair("blocks", 4, router_kwargs, "gated_relu", router=router,
                             dropless_block_size=4)
    assert_path_taken_and_equal_to_slots(
        monkeypatch, dropless_blocks, "tf_expert_blocks", blocks, slots, x, mask
    )


@pytest.mark.parametrize("adapt", ["lora", "int8"])
def test_lora_and_int8_banks_fall_back_to_the_portable_path(adapt, monkeypatch):
    """The fast path reads `w_in`/`w_gate`/`w_out` alone: banks with LoRA
    adapters or int8 weights take `ExpertBank.call_blocks` (and still equal
    the slot path)."""
    x, mask = moe_pair_inputs(2)
    slots, blocks = moe_pair("blocks", 4, {"k": 2, "capacity_factor": None}, "gated_silu",
                             dropless_block_size=4)
    for layer in (slots, blocks):
        if adapt == "lora":
            layer.experts.enable_lora(2, b_initializer="ones")
        else:
            layer.experts.quantize("int8")
    blocks.set_weights(slots.get_weights())
    assert dropless_blocks.fast_expert_blocks(blocks.experts) is None
    _spy(monkeypatch, "tf_expert_blocks", fail=True)
    portable = []
    original = type(blocks.experts).call_blocks
    monkeypatch.setattr(
        type(blocks.experts), "call_blocks",
        lambda self, *a: portable.append(1) or original(self, *a),
    )
    assert_same_step(slots, blocks, x, mask, training=True, compiled=False)
    assert portable, "the portable path did not run"


def test_plain_bank_takes_the_fast_path():
    _, blocks = moe_pair("blocks", 4, {"k": 2, "capacity_factor": None})
    assert dropless_blocks.fast_expert_blocks(blocks.experts) is dropless_blocks.tf_expert_blocks


def test_block_size_follows_the_paths_cost_model():
    """A training step multiplies runs of blocks (`chunk_rows`), so its
    blocks cost `TF_CHUNKED_BLOCK_COST_ROWS` beyond their rows and the layer
    picks smaller ones; inference (one block per matmul) and a LoRA bank
    (portable path) keep `BLOCK_COST_ROWS`."""
    _, plain = moe_pair("auto", 32, {"k": 2, "capacity_factor": None})
    _, lora = moe_pair("auto", 32, {"k": 2, "capacity_factor": None})
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

    _, layer = moe_pair("blocks", 4, {"k": 2, "capacity_factor": None}, "gelu",
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

    _, blocks = moe_pair("blocks", 6, {"k": 1, "capacity_factor": None}, activation)
    bank = blocks.experts
    # 9 used blocks of 12; expert 1's 6 blocks take the largest run twice.
    counts = np.array([0, 6, 0, 1, 2, 0], "int32")
    used = np.repeat(np.arange(6), counts)
    block_expert = np.concatenate([used, np.full(3, 5)]).astype("int32")
    rng = np.random.default_rng(5)
    rows = rng.normal(size=(12, 4, 8)).astype("float32")
    rows[len(used):] = 0.0  # unused blocks hold zero rows
    rows[2, 3:] = 0.0  # and part-filled blocks zero rows
    names = ["w_in", "w_gate", "w_out"] if bank._gated else ["w_in", "w_out"]
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


def test_fast_path_under_mixed_bfloat16(monkeypatch):
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, mask = moe_pair_inputs()
    slots, blocks = moe_pair("blocks", 4, {"k": 2, "capacity_factor": None}, "gated_silu",
                             dropless_block_size=4)
    calls = _spy(monkeypatch, "tf_expert_blocks")
    y_s = to_numpy(slots(x, padding_mask=mask, training=True)).astype("float32")
    y_b = blocks(x, padding_mask=mask, training=True)
    assert calls
    assert keras.backend.standardize_dtype(y_b.dtype) == "bfloat16"
    np.testing.assert_allclose(to_numpy(y_b).astype("float32"), y_s, rtol=2e-2, atol=2e-3)

"""Every dropless path of MoEFeedForward equals the slot path, one test per
property parametrised over the paths:

- `blocks`: `dropless_impl="blocks"` (the block-sparse layout; on each
  backend its fast path for plain banks), every backend;
- `ragged`: `dropless_impl="ragged"` (grouped matmuls), JAX only;
- `tf_blocks`: `"blocks"` on TensorFlow with its fast path
  (`dropless_blocks.tf_expert_blocks`) spied, eagerly and XLA-compiled.

Outputs, auxiliary losses, router statistics and gradients w.r.t. weights and
inputs; the causal inference routing takes the path; routing that drops keeps
the slot path; LoRA and int8 banks take the portable block path; mixed
bfloat16. What is one path's own (block layouts, the "auto" rules, configs,
the TensorFlow runs of blocks) stays in test_dropless_blocks.py,
test_ragged_experts.py and test_dropless_tensorflow.py."""

import dataclasses
import types

import keras
import numpy as np
import pytest
from conftest import assert_path_taken_and_equal_to_slots
from conftest import moe_pair
from conftest import moe_pair_inputs
from conftest import to_numpy
from keras import ops

from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import dropless_blocks
from keras_brainformer.layers import ragged_experts


@dataclasses.dataclass(frozen=True)
class Path:
    impl: str  # the layer's `dropless_impl`
    module: types.ModuleType  # `module.function` runs on this path and no other
    function: str
    backend: str | None  # the one backend it runs on; None: every backend
    block_size: int | None  # `dropless_block_size` where a test does not choose one
    # Tolerances: `atol` 1e-6 relative to the largest entry (summation order
    # differs from the slot path's), or absolute.
    relative_atol: bool


PATHS = {
    "blocks": Path("blocks", dropless_blocks, "block_routing", None, 4, True),
    "ragged": Path("ragged", ragged_experts, "ragged_experts_combine", "jax", None, False),
    "tf_blocks": Path("blocks", dropless_blocks, "tf_expert_blocks", "tensorflow", 4, True),
}


def path_param(name, *values, id=None):
    """`pytest.param(name, *values)`, skipped off the path's backend."""
    backend = PATHS[name].backend
    marks = pytest.mark.skipif(
        backend is not None and keras.backend.backend() != backend,
        reason=f"the {name} path runs on {backend} only",
    )
    return pytest.param(name, *values, marks=marks, id=id or name)


def pair(path, num_experts, router_options, activation="gelu", group_size=None,
         router="top_k", block_size=None):
    """A slot-path layer and one on `path` with the same weights."""
    extra = {"dropless_block_size": block_size} if path.impl == "blocks" else {}
    assert path.impl == "blocks" or block_size is None
    return moe_pair(path.impl, num_experts, router_options, activation, group_size, router,
                    **extra)


def spy(monkeypatch, path, fail=False):
    """Counts calls of `path.module.<path.function>` (or fails on one)."""
    calls = []
    original = getattr(path.module, path.function)

    def spied(*args):
        if fail:
            raise AssertionError(f"{path.function} must not run here")
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(path.module, path.function, spied)
    return calls


def _step(layer, x, mask, training, compiled):
    """`(loss, y, aux losses, new non-trainables, weight grads, input grad)` of
    `sum(y²) + aux losses` through `stateless_call`: jitted on JAX; on
    TensorFlow eagerly, or in a `tf.function(jit_compile=True)` (as `Model.fit`
    compiles it) when `compiled`."""
    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def forward(trainable, x):
        y, new_non_trainable, losses = layer.stateless_call(
            trainable, non_trainable, x, padding_mask=mask, training=training,
            return_losses=True,
        )
        total = ops.sum(ops.square(y)) + sum(losses)
        return total, y, losses, new_non_trainable

    if keras.backend.backend() == "jax":
        import jax

        def loss_fn(trainable, x):
            total, *aux = forward(trainable, x)
            return total, aux

        fn = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
        (loss, (y, losses, nt)), (g, gx) = fn(trainable, ops.convert_to_tensor(x))
        return loss, y, losses, nt, g, gx
    import tensorflow as tf

    def step(trainable, x):
        with tf.GradientTape() as tape:
            tape.watch(trainable)
            tape.watch(x)
            total, y, losses, nt = forward(trainable, x)
        grads, grad_x = tape.gradient(total, (trainable, x))
        return total, y, losses, nt, [tf.convert_to_tensor(g) for g in grads], grad_x

    if compiled:
        step = tf.function(step, jit_compile=True)
    return step(trainable, tf.constant(x))


def _close(path, actual, expected, rtol, err_msg=""):
    actual, expected = to_numpy(actual), to_numpy(expected)
    scale = max(1.0, np.abs(expected).max()) if path.relative_atol else 1.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-6 * scale,
                               err_msg=err_msg)


def assert_same_step(path, slots, other, x, mask, training, compiled=False):
    loss_s, y_s, losses_s, nt_s, g_s, gx_s = _step(slots, x, mask, training, compiled)
    loss_o, y_o, losses_o, nt_o, g_o, gx_o = _step(other, x, mask, training, compiled)
    _close(path, y_o, y_s, 1e-5)
    assert np.abs(to_numpy(y_s)).max() > 0
    if mask is not None:
        np.testing.assert_array_equal(to_numpy(y_o)[1, 11:], 0.0)  # padding: no expert output
    np.testing.assert_allclose(float(loss_o), float(loss_s), rtol=1e-5)
    assert len(losses_o) == len(losses_s) == (1 if training else 0) + (
        training and slots.router.z_loss_weight > 0
    )
    for a, b in zip(losses_o, losses_s):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6)
    assert len(nt_o) == len(nt_s)
    for a, b in zip(nt_o, nt_s):  # router statistics
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-6, atol=1e-7)
    names = [v.path for v in slots.trainable_variables]
    assert len(g_s) == len(g_o) == len(names)
    for name, a, b in zip(names, g_o, g_s):
        _close(path, a, b, 1e-4, err_msg=name)
        assert np.abs(to_numpy(b)).max() > 0, name
    _close(path, gx_o, gx_s, 1e-4)


def _case_id(path, num_experts, router_options, activation, group_size, block_size,
             training, compiled):
    extra = "".join(f"-{key}={value}" for key, value in router_options.items()
                    if key not in ("top_k", "capacity_factor"))
    return (f"{path}-E{num_experts}-k{router_options['top_k']}-{activation}{extra}"
            + (f"-group{group_size}" if group_size else "")
            + (f"-block{block_size}" if block_size else "")
            + ("-train" if training else "-infer") + ("-xla" if compiled else ""))


def _cases(path, cases):
    return [path_param(path, *case, id=_case_id(path, *case)) for case in cases]


def _dropless(k, **kwargs):
    return {"top_k": k, "capacity_factor": None, **kwargs}


# (E, router options, activation, group size, block size, training, compiled)
EQUAL_STEP_CASES = (
    _cases("blocks", [
        (2, _dropless(1), "gelu", None, None, True, False),
        (4, _dropless(1), "gated_silu", 8, 3, False, False),
        (8, _dropless(2, z_loss_weight=1e-3), "relu", 4, 1, True, False),
        (4, _dropless(4), "squared_relu", None, 2, True, False),  # top-k = E
    ])
    + _cases("ragged", [
        (num_experts, router_options, activation, group_size, None, training, False)
        for training in (True, False)
        for num_experts, router_options, activation, group_size in [
            (2, _dropless(1), "gelu", None),
            (4, _dropless(1), "gated_silu", 8),
            (4, _dropless(2), "gelu", 8),
            (4, _dropless(2), "gated_gelu", None),
            (8, _dropless(2, z_loss_weight=1e-3), "relu", 4),
            (8, _dropless(2, normalize_gates=False), "squared_relu", None),
        ]
    ])
    + _cases("tf_blocks", [
        (*case, compiled)
        for case in [
            (4, _dropless(1), "gelu", None, 3, True),  # top-1
            (8, _dropless(2, z_loss_weight=1e-3), "gated_silu", None, 2, True),
            (4, _dropless(4), "relu", None, 4, True),  # top-k = E
            (8, _dropless(2), "gated_gelu", None, 1, False),
        ]
        for compiled in (False, True)
    ])
)


@pytest.mark.parametrize(
    "path,num_experts,router_options,activation,group_size,block_size,training,compiled",
    EQUAL_STEP_CASES,
)
def test_path_equals_slots_outputs_losses_statistics_gradients(
    path, num_experts, router_options, activation, group_size, block_size, training,
    compiled, monkeypatch,
):
    path = PATHS[path]
    x, mask = moe_pair_inputs()
    slots, other = pair(path, num_experts, router_options, activation, group_size,
                        block_size=block_size)
    assert slots.router.z_loss_weight == router_options.get("z_loss_weight", 0.0)
    calls = spy(monkeypatch, path)
    assert_same_step(path, slots, other, x, mask, training, compiled)
    assert calls, f"{path.function} did not run"


@pytest.mark.parametrize(
    "router,router_options",
    [("top_k", {"top_k": 2, "capacity_factor": 1.0}), ("expert_choice", {"capacity_factor": 2.0})],
    ids=["top_k", "expert_choice"],
)
@pytest.mark.parametrize("path", [path_param(name) for name in PATHS])
def test_path_serves_causal_inference_routing(path, router, router_options, monkeypatch):
    """The causal inference routing is dropless token choice: it takes the
    path (also for routers that drop in training) and matches."""
    path = PATHS[path]
    x, mask = moe_pair_inputs(1)
    slots, other = pair(path, 4, router_options, "gated_relu", router=router,
                        block_size=path.block_size)
    assert_path_taken_and_equal_to_slots(
        monkeypatch, path.module, path.function, other, slots, x, mask
    )


@pytest.mark.parametrize("path", [path_param("blocks"), path_param("ragged")])
def test_routing_that_drops_keeps_the_slot_path(path, monkeypatch):
    path = PATHS[path]
    x, mask = moe_pair_inputs()
    _, dropping = pair(path, 4, {"top_k": 2, "capacity_factor": 1.0})
    _, dropless = pair(path, 4, _dropless(2))
    spy(monkeypatch, path, fail=True)
    dropping(x, padding_mask=mask, training=True)  # C < S: slots
    dropping(x, causal=False)  # as trained at inference: C < S: slots
    # The one-hot reference never takes the path, dropping or not.
    for layer, kwargs in ((dropping, {}), (dropless, {"training": True})):
        one_hot = MoEFeedForward.from_config({**layer.get_config(), "dispatch": "one_hot"})
        one_hot(x, **kwargs)


@pytest.mark.parametrize("adapt", ["lora", "int8"])
def test_lora_and_int8_banks_take_the_portable_block_path(adapt, monkeypatch):
    """The fast paths read `w_in`/`w_gate`/`w_out` alone: banks with LoRA
    adapters or int8 weights gather their experts per block
    (`ExpertBank.call_blocks`), with the same outputs and gradients as the
    slot path."""
    path = PATHS["blocks"]
    x, mask = moe_pair_inputs(2)
    slots, blocks = pair(path, 4, _dropless(2), "gated_silu", block_size=4)
    for layer in (slots, blocks):
        if adapt == "lora":
            layer.experts.enable_lora(2, b_initializer="ones")
        else:
            layer.experts.quantize("int8")
    blocks.set_weights(slots.get_weights())
    assert dropless_blocks.fast_expert_blocks(blocks.experts) is None
    for fast in ("jax_expert_blocks", "tf_expert_blocks"):
        spy(monkeypatch, dataclasses.replace(path, function=fast), fail=True)
    portable = []
    original = type(blocks.experts).call_blocks
    monkeypatch.setattr(
        type(blocks.experts), "call_blocks",
        lambda self, *a: portable.append(1) or original(self, *a),
    )
    assert_same_step(path, slots, blocks, x, mask, training=True)
    assert portable, "the portable path did not run"


@pytest.mark.parametrize("path", [path_param(name) for name in PATHS])
def test_path_under_mixed_bfloat16(path, monkeypatch):
    path = PATHS[path]
    keras.config.set_dtype_policy("mixed_bfloat16")
    x, mask = moe_pair_inputs()
    slots, other = pair(path, 4, _dropless(2), "gated_silu", block_size=path.block_size)
    y_s = to_numpy(slots(x, padding_mask=mask, training=True)).astype("float32")
    calls = spy(monkeypatch, path)
    y_o = other(x, padding_mask=mask, training=True)
    assert calls, f"{path.function} did not run"
    assert keras.backend.standardize_dtype(y_o.dtype) == "bfloat16"
    np.testing.assert_allclose(to_numpy(y_o).astype("float32"), y_s, rtol=2e-2, atol=2e-3)

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# XLA compilation is most of the fast tier's time on JAX (tiny models, a few
# steps each: measured 235 s of 2-core CPU time for two test files, 65 s of it
# once every graph was compiled). Fast tests therefore compile with XLA's
# optimisation passes off (`jax_disable_most_optimizations`: same results,
# 40 % less CPU time on those files), and the processes of one run share a
# compilation cache so an identical graph compiles once. Tests marked `slow`
# (the full trainings, every subprocess) compile with the full optimiser, as
# users and benchmarks do.
#
# Most compilations are single primitives: eager JAX (keras-hub's harness
# calls layers eagerly at several shapes and dtypes) compiles each primitive
# on first use. XLA:CPU's legacy elemental emitters compile those ~45 % faster
# than its fusion emitters (measured 36 -> 20 ms a primitive; the JAX fast
# tier 381 -> 270 s on 2 cores, all tests passing either way), so the fast
# tier (`-m "not slow"`, the default) selects them through `XLA_FLAGS`
# before the backend starts, where the installed jaxlib still has them: jaxlib
# aborts the process on a flag it does not know (0.12 dropped this one), so
# the flags are probed in a subprocess first, once per run. The slow tier keeps
# XLA's defaults.
_XLA_CACHE_ENV = "KERAS_BRAINFORMER_TEST_XLA_CACHE"
_FAST_TIER_XLA_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)
_XLA_PROBE = "import jax.numpy as jnp; jnp.ones(2).block_until_ready()"


def pytest_configure(config):
    if keras.backend.backend() != "jax":
        return
    if "PYTEST_XDIST_WORKER" not in os.environ:
        # The controller (or a lone process); workers inherit its XLA_FLAGS.
        fast_tier = (config.option.markexpr or "").strip() == "not slow"
        config._kb_xla_flags_note = _choose_xla_flags(
            _FAST_TIER_XLA_FLAGS if fast_tier else ()
        )
    import jax

    if _XLA_CACHE_ENV not in os.environ:
        # The controller (or a lone process): one folder per run, inherited
        # by pytest-xdist workers, removed when the run ends.
        os.environ[_XLA_CACHE_ENV] = tempfile.mkdtemp(prefix="kb-xla-cache-")
        config._kb_xla_cache_owner = True
    jax.config.update("jax_compilation_cache_dir", os.environ[_XLA_CACHE_ENV])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _xla_flags_refusal(flags):
    """None if a JAX process starts with `XLA_FLAGS=flags`, else the last
    line it printed (jaxlib aborts on a flag it does not know)."""
    result = subprocess.run(
        [sys.executable, "-c", _XLA_PROBE],
        env={**os.environ, "XLA_FLAGS": flags},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if result.returncode == 0:
        return None
    return (result.stderr.strip() or f"exit code {result.returncode}").splitlines()[-1]


def _choose_xla_flags(wanted):
    """Adds the `wanted` XLA flags to `XLA_FLAGS` where the installed jaxlib
    accepts them; stops the run with one clear message when the flags
    already set would abort every JAX process. Returns a header line."""
    import jaxlib

    user_flags = os.environ.get("XLA_FLAGS", "").strip()
    new = [f for f in wanted if f.split("=")[0] not in user_flags]
    candidate = " ".join([user_flags, *new]).strip()
    if new and _xla_flags_refusal(candidate) is None:
        os.environ["XLA_FLAGS"] = candidate
        return f"XLA_FLAGS={candidate!r} (fast tier)"
    refusal = _xla_flags_refusal(user_flags) if user_flags else None
    if refusal is not None:
        raise pytest.UsageError(
            f"XLA_FLAGS={user_flags!r} aborts every JAX process with jaxlib "
            f"{jaxlib.__version__}: {refusal}. Unset it or remove the flag."
        )
    if new:
        return (
            f"XLA_FLAGS={user_flags!r}: jaxlib {jaxlib.__version__} refuses "
            f"{' '.join(new)}; the fast tier compiles without it"
        )
    return f"XLA_FLAGS={user_flags!r}"


def pytest_report_header(config):
    note = getattr(config, "_kb_xla_flags_note", None)
    return [note] if note else []


def pytest_unconfigure(config):
    if getattr(config, "_kb_xla_cache_owner", False):
        shutil.rmtree(os.environ.pop(_XLA_CACHE_ENV), ignore_errors=True)


@pytest.fixture(autouse=True)
def _xla_optimisation_for_the_tier(request):
    if keras.backend.backend() != "jax":
        yield
        return
    import jax

    slow = request.node.get_closest_marker("slow") is not None
    jax.config.update("jax_disable_most_optimizations", not slow)
    yield


@pytest.fixture(autouse=True)
def _reset_keras_state():
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")


# The tiny preset of each of the zoo's six families, for the tests that run
# every family (`test_presets` checks these are exactly the registered
# `*_tiny` presets).
TINY_PRESETS = (
    "brainformer1_tiny",
    "brainformer2_tiny",
    "glam_tiny",
    "glam_ec_tiny",
    "dense_tiny",
    "primer_tiny",
)


def rewrite_keras_config(source, target, edit):
    """Copies the `.keras` archive `source` to `target` with its
    `config.json` replaced by `edit(config_text)`."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "config.json":
                data = edit(data.decode()).encode()
            dst.writestr(item, data)


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


@pytest.fixture(scope="session")
def tiny_backbone():
    """`tiny_backbone(name)`: the tiny preset's `BrainformerBackbone`, built
    once per test process (seeded) and shared by tests that only read it.
    A test that changes a shared backbone must restore it."""
    from keras_brainformer.models import BrainformerBackbone

    built = {}

    def get(name):
        if name not in built:
            keras.utils.set_random_seed(0)
            built[name] = BrainformerBackbone.from_preset(name)
        return built[name]

    return get


def assert_path_taken_and_equal_to_slots(monkeypatch, module, function, layer, slots, x, mask):
    """Calls `layer` with `module.function` spied on: asserts that path ran,
    and that outputs and router statistics equal the slot-path `slots`
    layer's on the same input (the shared check of the dropless fast paths)."""
    calls = []
    original = getattr(module, function)
    monkeypatch.setattr(module, function, lambda *a: calls.append(1) or original(*a))
    y = to_numpy(layer(x, padding_mask=mask))
    assert calls, f"{module.__name__}.{function} did not run"
    np.testing.assert_allclose(y, to_numpy(slots(x, padding_mask=mask)), rtol=1e-5, atol=1e-6)
    stats, expected = layer.router.routing_statistics(), slots.router.routing_statistics()
    for name in expected:
        np.testing.assert_allclose(stats[name], expected[name], rtol=1e-6, err_msg=name)


MOE_PAIR_SHAPE = (2, 16, 8)


def moe_pair(impl, num_experts, router_options, activation="gelu", group_size=None,
             router="top_k", **extra):
    """A slot-path `MoEFeedForward` and one with `dropless_impl=impl` (and
    `extra` config, e.g. `dropless_block_size`) holding the same weights."""
    from keras_brainformer.layers import MoEFeedForward

    slots = MoEFeedForward(
        num_experts=num_experts,
        intermediate_dim=12,
        router=router,
        **router_options,
        activation=activation,
        group_size=group_size,
        dropless_impl="slots",
    )
    slots.build(MOE_PAIR_SHAPE)
    other = MoEFeedForward.from_config({**slots.get_config(), "dropless_impl": impl, **extra})
    other.build(MOE_PAIR_SHAPE)
    other.set_weights(slots.get_weights())
    return slots, other


def moe_pair_inputs(seed=0):
    """`(x, padding_mask)` for `moe_pair` layers; the second row is padded
    after 11 tokens."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=MOE_PAIR_SHAPE).astype("float32")
    mask = np.ones(MOE_PAIR_SHAPE[:2], "int32")
    mask[1, 11:] = 0
    return x, mask


def inference_call(layer):
    """`layer(*args, **kwargs)` at inference, compiled on JAX: one XLA
    program per input structure instead of op-by-op eager dispatch, which on
    JAX compiles each primitive on first use (~25 ms each, hundreds per
    block call). Runs `stateless_call`, so router statistics stay put.
    TensorFlow calls the layer eagerly as it is. Eager JAX decoding keeps
    its own tests (`test_cached_decoding_matches_full_forward`, the
    `compiled=False` depthwise cases)."""
    return compiled_call(layer, training=False)


def compiled_call(layer, training):
    """`layer(*args, training=training, **kwargs)`'s output, compiled on JAX
    like `inference_call` (`training` is static; updated statistics and
    added losses are discarded). TensorFlow calls the layer eagerly."""
    if keras.backend.backend() != "jax":
        return lambda *args, **kwargs: layer(*args, training=training, **kwargs)
    import jax

    @jax.jit
    def run(trainable, non_trainable, args, kwargs):
        return layer.stateless_call(
            trainable, non_trainable, *args, training=training, **kwargs
        )[0]

    def call(*args, **kwargs):
        if not layer.built:
            layer.build(np.shape(args[0]))
        return run(
            [v.value for v in layer.trainable_variables],
            [v.value for v in layer.non_trainable_variables],
            args,
            kwargs,
        )

    return call


def max_leak(forward, x, t):
    """Largest change of `forward(x)` at positions <= t when every token
    after t changes (`forward` a callable, e.g. `inference_call(layer)`)."""
    y = to_numpy(forward(x))
    x2 = x.copy()
    x2[:, t + 1 :] = np.random.default_rng(99).normal(size=x2[:, t + 1 :].shape)
    return np.abs(to_numpy(forward(x2))[:, : t + 1] - y[:, : t + 1]).max()

"""Keras' own primitives vs this project's versions (issue 16's spike).

Compares, on the current backend, in one run (interleaved rounds, medians of
per-round ratios; forward + backward of a jitted/XLA-compiled function):

1. RMS normalisation: the RMSNorm layer this package carried until it adopted
   Keras' (computes in float32, scale applied in float32; kept below as
   `FormerRMSNormalization`, the record of that decision) vs
   `keras.layers.RMSNormalization`, which the blocks now use.
2. The attention core: ours (einsum scores in float32, causal + padding mask
   with `where`, float32 softmax, einsum with V) vs
   `keras.ops.dot_product_attention(..., is_causal=True, mask=padding)`.
3. A projection: `ops.einsum("btd,dhk->bthk")` with our kernel vs
   `keras.layers.EinsumDense` with the same equation and kernel.

For each: the largest absolute difference of the outputs (float32 inputs, and
bfloat16 inputs under `mixed_bfloat16` for the norm) and the time ratio
keras / ours. Run:

    KERAS_BACKEND=jax python benchmarks/keras_primitives.py [--rounds 5]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402


class FormerRMSNormalization(keras.layers.Layer):
    """The package's RMSNorm before it gave way to Keras' (for comparison)."""

    def __init__(self, epsilon=1e-6, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(name="scale", shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        x32 = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        y = x32 * ops.rsqrt(mean_square + self.epsilon) * ops.cast(self.scale, "float32")
        return ops.cast(y, self.compute_dtype)


def _compiled_value_and_grad(fn, args):
    """`args -> (sum of outputs, grads wrt args)` compiled for the backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        step = jax.jit(jax.value_and_grad(lambda *a: ops.sum(fn(*a).astype("float32")),
                                          argnums=tuple(range(len(args)))))
        return lambda: jax.block_until_ready(step(*args))
    import tensorflow as tf

    tensors = [tf.constant(a) for a in args]

    @tf.function(jit_compile=True)
    def step(*a):
        with tf.GradientTape() as tape:
            for t in a:
                tape.watch(t)
            loss = tf.reduce_sum(tf.cast(fn(*a), "float32"))
        return loss, tape.gradient(loss, a)

    return lambda: [t.numpy() for t in tf.nest.flatten(step(*tensors))]


def _time(run, repeats):
    run()  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def _pairs(batch, length, width, heads):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, length, width)).astype("float32")
    head_dim = width // heads
    q, k, v = (rng.normal(size=(batch, length, heads, head_dim)).astype("float32")
               for _ in range(3))
    mask = np.ones((batch, length), "bool")
    mask[1, length // 2:] = False

    ours_norm, keras_norm = FormerRMSNormalization(), keras.layers.RMSNormalization()
    ours_norm.build(x.shape)
    keras_norm.build(x.shape)
    scale = rng.uniform(0.5, 1.5, size=(width,)).astype("float32")
    ours_norm.scale.assign(scale)
    keras_norm.scale.assign(scale)

    def our_attention(q, k, v):
        scores = ops.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(head_dim).astype("float32")
        allowed = np.tril(np.ones((length, length), bool))[None, None]
        allowed = ops.logical_and(allowed, ops.convert_to_tensor(mask)[:, None, None, :])
        probs = ops.softmax(ops.where(allowed, scores, -1e9), axis=-1)
        return ops.einsum("bhqs,bshk->bqhk", probs, v)

    def keras_attention(q, k, v):
        return ops.dot_product_attention(
            q, k, v, mask=ops.convert_to_tensor(mask)[:, None, None, :], is_causal=True
        )

    kernel = rng.normal(size=(width, heads, head_dim)).astype("float32") / np.sqrt(width)
    dense = keras.layers.EinsumDense("btd,dhk->bthk", output_shape=(None, heads, head_dim))
    dense.build(x.shape)
    dense.kernel.assign(kernel)

    return {
        "RMS normalisation": (lambda x: ours_norm(x), lambda x: keras_norm(x), (x,)),
        "attention core (causal + padding)": (our_attention, keras_attention, (q, k, v)),
        "projection (einsum vs EinsumDense)": (
            lambda x: ops.einsum("btd,dhk->bthk", x, kernel), lambda x: dense(x), (x,)),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    pairs = _pairs(args.batch, args.length, args.width, args.heads)
    print(f"backend {keras.backend.backend()}, keras {keras.__version__}, "
          f"[B={args.batch}, T={args.length}, d={args.width}, H={args.heads}]")
    print("| primitive | max abs diff (float32) | keras / ours time (median of "
          f"{args.rounds} rounds) | ours ms | keras ms |")
    print("|---|---|---|---|---|")
    for name, (ours, theirs, inputs) in pairs.items():
        diff = np.abs(ops.convert_to_numpy(ours(*inputs))
                      - ops.convert_to_numpy(theirs(*inputs))).max()
        run_ours = _compiled_value_and_grad(ours, inputs)
        run_theirs = _compiled_value_and_grad(theirs, inputs)
        ratios, ours_t, theirs_t = [], [], []
        for _ in range(args.rounds):
            a = _time(run_ours, args.repeats)
            b = _time(run_theirs, args.repeats)
            ratios.append(b / a)
            ours_t.append(a)
            theirs_t.append(b)
        print(f"| {name} | {diff:.2e} | {statistics.median(ratios):.2f} | "
              f"{statistics.median(ours_t) * 1e3:.2f} | {statistics.median(theirs_t) * 1e3:.2f} |")
    # Mixed precision: what each norm returns and keeps for bfloat16 inputs.
    keras.config.set_dtype_policy("mixed_bfloat16")
    ours, theirs = FormerRMSNormalization(), keras.layers.RMSNormalization()
    x = np.random.default_rng(1).normal(size=(2, 8, args.width)).astype("float32") * 30
    yo, yt = ours(x), theirs(x)
    as32 = [ops.convert_to_numpy(ops.cast(y, "float32")) for y in (yo, yt)]
    diff = np.abs(as32[0] - as32[1]).max()
    print(f"\nmixed_bfloat16: ours {yo.dtype} (scale {ours.scale.dtype}), keras {yt.dtype} "
          f"(scale {theirs.scale.dtype}); max abs diff {diff:.3e}")
    keras.config.set_dtype_policy("float32")


if __name__ == "__main__":
    main()

"""The TensorFlow fast path of the dropless block computation
(`dropless_blocks.expert_blocks`): the loops of `dropless_blocks_jax` as
`tf.while_loop`s with a `tf.custom_gradient`. Chosen by
`dropless_blocks.fast_expert_blocks` on the TensorFlow backend for a plain
float expert bank; the portable path (`ExpertBank.call_blocks`) is its
tested reference."""

from keras import ops


def tf_expert_blocks(bank, x, blocks_per_expert, chunk_rows=None):
    """The TensorFlow fast path of `expert_blocks`: the loops of
    `jax_expert_blocks` as `tf.while_loop`s (static shapes, data-dependent
    trip counts; compiled by XLA under `tf.function(jit_compile=True)`, run
    as Python loops eagerly). For each expert with blocks, its weights are
    sliced once and its own blocks multiplied, written in place into the
    output; the unused trailing blocks are never computed (zeros).
    A `tf.custom_gradient` runs the same loops backwards, summing each
    expert's weight gradient over its blocks in a float32 accumulator
    written once per expert, instead of the portable path's per-block weight
    gathers and the scatter-add of their gradients (memory-bound on CPU,
    `benchmarks/dropless_blocks.py --backend tensorflow`).

    `chunk_rows=None` multiplies the blocks one by one: every matmul has the
    same `b` rows, so a token's output does not depend on how the other
    tokens were routed, to the bit (what inference uses: exact causality).
    `chunk_rows=R` multiplies an expert's consecutive blocks in runs of up to
    `R` rows (as many of the largest run as fit, then a binary split of the
    rest), so small blocks (little padding) still make large matmuls: faster
    (the training step's path, `TF_CHUNK_ROWS`), but a run's row count then
    depends on the other tokens' routing and XLA's CPU matmul rounds
    differently for other row counts (outputs move by ~1e-8)."""
    import tensorflow as tf  # the TensorFlow fast path: on its backend only

    dtype = bank.compute_dtype
    activation, gated = bank.activation_fn, bank.gated
    names = ("w_in", "w_gate", "w_out") if gated else ("w_in", "w_out")
    weights = tuple(
        tf.convert_to_tensor(ops.cast(getattr(bank, name), dtype)) for name in names
    )
    x = tf.convert_to_tensor(ops.convert_to_tensor(x, dtype=dtype))
    counts = tf.cast(tf.convert_to_tensor(blocks_per_expert), tf.int32)
    n, b, d = x.shape
    E = bank.num_experts
    h = weights[0].shape[-1]
    f32 = tf.float32
    # Runs of consecutive blocks of one expert computed as one matmul: up to
    # `chunk_rows` rows (powers of two of blocks); one block at a time
    # without `chunk_rows`.
    most = max(1, min(n, (chunk_rows or b) // b))
    chunks = [2**p for p in range(most.bit_length())][::-1]

    def take(tensor, i):
        # A gather, not `tensor[i]`: XLA would try to resolve a strided
        # slice's loop-carried index as a compile-time constant.
        return tf.gather(tensor, i)

    def buffer(size, shape, dtype):
        # Written once per index in the loops (in place under XLA); the
        # entries never written stack as zeros.
        return tf.TensorArray(dtype, size=size, element_shape=shape)

    def put(buffer, value, i):
        return buffer.write(i, tf.cast(value, buffer.dtype))

    def hidden(*pre):
        # pre: (x·w_in,) or (x·w_in, x·w_gate) -> the activated hidden rows.
        return activation(pre[1]) * pre[0] if gated else activation(pre[0])

    def over_experts(weights, expert_body, carry):
        """`expert_body(e, ws, first, end, carry)` for every expert `e` that
        has blocks: its weights `ws` and its blocks `[first, end)`. Experts
        without blocks are not visited (their weights are never read)."""
        starts = tf.cumsum(counts, exclusive=True)
        active = tf.argsort(tf.cast(counts == 0, tf.int32), stable=True)
        num_active = tf.reduce_sum(tf.cast(counts > 0, tf.int32))

        def expert(j, carry):
            e = take(active, j)
            ws = tuple(take(w, e) for w in weights)
            first = take(starts, e)
            return j + 1, expert_body(e, ws, first, first + take(counts, e), carry)

        return tf.while_loop(
            lambda j, carry: j < num_active, expert, (tf.constant(0), carry)
        )[1]

    def over_blocks(first, end, chunk, carry):
        """`chunk(i, c, carry)` over blocks `[first, end)` in runs of `c`
        consecutive blocks: as many of the largest `c` of `chunks` as fit,
        then each smaller one at most once (a binary split of the rest)."""
        i = first
        for c in chunks:
            i, carry = tf.while_loop(
                lambda i, carry, c=c: i + c <= end,
                lambda i, carry, c=c: (i + c, chunk(i, c, carry)),
                (i, carry),
            )
        return carry

    def rows_of(tensor, i, c):
        # Blocks `[i, i + c)` as `[c·b, ...]` rows: a slice of static size at
        # a dynamic start (an XLA dynamic-slice).
        begin = tf.stack([i] + [0] * (len(tensor.shape) - 1))
        part = tf.slice(tensor, begin, [c] + tensor.shape[1:].as_list())
        return tf.reshape(part, [c * b] + tensor.shape[2:].as_list())

    def put_rows(buffer, value, i, c):
        # Rows `[c·b, ...]` into blocks `i .. i + c - 1` of a TensorArray, a
        # write per block (`TensorArray.scatter` has no XLA CPU kernel).
        value = tf.reshape(value, [c, b] + value.shape[1:].as_list())
        for j in range(c):
            buffer = put(buffer, value[j], i + j)
        return buffer

    def forward(x, weights):
        def expert(e, ws, first, end, carry):
            def chunk(i, c, carry):
                y, pre = carry
                rows = rows_of(x, i, c)
                p = tuple(tf.matmul(rows, w) for w in ws[:-1])
                y = put_rows(y, tf.matmul(hidden(*p), ws[-1]), i, c)
                return y, tuple(put_rows(buf, v, i, c) for buf, v in zip(pre, p))

            return over_blocks(first, end, chunk, carry)

        pre = tuple(buffer(n, (b, h), dtype) for _ in weights[:-1])
        y, pre = over_experts(weights, expert, (buffer(n, (b, d), dtype), pre))
        return y.stack(), tuple(buf.stack() for buf in pre)

    @tf.custom_gradient
    def ffn(x, *weights):
        y, pre = forward(x, weights)

        def grad(dy):
            dy = tf.cast(dy, dtype)

            def expert(e, ws, first, end, carry):
                d_x, d_weights = carry

                def chunk(i, c, inner):
                    d_x, acc = inner
                    rows, g = rows_of(x, i, c), rows_of(dy, i, c)
                    p = tuple(rows_of(buf, i, c) for buf in pre)
                    with tf.GradientTape() as tape:
                        tape.watch(p)
                        hid = hidden(*p)
                    d_pre = tuple(tape.gradient(
                        hid, p, output_gradients=tf.matmul(g, ws[-1], transpose_b=True)
                    ))
                    lefts = (rows,) * len(d_pre) + (hid,)
                    acc = tuple(
                        a + tf.matmul(tf.cast(left, f32), tf.cast(right, f32),
                                      transpose_a=True)
                        for a, left, right in zip(acc, lefts, d_pre + (g,))
                    )
                    d_rows = tf.add_n([
                        tf.matmul(dp, w, transpose_b=True) for dp, w in zip(d_pre, ws[:-1])
                    ])
                    return put_rows(d_x, d_rows, i, c), acc

                zeros = tuple(tf.zeros(w.shape, f32) for w in ws)
                d_x, acc = over_blocks(first, end, chunk, (d_x, zeros))
                return d_x, tuple(put(dw, a, e) for dw, a in zip(d_weights, acc))

            d_weights = tuple(buffer(E, w.shape[1:], w.dtype) for w in weights)
            d_x, d_weights = over_experts(weights, expert, (buffer(n, (b, d), dtype), d_weights))
            return (d_x.stack(), *(dw.stack() for dw in d_weights))

        return y, grad

    return ffn(x, *weights)

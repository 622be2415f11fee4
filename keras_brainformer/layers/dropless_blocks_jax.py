"""The JAX fast path of the dropless block computation
(`dropless_blocks.expert_blocks`): a grouped matmul written as loops with a
custom VJP. Chosen by `dropless_blocks.fast_expert_blocks` on the JAX
backend for a plain float expert bank; the portable path
(`ExpertBank.call_blocks`) is its tested reference."""

from keras import ops


def jax_expert_blocks(bank, x, blocks_per_expert):
    """The JAX fast path of `expert_blocks`: a grouped matmul written as
    loops. For each expert, its weights are sliced once and its own blocks
    (a data-dependent range, `blocks_per_expert`) are multiplied one by one,
    written in place into the output; the unused trailing blocks are never
    computed (zeros). A custom VJP runs the same loops backwards, summing
    each expert's weight gradient over its blocks in a local float32
    accumulator written once per expert. Nothing is differentiated through
    a loop, so the dynamic trip counts are fine under `jit` and `grad`. On
    XLA CPU this is several times faster than the batched matmul over
    gathered weights (memory-bound weight gathers and gradient scatters,
    `benchmarks/dropless_blocks.py`)."""
    # The JAX fast path: jax is imported on its backend only.
    import jax
    import jax.numpy as jnp

    dtype = bank.compute_dtype
    activation, gated = bank.activation_fn, bank.gated
    names = ("w_in", "w_gate", "w_out") if gated else ("w_in", "w_out")
    weights = tuple(jnp.asarray(ops.cast(getattr(bank, name), dtype)) for name in names)
    x = jnp.asarray(ops.convert_to_tensor(x, dtype=dtype))
    counts = jnp.asarray(blocks_per_expert).astype("int32")

    def take(w, i):
        return jax.lax.dynamic_index_in_dim(w, i, keepdims=False)

    def put(buffer, value, i):
        return jax.lax.dynamic_update_index_in_dim(buffer, value.astype(buffer.dtype), i, 0)

    def hidden(*pre):
        # pre: (x·w_in,) or (x·w_in, x·w_gate) -> the activated hidden rows.
        return activation(pre[1]) * pre[0] if gated else activation(pre[0])

    def over_experts(weights, counts, expert_body, carry):
        """`expert_body(e, ws, first, end, carry)` for every expert `e` that
        has blocks: its weights `ws` and its blocks `[first, end)`. Experts
        without blocks are not visited (their weights are never read)."""
        starts = jnp.cumsum(counts) - counts
        active = jnp.argsort(counts == 0, stable=True)  # experts with blocks first

        def expert(j, carry):
            e = active[j]
            ws = tuple(take(w, e) for w in weights)
            return expert_body(e, ws, starts[e], starts[e] + counts[e], carry)

        return jax.lax.fori_loop(0, jnp.sum(counts > 0), expert, carry)

    def forward(weights, x, counts):
        n, b, _ = x.shape
        h = weights[0].shape[-1]

        def expert(e, ws, first, end, carry):
            def block(i, carry):
                y, pre = carry
                rows = take(x, i)
                p = tuple(rows @ w for w in ws[:-1])
                y = put(y, hidden(*p) @ ws[-1], i)
                return y, tuple(put(buf, v, i) for buf, v in zip(pre, p))

            return jax.lax.fori_loop(first, end, block, carry)

        pre = tuple(jnp.zeros((n, b, h), dtype) for _ in weights[:-1])
        return over_experts(weights, counts, expert, (jnp.zeros_like(x), pre))

    @jax.custom_vjp
    def ffn(weights, x, counts):
        return forward(weights, x, counts)[0]

    def ffn_fwd(weights, x, counts):
        y, pre = forward(weights, x, counts)
        return y, (weights, x, counts, pre)

    def ffn_bwd(residuals, grad):
        weights, x, counts, pre = residuals

        def expert(e, ws, first, end, carry):
            d_x, d_weights = carry

            def block(i, inner):
                d_x, acc = inner
                rows, g = take(x, i), take(grad, i)
                h, hidden_vjp = jax.vjp(hidden, *(take(p, i) for p in pre))
                d_pre = hidden_vjp(g @ ws[-1].T)
                acc = tuple(
                    a + jnp.matmul(left.T, right, preferred_element_type="float32")
                    for a, left, right in zip(acc, (rows,) * len(d_pre) + (h,), d_pre + (g,))
                )
                d_rows = sum(dp @ w.T for dp, w in zip(d_pre, ws[:-1]))
                return put(d_x, d_rows, i), acc

            zeros = tuple(jnp.zeros(w.shape, "float32") for w in ws)
            d_x, acc = jax.lax.fori_loop(first, end, block, (d_x, zeros))
            return d_x, tuple(put(dw, a, e) for dw, a in zip(d_weights, acc))

        d_weights = tuple(jnp.zeros(w.shape, w.dtype) for w in weights)
        d_x, d_weights = over_experts(
            weights, counts, expert, (jnp.zeros_like(x), d_weights)
        )
        return d_weights, d_x, None

    ffn.defvjp(ffn_fwd, ffn_bwd)
    return ffn(weights, x, counts)

"""Where an MoE layer's training step spends its time: router, dispatch,
experts and combine, each jitted alone (forward + backward), beside a dense
FFN with the same activated FLOPs. JAX backend.

    python benchmarks/moe_pieces.py --experts 16 --reps 6
"""

import os

os.environ["KERAS_BACKEND"] = "jax"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from keras_brainformer.layers import FeedForward  # noqa: E402
from keras_brainformer.layers import dispatch as D  # noqa: E402
from keras_brainformer.layers.experts import ExpertBank  # noqa: E402
from keras_brainformer.layers.routers import TopKRouter  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--model-dim", type=int, default=512)
    parser.add_argument("--hidden-dim", type=int, default=1024)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    args = parser.parse_args()
    E, G, S, d, h, k = (
        args.experts, args.batch, args.length, args.model_dim, args.hidden_dim, 2
    )
    x = jnp.asarray(np.random.default_rng(0).standard_normal((G, S, d)), "float32")
    router = TopKRouter(num_experts=E, top_k=k, capacity_factor=args.capacity_factor)
    router.build((None, None, d))
    bank = ExpertBank(E, h)
    bank.build((E, None, None, d))
    ffn = FeedForward(k * h)
    ffn.build((None, d))
    stats = [v.value for v in router.non_trainable_variables]
    routing = router(x, training=True)
    slot_token, slot_gate = routing.slot_token, routing.slot_gate
    expert_in = D.dispatch(x, slot_token)
    expert_out = bank(expert_in)

    def router_loss(kernel, x):
        r, _, losses = router.stateless_call(
            [kernel], stats, x, training=True, return_losses=True
        )
        return jnp.sum(jnp.square(r.slot_gate)) + sum(losses)

    def squared(f):
        return lambda *a: jnp.sum(jnp.square(f(*a)))

    cases = {
        "router": (router_loss, (0, 1), (router.kernel.value, x)),
        "dispatch (gather)": (squared(lambda x: D.dispatch(x, slot_token)), 0, (x,)),
        "experts": (
            squared(lambda w, xi: bank.stateless_call(w, [], xi)[0]),
            (0, 1),
            ([v.value for v in bank.trainable_variables], expert_in),
        ),
        "combine (segment-sum)": (
            squared(lambda eo, g: D.combine(eo, slot_token, g, S)),
            (0, 1),
            (expert_out, slot_gate),
        ),
        "dense FFN (same FLOPs)": (
            squared(lambda w, x: ffn.stateless_call(w, [], x)[0]),
            (0, 1),
            ([v.value for v in ffn.trainable_variables], x.reshape(G * S, d)),
        ),
    }
    steps = {
        name: (jax.jit(jax.value_and_grad(f, argnums=argnums)), a)
        for name, (f, argnums, a) in cases.items()
    }

    def block(out):
        jax.tree_util.tree_map(lambda a: a.block_until_ready(), out)

    for step, a in steps.values():
        block(step(*a))
    times = {name: [] for name in steps}
    for _ in range(args.reps):
        for name, (step, a) in steps.items():  # interleaved rounds
            t0 = time.perf_counter()
            block(step(*a))
            times[name].append((time.perf_counter() - t0) * 1e3)
    C = routing.capacity
    print(f"E={E}, C={C}, {G}x{S} tokens, d={d}, h={h}, k={k}, median of {args.reps}")
    print("| piece | ms |\n|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {statistics.median(t):.1f} |")


if __name__ == "__main__":
    main()

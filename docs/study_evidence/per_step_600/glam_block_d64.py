"""The search for a cheap setting where MoE beats dense per step (issue 33).

glam_block_d64.csv came from (2 shared CPU cores, JAX 0.10.2, Python 3.11.7):

    KERAS_BACKEND=jax python glam_block_d64.py 64 1 128 64 16 600 0 g8,g8_old,gdense,g2
    KERAS_BACKEND=jax python glam_block_d64.py 64 1 128 64 16 600 1,2 g8,gdense,g2,g8_old
    KERAS_BACKEND=jax python glam_block_d64.py 64 1 128 64 16 600 0,1,2 g8_r1,g8

Arguments: d, blocks, expert width h, sequence length, batch, steps, seeds,
variants. `g8`: GLaM's block [attention, MoE(8 experts of width h, top-2),
attention, gated-GELU FFN(h)]; `g2`: 2 experts; `gdense`: the MoE replaced by
a GELU FFN of width 2h (equal FLOPs); `_old`: the expert initialisation before
the fix; `_r1`: the router kernel scaled by sqrt(10) after the build (std
1/sqrt(d), GShard's gate). The last run's g8 repeated the first runs' losses
exactly. tests/test_experts_earn_their_parameters.py is this setting, seeds 0-1.
"""
import sys, time, json
import numpy as np
import keras
from keras_brainformer.layers import experts
from keras_brainformer.layers.initializers import clone_initializer, expert_initializer
from keras_brainformer.models import AttentionSpec, BlockSpec, FeedForwardSpec, MoESpec
from keras_brainformer.models import BrainformerBackbone, BrainformerCausalLM
from keras_brainformer.training.builtin_text import pydoc_text, byte_lm_arrays
from keras_brainformer.training.trainer import compile_language_model

d, L, h, seq, batch, steps = [int(v) for v in sys.argv[1:7]]
seeds = [int(s) for s in sys.argv[7].split(",")]
variants = sys.argv[8].split(",")
text = pydoc_text()[:1_500_000]
(xt, yt), (xv, yv) = byte_lm_arrays(text, seq, 0.05)
xv = {k: v[:256] for k, v in xv.items()}; yv = yv[:256]

def build(variant):
    # moeE: [attn, MoE(E, h, top-2)]; gE: GLaM's [attn, MoE(E, h, top-2), attn, FFN(h, gated)];
    # dense / gdense: the MoE replaced by an equal-FLOP FFN of width 2h.
    name = variant.split("_")[0]  # suffixes: _old (initialisation), _r1 (router)
    glam = name.startswith("g")
    name = name[1:] if glam else name
    if name.startswith("moe") or (glam and name[0].isdigit()):
        E = int(name.replace("moe", ""))
        ffn = MoESpec(E, h, activation="gelu", router="top_k", top_k=2, capacity_factor=2.0)
    else:
        ffn = FeedForwardSpec(2 * h, activation="gelu")
    attn = AttentionSpec(num_heads=max(1, d // 16))
    layers = [attn, ffn] + ([attn, FeedForwardSpec(h, activation="gated_gelu")] if glam else [])
    spec = BlockSpec(layers)
    bb = BrainformerBackbone(vocabulary_size=256, hidden_dim=d, blocks=spec, num_layers=L,
                             max_sequence_length=seq)
    return BrainformerCausalLM(bb, preprocessor=None)

results = {}
for variant in variants:
    old = "_old" in variant
    experts.expert_initializer = (lambda i, E: clone_initializer(i)) if old else expert_initializer
    for seed in seeds:
        keras.utils.set_random_seed(seed)
        lm = build(variant)
        if variant.endswith("_r1"):
            # The router drawn like GShard's gate (std 1/sqrt(d)): sqrt(10) x ours.
            for layer in lm.backbone._flatten_layers():
                if hasattr(layer, "router") and hasattr(layer.router, "kernel"):
                    k = layer.router.kernel
                    k.assign(keras.ops.convert_to_numpy(k) * np.sqrt(10.0))
        compile_language_model(lm, "adafactor", 0.01, constant_steps=10**9)
        rng = np.random.default_rng(seed)
        curve = []
        t = time.time()
        for chunk in range(steps // 100):
            idx = rng.integers(0, len(yt), size=100 * batch)
            lm.fit({k: v[idx] for k, v in xt.items()}, yt[idx], batch_size=batch, epochs=1, verbose=0, shuffle=False)
            logs = lm.evaluate(xv, yv, batch_size=64, verbose=0, return_dict=True)
            curve.append(round(float(logs["loss"]), 4))
        results[(variant, seed)] = curve
        entropy = logs.get("moe_router_entropy")
        print(variant, seed, curve, f"{time.time()-t:.0f}s", "entropy", entropy, flush=True)
for variant in variants:
    c = np.array([results[(variant, s)] for s in seeds])
    print("MEAN", variant, c.mean(0).round(4).tolist())

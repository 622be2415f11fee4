"""Reconstructs the Brainformer block's layout and per-scale widths from Table 3.

The paper gives the exact layer order and widths of Brainformer blocks 1 and 2
only in its Figures 8 and 9 (images). What it states in text and tables:
8 sublayers a block; stacked 3x / 6x / 8x at the 100M / 1B / 8B scales with
32 / 64 / 64 experts; model dim 1024 at 100M, x2 and x4 at 1B and 8B; hidden
widths from the search space {1536, 2048, 3072, 4096} (x2 and x4 at 1B / 8B);
a smaller expansion than the 100M baseline's (3072 on d=768, i.e. 4x); block 1
uses expert choice with capacity factor 1, block 2 a larger capacity factor;
and the total / activated parameter counts of Table 3.

This script searches, under the counting convention that reproduces the
paper's Table 2 (`paper_convention_counts`: a 32K tied embedding, gated FFNs =
3 matrices, plain FFNs / experts = 2, attention 4 d^2), for:

* a layout: `n_attention + n_ffn + n_moe = 8`, in a fixed evenly interleaved
  order (the paper's ablation: order barely matters, the ratio does);
* which dense FFN and MoE sublayers are gated (gated GELU) or plain (GELU),
  the same at every scale;
* per scale, the hidden width of each FFN / MoE sublayer from the scaled
  search space,

minimising the worst relative error over total and activated parameters at all
three scales (ties: the mean error). Block 2 keeps block 1's layout and
activations, uses capacity factor 2, and refits the 100M widths to 3.33B / 266M.

Usage:
    python presets/reconstruct_brainformer.py [--max-width-100m 3072] [--top 10]

`--max-width-100m 2048` (hidden widths strictly below 3072 at 100M) cannot fit
Table 3 within 10 %: at best ~11 % at 8B (a block with five MoE layers has too
little dense capacity to reach 8B's activated count). 3072 on d=1024 is an
expansion of 3x, below the baseline's 4x, so 3072 is the default bound.
"""

import argparse
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from keras_brainformer.models.brainformer.block_spec import AttentionSpec  # noqa: E402
from keras_brainformer.models.brainformer.block_spec import FeedForwardSpec  # noqa: E402
from keras_brainformer.models.brainformer.block_spec import MoESpec  # noqa: E402
from keras_brainformer.zoo.parameter_count import sublayer_parameters  # noqa: E402

PAPER_VOCABULARY_SIZE = 32000
BASE_WIDTHS = (1536, 2048, 3072, 4096)
ACTIVATIONS = {True: "gated_gelu", False: "gelu"}
# name: model dim, experts, blocks, width factor, heads, head dim.
SCALES = {
    "100m": dict(d=1024, experts=32, blocks=3, factor=1, heads=16, head_dim=64),
    "1b": dict(d=2048, experts=64, blocks=6, factor=2, heads=16, head_dim=128),
    "8b": dict(d=4096, experts=64, blocks=8, factor=4, heads=32, head_dim=128),
}
# Table 3 (total, activated).
BLOCK1_TARGETS = {"100m": (3.19e9, 156e6), "1b": (30e9, 1.38e9), "8b": (158e9, 7.4e9)}
BLOCK2_TARGETS = {"100m": (3.33e9, 266e6)}
BLOCK1_CAPACITY_FACTOR = 1.0
BLOCK2_CAPACITY_FACTOR = 2.0
ORDER_PRIORITY = {"attention": 0, "moe": 1, "ffn": 2}


def layout_order(num_attention, num_ffn, num_moe):
    """Evenly interleaved order: a sublayer of a kind with `c` copies sits at
    `i / c`; ties go attention, MoE, FFN. (2, 2, 4) gives
    attention, moe, ffn, moe, attention, moe, ffn, moe."""
    slots = []
    for kind, count in (("attention", num_attention), ("ffn", num_ffn), ("moe", num_moe)):
        slots += [(i / count, ORDER_PRIORITY[kind], kind) for i in range(count)]
    return [kind for _, _, kind in sorted(slots)]


def layouts(min_attention=1, min_moe=1):
    for num_attention in range(min_attention, 8):
        for num_moe in range(min_moe, 8 - num_attention + 1):
            yield num_attention, 8 - num_attention - num_moe, num_moe


def _sublayer_counts(kind, gated, width, scale, capacity_factor):
    """(total, activated) of one sublayer including its norm, in the paper
    convention (the project's own `sublayer_parameters`)."""
    d = scale["d"]
    if kind == "ffn":
        spec = FeedForwardSpec(intermediate_dim=width, activation=ACTIVATIONS[gated])
    else:
        spec = MoESpec(
            num_experts=scale["experts"],
            intermediate_dim=width,
            activation=ACTIVATIONS[gated],
            router="expert_choice",
            capacity_factor=capacity_factor,
        )
    total, activated = sublayer_parameters(spec, d)
    return total + d, activated + d


def _attention_counts(scale):
    spec = AttentionSpec(num_heads=scale["heads"], head_dim=scale["head_dim"])
    total, activated = sublayer_parameters(spec, scale["d"])
    return total + scale["d"], activated + scale["d"]


def _group_options(kind, gated, count, scale, widths, capacity_factor):
    """Every multiset of `count` widths for a group of same-kind, same-
    activation sublayers: list of (widths descending, total, activated)."""
    per_width = {w: _sublayer_counts(kind, gated, w, scale, capacity_factor) for w in widths}
    options = []
    for combo in itertools.combinations_with_replacement(sorted(widths, reverse=True), count):
        total = sum(per_width[w][0] for w in combo)
        activated = sum(per_width[w][1] for w in combo)
        options.append((combo, total, activated))
    return options


def fit_scale(layout, gated_ffn, gated_moe, scale, targets, widths, capacity_factor):
    """Best widths at one scale for a layout and activation split.

    Returns dict(error, total, activated, widths={group: widths}) where the
    groups are `ffn_gated`, `ffn_plain`, `moe_gated`, `moe_plain`.
    """
    num_attention, num_ffn, num_moe = layout
    d, blocks = scale["d"], scale["blocks"]
    fixed = PAPER_VOCABULARY_SIZE * d + d  # tied embedding + final norm
    attention = _attention_counts(scale)
    base_total = num_attention * attention[0]
    base_activated = num_attention * attention[1]
    groups = {
        "ffn_gated": ("ffn", True, gated_ffn),
        "ffn_plain": ("ffn", False, num_ffn - gated_ffn),
        "moe_gated": ("moe", True, gated_moe),
        "moe_plain": ("moe", False, num_moe - gated_moe),
    }
    names = list(groups)
    choices = [
        _group_options(kind, gated, count, scale, widths, capacity_factor)
        for kind, gated, count in groups.values()
    ]
    target_total, target_activated = targets
    best = None
    for combo in itertools.product(*choices):
        total = fixed + blocks * (base_total + sum(c[1] for c in combo))
        activated = fixed + blocks * (base_activated + sum(c[2] for c in combo))
        error = max(abs(total / target_total - 1), abs(activated / target_activated - 1))
        if best is None or error < best["error"]:
            best = {
                "error": error,
                "total": total,
                "activated": round(activated),
                "total_error": total / target_total - 1,
                "activated_error": activated / target_activated - 1,
                "widths": {name: c[0] for name, c in zip(names, combo)},
            }
    return best


def scale_widths(scale_name, max_width_100m):
    """The search space's widths times the scale factor; the 100M scale
    (where the paper states the smaller expansion) is capped."""
    factor = SCALES[scale_name]["factor"]
    if scale_name == "100m":
        return tuple(w for w in BASE_WIDTHS if w <= max_width_100m)
    return tuple(w * factor for w in BASE_WIDTHS)


def _fit_scale_any_activation(layout, name, max_width_100m, capacity_factor, targets):
    """Best fit at one scale over every activation split."""
    _, num_ffn, num_moe = layout
    best = None
    for gated_ffn in range(num_ffn + 1):
        for gated_moe in range(num_moe + 1):
            fit = fit_scale(
                layout,
                gated_ffn,
                gated_moe,
                SCALES[name],
                targets,
                scale_widths(name, max_width_100m),
                capacity_factor,
            )
            if best is None or fit["error"] < best["error"]:
                best = fit
    return best


def _candidate(layout, fits):
    errors = [f["error"] for f in fits.values()]
    return {"layout": layout, "worst": max(errors), "mean": sum(errors) / len(errors),
            "fits": fits}


def search(max_width_100m=3072, same_activations=False, min_attention=1):
    """Block 1 candidates, best first: one per layout (per layout and
    activation split with `same_activations`), each with its best fit per
    scale. By default each scale picks its own activations (gated or plain
    per sublayer); the layout (types and order) is shared by all scales."""
    candidates = []
    for layout in layouts(min_attention=min_attention):
        _, num_ffn, num_moe = layout
        if not same_activations:
            fits = {
                name: _fit_scale_any_activation(
                    layout, name, max_width_100m, BLOCK1_CAPACITY_FACTOR, BLOCK1_TARGETS[name]
                )
                for name in SCALES
            }
            candidates.append(_candidate(layout, fits))
            continue
        for gated_ffn in range(num_ffn + 1):
            for gated_moe in range(num_moe + 1):
                fits = {
                    name: fit_scale(
                        layout,
                        gated_ffn,
                        gated_moe,
                        SCALES[name],
                        BLOCK1_TARGETS[name],
                        scale_widths(name, max_width_100m),
                        BLOCK1_CAPACITY_FACTOR,
                    )
                    for name in SCALES
                }
                candidates.append(_candidate(layout, fits))
    candidates.sort(key=lambda c: (round(c["worst"], 6), round(c["mean"], 6), c["layout"]))
    return candidates


# Among candidates tied on the worst error, the zoo takes the best one with at
# least two attention sublayers: rank 1 (1A+3F+4M) and rank 2 (2A+2F+4M) tie at
# 7.6 % (both limited by the 100M row), and one attention sublayer in eight
# would leave the 100M model with 3 attention layers in 24 sublayers.
CHOSEN_MIN_ATTENTION = 2


def choose(candidates):
    """The zoo's pick: the best candidate with `CHOSEN_MIN_ATTENTION` or more
    attention sublayers, provided it ties the overall best on the worst error
    (to 0.1 %)."""
    best = candidates[0]
    for c in candidates:
        if c["layout"][0] >= CHOSEN_MIN_ATTENTION:
            if round(c["worst"], 3) <= round(best["worst"], 3):
                return c
            break
    return best


def chosen_blocks(max_width_100m=3072):
    """The chosen reconstruction as sublayer dict lists:
    `{("brainformer1", scale): [...], ("brainformer2", "100m"): [...]}` plus
    the fits, for the presets and their test."""
    candidate = choose(search(max_width_100m))
    blocks = {}
    for name in SCALES:
        blocks[("brainformer1", name)] = block_sublayers(
            candidate, candidate["fits"][name], SCALES[name], BLOCK1_CAPACITY_FACTOR
        )
    block2 = fit_block2(candidate, max_width_100m)
    blocks[("brainformer2", "100m")] = block_sublayers(
        candidate, block2, SCALES["100m"], BLOCK2_CAPACITY_FACTOR
    )
    return candidate, block2, blocks


def fit_block2(candidate, max_width_100m=3072):
    """Block 2: block 1's layout and 100M activations, capacity factor 2,
    widths refit to Table 3's 3.33B / 266M."""
    fit1 = candidate["fits"]["100m"]
    return fit_scale(
        candidate["layout"],
        len(fit1["widths"]["ffn_gated"]),
        len(fit1["widths"]["moe_gated"]),
        SCALES["100m"],
        BLOCK2_TARGETS["100m"],
        scale_widths("100m", max_width_100m),
        BLOCK2_CAPACITY_FACTOR,
    )


def block_sublayers(candidate, fit, scale, capacity_factor):
    """The block as a list of sublayer dicts, in `layout_order`: within a kind
    the gated sublayers come first, each group's widths in descending order."""
    layout = candidate["layout"]
    queues = {
        "ffn": [(True, w) for w in fit["widths"]["ffn_gated"]]
        + [(False, w) for w in fit["widths"]["ffn_plain"]],
        "moe": [(True, w) for w in fit["widths"]["moe_gated"]]
        + [(False, w) for w in fit["widths"]["moe_plain"]],
    }
    sublayers = []
    for kind in layout_order(*layout):
        if kind == "attention":
            sublayers.append(
                {"kind": "attention", "num_heads": scale["heads"], "head_dim": scale["head_dim"]}
            )
            continue
        gated, width = queues[kind].pop(0)
        if kind == "ffn":
            sublayers.append(
                {"kind": "ffn", "intermediate_dim": width, "activation": ACTIVATIONS[gated]}
            )
        else:
            sublayers.append(
                {
                    "kind": "moe",
                    "num_experts": scale["experts"],
                    "intermediate_dim": width,
                    "activation": ACTIVATIONS[gated],
                    "router": "expert_choice",
                    "capacity_factor": capacity_factor,
                }
            )
    return sublayers


def _short(sublayers):
    parts = []
    for s in sublayers:
        if s["kind"] == "attention":
            parts.append("A")
        else:
            tag = "g" if s["activation"].startswith("gated") else ""
            parts.append(f"{'M' if s['kind'] == 'moe' else 'F'}{tag}{s['intermediate_dim']}")
    return " ".join(parts)


def describe(candidate):
    a, f, m = candidate["layout"]
    return f"{a}A+{f}F+{m}M"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-width-100m", type=int, default=3072, choices=BASE_WIDTHS)
    parser.add_argument("--top", type=int, default=10)
    parser.add_argument(
        "--same-activations",
        action="store_true",
        help="force each sublayer's activation (gated or plain) to be the same at every scale",
    )
    args = parser.parse_args(argv)
    candidates = search(args.max_width_100m, args.same_activations)
    print(f"Brainformer block 1 vs Table 3 (paper convention, 32K tied embedding), "
          f"widths at 100M <= {args.max_width_100m}; {len(candidates)} candidates.\n")
    print("| rank | layout | worst err | mean err | 100M tot/act (err) | 1B tot/act (err) "
          "| 8B tot/act (err) |")
    print("|---|---|---|---|---|---|---|")
    for rank, c in enumerate(candidates[: args.top], 1):
        cells = []
        for name in SCALES:
            f = c["fits"][name]
            cells.append(
                f"{f['total'] / 1e9:.2f}B/{f['activated'] / 1e6:.0f}M "
                f"({f['total_error']:+.1%}/{f['activated_error']:+.1%})"
            )
        print(f"| {rank} | {describe(c)} | {c['worst']:.1%} | {c['mean']:.1%} | "
              + " | ".join(cells) + " |")
    print()
    chosen = choose(candidates)
    shown = candidates[: min(args.top, 3)]
    if chosen not in shown:
        shown.append(chosen)
    for c in shown:
        rank = candidates.index(c) + 1
        if c is chosen:
            print("CHOSEN (brainformer presets):")
        print(f"#{rank} {describe(c)}, order {' '.join(layout_order(*c['layout']))}")
        for name in SCALES:
            subs = block_sublayers(c, c["fits"][name], SCALES[name], BLOCK1_CAPACITY_FACTOR)
            print(f"   block 1 {name:>4}: {_short(subs)}")
        b2 = fit_block2(c, args.max_width_100m)
        subs = block_sublayers(c, b2, SCALES["100m"], BLOCK2_CAPACITY_FACTOR)
        print(f"   block 2 100m: {_short(subs)}  -> {b2['total'] / 1e9:.2f}B/"
              f"{b2['activated'] / 1e6:.0f}M ({b2['total_error']:+.1%}/"
              f"{b2['activated_error']:+.1%})")
    print("\nA = attention; F/M = dense FFN / MoE hidden width; g = gated GELU (else GELU).")


if __name__ == "__main__":
    main()

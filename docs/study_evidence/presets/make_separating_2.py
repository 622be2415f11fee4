"""Builds the second separating experiment's presets (issue 33): what, besides
unserved tokens, keeps Brainformer-1 behind GLaM per step at its activated
size?

- `brainformer1_small_top2_half/`: Brainformer-1 (`presets/brainformer1_small`)
  with every MoE sublayer routed as GLaM routes (token choice, top-2, capacity
  factor 2.0, the top-k router's load-balance loss) and every expert half as
  wide, so each token still meets the activated width of the capacity-1.0
  block. Against `brainformer1_small_cap2_half/` (expert choice at capacity
  2.0, the same widths): expert choice against top-2 at equal activated
  parameters and equal capacity.
- `searched_small_top2_half/`: the search's best block (`searched_small/`)
  changed the same way (its one MoE sublayer of eight).
- `glam_small_moe_ffns/`: GLaM (`presets/glam_small`) with its dense FFN
  sublayer replaced by a second MoE sublayer (GLaM's router settings; top-2
  experts half as wide as the dense FFN, with its gated activation), so half
  of the block's sublayers are MoE, as in Brainformer-1, at GLaM's activated
  width.

    python docs/study_evidence/presets/make_separating_2.py
"""

import pathlib

# This folder's other generator (Python puts a script's folder on sys.path).
from make_capacity_2 import write_variant

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
TOP_2 = {"router": "top_k", "top_k": 2, "capacity_factor": 2.0, "load_balance_loss_weight": None}


def sublayers(config):
    return config["config"]["blocks"]["sublayers"]


def top2_half(config):
    """Every expert-choice MoE sublayer routed top-2 at half width."""
    changed = 0
    for sub in sublayers(config):
        if sub["kind"] == "moe":
            if sub["router"] != "expert_choice" or sub["capacity_factor"] != 1.0:
                raise ValueError(f"expected expert choice at capacity 1.0, got {sub}")
            sub.pop("k", None)  # 0.1's name of `top_k` (searched_small/ is a 0.1 folder)
            sub.update(TOP_2)
            # `hidden_dim` in folders written before issue 35's renames.
            sub["intermediate_dim" if "intermediate_dim" in sub else "hidden_dim"] //= 2
            changed += 1
    return changed, (f"every MoE sublayer ({changed}) routed top-2 at capacity factor 2.0 "
                     "(GLaM's router) with experts half as wide")


def moe_ffns(config):
    """GLaM's dense FFN sublayers replaced by MoE sublayers like its own."""
    subs = sublayers(config)
    moe = next(s for s in subs if s["kind"] == "moe")
    changed = 0
    for i, sub in enumerate(subs):
        if sub["kind"] == "ffn":
            if moe["router"] != "top_k" or moe["top_k"] != 2:
                raise ValueError(f"expected GLaM's top-2 MoE sublayer, got {moe}")
            subs[i] = {**moe, "intermediate_dim": sub["intermediate_dim"] // 2,
                       "activation": sub["activation"]}
            changed += 1
    return changed, (f"its dense FFN sublayer ({changed} a block) replaced by a top-2 MoE "
                     "sublayer with GLaM's router and experts half the FFN's width")


SOURCES = {
    "brainformer1_small_top2_half": (ROOT / "presets/brainformer1_small", top2_half),
    "glam_small_moe_ffns": (ROOT / "presets/glam_small", moe_ffns),
    "searched_small_top2_half": (HERE / "searched_small", top2_half),
}


def main():
    for name, (source, change) in SOURCES.items():
        write_variant(name, source, change)


if __name__ == "__main__":
    main()

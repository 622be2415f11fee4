"""The routing of each MoE family at the end of a `compare` study, from its
run files: the share of (token, MoE layer) pairs no expert served in training
(`dropped_fraction`; studies before issue 33 did not log it), the router entropy (nats; uniform over 8 experts is
2.08), and the gap between the causal loss (the inference routing) and the
as-trained loss. Mean over seeds, per-seed values in brackets.

    python docs/study_evidence/small_bytes_300s_fixed_init/routing_table.py STUDY_DIR [STUDY_DIR ...]
"""

import glob
import json
import pathlib
import statistics
import sys

FAMILIES = ("glam_small", "glam_ec_small", "brainformer1_small", "brainformer2_small",
            "searched_small")


def rows(study):
    for family in FAMILIES:
        runs = [json.load(open(f)) for f in sorted(glob.glob(f"{study}/runs/{family}/seed-*.json"))]
        if not runs:
            continue
        last = [r["curve"][-1] for r in runs]
        values = {
            "dropped": [c.get("dropped_fraction") for c in last],
            "entropy": [c.get("router_entropy") for c in last],
            "gap": [r["val_loss_causal"] - r["val_loss_as_trained"] for r in runs],
            "causal": [r["val_loss_causal"] for r in runs],
        }
        yield family, runs[0]["steps"], len(runs), values


def cell(values, digits):
    if None in values:
        return "not logged"
    per_seed = " / ".join(f"{v:.{digits}f}" for v in values)
    return f"{statistics.mean(values):.{digits}f} ({per_seed})"


def main(studies):
    for study in studies:
        print(f"\n`{pathlib.Path(study).name}`\n")
        print("| family | steps | seeds | unserved in training | router entropy | causal − as trained |")
        print("|---|---:|---:|---|---|---|")
        for family, steps, seeds, v in rows(study):
            print(f"| {family} | {steps} | {seeds} | {cell(v['dropped'], 3)} | "
                  f"{cell(v['entropy'], 2)} | {cell(v['gap'], 3)} |")


if __name__ == "__main__":
    main(sys.argv[1:])

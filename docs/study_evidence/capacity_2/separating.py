"""Issue 33's separating experiment: do Brainformer-1 and the search's best
block fall behind GLaM because expert choice at capacity factor 1.0 leaves
16-19 % of (token, MoE layer) pairs unserved?

Each block is retrained at capacity factor 2.0 (every MoE sublayer; nothing
else changed: `docs/study_evidence/presets/make_capacity_2.py`) for exactly
the steps it had in the rerun study (`compare --steps`, same data, seeds
0-2, batch 16 x 128, Adafactor 0.01 constant over these steps), and read at
equal steps beside the capacity-1.0 runs and GLaM / GLaM-EC / dense of that
study (their validation curves, every 50 steps). Capacity 2.0 also doubles
the expert compute per token; Brainformer-1's third arm halves every
expert's width too, so its activated parameters are the capacity-1.0
block's (`make_capacity_2.py`).

    python docs/study_evidence/capacity_2/separating.py > docs/study_evidence/capacity_2/separating.md
"""

import json
import pathlib
import statistics

HERE = pathlib.Path(__file__).resolve().parent
EVIDENCE = HERE.parent
SECOND = EVIDENCE / "separating_2"  # the second experiment's runs
EXPERIMENTS = (
    # (title, study of the capacity-1.0 runs, capacity-1.0 family,
    #  ((label, runs folder), ...) of the variants, references of that study)
    ("Brainformer-1 (study 2's rerun, embedded corpus)", "small_bytes_300s_fixed_init",
     "brainformer1_small",
     (("brainformer1_small, capacity 2.0", HERE / "brainformer1_small_cap2"),
      ("brainformer1_small, capacity 2.0, expert widths halved",
       HERE / "brainformer1_small_cap2_half")),
     ("glam_small", "glam_ec_small", "dense_small")),
    ("the search's best block (study 4's rerun)", "searched_small_300s_fixed_init",
     "searched_small", (("searched_small, capacity 2.0", HERE / "searched_small_cap2"),
                        ("searched_small, top-2 at capacity 2.0, expert widths halved",
                         SECOND / "searched_small_top2_half")),
     ("glam_small", "glam_ec_small", "dense_small")),
    ("Brainformer-1's routing and GLaM's MoE count (the second experiment)",
     "small_bytes_300s_fixed_init", "brainformer1_small",
     (("brainformer1_small, capacity 2.0, expert widths halved",
       HERE / "brainformer1_small_cap2_half"),
      ("brainformer1_small, top-2 at capacity 2.0, expert widths halved",
       SECOND / "brainformer1_small_top2_half"),
      ("glam_small with an MoE in place of its dense FFN", SECOND / "glam_small_moe_ffns")),
     ("glam_small", "glam_ec_small", "dense_small")),
)
STEPS = (200, 400, 600, 800)


def runs(folder):
    return [json.loads(p.read_text()) for p in sorted(folder.glob("seed-*.json"))]


def at_step(family_runs, step):
    values = [c["val_loss"] for r in family_runs for c in r["curve"] if c["step"] == step]
    return statistics.mean(values) if len(values) == len(family_runs) else None


def last(family_runs, key):
    return [r["curve"][-1].get(key) for r in family_runs]


def fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}f}"


def row(label, family_runs):
    per_step = " | ".join(fmt(at_step(family_runs, s)) for s in STEPS)
    causal = [r["val_loss_causal"] for r in family_runs]
    trained = [r["val_loss_as_trained"] for r in family_runs]
    dropped, entropy = last(family_runs, "dropped_fraction"), last(family_runs, "router_entropy")
    moe = None not in dropped
    seeds = " / ".join(f"{c:.3f}" for c in causal)
    return (
        f"| {label} | {family_runs[0]['steps']} | {per_step} | {statistics.mean(causal):.3f} "
        f"({seeds}) | {statistics.mean(trained):.3f} | "
        f"{statistics.mean(causal) - statistics.mean(trained):.3f} | "
        f"{fmt(statistics.mean(dropped)) if moe else '–'} | "
        f"{fmt(statistics.mean(entropy), 2) if moe else '–'} | "
        f"{family_runs[0]['activated_params']:,} |"
    )


def main():
    for title, study, family, variants, references in EXPERIMENTS:
        study_runs = EVIDENCE / study / "runs"
        print(f"\n### {title}\n")
        print(
            "| family | steps | " + " | ".join(f"val @ {s}" for s in STEPS)
            + " | causal, end (per seed) | as trained, end | causal − as trained"
            " | unserved in training | router entropy | activated params |"
        )
        print("|---|---:|" + "---:|" * len(STEPS) + "---|---:|---:|---:|---:|---:|")
        print(row(f"{family}, capacity 1.0", runs(study_runs / family)))
        for label, root in variants:
            folder = root / "runs" / root.name
            if folder.exists():
                print(row(f"**{label}**", runs(folder)))
        for reference in references:
            print(row(reference, runs(study_runs / reference)))


if __name__ == "__main__":
    main()

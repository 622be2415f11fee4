"""Study 2 before -> after issue 33's initialisation fixes: the same (family, seed) runs, the same step
counts (this folder reuses study 2's step_times.json), final validation loss, causal and as trained.
Dense and Primer have no experts or routers: their seed-0 reruns equal study 2's runs exactly, so their
seed-1 and seed-2 files here are copies of study 2's.

    python docs/study_evidence/small_bytes_300s_fixed_init/before_after.py > .../before_after.md
"""
import json
import pathlib
import statistics

HERE = pathlib.Path(__file__).parent
BEFORE = HERE.parent / "small_bytes_300s" / "runs"
print("| family | seed | steps | causal: study 2 | now | now − study 2 | as trained: study 2 | now | now − study 2 |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
deltas = {}
for run in sorted((HERE / "runs").glob("*/seed-*.json")):
    after = json.loads(run.read_text())
    before = json.loads((BEFORE / run.parent.name / run.name).read_text())
    assert after["steps"] == before["steps"], (run, after["steps"], before["steps"])
    row = []
    for key in ("val_loss_causal", "val_loss_as_trained"):
        b, a = before[key], after[key]
        row.append(f"{b:.4f} | {a:.4f} | {a - b:+.4f}")
        deltas.setdefault((after["family"], key), []).append(a - b)
    print(f"| {after['family']} | {after['seed']} | {after['steps']} | " + " | ".join(row) + " |")
print()
print("| family | mean change, causal | mean change, as trained |")
print("|---|---:|---:|")
for family in sorted({f for f, _ in deltas}):
    c = statistics.mean(deltas[(family, "val_loss_causal")])
    t = statistics.mean(deltas[(family, "val_loss_as_trained")])
    print(f"| {family} | {c:+.4f} | {t:+.4f} |")

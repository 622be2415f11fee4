"""A study before -> after issue 33's initialisation fixes: the same (family, seed) runs, the same step
counts (the rerun's folder reuses the study's step_times.json), final validation loss, causal and as
trained. Dense and Primer have no experts or routers: in study 2 their seed-0 reruns equal the original
runs exactly, so their seed-1 and seed-2 files here are copies of study 2's, and study 3's rerun copies
all of its dense and Primer runs.

    python docs/study_evidence/small_bytes_300s_fixed_init/before_after.py > .../before_after.md

The same for study 3's rerun (keras source), with the two folders given:

    python .../before_after.py docs/study_evidence/keras_bytes_300s_fixed_init \
        docs/study_evidence/keras_bytes_300s > docs/study_evidence/keras_bytes_300s_fixed_init/before_after.md
"""
import json
import pathlib
import statistics
import sys

HERE = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent
BEFORE = (pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else HERE.parent / "small_bytes_300s") / "runs"
print("| family | seed | steps | causal: before | now | change | as trained: before | now | change |")
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

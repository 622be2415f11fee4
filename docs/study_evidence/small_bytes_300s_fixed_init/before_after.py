"""A study before -> after issue 33's initialisation fixes: the same (family, seed) runs, the same step
counts (the rerun's folder reuses the study's step_times.json), final validation loss, causal and as
trained, read from each folder's runs.csv. Dense and Primer have no experts or routers: in study 2 their
seed-0 reruns equal the original runs exactly, so their seed-1 and seed-2 files here are copies of study
2's, and study 3's rerun copies all of its dense and Primer runs.

    python docs/study_evidence/small_bytes_300s_fixed_init/before_after.py > .../before_after.md

The same for another study's rerun, with the two folders given (study 3, the keras source):

    python .../before_after.py docs/study_evidence/keras_bytes_300s_fixed_init \
        docs/study_evidence/keras_bytes_300s > docs/study_evidence/keras_bytes_300s_fixed_init/before_after.md
"""
import csv
import pathlib
import statistics
import sys

HERE = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).parent
BEFORE = pathlib.Path(sys.argv[2]) if len(sys.argv) > 2 else HERE.parent / "small_bytes_300s"


def runs(folder):
    with open(folder / "runs.csv") as f:
        return {(row["family"], int(row["seed"])): row for row in csv.DictReader(f)}


before_runs = runs(BEFORE)
print("| family | seed | steps | causal: before | now | change | as trained: before | now | change |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
deltas = {}
for (family, seed), after in sorted(runs(HERE).items()):
    before = before_runs[(family, seed)]
    assert after["steps"] == before["steps"], (family, seed, after["steps"], before["steps"])
    row = []
    for key in ("val_loss_causal", "val_loss_as_trained"):
        b, a = float(before[key]), float(after[key])
        row.append(f"{b:.4f} | {a:.4f} | {a - b:+.4f}")
        deltas.setdefault((family, key), []).append(a - b)
    print(f"| {family} | {seed} | {after['steps']} | " + " | ".join(row) + " |")
print()
print("| family | mean change, causal | mean change, as trained |")
print("|---|---:|---:|")
for family in sorted({f for f, _ in deltas}):
    c = statistics.mean(deltas[(family, "val_loss_causal")])
    t = statistics.mean(deltas[(family, "val_loss_as_trained")])
    print(f"| {family} | {c:+.4f} | {t:+.4f} |")

"""Study 2 before -> after issue 33's initialisation fixes: the same (family, seed) runs, the same step
counts (this folder reuses study 2's step_times.json), validation loss at equal steps.

    python docs/study_evidence/small_bytes_300s_fixed_init/before_after.py > .../before_after.md
"""
import json
import pathlib

HERE = pathlib.Path(__file__).parent
BEFORE = HERE.parent / "small_bytes_300s" / "runs"
print("| family | seed | steps | val loss before (study 2) | after (both fixes) | after − before |")
print("|---|---:|---:|---:|---:|---:|")
for run in sorted((HERE / "runs").glob("*/seed-*.json")):
    after = json.loads(run.read_text())
    before = json.loads((BEFORE / run.parent.name / run.name).read_text())
    assert after["steps"] == before["steps"], (run, after["steps"], before["steps"])
    b, a = before["val_loss_causal"], after["val_loss_causal"]
    print(f"| {after['family']} | {after['seed']} | {after['steps']} | {b:.4f} | {a:.4f} | {a - b:+.4f} |")

"""Compile the presets' real `fit` steps for the paper's TPU slices, by hand.

Each row runs `keras-brainformer compile ... --json` in its own process (so
one compilation's memory is returned before the next) and appends the JSON
object to `--out` (JSON lines); then a table: XLA's peak memory per chip
against `plan`'s, the compiler's cost-model step time (`estimated_seconds`:
`optimal_seconds` with the -1 s of each uncosted custom call taken back out;
docs/tpu.md), steps/s and each family's steps/s over GLaM's, also by the
roofline of the compiler's FLOPs and bytes. Needs libtpu (`pip install -e ".[tpu]"`).

    PYTHONPATH=. python benchmarks/tpu_compile_scale.py --set 100m --out runs/tpu_100m.jsonl
    PYTHONPATH=. python benchmarks/tpu_compile_scale.py --set 8b --out runs/tpu_8b.jsonl
    PYTHONPATH=. python benchmarks/tpu_compile_scale.py --table runs/tpu_100m.jsonl

Settings are those of docs/performance_model.md's check 2: mixed_bfloat16,
Adafactor, 1024-token sequences, experts on the data axis (GShard) when the
mesh has no `expert` axis.
"""

import argparse
import json
import os
import subprocess
import sys
import time

FAMILIES_100M = ("brainformer1_100m", "brainformer2_100m", "glam_100m_32e",
                 "glam_ec_100m_32e", "dense_100m", "primer_100m")
FAMILIES_1B = ("brainformer1_1b", "glam_1b7_64e", "dense_1b7", "primer_1b7")
FAMILIES_8B = ("brainformer1_8b", "glam_8b_64e", "glam_ec_8b_64e", "dense_8b")
# name -> (presets, topology, mesh, fsdp, global batch)
SETS = {
    "tiny": (("brainformer1_tiny", "glam_tiny"), "v4:2x2x1", "batch=4", False, 16),
    "100m": (FAMILIES_100M, "v4:4x4x4", "batch=32,model=2", False, 64),
    # 64 v5e chips with v4's mesh (16 GiB chips). GLaM's --fsdp step on
    # v5e:4x4 needed 45 GB before the fsdp layout fix and 9.25 GiB with it
    # (docs/performance_model.md, "Plan vs XLA's TPU compiler").
    "100m-v5e": (FAMILIES_100M, "v5e:8x8", "batch=32,model=2", False, 64),
    "1b": (FAMILIES_1B, "v4:4x4x4", "batch=32,model=2", True, 64),
    "8b": (FAMILIES_8B, "v4:8x8x8", "batch=64,model=8", True, 64),
}


def run_one(preset, topology, mesh, fsdp, batch, seq_len, timeout):
    command = [
        sys.executable, "-m", "keras_brainformer", "compile", "--preset", preset,
        "--topology", topology, "--mesh", mesh, "--batch-size", str(batch),
        "--seq-len", str(seq_len), "--dtype", "mixed_bfloat16", "--optimizer", "adafactor",
        "--json",
    ] + (["--fsdp"] if fsdp else [])
    env = dict(os.environ, KERAS_BACKEND="jax")
    start = time.time()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.time() - start
    try:
        report = json.loads(done.stdout[done.stdout.index("{"):])
    except ValueError:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        report = {"preset": preset, "error": " | ".join(tail), "exit": done.returncode}
    report.update(wall_seconds=wall, command=" ".join(command[2:]))
    return report


def table(rows):
    gib = 2**30
    glam = {}
    for r in rows:
        if "error" not in r and r["preset"].startswith("glam_") and "_ec_" not in r["preset"]:
            glam[(r["topology"], json.dumps(r["mesh"]), r["fsdp"])] = r
    print("| preset | slice | mesh | fsdp | batch | XLA peak GiB | plan GiB | plan / XLA | "
          "plan TPU / XLA | fits | optimal_seconds | ConcatBitcast | cost model ms | steps/s | "
          "MFU | vs GLaM steps/s | roofline ms | vs GLaM (roofline) | compile s |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| `{r['preset']}` | error: {r['error'][:120]} |")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        g = glam.get((r["topology"], json.dumps(r["mesh"]), r["fsdp"]))
        ratio = roof_ratio = ""
        if g and r.get("steps_per_second") and g.get("steps_per_second"):
            ratio = f"{r['steps_per_second'] / g['steps_per_second']:.2f}"
        if g and r.get("roofline_seconds") and g.get("roofline_seconds"):
            roof_ratio = f"{g['roofline_seconds'] / r['roofline_seconds']:.2f}"
        est = r.get("estimated_seconds")
        opt = f"{est * 1e3:.1f}" if est else "n/a"
        roof = f"{r['roofline_seconds'] * 1e3:.1f}" if r.get("roofline_seconds") else "n/a"
        sps = f"{r['steps_per_second']:.2f}" if r["steps_per_second"] else "n/a"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] else "n/a"
        # plan_memory(target="tpu") / XLA's peak (reports before it existed: n/a).
        tpu_ratio = f"{r['plan_tpu_over_peak']:.2f}" if r.get("plan_tpu_over_peak") else "n/a"
        print(
            f"| `{r['preset']}` | {r['topology']} | `{mesh}` | {'on' if r['fsdp'] else 'off'} | "
            f"{r['batch_size']} | {r['peak_bytes'] / gib:.2f} | {r['plan_total'] / gib:.2f} | "
            f"{r['plan_over_peak']:.2f} | {tpu_ratio} | {'yes' if r['fits'] else 'no'} | "
            f"{r['optimal_seconds']:.4g} | {r.get('uncosted_custom_calls', '?')} | {opt} | "
            f"{sps} | {mfu} | {ratio} | {roof} | {roof_ratio} | {r['compile_seconds']:.0f} |"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", choices=sorted(SETS))
    parser.add_argument("--presets", nargs="*", help="only these presets of the set")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per compilation")
    parser.add_argument("--out", help="JSON lines to append to")
    parser.add_argument("--table", help="print the table of a JSON lines file and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            table([json.loads(line) for line in f if line.strip()])
        return
    presets, topology, mesh, fsdp, batch = SETS[args.set]
    rows = []
    for preset in args.presets or presets:
        report = run_one(preset, topology, mesh, fsdp, batch, args.seq_len, args.timeout)
        rows.append(report)
        print(f"{preset}: {report.get('error') or 'compiled'} ({report['wall_seconds']:.0f} s)",
              flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(report) + "\n")
    table(rows)


if __name__ == "__main__":
    main()

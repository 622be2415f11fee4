"""The step-time model against the paper's steps/s ratios (analytic, seconds).

Brainformers [BF] Table 3 gives steps/s on 64 TPU v4 chips (100M/32E, 1B/64E)
and 512 (8B/64E). This predicts, for our presets, the Brainformer-1 / GLaM
(and, at 8B, GLaM+EC / GLaM) steps/s ratio on the same chips under meshes the
memory planner says fit a 32 GiB v4 chip (Adafactor, `mixed_bfloat16`), and
prints each side's per-part breakdown.

    python benchmarks/paper_step_time.py                         # global batch 64 and 256 x 1024
    python benchmarks/paper_step_time.py --batch-sizes 64 --breakdown
"""

import argparse
import itertools

from keras_brainformer.distribution.memory_plan import plan_memory
from keras_brainformer.distribution.mesh import expert_axis
from keras_brainformer.distribution.mesh import parse_mesh_spec
from keras_brainformer.distribution.step_time import predict_step_time
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config

# (scale, chips, numerator preset, GLaM preset, paper steps/s ratio, meshes)
CASES = (
    ("100M/32E", 64, "brainformer1_100m", "glam_100m_32e", 2.03 / 1.92,
     ("batch=32,model=2", "batch=16,model=4")),
    ("1B/64E", 64, "brainformer1_1b", "glam_1b7_64e", 2.00 / 1.23,
     ("batch=64", "batch=32,model=2")),
    ("8B/64E", 512, "brainformer1_8b", "glam_8b_64e", 1.96 / 0.39,
     ("batch=64,model=8", "batch=32,expert=16")),
    ("8B/64E GLaM+EC", 512, "glam_ec_8b_64e", "glam_8b_64e", 0.50 / 0.39,
     ("batch=64,model=8",)),
)


def plan(name, mesh, batch, fsdp):
    config = get_preset_config(name)
    sizes = parse_mesh_spec(mesh)
    axis = expert_axis(sizes, "batch" if "expert" not in sizes else None, fsdp)
    memory = plan_memory(config, sizes, batch, 1024, dtype="mixed_bfloat16",
                         optimizer="adafactor", fsdp=fsdp, expert_dim_name=axis)
    step = predict_step_time(config, sizes, batch, 1024, "tpu-v4", dtype="mixed_bfloat16",
                             optimizer="adafactor", fsdp=fsdp, expert_dim_name=axis)
    return memory, step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256],
                        help="global sequences a step")
    parser.add_argument("--breakdown", action="store_true", help="per-part ms of each side")
    args = parser.parse_args()
    print("TPU v4, sequences of 1024 tokens, mixed_bfloat16, Adafactor, experts on the batch "
          "axis (GShard) unless the mesh has an expert axis\n")
    print("| scale | chips | batch | mesh | fsdp | fits 32 GiB (ours / GLaM) | ours steps/s "
          "| GLaM steps/s | predicted ratio | paper ratio | MFU ours / GLaM |")
    print("|---|---:|---:|---|---|---|---:|---:|---:|---:|---|")
    breakdowns = []
    for scale, chips, ours, glam, paper, meshes in CASES:
        for batch, mesh, fsdp in itertools.product(args.batch_sizes, meshes, (False, True)):
            try:
                (m1, s1), (m2, s2) = plan(ours, mesh, batch, fsdp), plan(
                    glam, mesh, batch, fsdp)
            except ValueError as error:
                print(f"| {scale} | {chips} | {batch} | `{mesh}` | {fsdp} | {error} |||||")
                continue
            assert s1.chips == chips
            fits = f"{m1.total / 2**30:.1f} / {m2.total / 2**30:.1f} GiB " + (
                "yes" if m1.fits("32GiB") and m2.fits("32GiB") else "no")
            print(f"| {scale} | {chips} | {batch} | `{mesh}` | {'on' if fsdp else 'off'} "
                  f"| {fits} "
                  f"| {s1.steps_per_second:.2f} | {s2.steps_per_second:.2f} "
                  f"| {s1.steps_per_second / s2.steps_per_second:.2f} | {paper:.2f} "
                  f"| {s1.mfu:.0%} / {s2.mfu:.0%} |")
            if m1.fits("32GiB") and m2.fits("32GiB"):
                breakdowns.append((scale, batch, mesh, fsdp, ours, s1, glam, s2))
    if args.breakdown:
        for scale, batch, mesh, fsdp, ours, s1, glam, s2 in breakdowns:
            print(f"\n#### {scale}, batch {batch}, `{mesh}`, fsdp {'on' if fsdp else 'off'}: "
                  "ms per step (per device)\n")
            print(f"| part | {ours} | {glam} | difference |")
            print("|---|---:|---:|---:|")
            for part in dict.fromkeys(list(s2.parts) + list(s1.parts)):
                a, b = s1.parts.get(part, 0.0) * 1e3, s2.parts.get(part, 0.0) * 1e3
                print(f"| {part} | {a:.1f} | {b:.1f} | {a - b:+.1f} |")
            print(f"| **step** | {s1.step_seconds * 1e3:.1f} | {s2.step_seconds * 1e3:.1f} "
                  f"| {(s1.step_seconds - s2.step_seconds) * 1e3:+.1f} |")


if __name__ == "__main__":
    main()

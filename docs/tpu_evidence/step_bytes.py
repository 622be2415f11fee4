"""`plan --hardware tpu-v4`'s step-time model against the programs XLA's TPU
compiler made of the same steps (issue 34): FLOPs and bytes accessed per
chip, the model's per part beside the compiled program's totals.

Reads the `keras-brainformer compile --json` reports in `100m_v4_64/` and
`8b_v4_512/` (their commands: README.md here), rebuilds each step's terms
with `step_time.step_terms` (collectives left out: the compiled `bytes
accessed` counts memory traffic, not links) and prints a markdown table:

    python docs/tpu_evidence/step_bytes.py
"""

import collections
import json
import pathlib

from keras_brainformer.distribution.hardware import get_hardware
from keras_brainformer.distribution.step_time import step_terms
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config

HERE = pathlib.Path(__file__).resolve().parent
FOLDERS = ("100m_v4_64", "8b_v4_512")


def model_totals(report):
    terms = step_terms(
        get_preset_config(report["preset"]), report["mesh"], report["batch_size"],
        report["sequence_length"], dtype=report["dtype"], optimizer=report["optimizer"],
        fsdp=report["fsdp"], expert_dim_name=report["experts_on"],
    )
    parts = collections.Counter()
    flops = 0.0
    for term in terms:
        if term.collective is None:
            parts[term.part] += term.bytes
            flops += term.flops
    return flops, parts


def main():
    hardware = get_hardware("tpu-v4")
    print("| program | FLOPs: model / compiled | bytes: model / compiled "
          "| model's bytes by part (GB) | compute s at HBM speed: model / compiled bytes |")
    print("|---|---:|---:|---|---:|")
    for folder in FOLDERS:
        for path in sorted((HERE / folder).glob("*.json")):
            report = json.loads(path.read_text())
            flops, parts = model_totals(report)
            model_bytes = sum(parts.values())
            split = ", ".join(f"{part} {n / 1e9:.1f}" for part, n in parts.most_common(4))
            fsdp = " --fsdp" if report["fsdp"] else ""
            name = f"`{report['preset']}`{fsdp}, {report['chips']} chips"
            print(
                f"| {name} | {flops:.3g} / {report['flops']:.3g} ({flops / report['flops']:.2f}) "
                f"| {model_bytes:.3g} / {report['bytes_accessed']:.3g} "
                f"({model_bytes / report['bytes_accessed']:.2f}) | {split} "
                f"| {model_bytes / hardware.memory_bandwidth * 1e3:.1f} / "
                f"{report['bytes_accessed'] / hardware.memory_bandwidth * 1e3:.1f} ms |"
            )


if __name__ == "__main__":
    main()

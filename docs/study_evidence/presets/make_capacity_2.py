"""Builds `brainformer1_small_cap2/` and `searched_small_cap2/`: Brainformer-1
(`presets/brainformer1_small`) and the search's best block
(`searched_small/`) with every MoE sublayer's expert-choice capacity factor
raised from 1.0 to 2.0, nothing else changed (issue 33's separating
experiment: do these blocks fall behind GLaM because expert choice at
capacity 1.0 leaves 16-19 % of tokens unserved?). Capacity 2.0 also doubles
the expert compute per token, so `brainformer1_small_cap2_half/` halves
every expert's width as well: capacity 2.0 at Brainformer-1's activated
parameters.

    python docs/study_evidence/presets/make_capacity_2.py
"""

import json
import pathlib
import shutil

from keras_brainformer.zoo.parameter_count import count_parameters

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[2]
# name: (source folder, divisor of every expert's intermediate_dim)
SOURCES = {
    "brainformer1_small_cap2": (ROOT / "presets/brainformer1_small", 1),
    "searched_small_cap2": (HERE / "searched_small", 1),
    "brainformer1_small_cap2_half": (ROOT / "presets/brainformer1_small", 2),
}
CAPACITY = 2.0


def write_variant(name, source, change):
    """Copies preset folder `source` to `name/` here, changes its config with
    `change(config) -> (sublayers changed, what)` and writes the config and
    the metadata (description, and the changed model's parameter counts)."""
    out = HERE / name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(source, out)
    config = json.loads((out / "config.json").read_text())
    changed, what = change(config)
    if not changed:
        raise ValueError(f"{source}: nothing to change")
    (out / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    metadata = json.loads((out / "metadata.json").read_text())
    metadata["description"] = (
        f"{source.name} with {what}; nothing else changed. "
        "Random initialisation (architecture preset)."
    )
    # The counts of the changed model, not the source's.
    counts = count_parameters(config["config"])
    metadata["params"], metadata["activated_params"] = counts["total"], counts["activated"]
    (out / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    print(f"wrote {out}: {what}")


def capacity_change(source, divisor):
    def change(config):
        changed = 0
        for sublayer in config["config"]["blocks"]["sublayers"]:
            if sublayer["kind"] == "moe":
                if sublayer["capacity_factor"] != 1.0:
                    raise ValueError(f"{source}: expected capacity 1.0, got {sublayer}")
                sublayer["capacity_factor"] = CAPACITY
                # `hidden_dim` in folders written before issue 35's renames.
                width = "intermediate_dim" if "intermediate_dim" in sublayer else "hidden_dim"
                sublayer[width] //= divisor
                changed += 1
        return changed, (
            f"every MoE sublayer's capacity factor {CAPACITY} instead of 1.0 "
            f"({changed} MoE sublayers)"
            + (f" and expert widths divided by {divisor}" if divisor > 1 else "")
        )

    return change


def main():
    for name, (source, divisor) in SOURCES.items():
        write_variant(name, source, capacity_change(source, divisor))


if __name__ == "__main__":
    main()

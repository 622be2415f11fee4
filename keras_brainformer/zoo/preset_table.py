"""The zoo's table: one row per architecture preset with our parameter
counts (recorded in its folder's `metadata.json`), the paper-convention
counts and the paper's figures.

Print it (the table in `docs/presets.md`, which a test keeps in sync) with
`python -m keras_brainformer.zoo.preset_table`.
"""

from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.preset_folders import human_count
from keras_brainformer.zoo.preset_recipes import activated_non_embedding
from keras_brainformer.zoo.preset_recipes import paper_convention_counts


def _layout(config):
    letters = {"attention": "A", "ffn": "F", "moe": "M"}
    spec = BlockSpec.from_dict(config["blocks"])
    return f"{config['num_layers']} x [{' '.join(letters[s.kind] for s in spec.sublayers)}]"


def _experts(config):
    spec = BlockSpec.from_dict(config["blocks"])
    experts = sorted({s.num_experts for s in spec.sublayers if s.kind == "moe"})
    return "/".join(map(str, experts)) or "-"


def table_rows(presets=None):
    """One dict per preset: counts (ours and paper convention), paper figures,
    relative errors of the paper-convention counts."""
    rows = []
    for name, preset in (presets or backbone_presets).items():
        config, meta = preset["config"], preset["metadata"]
        paper_counts = paper_convention_counts(config)
        row = {
            "name": name,
            "family": meta["family"],
            "layout": _layout(config),
            "d": config["hidden_dim"],
            "experts": _experts(config),
            "total": meta["params"],
            "activated": meta["activated_params"],
            "paper_convention_total": paper_counts["total"],
            "paper_convention_activated": paper_counts["activated"],
            "paper": meta["paper"],
            "total_error": None,
            "activated_error": None,
        }
        if meta["paper"]:
            row["total_error"] = paper_counts["total"] / meta["paper"]["total"] - 1
            row["activated_error"] = (
                paper_counts["activated"] / meta["paper"]["activated"] - 1
            )
        rows.append(row)
    return rows


def markdown_table(presets=None):
    """The presets as a markdown table (the one in `docs/presets.md`)."""
    lines = [
        "| preset | family | blocks x layout | d | E | total / activated (ours, vocab) "
        "| paper convention (32K vocab) | paper | error (total / activated) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table_rows(presets):
        vocab = (presets or backbone_presets)[r["name"]]["config"]["vocabulary_size"]
        ours = f"{human_count(r['total'])} / {human_count(r['activated'])} ({vocab})"
        conv = (
            f"{human_count(r['paper_convention_total'])} / "
            f"{human_count(r['paper_convention_activated'])}"
        )
        metadata = (presets or backbone_presets)[r["name"]]["metadata"]
        if r["name"].endswith(("_tiny", "_small")) or "keras_hub_preset" in metadata:
            conv = "-"
        if "keras_hub_preset" in metadata:
            # keras-hub's own count of the original (no paper figure).
            paper = f"{human_count(metadata['keras_hub_params'])} (keras-hub " \
                    f"`{metadata['keras_hub_preset']}`)"
            error = f"{r['total'] / metadata['keras_hub_params'] - 1:+.1%} / -"
        elif r["paper"]:
            paper = (
                f"{human_count(r['paper']['total'])} / {human_count(r['paper']['activated'])} "
                f"({r['paper']['source']})"
            )
            error = f"{r['total_error']:+.1%} / {r['activated_error']:+.1%}"
        else:
            paper, error = "-", "-"
        lines.append(
            f"| `{r['name']}` | {r['family']} | {r['layout']} | {r['d']} | {r['experts']} "
            f"| {ours} | {conv} | {paper} | {error} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown_table())
    print()
    for tier in ("_tiny", "_small"):
        print(f"\n*{tier} presets, activated non-embedding parameters:")
        for name, n in activated_non_embedding(backbone_presets, tier).items():
            total = backbone_presets[name]["metadata"]["params"]
            print(f"- `{name}`: {n:,} activated non-embedding; {total:,} total")

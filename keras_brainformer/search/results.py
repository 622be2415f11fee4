"""What a search leaves behind, read back from its KerasTuner folder.

    trials.csv          one row per trial (every figure measured, the genome,
                        the block spec as JSON)
    search.png          step time against validation loss, baseline marked
    top/rank<k>.block.json   the k-th best block (`BlockSpec.from_json`)
    top/rank<k>.json         its model dim, genome and measurements
    presets/search_rank<k>_proxy/   the block as searched (proxy scale,
                        stacked as in the search), a keras-hub preset folder
    presets/search_rank<k>_paper/   scaled to paper size (widths / scale,
                        the paper's expert count) and stacked N times, N
                        chosen so the activated parameter count is closest to
                        a target
    summary.md          the table of the best blocks and the baseline

Everything is rebuilt from the trial files, so it works the same after a
local search, a distributed one, or an interrupted one.
"""

import csv
import glob
import json
import math
import os
import pathlib

from keras_brainformer.models.brainformer.brainformer_causal_lm_preprocessor import (
    BrainformerCausalLMPreprocessor,
)
from keras_brainformer.models.brainformer.brainformer_tokenizer import BrainformerTokenizer
from keras_brainformer.search.space import LAYER_LETTERS
from keras_brainformer.search.space import SearchSpace
from keras_brainformer.search.space import slot_gene
from keras_brainformer.zoo.parameter_count import count_parameters
from keras_brainformer.zoo.preset_building import backbone_config_json
from keras_brainformer.zoo.preset_recipes import PAPER_SEQUENCE_LENGTH
from keras_brainformer.zoo.preset_recipes import PAPER_TRAINING_VOCABULARY_SIZE
from keras_brainformer.zoo.preset_recipes import paper_convention_counts

CSV_FIELDS = (
    "trial_id", "status", "origin", "in_population", "block", "model_dim", "reward",
    "val_loss", "val_loss_at_check", "step_ms", "step_ms_at_check", "steps", "tokens",
    "rejected", "rejected_step_time", "rejected_loss", "params", "activated_params",
    "compile_seconds", "train_seconds", "wall_seconds", "baseline_step_ms",
    "baseline_val_loss_at_check", "baseline_val_loss", "genome", "block_spec",
)
METRICS = (
    "reward", "val_loss", "val_loss_at_check", "step_ms", "step_ms_at_check", "steps",
    "tokens", "rejected", "rejected_step_time", "rejected_loss", "params",
    "activated_params", "compile_seconds", "train_seconds", "wall_seconds",
    "baseline_step_ms", "baseline_val_loss_at_check", "baseline_val_loss",
)
# GLaM 0.1B/32E's activated parameters (the paper's Tables 2 and 3).
DEFAULT_TARGET_ACTIVATED = 145e6


def load_search(project_dir):
    """`(space, oracle_state, trials)` of a search folder; `trials` is a list
    of dicts (`trial_id`, `status`, `values`, `metrics`: last value of each)
    sorted by trial id."""
    project_dir = pathlib.Path(project_dir)
    oracle_file = project_dir / "oracle.json"
    if not oracle_file.exists():
        raise FileNotFoundError(f"No search in {project_dir} (no oracle.json).")
    with open(oracle_file) as f:
        state = json.load(f)
    space = SearchSpace.from_config(state["evolution"]["space"])
    trials = []
    for path in sorted(glob.glob(str(project_dir / "trial_*" / "trial.json"))):
        with open(path) as f:
            t = json.load(f)
        metrics = {}
        for name, history in t.get("metrics", {}).get("metrics", {}).items():
            observations = history.get("observations", [])
            if observations:
                value = observations[-1]["value"]
                metrics[name] = value[0] if isinstance(value, list) else value
        trials.append(
            {
                "trial_id": t["trial_id"],
                "status": t["status"],
                "values": t["hyperparameters"]["values"],
                "metrics": metrics,
            }
        )
    # Numerically: extending a search from 9 to 10+ trials widens the ids.
    trials.sort(key=lambda t: (int(t["trial_id"]) if t["trial_id"].isdigit() else -1,
                               t["trial_id"]))
    return space, state, trials


def layout(space, genome):
    """The block's layout in letters, e.g. `A M F M A M F M`."""
    return " ".join(
        LAYER_LETTERS[genome[slot_gene(i, "type")]] for i in range(space.num_sublayers)
    )


def trial_rows(space, state, trials):
    """One CSV row (dict) per trial."""
    evolution = state.get("evolution", {})
    population = set(evolution.get("population", []))
    origins = evolution.get("origins", {})
    rows = []
    for t in trials:
        genome = {g: t["values"][g] for g in space.gene_names() if g in t["values"]}
        complete = len(genome) == len(space.gene_names())
        row = {
            "trial_id": t["trial_id"],
            "status": t["status"],
            "origin": origins.get(t["trial_id"], ""),
            "in_population": int(t["trial_id"] in population),
            "block": space.describe(genome) if complete else "",
            "model_dim": genome.get("model_dim", ""),
            "genome": json.dumps(genome, sort_keys=True),
            "block_spec": space.to_block_spec(genome).to_json() if complete else "",
        }
        for name in METRICS:
            row[name] = t["metrics"].get(name, "")
        rows.append(row)
    return rows


def ranked(rows):
    """Completed, accepted trials, best (highest reward) first."""
    good = [
        r for r in rows
        if r["status"] == "COMPLETED" and r["reward"] != "" and float(r["reward"]) > 0
    ]
    return sorted(good, key=lambda r: -float(r["reward"]))


def write_csv(rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def paper_scale_config(space, genome, target_activated=DEFAULT_TARGET_ACTIVATED,
                       num_experts=32, max_blocks=64):
    """The block at paper size, stacked to the activated-parameter target.

    Widths are divided by `space.scale` (model dim, hidden dims, head width),
    the expert count becomes `num_experts`, and the block is stacked N times,
    N the count whose activated parameters (paper convention: 32K tied
    embedding, see `zoo.preset_recipes.paper_convention_counts`) are closest
    to `target_activated`. The config's own vocabulary is the paper's 256K.

    Returns:
        `(backbone_config, num_blocks, paper_convention_counts)`.
    """
    paper_space = SearchSpace(
        num_sublayers=space.num_sublayers,
        scale=1.0,
        gating=("top_2", "expert_choice"),
        num_experts=num_experts,
        model_dims=space.paper_model_dims,
        hidden_dims=space.paper_hidden_dims,
        num_heads=space.num_heads,
        capacity_factors=space.capacity_factors,
        activations=space.activations,
    )
    big = dict(genome)
    big["model_dim"] = space.paper_model_dims[space.model_dims.index(genome["model_dim"])]
    for i in range(space.num_sublayers):
        gene = slot_gene(i, "hidden")
        big[gene] = space.paper_hidden_dims[space.hidden_dims.index(genome[gene])]
    best = None
    for n in range(1, max_blocks + 1):
        config = paper_space.to_backbone_config(
            big, PAPER_TRAINING_VOCABULARY_SIZE, num_blocks=n,
            max_sequence_length=PAPER_SEQUENCE_LENGTH,
        )
        counts = paper_convention_counts(config)
        error = abs(counts["activated"] - target_activated)
        if best is None or error < best[0]:
            best = (error, config, n, counts)
    return best[1], best[2], best[3]


def write_preset_folder(config, metadata, directory):
    """A keras-hub preset folder (config.json, metadata.json, and the
    shipped tokenizer when the vocabulary is its size) for `config`."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "config.json", "w") as f:
        json.dump(backbone_config_json(config), f, indent=4)
        f.write("\n")
    counts = count_parameters(config)
    tokenizer = BrainformerTokenizer()
    if config["vocabulary_size"] == tokenizer.vocabulary_size():
        BrainformerCausalLMPreprocessor(
            tokenizer=tokenizer, sequence_length=min(256, config["max_sequence_length"])
        ).save_to_preset(str(directory))
    with open(directory / "metadata.json", "w") as f:
        json.dump(
            {"params": counts["total"], "activated_params": counts["activated"], **metadata},
            f, indent=4,
        )
        f.write("\n")
    return directory


def plot_search(rows, path, baselines=None):
    """Step time against validation loss, one point per trial (accepted,
    rejected by the constraint), the baselines as stars."""
    import matplotlib  # heavy, for the plot only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for label, keep, style in (
        ("accepted", lambda r: float(r["rejected"]) == 0, dict(marker="o", color="tab:blue")),
        ("rejected (-1; loss at the check)", lambda r: float(r["rejected"]) != 0,
         dict(marker="x", color="tab:gray")),
    ):
        points = [
            (float(r["step_ms"]), float(r["val_loss"])) for r in rows
            if r["status"] == "COMPLETED" and r["rejected"] != "" and keep(r)
            and math.isfinite(float(r["val_loss"])) and math.isfinite(float(r["step_ms"]))
        ]
        if points:
            axis.scatter(*zip(*points), label=label, alpha=0.75, **style)
    best = ranked(rows)[:1]
    if best:
        axis.scatter(float(best[0]["step_ms"]), float(best[0]["val_loss"]), s=160,
                     facecolors="none", edgecolors="tab:red",
                     label=f"best (#{best[0]['trial_id']})")
    colours = ("tab:orange", "tab:red", "tab:olive", "tab:green", "tab:purple", "tab:brown")
    for (name, (step_ms, val_loss)), colour in zip((baselines or {}).items(), colours):
        axis.scatter(step_ms, val_loss, marker="*", s=220, color=colour, label=name)
        axis.axvline(step_ms, color=colour, alpha=0.3, linestyle="--")
    axis.set_xlabel("median training step time (ms)")
    axis.set_ylabel("validation loss (nats/token)")
    axis.set_title("Block search: step time vs validation loss")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _baseline_points(project_dir):
    points = {}
    for path in sorted(glob.glob(os.path.join(project_dir, "baseline-*.json"))):
        with open(path) as f:
            m = json.load(f)["metrics"]
        tuner = os.path.basename(path)[len("baseline-"):-len(".json")]
        points[f"GLaM-style baseline ({tuner})"] = (m["step_ms"], m["val_loss"])
    return points


def _remeasured_points(out):
    """Mean step time and loss per model of `remeasure.json`, if any."""
    path = pathlib.Path(out) / "remeasure.json"
    if not path.exists():
        return {}
    with open(path) as f:
        record = json.load(f)
    points = {}
    for m in record["measurements"]:
        points.setdefault(m["model"], []).append((m["step_ms"], m["val_loss"]))
    return {
        f"{name}, re-measured": (
            sum(p[0] for p in values) / len(values), sum(p[1] for p in values) / len(values)
        )
        for name, values in points.items()
    }


def write_results(out, project_name="search", top_k=3,
                  target_activated=DEFAULT_TARGET_ACTIVATED, paper_num_experts=32,
                  vocabulary_size=None, sequence_length=None, num_blocks=3, verbose=1):
    """Writes every output of a search in `out` (see the module docstring).

    Args:
        out: the search folder (the KerasTuner project is `out/project_name`).
        top_k: blocks exported.
        target_activated: activated parameters the paper-size presets aim at.
        paper_num_experts: experts of the paper-size presets.
        vocabulary_size, sequence_length, num_blocks: of the proxy presets
            (default: from the search's metadata).

    Returns:
        The ranked rows (best first).
    """
    out = pathlib.Path(out)
    project_dir = out / project_name
    space, state, trials = load_search(project_dir)
    rows = trial_rows(space, state, trials)
    settings = {}
    settings_file = out / "search.json"
    if settings_file.exists():
        with open(settings_file) as f:
            settings = json.load(f)
    vocabulary_size = vocabulary_size or settings.get("vocabulary_size", 8192)
    sequence_length = sequence_length or settings.get("sequence_length", 128)
    num_blocks = settings.get("num_blocks", num_blocks)

    write_csv(rows, out / "trials.csv")
    plot_search(rows, out / "search.png",
                {**_baseline_points(str(project_dir)), **_remeasured_points(out)})
    best = ranked(rows)[:top_k]
    top_dir = out / "top"
    top_dir.mkdir(exist_ok=True)
    for old in list(top_dir.glob("rank*")):
        old.unlink()
    lines = [
        f"Search in `{out}`: {len(rows)} trials, "
        f"{sum(r['status'] == 'COMPLETED' for r in rows)} completed, "
        f"{sum(r['rejected'] not in ('', 0, 0.0) for r in rows)} rejected by the constraint.",
        "",
        "| rank | trial | block | step (ms) | val loss | reward | activated / total (proxy) "
        "| paper-size preset |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rank, row in enumerate(best, start=1):
        genome = json.loads(row["genome"])
        spec = space.to_block_spec(genome)
        (top_dir / f"rank{rank}.block.json").write_text(spec.to_json(indent=2) + "\n")
        record = {"rank": rank, "trial_id": row["trial_id"], "model_dim": genome["model_dim"],
                  "genome": genome, "block": row["block"],
                  "metrics": {m: row[m] for m in METRICS}}
        (top_dir / f"rank{rank}.json").write_text(json.dumps(record, indent=2) + "\n")
        proxy_config = space.to_backbone_config(
            genome, vocabulary_size, num_blocks=num_blocks, max_sequence_length=sequence_length
        )
        description = f"Block search rank {rank} (trial {row['trial_id']}): {row['block']}."
        write_preset_folder(
            proxy_config,
            {"description": description + " Proxy scale, as searched. Random initialisation.",
             "search": record},
            out / "presets" / f"search_rank{rank}_proxy",
        )
        paper_config, n, counts = paper_scale_config(
            space, genome, target_activated, num_experts=paper_num_experts
        )
        write_preset_folder(
            paper_config,
            {"description": description + f" Scaled to paper size (widths / {space.scale:g}, "
             f"{paper_num_experts} experts), stacked {n}x for about "
             f"{target_activated / 1e6:.0f}M activated parameters (paper convention). "
             "Random initialisation.",
             "search": record, "paper_convention_counts": counts},
            out / "presets" / f"search_rank{rank}_paper",
        )
        lines.append(
            f"| {rank} | {row['trial_id']} | `{row['block']}` | {float(row['step_ms']):.1f} "
            f"| {float(row['val_loss']):.4f} | {float(row['reward']):.4f} "
            f"| {float(row['activated_params']) / 1e6:.2f}M / {float(row['params']) / 1e6:.2f}M "
            f"| {n} blocks, {counts['activated'] / 1e6:.0f}M / {counts['total'] / 1e9:.2f}B |"
        )
    for name, (step_ms, val_loss) in _baseline_points(str(project_dir)).items():
        lines.append(f"| - | {name} | | {step_ms:.1f} | {val_loss:.4f} | | | |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    if verbose:
        print("\n".join(lines))
        print(f"Wrote {out / 'trials.csv'}, {out / 'search.png'}, {out / 'summary.md'}, "
              f"{top_dir}/ and {out / 'presets'}/")
    return best

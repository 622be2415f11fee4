"""Turns a finished `keras-brainformer train` run into a shipped trained preset.

    python presets/package_trained_preset.py RUN_DIR NAME --command "keras-brainformer train ..."

Copies `RUN_DIR/preset` to `presets/NAME`, writes the held-out evaluation
text (`presets/heldout/stdlib_validation.txt`, from the run's validation
split) if it is missing, measures the preset's loss on it and records the
training (command, seed, steps, tokens, wall-clock, validation losses) and
that loss in `presets/NAME/metadata.json`. `tests/test_trained_presets.py`
checks the recorded loss against a fresh load.
"""

import argparse
import json
import pathlib
import shutil

import keras

from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.training.corpus import default_documents
from keras_brainformer.training.corpus import split_documents
from keras_brainformer.training.evaluation import heldout_loss
from keras_brainformer.utils.preset_integrity import record_checksums
from keras_brainformer.zoo import count_parameters

HERE = pathlib.Path(__file__).resolve().parent
HELDOUT = HERE / "heldout" / "stdlib_validation.txt"
HELDOUT_BYTES = 60_000
HELDOUT_WINDOWS = 32
SEQUENCE_LENGTH = 128


def write_heldout(max_corpus_bytes):
    """The run's validation documents (never trained on), concatenated."""
    _, validation = split_documents(default_documents(max_corpus_bytes))
    text = "\n".join(document.text for document in validation)
    text = text.encode("utf-8")[:HELDOUT_BYTES].decode("utf-8", errors="ignore")
    HELDOUT.parent.mkdir(exist_ok=True)
    HELDOUT.write_text(text, encoding="utf-8")
    names = ", ".join(document.name for document in validation)
    (HELDOUT.parent / "README.md").write_text(
        "# Held-out text of the trained presets\n\n"
        f"`stdlib_validation.txt`: the first {HELDOUT_BYTES:,} bytes of the validation split "
        "of the embedded corpus the trained presets were trained with (documents never seen "
        f"in training): {names}. Written by `presets/package_trained_preset.py`; each trained "
        "preset's `metadata.json` records its loss on the first "
        f"{HELDOUT_WINDOWS} windows of {SEQUENCE_LENGTH} tokens.\n"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("name")
    parser.add_argument("--command", required=True, help="the exact training command")
    args = parser.parse_args(argv)

    run_dir = pathlib.Path(args.run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    if not HELDOUT.exists():
        write_heldout(run["max_corpus_bytes"])
    target = HERE / args.name
    staging = HERE / (args.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    # Load and save again: the folder is written by this version of the code
    # (config, tokenizer, keras-hub metadata), with the run's weights.
    keras.utils.set_random_seed(0)
    lm = BrainformerCausalLM.from_preset(str(run_dir / "preset"))
    lm.save_to_preset(str(staging))
    loss = heldout_loss(lm, HELDOUT.read_text(encoding="utf-8"), SEQUENCE_LENGTH, HELDOUT_WINDOWS)
    base = run["preset"]
    counts = count_parameters(lm.backbone.get_config())
    metadata = json.loads((staging / "metadata.json").read_text())
    metadata.update(
        {
            "keras_brainformer_preset": args.name,
            "description": (
                f"{base} trained on the embedded standard-library corpus (Python reference "
                f"manual and sources) for {summary['steps']} steps, "
                f"{summary['tokens_seen']:,} tokens; validation loss "
                f"{summary['validation_loss_causal']:.3f} nats/token (causal routing)."
            ),
            "family": backbone_presets[base]["metadata"]["family"],
            "base_preset": base,
            "params": counts["total"],
            "activated_params": counts["activated"],
            "paper": None,
            "training": {
                "command": args.command,
                "backend": run["backend"],
                "seed": run["seed"],
                "steps": summary["steps"],
                "tokens_seen": summary["tokens_seen"],
                "wall_clock_seconds": summary["seconds_this_run"],
                "validation_loss_causal": summary["validation_loss_causal"],
                "validation_perplexity_causal": summary["validation_perplexity_causal"],
                "validation_loss_as_trained": summary["validation_loss_as_trained"],
            },
            "heldout": {
                "file": "presets/heldout/stdlib_validation.txt",
                "sequence_length": SEQUENCE_LENGTH,
                "windows": HELDOUT_WINDOWS,
                "loss_causal": loss,
            },
        }
    )
    (staging / "metadata.json").write_text(json.dumps(metadata, indent=4) + "\n")
    record_checksums(staging)  # from_preset verifies them before loading
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    print(f"{args.name}: held-out loss {loss:.4f} nats/token; written to {target}")


if __name__ == "__main__":
    main()

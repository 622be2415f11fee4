"""The `keras-brainformer` command line (also `python -m keras_brainformer`).

    keras-brainformer train --preset brainformer1_tiny --steps 300
    keras-brainformer generate --preset runs/brainformer1_tiny/preset "def "
    keras-brainformer presets
    keras-brainformer compare --budget 60
    keras-brainformer plan --preset brainformer1_8b --mesh batch=16,expert=16
    keras-brainformer search --budget-per-trial 60 --trials 40 --out runs/search
    keras-brainformer upcycle --preset dense_tiny_stdlib --to target.json --out runs/glam_up
    keras-brainformer convert --preset mixtral_8_7b_en --out runs/mixtral
    keras-brainformer checksum runs/my_preset

Bad input (unknown preset, missing data, a budget <= 0, a run folder of
another model or in use by another `train`) prints one `error:` line and
exits with code 2; a problem of the environment (permissions, a full disk)
one `error:` line and code 1. A training loss that turns NaN or infinite
prints the step and the checkpoint kept, and exits with code 3. Ctrl-C
(SIGINT) or SIGTERM during `train` writes a checkpoint at the current step
and exits with 130 or 143 (rerun the same command to continue; a second
signal exits at once). `plan`
exits with 1 when the plan does not fit.
"""

import argparse
import contextlib
import json
import os
import sys
import warnings

from keras_brainformer.argument_types import positive_float
from keras_brainformer.argument_types import positive_int
from keras_brainformer.errors import NonFiniteLossError
from keras_brainformer.errors import PresetError
from keras_brainformer.errors import PresetWarning
from keras_brainformer.errors import TrainingError
from keras_brainformer.errors import TrainingInterrupted
from keras_brainformer.preset_folders import human_count as human
from keras_brainformer.preset_folders import preset_folder_metadata
from keras_brainformer.training.config import COMPARE_DEFAULT_FAMILIES
from keras_brainformer.training.config import TrainingConfig

EXIT_ENVIRONMENT = 1
EXIT_BAD_INPUT = 2
EXIT_NON_FINITE_LOSS = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM
# keras-hub's sampler names (`keras_hub.samplers.get`).
SAMPLERS = ("greedy", "top_k", "top_p", "random", "beam", "contrastive")
COMMANDS = (
    "train", "generate", "presets", "compare", "upcycle", "convert", "plan", "compile", "search",
    "checksum",
)
COMPARE_EPILOG = """examples:
  keras-brainformer compare --budget 60
  # the studies of docs/reproducing_the_paper.md (raw results: docs/study_evidence/):
  keras-brainformer compare --families brainformer1_small glam_small dense_small \\
      --seeds 0 1 2 --budget 90 --batch-size 16 --sequence-length 128 \\
      --eval-every 25 --out runs/small_bytes_90s
  keras-brainformer compare --families brainformer1_small brainformer2_small \\
      glam_small glam_ec_small dense_small primer_small --seeds 0 1 2 \\
      --budget 300 --batch-size 16 --sequence-length 128 --eval-every 50 \\
      --out runs/small_bytes_300s
  # study 3, run in the folder that holds the installed keras package (site-packages):
  keras-brainformer compare --families brainformer1_small brainformer2_small \\
      glam_small glam_ec_small dense_small primer_small --seeds 0 1 2 \\
      --budget 300 --batch-size 16 --sequence-length 128 --eval-every 50 \\
      --data keras/src --max-corpus-bytes 20000000 --tokenizer byte \\
      --out ~/runs/keras_bytes_300s
  # study 4, the search's best block (a preset folder in the repository):
  keras-brainformer compare --families docs/study_evidence/presets/searched_small \\
      glam_small glam_ec_small dense_small --seeds 0 1 2 --budget 300 \\
      --batch-size 16 --sequence-length 128 --eval-every 50 \\
      --out runs/searched_small_300s
  # study 5, SentencePiece (8K vocabulary, so the tiny tier):
  keras-brainformer compare --families brainformer1_tiny glam_tiny dense_tiny \\
      --seeds 0 1 2 --budget 300 --batch-size 16 --sequence-length 128 \\
      --eval-every 50 --tokenizer sentencepiece --out runs/tiny_sentencepiece_300s
  keras-brainformer compare --families brainformer1_tiny glam_tiny dense_tiny \\
      --seeds 0 1 2 --budget 120 --out runs/compare_seeds
  keras-brainformer compare --data my_corpus/ --tokenizer byte --seeds 0 1 2 \\
      --families brainformer1_tiny glam_tiny --out runs/compare_bytes
"""


def _add_train_arguments(parser):
    """`train`'s own flags; the training settings it shares with `compare`
    and `search` come from `TrainingConfig.add_arguments`."""
    parser.add_argument("--steps", type=positive_int, default=300, help="training steps")
    parser.add_argument(
        "--time-budget", type=positive_float, default=None, help="stop after this many seconds"
    )
    parser.add_argument(
        "--steps-per-epoch",
        type=positive_int,
        default=50,
        help="steps between validation, logs and checkpoints",
    )
    parser.add_argument(
        "--constant-steps",
        type=positive_int,
        default=None,
        help="steps at the peak learning rate before the 1/sqrt decay (default: half)",
    )
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--mixed-bfloat16", action="store_true")
    parser.add_argument(
        "--sample-prompt",
        default=None,
        help="prompt of the sample printed at the end (default: the start of a "
        "validation document)",
    )
    parser.add_argument(
        "--mesh",
        default=None,
        help="device mesh, e.g. batch=2,expert=4 (JAX; see docs/distributed_training.md)",
    )
    parser.add_argument(
        "--experts-on",
        choices=("expert", "batch"),
        default=None,
        help="mesh axis of the expert banks (default: expert if the mesh has it, else batch)",
    )
    parser.add_argument(
        "--fsdp", action="store_true", help="also split weights along the batch axis"
    )
    parser.add_argument(
        "--allow-data-change",
        action="store_true",
        help="resume a run's checkpoint even though its data (corpus, split) changed "
        "(refused otherwise, saying what changed)",
    )
    TrainingConfig.add_arguments(parser)


def build_parser(only=None):
    """The command line's parser; with `only`, the other commands' own
    arguments are left out (their modules are not imported)."""
    parser = argparse.ArgumentParser(
        prog="keras-brainformer",
        description="Brainformer and MoE language models for Keras 3.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--verbose", action="store_true", help="keep the backends' start-up logging"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands, common)
    _add_generate_parser(commands, common)
    commands.add_parser(
        "presets", parents=[common], help="list the zoo's presets with parameter counts"
    )
    _add_checksum_parser(commands, common)
    _add_compare_parser(commands, common)
    _add_upcycle_parser(commands, common)
    _add_convert_parser(commands, common)
    _add_lazy_parsers(commands, common, only)
    return parser


def _add_train_parser(commands, common):
    """Adds `train` (its flags: `_add_train_arguments`) to the subcommands."""
    train = commands.add_parser(
        "train",
        parents=[common],
        help="train a preset on a corpus; rerun the same command to resume",
        description="Train a causal LM from a preset. Killing it and rerunning the same "
        "command resumes from the last completed epoch.",
    )
    train.add_argument("--preset", required=True, help="zoo preset name or preset folder")
    train.add_argument("--out", default=None, help="run folder (default: runs/<preset>)")
    train.add_argument("--overwrite", action="store_true", help="replace a different run")
    _add_train_arguments(train)


def _add_generate_parser(commands, common):
    """Adds `generate` and its flags to the subcommands."""
    generate = commands.add_parser(
        "generate",
        parents=[common],
        help="generate text from a preset",
        description="Generate text from a preset: each prompt is continued up to "
        "--max-length tokens in all (the prompt, its start token and the new tokens), "
        "at most the model's max_sequence_length.",
    )
    generate.add_argument(
        "--preset", required=True, help="preset name (see `keras-brainformer presets`) or folder"
    )
    generate.add_argument("prompt", nargs="+", help="one or more prompts")
    generate.add_argument(
        "--max-length", type=positive_int, default=64,
        help="tokens per output, prompt included (default: %(default)s)",
    )
    generate.add_argument(
        "--sampler", default="top_k",
        help=f"{', '.join(SAMPLERS)} (default: %(default)s)",
    )
    generate.add_argument(
        "--seed", type=int, default=0, help="random seed of the sampler (default: %(default)s)"
    )


def _add_checksum_parser(commands, common):
    """Adds `checksum` and its argument to the subcommands."""
    checksum = commands.add_parser(
        "checksum",
        parents=[common],
        help="record the sha256 of a preset folder's files in its metadata.json",
        description="Loads the preset folder (its weights must fit its config.json) and "
        "records the sha256 of every file in its metadata.json, which from_preset, "
        "generate and train then verify before loading. Only for a folder you trust: a "
        "checksum proves a file unchanged since now, not sound. A folder whose recorded "
        "checksums no longer match is refused.",
    )
    checksum.add_argument("folder", help="the preset folder")


def _add_compare_parser(commands, common):
    """Adds `compare` (its flags: `_add_compare_arguments`) to the
    subcommands."""
    compare = commands.add_parser(
        "compare",
        parents=[common],
        help="train several families for the same training time, per seed, and compare",
        description="The paper's fixed-wall-clock evaluation as a study: every family (a "
        "preset name or folder) trains for the same seconds on the same data, once per "
        "seed; results per seed and over seeds (mean, 95 % interval) of the final loss, "
        "the step time and the time to reach a target loss and the reference family's "
        "final loss. The default paired clock times every family's step side by side and "
        "trains each for budget / step time steps, fair on a shared machine. Rerun the "
        "same command to continue a study (more --seeds extend it).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=COMPARE_EPILOG,
    )
    _add_compare_arguments(compare)


def _add_compare_arguments(compare):
    """`compare`'s own flags, then the training settings of
    `TrainingConfig.add_arguments`."""
    compare.add_argument(
        "--families",
        nargs="+",
        default=list(COMPARE_DEFAULT_FAMILIES),
        metavar="PRESET",
        help="preset names or folders to compare",
    )
    compare.add_argument(
        "--budget", type=positive_float, default=60.0,
        help="seconds of training per family and seed",
    )
    compare.add_argument(
        "--steps", type=positive_int, default=None,
        help="instead of --budget: train every family for exactly this many steps (equal "
        "steps, sample efficiency; times are each family's measured steps)",
    )
    compare.add_argument("--out", default="runs/compare")
    compare.add_argument(
        "--seeds", type=int, nargs="+", default=None, metavar="SEED",
        help="train every family once per seed (default: --seed)",
    )
    compare.add_argument(
        "--clock", choices=("paired", "wall"), default="paired",
        help="paired: step times measured side by side, each family trains budget / step "
        "time steps; wall: each trains for the budget of its own measured steps",
    )
    compare.add_argument("--timing-rounds", type=positive_int, default=5,
                         help="rounds of the paired step timing")
    compare.add_argument("--timing-steps", type=positive_int, default=10,
                         help="steps per family and round of the paired timing")
    compare.add_argument(
        "--eval-every", type=positive_int, default=25, help="steps between validation points"
    )
    compare.add_argument(
        "--target-loss", type=positive_float, default=None,
        help="report the time to reach this validation loss (default: per seed, the worst "
        "family's final loss)",
    )
    compare.add_argument(
        "--reference", default="auto",
        help="family whose final loss the others race to ('auto': the first glam* family; "
        "'none')",
    )
    compare.add_argument("--overwrite", action="store_true",
                         help="replace a study in --out made with other settings")
    TrainingConfig.add_arguments(compare)


def _add_upcycle_parser(commands, common):
    """Adds `upcycle` and its flags to the subcommands."""
    upcycle = commands.add_parser(
        "upcycle",
        parents=[common],
        help="turn a trained dense preset into an MoE preset that keeps its weights",
        description="Sparse upcycling (docs/upcycling.md): every weight with a counterpart "
        "is copied, each MoE sublayer's experts start from the dense FFN it replaces. "
        "Writes an ordinary preset folder (tokenizer carried over).",
    )
    upcycle.add_argument("--preset", required=True, help="the dense preset (name or folder)")
    upcycle.add_argument(
        "--to",
        required=True,
        metavar="SPEC|PRESET",
        help="target layout: a block spec or list of block specs as JSON (inline or a "
        ".json file), or a preset name or folder with the same widths",
    )
    upcycle.add_argument("--out", required=True, help="the preset folder to write")
    upcycle.add_argument(
        "--expert-noise", type=float, default=0.0, help="multiplicative noise on the copies"
    )
    upcycle.add_argument(
        "--router-init", choices=("small_random", "zeros"), default="small_random"
    )
    upcycle.add_argument(
        "--expert-choice-scale", choices=("compensate", "none"), default="compensate"
    )
    upcycle.add_argument("--seed", type=int, default=0)
    upcycle.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _add_convert_parser(commands, common):
    """Adds `convert` and its flags to the subcommands."""
    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="a keras-hub Mixtral / Qwen-MoE / Qwen3-MoE preset as a Brainformer preset",
        description="Converts a keras-hub MoE preset (docs/keras_hub_models.md): the same "
        "logits, every weight copied, routed tokens only computed; its tokenizer and "
        "preprocessor carried over. Writes an ordinary preset folder for `generate`, "
        "`train --preset` and `from_preset`.",
    )
    convert.add_argument(
        "--preset", required=True,
        help="a keras-hub preset name (from your keras-hub cache) or folder",
    )
    convert.add_argument("--out", required=True, help="the preset folder to write")
    convert.add_argument(
        "--max-sequence-length", type=positive_int, default=None,
        help="longest input the converted model accepts (default 32768)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")


def _add_lazy_parsers(commands, common, only):
    """Adds `plan`, `compile` and `search`, whose flags their own modules
    define: each module is imported (and its flags added) only when `only`
    is None or names that command."""
    plan = commands.add_parser(
        "plan",
        parents=[common],
        help="per-device memory plan of a preset on a device mesh (allocates nothing)",
    )
    if only in (None, "plan"):
        # Lazy (loads Keras): only the command being run defines its flags.
        from keras_brainformer.distribution import plan_command

        plan_command.add_arguments(plan)
    compile_parser = commands.add_parser(
        "compile",
        parents=[common],
        help="compile fit's train step for a TPU slice with XLA's TPU compiler "
        "(needs libtpu; allocates no weight)",
    )
    if only in (None, "compile"):
        # Lazy, as above (loads Keras and JAX).
        from keras_brainformer.distribution import compile_command

        compile_command.add_arguments(compile_parser)
    search = commands.add_parser(
        "search",
        parents=[common],
        help="the paper's block-wise regularized-evolution search (KerasTuner)",
    )
    if only in (None, "search"):
        # Lazy, as above (its parser is light; the search itself loads when run).
        from keras_brainformer.search import command as search_command

        search_command.add_arguments(search)


def _run_train(args):
    # Lazy: the Keras stack loads when a command runs, not for `--help`/`presets`.
    from keras_brainformer.training.interruption import terminate_as_interrupt
    from keras_brainformer.training.trainer import train_language_model

    if args.out is not None and not args.out.strip():
        raise TrainingError(
            f"--out {args.out!r} is empty: give a run folder, or leave --out out for "
            "runs/<preset>."
        )
    out = args.out or os.path.join("runs", os.path.basename(os.path.normpath(args.preset)))
    with _errors_on_their_own_line(), terminate_as_interrupt():
        train_language_model(
            args.preset,
            out,
            TrainingConfig.from_args(args),
        steps=args.steps,
        time_budget=args.time_budget,
        steps_per_epoch=args.steps_per_epoch,
        constant_steps=args.constant_steps,
        warmup_steps=args.warmup_steps,
        mixed_bfloat16=args.mixed_bfloat16,
            sample_prompt=args.sample_prompt,
            overwrite=args.overwrite,
            mesh=args.mesh,
            experts_on=args.experts_on,
            fsdp=args.fsdp,
            allow_data_change=args.allow_data_change,
        )


class _LineTracker:
    """`sys.stdout` as it was, recording whether its last character ended a
    line (Keras' progress bar rewrites its line without ending it)."""

    def __init__(self, stream):
        self._stream = stream
        self.at_line_start = True

    def write(self, text):
        if text:
            self.at_line_start = text.endswith("\n")
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _errors_on_their_own_line():
    """An error (or an interruption) raised while a progress bar holds the
    line ends that line on stdout first, so the `error:` line that follows
    on stderr starts a line of its own in the terminal."""
    tracker = _LineTracker(sys.stdout)
    previous, sys.stdout = sys.stdout, tracker
    try:
        yield
    except BaseException:
        if not tracker.at_line_start:
            previous.write("\n")
            previous.flush()
        raise
    finally:
        sys.stdout = previous


def _run_generate(args):
    # Lazy: the Keras stack loads when a command runs, not for `--help`/`presets`.
    import keras
    import keras_hub

    from keras_brainformer.models import BrainformerCausalLM
    from keras_brainformer.models.brainformer import brainformer_causal_lm
    from keras_brainformer.utils.preset_loading import has_weights
    from keras_brainformer.utils.preset_loading import resolve_preset

    if args.sampler not in SAMPLERS:
        raise TrainingError(
            f"Unknown --sampler {args.sampler!r}. Allowed: {', '.join(SAMPLERS)}."
        )
    sampler = keras_hub.samplers.get(args.sampler)
    keras.utils.set_random_seed(args.seed)
    directory = str(resolve_preset(args.preset))
    is_handle = "://" in directory  # kaggle://, hf://, ... : keras-hub resolves it
    if not is_handle and not os.path.isfile(os.path.join(directory, "config.json")):
        raise TrainingError(
            f"Unknown preset {args.preset!r}: not a zoo preset name (see `keras-brainformer "
            "presets`) nor a preset folder with a config.json (a `train` run's preset is "
            "in RUN/preset)."
        )
    _check_preset_fits_in_memory(args.preset, "Loading")
    lm = BrainformerCausalLM.from_preset(args.preset)
    if lm.preprocessor is None:
        raise TrainingError(
            f"Preset {args.preset!r} has no tokenizer, so it cannot generate text "
            "(full-size presets use the paper's unreleased 256K vocabulary)."
        )
    try:  # the Python API's checks, naming the flag
        brainformer_causal_lm.check_generate_arguments(
            lm, args.prompt, args.max_length, name="--max-length"
        )
    except ValueError as error:
        raise TrainingError(str(error)) from None
    if os.path.isdir(directory) and not has_weights(directory):
        print(
            f"warning: preset {args.preset!r} has no trained weights: this text comes "
            "from a random initialisation. Trained presets: `keras-brainformer presets`.",
            file=sys.stderr,
        )
    lm.compile(sampler=sampler)
    outputs = lm.generate(args.prompt, max_length=args.max_length)
    for text in outputs:
        print(text)
        print("-" * 40)


def _run_checksum(args):
    # Lazy: the Keras stack loads when a command runs, not for `--help`/`presets`.
    from keras_brainformer.models import BrainformerBackbone
    from keras_brainformer.utils.preset_integrity import record_checksums

    folder = args.folder
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise TrainingError(
            f"{folder!r} is not a preset folder (no config.json); `checksum` takes the "
            "folder of a preset (a `train` run's preset is in RUN/preset)."
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PresetWarning)  # what this command fixes
        _check_preset_fits_in_memory(folder, "Checking")
        # Refuses changed recorded files, a damaged or foreign weights file.
        BrainformerBackbone.from_preset(folder)
    files = record_checksums(folder)
    print(
        f"Recorded the sha256 of {len(files)} files in {os.path.join(folder, 'metadata.json')}; "
        "from_preset, generate and train now refuse a preset folder in which any of them "
        "changed."
    )


def _sizing_advice(preset):
    """What the memory refusals of `convert`, `upcycle`, `generate` and
    `checksum` suggest: the commands that size `preset` without building it."""
    return (
        f"Use a machine with more memory: `keras-brainformer plan --preset {preset}` "
        "sizes it per device on a mesh (add --device-memory), and `keras-brainformer "
        f"compile --preset {preset} --topology ...` compiles its training step for a TPU "
        "slice (docs/tpu.md)."
    )


def _check_preset_fits_in_memory(preset, doing, copies=1):
    """Refuses (one `error:` line, before anything is built or written) to
    build the zoo preset or preset folder `preset` when `copies` models of its
    size need more memory than this machine can give. A handle keras-hub
    downloads, or a folder without a Brainformer `config.json`, is left to the
    loader (which reports it)."""
    from keras_brainformer.distribution.memory_plan import check_memory_available
    from keras_brainformer.distribution.memory_plan import weight_bytes
    from keras_brainformer.utils.preset_loading import resolve_preset

    path = os.path.join(str(resolve_preset(preset)), "config.json")
    try:
        with open(path) as f:
            data = json.load(f)
        if data.get("class_name") != "BrainformerBackbone":
            return
        needed = copies * weight_bytes(data["config"])
    except (OSError, ValueError, TypeError, KeyError):
        return  # not a preset folder, or a config the loader will refuse by name
    what = "its weights" if copies == 1 else f"{copies} models of its size at once"
    check_memory_available(
        needed, f"{doing} {preset!r}", f"({what})", _sizing_advice(preset)
    )


def _check_conversion_fits_in_memory(preset, max_sequence_length):
    """Before keras-hub builds `preset`: refuses a class the conversion does
    not take (nothing is built), and a model whose two copies (keras-hub's
    and the Brainformer one, alive together while the weights are copied)
    need more memory than this machine can give. Reads only the preset's
    `config.json`."""
    from keras_brainformer.distribution.memory_plan import check_memory_available
    from keras_brainformer.distribution.memory_plan import weight_bytes
    from keras_brainformer.zoo import keras_hub_conversion as conversion
    from keras_brainformer.zoo.keras_hub_presets import KERAS_HUB_ARCHITECTURES

    try:
        class_name, config = conversion.keras_hub_preset_config(preset)
    except (ValueError, FileNotFoundError, OSError, KeyError, TypeError):
        return  # `_load_keras_hub_preset` reports a preset it cannot load
    family = conversion.KERAS_HUB_FAMILIES.get(class_name)
    if family is None:
        original = {name: entry[0] for name, entry in KERAS_HUB_ARCHITECTURES.items()}
        hint = ""
        if str(preset) in original:
            hint = (
                f"; {preset!r} is the zoo's architecture preset of keras-hub's "
                f"{original[str(preset)]!r}: `keras-brainformer convert --preset "
                f"{original[str(preset)]}` converts the original"
            )
        raise TrainingError(
            f"Cannot convert {preset!r}: it is a {class_name} preset; convert takes a "
            f"keras-hub backbone of one of the classes {tuple(conversion.KERAS_HUB_FAMILIES)}"
            f"{hint}."
        )
    try:
        target = conversion.brainformer_config_from_keras_hub(
            config, family, max_sequence_length
        )
        needed = 2 * weight_bytes(target)
    except (ValueError, TypeError, KeyError):
        return  # the conversion itself refuses it, by name
    sizing = next(
        (name for name, entry in KERAS_HUB_ARCHITECTURES.items() if entry[0] == str(preset)),
        None,
    )
    advice = (
        _sizing_advice(sizing)
        if sizing
        else "Use a machine with more memory; once converted, `keras-brainformer plan "
        "--preset OUT` and `keras-brainformer compile --preset OUT --topology ...` size "
        "its training."
    )
    check_memory_available(
        needed,
        f"Converting {preset!r} ({class_name})",
        "(keras-hub's model and its Brainformer copy, alive together)",
        advice,
    )


def _load_keras_hub_preset(preset):
    """keras-hub's backbone of `preset` (a name or a folder) and its causal-LM
    preprocessor, or None when the preset has no tokenizer."""
    import keras_hub  # lazy: the Keras stack loads when a command runs

    try:
        backbone = keras_hub.models.Backbone.from_preset(preset)
    except (ValueError, FileNotFoundError, OSError) as error:
        reason = " ".join(str(error).split())  # keras-hub's message spans lines
        raise TrainingError(
            f"Cannot load keras-hub preset {preset!r} (a keras-hub preset name or a "
            f"folder with config.json): {reason}"
        ) from None
    try:
        preprocessor = keras_hub.models.CausalLMPreprocessor.from_preset(preset)
    except (ValueError, FileNotFoundError, OSError):
        preprocessor = None  # no tokenizer in the preset: token ids in and out
    return backbone, preprocessor


def _run_convert(args):
    # Lazy: the Keras stack loads when a command runs, not for `--help`/`presets`.
    from keras_brainformer.models import BrainformerCausalLM
    from keras_brainformer.zoo import keras_hub_conversion as conversion
    from keras_brainformer.zoo import preset_writing

    try:
        preset_writing.check_output_folder(args.out, args.overwrite)
    except ValueError as error:
        raise TrainingError(f"{error} (--out, --overwrite)") from None
    _check_conversion_fits_in_memory(args.preset, args.max_sequence_length)
    backbone, preprocessor = _load_keras_hub_preset(args.preset)
    try:
        converted = conversion.backbone_from_keras_hub(backbone, args.max_sequence_length)
        lm = BrainformerCausalLM(converted, preprocessor=preprocessor)
        metadata = {
            "description": f"keras-hub's {args.preset} ({type(backbone).__name__}) converted "
            "to a Brainformer model: weights copied, same logits.",
            "family": "keras_hub_conversion",
            "base_preset": str(args.preset),
            "keras_hub_class": type(backbone).__name__,
            "paper": None,
        }
        folder = preset_writing.write_task_preset(lm, args.out, metadata, args.overwrite)
    except (ValueError, TypeError) as error:
        raise TrainingError(str(error)) from None
    moe = len(converted.moe_layers)
    tokenizer = "with its tokenizer" if preprocessor is not None else "no tokenizer in the preset"
    print(
        f"Converted {args.preset} ({type(backbone).__name__}) into {folder}: "
        f"{converted.num_layers} blocks, {moe} MoE sublayers, "
        f"{converted.count_params():,} parameters, {tokenizer}."
    )


def _run_upcycle(args):
    # Lazy: the Keras stack loads when a command runs, not for `--help`/`presets`.
    from keras_brainformer.models import BrainformerCausalLM
    from keras_brainformer.zoo import preset_writing
    from keras_brainformer.zoo import upcycling

    out = args.out
    try:
        preset_writing.check_output_folder(out, args.overwrite)
    except ValueError as error:
        raise TrainingError(f"{error} (--out, --overwrite)") from None
    if args.expert_noise < 0:
        raise TrainingError(f"--expert-noise must be >= 0. Received: {args.expert_noise}")
    try:
        _check_upcycle_fits_in_memory(args.preset, args.to)
        lm = BrainformerCausalLM.from_preset(args.preset)
        target = upcycling.target_block_specs(args.to, lm.backbone.get_config())
        upcycled = upcycling.upcycle(
            lm,
            target,
            expert_noise=args.expert_noise,
            router_init=args.router_init,
            expert_choice_scale=args.expert_choice_scale,
            seed=args.seed,
        )
        settings = {
            "to": args.to,
            "expert_noise": args.expert_noise,
            "router_init": args.router_init,
            "expert_choice_scale": args.expert_choice_scale,
            "seed": args.seed,
        }
        upcycling.save_upcycled_preset(
            upcycled, out, args.preset, target, settings, overwrite=args.overwrite
        )
    except (ValueError, TypeError) as error:
        raise TrainingError(str(error)) from None
    summary = upcycled.backbone.get_config()
    moe = sum(len(b.moe_layers) for b in upcycled.backbone.transformer_blocks)
    print(
        f"Upcycled {args.preset} into {out}: {summary['num_layers'] or len(summary['blocks'])} "
        f"blocks, {moe} MoE sublayers, {upcycled.backbone.count_params():,} parameters."
    )


def _check_upcycle_fits_in_memory(preset, to):
    """Refuses (one `error:` line) an upcycling whose dense model and MoE
    target, alive together, need more memory than this machine can give;
    from the configs alone, before either is built."""
    from keras_brainformer.distribution.memory_plan import check_memory_available
    from keras_brainformer.distribution.memory_plan import weight_bytes
    from keras_brainformer.models.brainformer.brainformer_presets import read_backbone_config
    from keras_brainformer.utils.preset_loading import resolve_preset
    from keras_brainformer.zoo import upcycling

    try:
        source = read_backbone_config(resolve_preset(preset))
    except (OSError, ValueError, TypeError, KeyError):
        return  # `from_preset` reports a preset it cannot load
    target = upcycling.upcycled_config(source, upcycling.target_block_specs(to, source))
    check_memory_available(
        weight_bytes(source) + weight_bytes(target),
        f"Upcycling {preset!r}",
        "(the dense model and its MoE target, alive together)",
        _sizing_advice(preset),
    )


def _run_presets(args):
    """The zoo from the packaged folders' metadata (plain JSON: no Keras)."""

    rows = [("name", "family", "total", "activated", "weights", "paper (total / activated)")]
    trained = []
    for name, meta in preset_folder_metadata().items():
        paper = meta.get("paper")
        reference = (
            f"{human(paper['total'])} / {human(paper['activated'])} ({paper['source']})"
            if paper
            else "-"
        )
        weights = "random"
        if "training" in meta:
            weights = f"trained ({meta['training']['steps']} steps)"
            trained.append((name, meta["description"]))
        counts = (human(meta["params"]), human(meta["activated_params"]))
        rows.append((name, meta["family"], *counts, weights, reference))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    print("\nTrained presets (generate from them, or continue training with train --preset):")
    for name, description in trained:
        print(f"  {name}: {description}")
    print(
        "\nCounts use each preset's own vocabulary (256K for full-size, 8192 for tiny); "
        "docs/presets.md compares them with the paper's tables. Trained presets: "
        "docs/trained_presets.md."
    )


@contextlib.contextmanager
def _native_logs_silenced():
    """Without `--verbose`: the native libraries' log lines (TensorFlow's and
    XLA's C++ and absl lines such as the CUDA probe, SentencePiece's
    normalizer line) are dropped, Python's own stderr (our `error:` lines,
    warnings) is kept. Native code writes to file descriptor 2 directly,
    so fd 2 points at /dev/null while `sys.stderr` writes to a copy of the
    real one; both are restored on exit. Skipped when `sys.stderr` is not
    the process's own (under a test harness that captures it)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    if sys.stderr is not sys.__stderr__:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    original, sys.stderr = sys.stderr, open(os.dup(saved), "w", buffering=1)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr.close()
        sys.stderr = original
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _preset_warnings_as_lines():
    """A `PresetWarning` (a preset folder without checksums) is printed as
    one `warning:` line on stderr, every time; other warnings as Python
    prints them."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", PresetWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, PresetWarning):
                print(f"warning: {message}", file=sys.stderr)
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def main(argv=None):
    program = argv is None  # the process is the command (not a Python caller)
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if "--verbose" in argv:
        code = _main(argv)
    else:
        with _native_logs_silenced():
            code = _main(argv)
    if program and code in (EXIT_INTERRUPTED, EXIT_TERMINATED):
        # Interrupted: the checkpoint is on disk, the logs closed and the
        # run folder's lock released; the interpreter's teardown of
        # TensorFlow and JAX would keep the process alive for seconds more
        # (measured 3-8 s, 40 s under load), silently. Exit now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv):
    # Only the chosen command's arguments are defined (some need the Keras
    # stack for their choices), so `--help` and `presets` load no backend.
    command = next((a for a in argv if a in COMMANDS), "")
    args = build_parser(only=command).parse_args(argv)

    handlers = {
        "train": _run_train,
        "generate": _run_generate,
        "presets": _run_presets,
        "upcycle": _run_upcycle,
        "convert": _run_convert,
        "checksum": _run_checksum,
    }
    # The handlers import lazily: the Keras stack loads when a command runs,
    # not for `--help` or `presets`.
    if args.command == "compare":
        from keras_brainformer.training.compare import run_compare  # lazy

        handlers["compare"] = run_compare
    if args.command == "plan":
        from keras_brainformer.distribution import plan_command  # lazy

        handlers["plan"] = plan_command.run
    if args.command == "compile":
        from keras_brainformer.distribution import compile_command  # lazy
        from keras_brainformer.training.trainer import compile_language_model  # lazy

        # `train`'s own compile (optimizer, the paper's schedule at its default
        # peak 0.01 and 10K constant steps, loss, metrics): the step `fit` runs.
        handlers["compile"] = lambda a: compile_command.run(
            a, compile_model=lambda lm, optimizer: compile_language_model(
                lm, optimizer, 0.01, 10_000
            ),
        )
    if args.command == "search":
        from keras_brainformer.search import command as search_command  # lazy

        handlers["search"] = search_command.run
    try:
        with _preset_warnings_as_lines():
            code = handlers[args.command](args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_NON_FINITE_LOSS
    except TrainingInterrupted as error:
        print(error, file=sys.stderr)
        return getattr(error, "exit_code", EXIT_INTERRUPTED)  # 143 after SIGTERM
    except KeyboardInterrupt as error:  # also SIGTERM outside `train`'s steps: 143
        print(f"\n{error or 'Interrupted.'}", file=sys.stderr)
        return getattr(error, "exit_code", EXIT_INTERRUPTED)
    except (TrainingError, PresetError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as error:  # the environment: permissions, a full disk, ...
        where = f": {error.filename}" if error.filename else ""
        print(f"error: {error.strerror or error}{where}", file=sys.stderr)
        return EXIT_ENVIRONMENT
    return code or 0


if __name__ == "__main__":
    sys.exit(main())

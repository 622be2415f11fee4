"""`train_language_model`: the job behind `keras-brainformer train`.

One run folder holds everything a run writes:

    run.json        what was asked (preset, model config, data and optimizer
                    settings); a rerun with different settings is refused
    backup/         crash-safe checkpoints (weights + optimizer + step) at each
                    epoch's end and at a stop, see `checkpointing.py`
    logs/           TensorBoard: loss, perplexity, learning rate, tokens/s,
                    per-MoE-layer router statistics
    history.csv     one row per completed epoch (appended across resumes;
                    rows of epochs a resume redoes are replaced)
    data.json       the data's fingerprint (per split: documents, tokens,
                    SHA-256 of the windows; a digest per document): a resume
                    on other data is refused unless `allow_data_change`
    preset/         the trained model as a keras-hub preset (`from_preset`)
    summary.json    final validation loss (causal and as-trained routing),
                    steps, tokens seen, seconds, a sample generation

    .lock           held while a `train` runs: a second writer is refused

Resuming: rerunning the same command continues from the newest checkpoint at
its exact step: an epoch's end, the step a time budget stopped at, or the
step in flight when Ctrl-C was pressed or SIGTERM arrived (a checkpoint is
written then; a second signal exits at once). The data pipeline restarts at that step's
batch, so no batch is skipped or repeated, and the run ends with the same
weights and losses as an uninterrupted run with the same seed. A kill
(SIGKILL) loses the steps since the last checkpoint, which are redone.
"""

import contextlib
import dataclasses
import errno
import json
import math
import os
import pathlib
import shutil
import time

import keras
import keras_hub
import numpy as np

from keras_brainformer.distribution.memory_plan import check_memory_available
from keras_brainformer.distribution.memory_plan import plan_memory
from keras_brainformer.distribution.mesh import distribution_scope
from keras_brainformer.distribution.mesh import make_distribution
from keras_brainformer.distribution.mesh import parse_mesh_spec
from keras_brainformer.errors import NonFiniteLossError
from keras_brainformer.errors import TrainingError
from keras_brainformer.models import BrainformerByteTokenizer
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import BrainformerCausalLMPreprocessor
from keras_brainformer.models import BrainformerTokenizer
from keras_brainformer.models.brainformer.block_spec import current_backbone_config
from keras_brainformer.models.brainformer.brainformer_layout_map import check_divisible
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.models.brainformer.brainformer_presets import read_backbone_config
from keras_brainformer.training.callbacks import CompilationNotice
from keras_brainformer.training.callbacks import EpochHistoryLogger
from keras_brainformer.training.callbacks import RouterStatisticsLogger
from keras_brainformer.training.callbacks import StopOnNonFiniteLoss
from keras_brainformer.training.callbacks import ThroughputLogger
from keras_brainformer.training.callbacks import keep_history_rows
from keras_brainformer.training.checkpointing import AtomicBackupAndRestore
from keras_brainformer.training.checkpointing import latest_state
from keras_brainformer.training.config import TrainingConfig
from keras_brainformer.training.corpus import CorpusTooSmallError
from keras_brainformer.training.corpus import build_language_model_data
from keras_brainformer.training.corpus import data_changes
from keras_brainformer.training.interruption import StopOnInterrupt
from keras_brainformer.training.run_lock import LOCK_FILE
from keras_brainformer.training.run_lock import RunFolderLock
from keras_brainformer.training.schedules import InverseSquareRootSchedule
from keras_brainformer.training.schedules import make_optimizer
from keras_brainformer.utils.preset_integrity import record_checksums
from keras_brainformer.utils.preset_loading import resolve_preset
from keras_brainformer.utils.preset_loading import trained_presets
from keras_brainformer.zoo.weight_specs import weight_shapes

RUN_FILE = "run.json"
DATA_FILE = "data.json"
HISTORY_FILE = "history.csv"
SUMMARY_FILE = "summary.json"
BACKUP_DIR = "backup"
PRESET_DIR = "preset"


class TimeBudget(keras.callbacks.Callback):
    """Stops training once `seconds` of wall-clock time have passed since
    the first `fit` it was used in (checked after every batch; the batch in
    flight finishes). `stopped` says whether it stopped training."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds
        self.start = None
        self.stopped = False

    def on_train_begin(self, logs=None):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        if time.perf_counter() - self.start >= self.seconds:
            self.stopped = True
            self.model.stop_training = True


def _json_roundtrip(value):
    return json.loads(json.dumps(value))


def load_tokenizer(preset, tokenizer="preset"):
    """The tokenizer of a run: the preset's own (`"preset"`; the shipped
    SentencePiece vocabulary for a preset without one), the shipped
    SentencePiece vocabulary (`"sentencepiece"`), or bytes (`"byte"`)."""

    if tokenizer == "byte":
        return BrainformerByteTokenizer()
    if tokenizer == "preset":
        directory = pathlib.Path(resolve_preset(preset))
        if (directory / "tokenizer.json").exists():
            # The class the folder names: SentencePiece or bytes.
            return keras_hub.tokenizers.Tokenizer.from_preset(str(directory))
    return BrainformerTokenizer()


def load_data(config, tokenizer, verbose=1):
    """The corpus of `config` (its files, or the embedded corpus) tokenized
    and packed into `LanguageModelData` for `config.sequence_length`, with at
    least one training batch; bad data raises `TrainingError`."""
    try:
        data = build_language_model_data(
            tokenizer,
            config.sequence_length,
            paths=list(config.data_paths) if config.data_paths else None,
            max_bytes=config.max_corpus_bytes,
            encoding=config.encoding,
            verbose=bool(verbose),
        )
        data.check_train_batch_size(config.batch_size)
    except CorpusTooSmallError as error:
        raise TrainingError(_too_small_message(error, config)) from None
    except (ValueError, FileNotFoundError) as error:
        raise TrainingError(str(error)) from error
    if verbose:
        print(data.summary(), flush=True)
    return data


def _too_small_message(error, config):
    """The corpus-too-small error in the terms of `train`, `compare` and
    `search`: their flags (each a `TrainingConfig` field of the same name),
    not the corpus functions' arguments (`validation_fraction` is no flag)."""
    cap = f", capped by --max-corpus-bytes {config.max_corpus_bytes:,}" if error.capped else ""
    fixes = ["more text (--data)"]
    if error.capped:
        fixes.append("a larger --max-corpus-bytes")
    fixes.append(f"a --sequence-length below {config.sequence_length}")
    about = (
        " (about 5 % of the documents, or of the lines of a single file, are held out for "
        "validation)" if error.split == "validation" else ""
    )
    return (
        f"The corpus is too small: its {error.split} split ({error.documents:,} documents, "
        f"{error.tokens:,} tokens) does not fill one window of --sequence-length "
        f"{config.sequence_length} + 1 = {error.window} tokens{about}. The corpus, "
        f"{error.source}, has {error.total_bytes:,} bytes in {error.total_documents:,} "
        f"documents{cap}. Use {', '.join(fixes[:-1])} or {fixes[-1]}."
    )


def _check_positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TrainingError(f"`{name}` must be a positive number. Received: {name}={value!r}")


def check_preset(preset):
    """Raises `TrainingError` unless `preset` is a zoo preset name (an
    architecture or a trained one) or a preset folder."""
    is_name = isinstance(preset, str) and (
        preset in backbone_presets or preset in trained_presets()
    )
    if not is_name and not (pathlib.Path(str(preset)) / "config.json").exists():
        raise TrainingError(
            f"Unknown preset {preset!r}: not a zoo preset name (see `keras-brainformer "
            "presets`) nor a preset folder with a config.json."
        )


def preset_model_config(preset):
    """The backbone config of a preset name or folder (read from its
    `config.json`; nothing is built)."""
    return read_backbone_config(resolve_preset(preset))


def train_language_model(
    preset,
    run_dir,
    config=None,
    *,
    steps=300,
    time_budget=None,
    steps_per_epoch=50,
    constant_steps=None,
    warmup_steps=0,
    mixed_bfloat16=False,
    overwrite=False,
    sample_prompt=None,
    verbose=1,
    mesh=None,
    experts_on=None,
    fsdp=False,
    extra_callbacks=(),
    allow_data_change=False,
    **training,
):
    """Trains a causal LM from a preset on a corpus and writes a run folder.

    Args:
        preset: zoo preset name or preset folder (a trained folder continues
            from its weights).
        run_dir: the run folder (see the module docstring).
        config: a `TrainingConfig` (data, tokenizer, batch shape, optimizer,
            seed, validation batches); default: its defaults.
        steps: training steps (rounded up to whole epochs of
            `steps_per_epoch`).
        time_budget: optional seconds of training after which to stop.
        steps_per_epoch: steps between validation, logging and checkpoints.
        constant_steps: steps at the peak learning rate before the
            inverse-square-root decay (default: half of `steps`).
        warmup_steps: linear warm-up steps.
        mixed_bfloat16: train under the `mixed_bfloat16` policy (routers stay
            float32).
        overwrite: replace a run folder made with other settings.
        sample_prompt: prompt of the sample generation at the end (default:
            the first tokens of the validation split, the start of one of
            its documents).
        verbose: 0 silent, 1 progress.
        mesh: optional device mesh spec such as `"batch=2,expert=4"` (JAX
            backend): weights and batches are split with
            `keras_brainformer.distribution.make_distribution`. The batch
            size must be divisible by the `batch` axis.
        experts_on: `"expert"` or `"batch"`, the mesh axis of the expert banks
            (see `make_distribution`).
        fsdp: also split weights along the batch axis.
        extra_callbacks: more Keras callbacks, run after the built-in ones
            (after the epoch's checkpoint is written).
        allow_data_change: resume from the run folder's checkpoint even if
            the data (corpus, split, tokens) is not the data it was trained
            on (`data.json`); otherwise that is refused with a
            `TrainingError` saying what changed.
        **training: `TrainingConfig` fields that replace those of `config`
            (`train_language_model(p, d, batch_size=8)`).

    Returns:
        The summary dict (also written to `summary.json`).
    """

    # === Validate everything before touching the run folder ===
    config = TrainingConfig.create(config, **training)
    plan = _plan_run(
        preset, run_dir, config, steps=steps, time_budget=time_budget,
        steps_per_epoch=steps_per_epoch, constant_steps=constant_steps,
        warmup_steps=warmup_steps, mixed_bfloat16=mixed_bfloat16, mesh=mesh,
        experts_on=experts_on, fsdp=fsdp,
    )
    with RunFolderLock(plan.run_dir):
        _claim_run_folder(plan.run_dir, plan.run_settings, overwrite)

        # === Data ===
        text_tokenizer, data, fingerprint = _load_run_data(
            preset, plan.run_dir, config, allow_data_change, verbose
        )

        # === Model, training, evaluation ===
        # Weights are created (and split) under the distribution; fit, evaluate
        # and generate run under it too.
        with distribution_scope(plan.distribution):
            lm = _build_language_model(plan, config, text_tokenizer, verbose)

            # === Run folder and resume point ===
            backup, start_step = _open_run_folder(lm, plan, fingerprint, verbose)

            # === Callbacks ===
            callbacks, interrupt, budget = _training_callbacks(
                config, plan.run_dir, backup, time_budget, extra_callbacks, verbose
            )

            # === Fit, from the resume point ===
            seconds = _fit_from(lm, data, config, plan, start_step, callbacks, interrupt, verbose)

            # === Summary ===
            return _write_summary(
                lm, preset, plan, data, text_tokenizer, config, start_step, seconds, budget,
                sample_prompt, verbose,
            )


@dataclasses.dataclass(frozen=True)
class _RunPlan:
    """What `_plan_run` settled before the run folder is touched."""

    run_dir: pathlib.Path
    preset_dir: str
    distribution: object  # a `keras.distribution.Distribution`, or None
    steps_per_epoch: int
    epochs: int
    total_steps: int  # whole epochs
    constant_steps: int
    warmup_steps: int
    mixed_bfloat16: bool
    run_settings: dict  # what `run.json` records


def _plan_run(
    preset, run_dir, config, *, steps, time_budget, steps_per_epoch, constant_steps,
    warmup_steps, mixed_bfloat16, mesh, experts_on, fsdp,
):
    """Validates the arguments, the preset, the layout and the memory,
    touching no file, and returns the run's `_RunPlan` (steps rounded up to
    whole epochs, the distribution, the settings `run.json` records); raises
    `TrainingError` at the first problem."""
    if not str(run_dir).strip():
        raise TrainingError(
            f"The run folder is empty ({str(run_dir)!r}): give a folder (--out)."
        )
    for name, value in (("steps", steps), ("steps_per_epoch", steps_per_epoch)):
        _check_positive(name, value)
    _check_positive("time_budget", time_budget, allow_none=True)
    check_preset(preset)
    distribution = _make_distribution(mesh, experts_on, fsdp, config.batch_size)

    steps_per_epoch = min(int(steps_per_epoch), int(steps))
    epochs = math.ceil(int(steps) / steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    if constant_steps is None:
        constant_steps = max(1, total_steps // 2)

    preset_dir = str(resolve_preset(preset))
    model_config = preset_model_config(preset_dir)
    check_layout(model_config, distribution)
    check_sequence_length(model_config, config.sequence_length, preset)
    if distribution is None:
        _check_step_fits_in_memory(model_config, config, mixed_bfloat16)
    run_settings = _json_roundtrip(
        {
            "preset": str(preset),
            "model_config": model_config,
            "steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "constant_steps": constant_steps,
            "warmup_steps": warmup_steps,
            "mixed_bfloat16": bool(mixed_bfloat16),
            **config.as_dict(),
            "data_paths": [os.path.abspath(p) for p in config.data_paths or ()],
            "backend": keras.config.backend(),
        }
    )
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise TrainingError(f"--out {str(run_dir)!r} is a file, not a folder.")
    return _RunPlan(
        run_dir, preset_dir, distribution, steps_per_epoch, epochs, total_steps,
        constant_steps, warmup_steps, mixed_bfloat16, run_settings,
    )


def _load_run_data(preset, run_dir, config, allow_data_change, verbose):
    """Seeds the run, loads the tokenizer and the data, and checks the data
    against the run folder's `data.json` (refused if it changed, unless
    `allow_data_change`); returns `(tokenizer, data, fingerprint)`, the
    fingerprint to record."""
    keras.utils.set_random_seed(config.seed)
    text_tokenizer = load_tokenizer(preset, config.tokenizer)
    data = load_data(config, text_tokenizer, verbose)
    fingerprint = _check_same_data(run_dir, data.fingerprint(), allow_data_change, verbose)
    return text_tokenizer, data, fingerprint


def _build_language_model(plan, config, text_tokenizer, verbose):
    """Builds the preset's causal LM (under the current distribution scope),
    checks that the tokenizer fits its vocabulary, and compiles it with the
    run's optimizer, schedule and a seeded top-k sampler; returns it."""
    kwargs = {"dtype": "mixed_bfloat16"} if plan.mixed_bfloat16 else {}
    if plan.distribution is not None and verbose:
        print(f"Distribution: {_describe(plan.distribution)}")
    lm = BrainformerCausalLM.from_preset(plan.preset_dir, preprocessor=None, **kwargs)
    check_tokenizer_fits(text_tokenizer, lm.backbone.vocabulary_size)
    # The sample at the end: top-k sampling, seeded (greedy decoding of a
    # small model tends to loop on one phrase).
    sampler = keras_hub.samplers.TopKSampler(k=10, seed=config.seed)
    compile_language_model(
        lm, config.optimizer, config.learning_rate, plan.constant_steps, plan.warmup_steps,
        sampler=sampler,
    )
    return lm


def _open_run_folder(lm, plan, fingerprint, verbose):
    """Creates the run folder, writes `run.json` and `data.json`, restores
    the newest checkpoint into `lm` and trims `history.csv` to the epochs
    kept; returns `(backup, start_step)`: the checkpointing callback and the
    step training resumes at (0 for a new run)."""
    run_dir = plan.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / RUN_FILE, "w") as f:
        json.dump(plan.run_settings, f, indent=2)
    _write_json_atomically(run_dir / DATA_FILE, fingerprint)
    # Restored once, here: the data then starts at the step restored
    # (a torn newest checkpoint falls back to an older one, and so
    # does the data).
    backup = AtomicBackupAndRestore(run_dir / BACKUP_DIR, restore_on_train_begin=False)
    backup.set_model(lm)
    start_step = backup.restore()["step"]
    # One row per epoch: the rows of epochs this resume redoes go.
    keep_history_rows(run_dir / HISTORY_FILE, backup.restored_epoch)
    if verbose and start_step:
        steps_per_epoch = plan.steps_per_epoch
        print(
            f"Resuming {run_dir} at step {start_step} of {plan.total_steps} "
            f"(after epoch {start_step // steps_per_epoch} of {plan.epochs}"
            + (f", {start_step % steps_per_epoch} steps into the next)."
               if start_step % steps_per_epoch else ").")
        )
    return backup, start_step


def _training_callbacks(config, run_dir, backup, time_budget, extra_callbacks, verbose):
    """The run's callbacks in their order (the built-in loggers, the
    checkpoint, the interrupt handler, the time budget, then
    `extra_callbacks`); returns `(callbacks, interrupt, budget)`, `budget`
    None without a time budget."""
    callbacks = [
        # Raises at the first non-finite loss, before the epoch's end, so
        # the epoch's checkpoint is never written from broken weights.
        StopOnNonFiniteLoss(raise_error=True),
        ThroughputLogger(config.tokens_per_batch),
        EpochHistoryLogger(str(run_dir / HISTORY_FILE)),
        keras.callbacks.TensorBoard(log_dir=str(run_dir / "logs")),
        RouterStatisticsLogger(str(run_dir / "logs")),
    ]
    if verbose:
        callbacks.insert(0, CompilationNotice())
    interrupt = StopOnInterrupt(
        backup, resume_hint="Run the same command again to continue from that step."
    )
    callbacks += [backup, interrupt]
    budget = TimeBudget(time_budget) if time_budget is not None else None
    if budget is not None:
        callbacks.append(budget)
    callbacks.extend(extra_callbacks)
    return callbacks, interrupt, budget


def _fit_from(lm, data, config, plan, start_step, callbacks, interrupt, verbose):
    """Trains `lm` from `start_step` to the run's last step (or until a
    callback stops it), with the interrupt handler installed, a non-finite
    loss reported and the logs closed on an error; returns the seconds it
    took."""
    start = time.perf_counter()
    with (
        interrupt,
        _reported_non_finite_loss(plan.run_dir / BACKUP_DIR, plan.steps_per_epoch),
        _logs_closed_on_error(callbacks),
    ):
        # An epoch cut short earlier (time budget, Ctrl-C) is finished
        # first, from the exact step; then whole epochs.
        for first_epoch, end_epoch, epoch_steps, first_step in _fit_phases(
            start_step, plan.steps_per_epoch, plan.epochs
        ):
            lm.fit(
                data.train_dataset(config.batch_size, seed=config.seed, start_step=first_step),
                initial_epoch=first_epoch,
                epochs=end_epoch,
                steps_per_epoch=epoch_steps,
                validation_data=data.validation_dataset(
                    config.batch_size, max_batches=config.validation_batches
                ),
                callbacks=callbacks,
                verbose=verbose,
                shuffle=False,  # the pipeline's order is the run's (resumable)
            )
            if lm.stop_training:  # the time budget (or a callback) stopped it
                break
    return time.perf_counter() - start


def _write_summary(
    lm, preset, plan, data, text_tokenizer, config, start_step, seconds, budget, sample_prompt,
    verbose,
):
    """Says where an early stop left the run, evaluates it and saves its
    preset (`_finish_run`), writes `summary.json` and prints it; returns the
    summary dict."""
    total_steps = plan.total_steps
    steps_done = int(keras.ops.convert_to_numpy(lm.optimizer.iterations))
    if verbose and steps_done < total_steps:
        why = "Time budget reached" if budget is not None and budget.stopped else "Stopped"
        print(
            f"{why} at step {steps_done} of {total_steps}; the checkpoint is "
            "written: rerun the same command to continue from that step."
        )
    summary = {
        "preset": str(preset),
        "steps": steps_done,
        "steps_this_run": steps_done - start_step,
        "first_step_this_run": start_step,
        "total_steps": total_steps,
        "tokens_seen": steps_done * config.tokens_per_batch,
        "seconds_this_run": round(seconds, 2),
        **_finish_run(lm, plan.run_dir, data, text_tokenizer, config, sample_prompt, verbose),
    }
    with open(plan.run_dir / SUMMARY_FILE, "w") as f:
        json.dump(summary, f, indent=2)
    if verbose:
        print(format_summary(summary))
    return summary


def check_sequence_length(model_config, sequence_length, preset):
    """Raises `TrainingError` if rows are longer than the model's positions."""
    max_length = model_config.get("max_sequence_length")
    if max_length is not None and sequence_length > max_length:
        raise TrainingError(
            f"--sequence-length {sequence_length} is longer than the model's "
            f"max_sequence_length {max_length} (preset {str(preset)!r}). Use at most "
            f"{max_length}."
        )


def check_tokenizer_fits(tokenizer, vocabulary_size):
    """Raises `TrainingError` if the tokenizer has ids the model cannot embed."""
    if tokenizer.vocabulary_size() > vocabulary_size:
        raise TrainingError(
            f"The tokenizer has {tokenizer.vocabulary_size()} tokens but the model's "
            f"vocabulary is {vocabulary_size}: use --tokenizer byte or a preset with a larger "
            "vocabulary."
        )


def _current_model_config(config):
    """A recorded run's model config in today's form (runs started by 0.1
    recorded its argument names); a config that is not a valid backbone
    config is returned as it is, and will differ."""
    if not isinstance(config, dict):
        return config
    try:
        return _json_roundtrip(current_backbone_config(config, "the run's recorded model config"))
    except (TypeError, ValueError):
        return config


def _claim_run_folder(run_dir, run_settings, overwrite):
    """Checks that `run_dir` is empty or holds this same run (clearing it
    with `overwrite`), under the run folder's lock."""
    run_file = run_dir / RUN_FILE
    if run_file.exists():
        with open(run_file) as f:
            previous = json.load(f)
        previous.setdefault("encoding", "utf-8")  # run folders from before --encoding
        previous["model_config"] = _current_model_config(previous.get("model_config"))
        if previous != run_settings:
            if not overwrite:
                changed = sorted(
                    k
                    for k in set(previous) | set(run_settings)
                    if previous.get(k) != run_settings.get(k)
                )
                raise TrainingError(
                    f"Run folder {str(run_dir)!r} holds a run with other settings "
                    f"(differing: {', '.join(changed)}). Use another --out, or "
                    "--overwrite to replace it."
                )
            _clear_run_folder(run_dir)
    elif any(p.name != LOCK_FILE for p in run_dir.iterdir()):
        if not overwrite:
            raise TrainingError(
                f"Run folder {str(run_dir)!r} is not empty and holds no {RUN_FILE}. "
                "Use another --out, or --overwrite to replace it."
            )
        _clear_run_folder(run_dir)


@contextlib.contextmanager
def _reported_non_finite_loss(backup_dir, steps_per_epoch):
    """Turns the non-finite-loss stop into a `NonFiniteLossError` saying
    which checkpoint is kept."""
    try:
        yield
    except FloatingPointError as error:
        kept = latest_state(backup_dir)
        where = (
            f"the checkpoint after epoch {kept['epoch']} is kept in {backup_dir}"
            if kept["step"] and kept["step"] == kept["epoch"] * steps_per_epoch
            else f"the checkpoint at step {kept['step']} is kept in {backup_dir}"
            if kept["step"]
            else "no epoch had finished, so there is no checkpoint"
        )
        raise NonFiniteLossError(
            f"{error} Training stopped; {where}, and no preset was written. "
            "Rerunning the same command resumes from the checkpoint; to change "
            "the learning rate, start a new run (--out or --overwrite)."
        ) from None


@contextlib.contextmanager
def _logs_closed_on_error(callbacks):
    """`fit` skips `on_train_end` when it raises (a Ctrl-C/SIGTERM stop, a
    full disk): the logging callbacks (TensorBoard writers, the CSV file)
    are closed here then, so what they hold is on disk even if the process
    then exits without tearing down the interpreter (the command line does,
    after an interruption)."""
    try:
        yield
    except BaseException:
        for callback in callbacks:
            if isinstance(callback, (keras.callbacks.TensorBoard, keras.callbacks.CSVLogger,
                                     RouterStatisticsLogger)):
                with contextlib.suppress(Exception):
                    callback.on_train_end()
        raise


def _finish_run(lm, run_dir, data, tokenizer, config, sample_prompt, verbose):
    """The end of a run: validation in both routings, the preset written,
    a sample generated. Returns the summary's fields."""
    validation = data.validation_dataset(
        config.batch_size, max_batches=config.validation_batches
    )
    if verbose:
        print("Evaluating on the validation split (causal and as-trained routing)...")
    modes = lm.evaluate_routing_modes(validation, verbose=0, return_dict=True)
    lm.preprocessor = BrainformerCausalLMPreprocessor(
        tokenizer, sequence_length=config.sequence_length
    )
    if verbose:
        print(f"Writing the preset to {run_dir / PRESET_DIR}...")
    _save_preset_atomically(lm, run_dir / PRESET_DIR)
    if sample_prompt is None:
        sample_prompt = _as_text(tokenizer.detokenize(data.validation_windows[0, :8]))
    if verbose:
        print(f"Sampling from the prompt {sample_prompt!r}...")
    # One prompt: a batch of 1 cannot be split along a batch axis, so the
    # sample runs without the distribution (on the already split weights).
    with _without_distribution():
        sample = lm.generate(sample_prompt, max_length=min(64, config.sequence_length))
    return {
        "validation_loss_causal": float(modes["causal"]["loss"]),
        "validation_loss_as_trained": float(modes["as_trained"]["loss"]),
        "validation_perplexity_causal": float(math.exp(modes["causal"]["loss"])),
        "has_moe": bool(lm.backbone.moe_layers),
        "sample_prompt": sample_prompt,
        "sample": sample,
        "preset_dir": str(run_dir / PRESET_DIR),
    }


def _make_distribution(mesh, experts_on, fsdp, batch_size):
    """The distribution for `--mesh`, validated before anything is written."""
    if mesh is None:
        if experts_on is not None or fsdp:
            raise TrainingError("`experts_on` and `fsdp` need a `mesh`.")
        return None

    try:
        sizes = parse_mesh_spec(mesh)
        if keras.config.backend() != "jax":
            raise ValueError(
                f"--mesh needs the JAX backend (keras.distribution); the backend is "
                f"{keras.config.backend()!r}. Set KERAS_BACKEND=jax, or see "
                "docs/distributed_training.md for tf.distribute."
            )
        if batch_size % sizes["batch"]:
            raise ValueError(
                f"The batch size {batch_size} is not divisible by the mesh's batch "
                f"axis ({sizes['batch']})."
            )
        return make_distribution(sizes, experts_on=experts_on, fsdp=fsdp)
    except (ValueError, TypeError) as error:
        raise TrainingError(str(error)) from None


def check_layout(model_config, distribution):
    """Raises `TrainingError` naming every weight of `model_config` that the
    distribution's layout map cannot split evenly (before any is created)."""
    layout_map = getattr(distribution, "_layout_map", None)
    if layout_map is None:
        return

    try:
        check_divisible(weight_shapes(model_config), layout_map)
    except ValueError as error:
        raise TrainingError(str(error)) from None


@contextlib.contextmanager
def _without_distribution():
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def _describe(distribution):
    mesh = distribution.device_mesh
    axes = ", ".join(f"{n}={s}" for n, s in zip(mesh.axis_names, mesh.shape))
    return f"{type(distribution).__name__} over {len(mesh.devices.flat)} devices ({axes})"


def compile_language_model(
    lm, optimizer, learning_rate, constant_steps, warmup_steps=0, sampler="greedy"
):
    """Compiles `lm` with the paper's schedule (constant, then 1/sqrt decay),
    cross-entropy on logits, accuracy, and builds the optimizer (checkpoint
    restoring needs its variables)."""

    schedule = InverseSquareRootSchedule(
        peak_learning_rate=learning_rate,
        constant_steps=constant_steps,
        warmup_steps=warmup_steps,
    )
    lm.compile(
        optimizer=make_optimizer(optimizer, learning_rate=schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        sampler=sampler,
    )
    lm.optimizer.build(lm.trainable_variables)


def _check_step_fits_in_memory(model_config, config, mixed_bfloat16):
    """Refuses a batch whose training step cannot fit in this machine's
    memory (the analytic plan of `keras-brainformer plan`: weights,
    gradients, optimizer state, activations), before anything is written,
    instead of letting the process be killed mid-run."""
    plan = plan_memory(
        model_config,
        {"batch": 1},
        config.batch_size,
        config.sequence_length,
        dtype="mixed_bfloat16" if mixed_bfloat16 else "float32",
        optimizer=config.optimizer,
    )
    check_memory_available(
        plan.total,
        f"--batch-size {config.batch_size} with --sequence-length {config.sequence_length}",
        "for one training step (weights, optimizer state, activations; see "
        "`keras-brainformer plan`)",
        "Use a smaller --batch-size.",
    )


def _as_text(value):
    """A detokenized string as `str` (TensorFlow returns a string tensor)."""
    if hasattr(value, "numpy"):
        value = value.numpy()
    if hasattr(value, "item"):
        value = value.item()
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def _fit_phases(start_step, steps_per_epoch, epochs):
    """`[(initial_epoch, epochs, steps_per_epoch, first_step)]`: the `fit`
    calls that train from global step `start_step` to `epochs` whole epochs.
    A resume inside an epoch first completes that epoch's remaining steps."""
    epoch, offset = divmod(start_step, steps_per_epoch)
    phases = []
    if offset:
        phases.append((epoch, epoch + 1, steps_per_epoch - offset, start_step))
        epoch += 1
    if epoch < epochs:
        phases.append((epoch, epochs, steps_per_epoch, epoch * steps_per_epoch))
    return phases


def _write_json_atomically(path, value):
    path = pathlib.Path(path)
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(partial, path)


def _check_same_data(run_dir, fingerprint, allow_data_change, verbose):
    """Refuses (a `TrainingError` saying what changed) to resume the
    checkpoint of `run_dir` on data other than the data it was trained on,
    unless `allow_data_change`. Returns the fingerprint to record (with
    the changes accepted so far)."""
    backup_dir = run_dir / BACKUP_DIR
    resuming = latest_state(backup_dir)["step"] > 0
    path = run_dir / DATA_FILE
    previous = None
    if path.exists():
        try:
            with open(path) as f:
                previous = json.load(f)
        except (OSError, ValueError):
            previous = None
    fingerprint = dict(fingerprint)
    fingerprint["accepted_changes"] = list((previous or {}).get("accepted_changes", []))
    if not resuming:
        fingerprint["accepted_changes"] = []
        return fingerprint
    step = latest_state(backup_dir)["step"]
    if previous is None:
        if verbose:
            print(
                f"Note: {run_dir} records no fingerprint of its data ({DATA_FILE}, written "
                "since issue 32), so resuming cannot check that the data is the same; "
                "it is recorded now."
            )
        return fingerprint
    changes = data_changes(previous, fingerprint)
    if not changes:
        return fingerprint
    what = "; ".join(changes)
    if not allow_data_change:
        raise TrainingError(
            f"The data changed since the checkpoint at step {step} in {run_dir}: {what}. "
            "A resume must train on the data the checkpoint was trained on: restore it, use "
            "another --out (or --overwrite to start again), or pass --allow-data-change to "
            "continue from the checkpoint on the new data."
        )
    if verbose:
        print(
            f"warning: the data changed since the checkpoint at step {step} ({what}); "
            "continuing on the new data (--allow-data-change)."
        )
    fingerprint["accepted_changes"].append({"step": step, "changes": changes})
    return fingerprint


def _clear_run_folder(run_dir):
    """Removes what a run folder holds, except the lock this process holds."""
    for child in pathlib.Path(run_dir).iterdir():
        if child.name == LOCK_FILE:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _save_preset_atomically(lm, directory):
    """Writes the preset next to `directory` (with the checksums of its
    files in `metadata.json`) and swaps it in when complete."""

    directory = pathlib.Path(directory)
    staging = directory.with_name(directory.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)
    # keras-hub's preset writer uses HDF5 on the disk, which cannot fail
    # cleanly on a full disk (see checkpointing.py): refuse to start first.
    needed = int(sum(
        int(np.prod(w.shape)) * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
        for w in lm.weights
    ) * 1.05) + (8 << 20)  # the weights, and headroom for the tokenizer and configs
    free = shutil.disk_usage(directory.parent).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"No space left for the preset in {directory} (about {needed / 1e6:.1f} MB, "
            f"{free / 1e6:.1f} MB free); nothing was written, and the run's checkpoints are "
            "intact: free some space and rerun the same command to write it.",
        )
    lm.save_to_preset(str(staging))
    record_checksums(staging)  # verified by from_preset before loading
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def format_summary(summary):
    """The summary printed at the end of `train`: the steps of this
    invocation apart from the run's total (a resumed run did only some)."""
    done, total = summary["steps"], summary.get("total_steps", summary["steps"])
    this_run = summary.get("steps_this_run", done)
    first = summary.get("first_step_this_run", 0)
    seconds = f"{summary['seconds_this_run']:.0f} s"
    tokens = f"{summary['tokens_seen']:,} tokens"
    of_total = f"{done} of {total} steps" if done < total else f"all {done} steps"
    if this_run == done:
        trained = f"Trained {done} steps ({tokens}) in {seconds}"
        trained += f"; {of_total} done." if done < total else "."
    elif this_run == 0:
        trained = f"Trained no steps this run: resumed at step {first}, {of_total} done ({tokens})."
    else:
        trained = (
            f"Trained {this_run} steps in {seconds} this run (steps {first + 1}-{done}, "
            f"resumed at step {first}); {of_total} of the run done ({tokens})."
        )
    lines = [
        trained,
        f"Validation loss (causal routing, what generation uses): "
        f"{summary['validation_loss_causal']:.4f} "
        f"(perplexity {summary['validation_perplexity_causal']:.2f})",
    ]
    if summary["has_moe"]:
        lines.append(
            f"Validation loss with the routing as trained (may look ahead): "
            f"{summary['validation_loss_as_trained']:.4f}"
        )
    lines.append(f"Preset written to {summary['preset_dir']}")
    lines.append(f"Sample: {summary['sample']!r}")
    return "\n".join(lines)

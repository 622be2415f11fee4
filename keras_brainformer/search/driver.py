"""`run_search`: a block search in this process, or as a KerasTuner chief or
worker, or launching a chief and N workers on this machine.

Roles (chosen from KerasTuner's environment variables, as KerasTuner does):

- no `KERASTUNER_*` variables and `workers == 1`: the whole search runs in
  this process;
- no variables and `workers > 1`: this process starts a chief and `workers`
  worker processes on this machine (gRPC on loopback), waits, and stops them
  all if one fails;
- `KERASTUNER_TUNER_ID=chief`: serve the oracle over gRPC at
  `oracle_address:KERASTUNER_ORACLE_PORT` until every trial is done, then
  write the results;
- `KERASTUNER_TUNER_ID=tuner<k>`: run trials against the chief at
  `KERASTUNER_ORACLE_IP:KERASTUNER_ORACLE_PORT`.

The oracle listens on 127.0.0.1 unless `oracle_address` says otherwise (for
workers on other machines: `oracle_address="0.0.0.0"` or the chief's own
address).
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

from keras_brainformer.errors import TrainingError
from keras_brainformer.search.fitness import evaluate_block
from keras_brainformer.search.oracle import RegularizedEvolutionOracle
from keras_brainformer.search.results import load_search
from keras_brainformer.search.results import ranked
from keras_brainformer.search.results import trial_rows
from keras_brainformer.search.results import write_results
from keras_brainformer.search.space import SearchSpace
from keras_brainformer.search.training_proxy import SEARCH_TOKENIZERS
from keras_brainformer.search.training_proxy import SEARCH_TRAINING
from keras_brainformer.search.tuner import BlockSearchTuner
from keras_brainformer.training.config import TrainingConfig
from keras_brainformer.training.trainer import load_data
from keras_brainformer.training.trainer import load_tokenizer
from keras_brainformer.upstream_private import keras_tuner_distribution

PROJECT_NAME = "search"
SETTINGS_FILE = "search.json"
LOOPBACK = "127.0.0.1"
# Settings a resumed search must share with the original one.
_RESUMABLE_EXCEPT = ("trials", "workers", "overwrite", "verbose", "top_k",
                     "target_activated", "oracle_address")


def _error(message):

    return TrainingError(message)


def is_loopback(address):
    return address in ("localhost", "::1") or str(address).startswith("127.")


def role():
    """`"local"`, `"chief"` or `"worker"` from KerasTuner's environment variables."""
    dist_utils, _, _ = keras_tuner_distribution()
    try:
        if not dist_utils.has_chief_oracle():
            return "local"
    except RuntimeError as error:
        raise _error(str(error)) from None
    return "chief" if dist_utils.is_chief_oracle() else "worker"


def free_port(address=LOOPBACK):
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def serve_oracle(oracle, address, port, poll_seconds=0.2):
    """Serves `oracle` over gRPC at `address:port` until a worker was told to
    stop and no worker is running a trial (KerasTuner's own chief loop polls
    every 20 s and binds to `KERASTUNER_ORACLE_IP`; this one binds where it
    is told and ends promptly)."""
    # gRPC (heavy, KerasTuner's transport): only the chief serves the oracle.
    from concurrent import futures

    import grpc

    _, protos, oracle_chief = keras_tuner_distribution()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    servicer = oracle_chief.OracleServicer(oracle)
    protos.get_service_grpc().add_OracleServicer_to_server(servicer, server)
    host = f"[{address}]" if ":" in address else address
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as error:
        raise _error(f"The oracle cannot listen on {host}:{port}: {error}") from None
    if not bound:
        raise _error(f"The oracle cannot listen on {host}:{port}.")
    server.start()
    print(f"Oracle listening on {host}:{port}", flush=True)
    try:
        while not (servicer.stop_triggered and oracle_chief.exit_chief(oracle)):
            time.sleep(poll_seconds)
    finally:
        server.stop(grace=1)


def _settings(**kwargs):
    return json.loads(json.dumps(kwargs))


def _check_settings(out, settings, overwrite, write):
    path = pathlib.Path(out) / SETTINGS_FILE
    if path.exists() and not overwrite:
        with open(path) as f:
            saved = json.load(f)
        saved.setdefault("encoding", "utf-8")  # searches from before --encoding
        differ = sorted(
            k for k in set(saved) | set(settings)
            if k not in _RESUMABLE_EXCEPT and saved.get(k) != settings.get(k)
        )
        if differ:
            raise _error(
                f"{out} holds a search with other settings ({', '.join(differ)}: "
                + ", ".join(f"{k}={saved.get(k)!r} here, {settings.get(k)!r} asked" for k in differ)
                + "). Use the same settings to resume it, another --out, or --overwrite."
            )
    if write:
        pathlib.Path(out).mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(settings, f, indent=2)


def _load_data(settings, verbose):
    config = TrainingConfig.from_dict(settings)
    tokenizer = load_tokenizer(None, config.tokenizer)
    return load_data(config, tokenizer, verbose)


def _validate(settings):
    def positive(name, integer=False):
        value = settings[name]
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0
        if integer:
            ok = ok and isinstance(value, int)
        if not ok:
            kind = "an integer" if integer else "a number"
            raise _error(f"`{name}` must be {kind} > 0. Received: {name}={value!r}")

    for name in ("budget_per_trial", "step_time_slack", "scale"):
        positive(name)
    for name in ("trials", "population_size", "tournament_size", "num_sublayers",
                 "num_experts", "num_blocks", "workers", "top_k"):
        positive(name, integer=True)
    if settings["loss_margin"] < 0:
        raise _error(f"`loss_margin` must be >= 0. Received: {settings['loss_margin']!r}")
    if not 0 < settings["check_fraction"] <= 1:
        raise _error(
            f"`check_fraction` must be in (0, 1]. Received: {settings['check_fraction']!r}"
        )


def _make_space(settings):

    try:
        return SearchSpace(
            num_sublayers=settings["num_sublayers"],
            scale=settings["scale"],
            gating=tuple(settings["gating"]),
            num_experts=settings["num_experts"],
        )
    except (TypeError, ValueError) as error:
        raise _error(str(error)) from None


def _make_oracle(space, settings, verbose):

    if settings["tournament_size"] > settings["population_size"]:
        raise _error(
            f"`tournament_size` ({settings['tournament_size']}) must be <= `population_size` "
            f"({settings['population_size']})."
        )
    oracle = RegularizedEvolutionOracle(
        space,
        max_trials=settings["trials"],
        population_size=settings["population_size"],
        tournament_size=settings["tournament_size"],
        seed=settings["seed"] + 1,  # KerasTuner treats seed 0 as "random"
        progress=(lambda line: print(line, flush=True)) if verbose else None,
    )
    oracle.verbose = 0  # our progress line replaces KerasTuner's tables
    return oracle


def _fitness_kwargs(settings):
    return {
        "num_blocks": settings["num_blocks"],
        "batch_size": settings["batch_size"],
        "learning_rate": settings["learning_rate"],
        "optimizer": settings["optimizer"],
        "seed": settings["seed"],
        "validation_batches": settings["validation_batches"],
        "step_time_slack": settings["step_time_slack"],
        "loss_margin": settings["loss_margin"],
        "check_fraction": settings["check_fraction"],
    }


def _make_tuner(oracle, data, settings, out, verbose):

    try:
        return BlockSearchTuner(
            oracle,
            data,
            settings["budget_per_trial"],
            fitness_kwargs=_fitness_kwargs(settings),
            directory=str(out),
            project_name=PROJECT_NAME,
            verbose=verbose,
        )
    except (ValueError, RuntimeError) as error:
        raise _error(f"Cannot resume the search in {out}: {error}") from None


def _results(out, settings, verbose):

    return write_results(
        out,
        PROJECT_NAME,
        top_k=settings["top_k"],
        target_activated=settings["target_activated"],
        verbose=verbose,
    )


def run_search(
    out="runs/search",
    budget_per_trial=60.0,
    trials=40,
    config=None,
    *,
    population_size=10,
    tournament_size=3,
    num_sublayers=8,
    scale=1 / 8,
    gating=("top_2", "expert_choice"),
    num_experts=8,
    num_blocks=3,
    step_time_slack=1.1,
    loss_margin=0.2,
    check_fraction=0.25,
    top_k=3,
    target_activated=145e6,
    workers=1,
    oracle_address=None,
    overwrite=False,
    remeasure=None,
    remeasure_repeats=1,
    verbose=1,
    **training,
):
    """Runs (or resumes) the block search in `out` and writes its results.

    Args:
        out: the search folder (KerasTuner project in `out/search`).
        budget_per_trial: seconds of training per trial.
        trials: trials in all, counting those of earlier runs in `out`.
        population_size, tournament_size: regularized evolution's P and S.
        config: the training proxy, a `TrainingConfig` (default:
            `training_proxy.SEARCH_TRAINING`; tokenizer `"sentencepiece"`, the
            shipped 8K vocabulary, or `"byte"`).
        num_sublayers, scale, gating, num_experts: the `SearchSpace`.
        num_blocks: times a candidate block is stacked (the paper's proxy: 3).
        step_time_slack, loss_margin, check_fraction: the constraint (see
            `fitness.evaluate_block`).
        top_k, target_activated: exported blocks and the activated-parameter
            target of their paper-size presets.
        workers: 1 runs in this process; N > 1 launches a chief and N workers.
        oracle_address: where the chief's gRPC oracle listens (default
            127.0.0.1).
        overwrite: delete an existing search in `out` first.
        remeasure: seconds; after the search, train the best block, the
            GLaM-style and the dense baselines for this long each (see
            `remeasure_best`). None: skip.
        remeasure_repeats: rounds of that comparison (seeds `seed + r`).
        verbose: 0 or 1.
        **training: `TrainingConfig` fields replacing those of `config`.

    Returns:
        The best rows (list of dicts, best first), or None for a worker.

    Example (about a minute on 2 CPU cores):
    ```python
    from keras_brainformer.search import run_search

    best = run_search(out="runs/tiny_search", budget_per_trial=2, trials=3,
                      population_size=2, tournament_size=2, num_sublayers=4,
                      scale=1 / 16, num_blocks=1, tokenizer="byte",
                      sequence_length=64, batch_size=8, max_corpus_bytes=200_000,
                      overwrite=True)
    print(best[0]["block"], best[0]["val_loss"] if best else "all rejected")
    ```
    """
    config = TrainingConfig.create(config or SEARCH_TRAINING, **training)
    if config.tokenizer not in SEARCH_TOKENIZERS:
        raise _error(
            f"Unknown tokenizer {config.tokenizer!r} for a search (its models are built, "
            f"not loaded from a preset). Allowed: {', '.join(map(repr, SEARCH_TOKENIZERS))}."
        )
    settings = _settings(
        budget_per_trial=budget_per_trial, trials=trials, population_size=population_size,
        tournament_size=tournament_size, num_sublayers=num_sublayers, scale=scale,
        gating=list(gating) if not isinstance(gating, str) else [gating],
        num_experts=num_experts, num_blocks=num_blocks, step_time_slack=step_time_slack,
        loss_margin=loss_margin, check_fraction=check_fraction, top_k=top_k,
        target_activated=target_activated, workers=workers, **config.as_dict(),
    )
    _validate(settings)
    space = _make_space(settings)
    settings["vocabulary_size"] = 256 if config.tokenizer == "byte" else 8192
    out = pathlib.Path(out)
    where = role()

    if where == "local" and workers > 1:
        best = _launch(out, settings, oracle_address, overwrite, verbose)
        if remeasure:
            remeasure_best(out, settings, remeasure, repeats=remeasure_repeats, verbose=verbose)
            best = _results(out, settings, verbose)
        return best

    if where != "worker":
        if overwrite and out.exists():
            shutil.rmtree(out)
        _check_settings(out, settings, overwrite=False, write=True)

    if where == "chief":
        env_address = os.environ["KERASTUNER_ORACLE_IP"]
        if oracle_address is None:
            if not is_loopback(env_address):
                raise _error(
                    f"KERASTUNER_ORACLE_IP={env_address} but the oracle listens on {LOOPBACK} "
                    "unless told otherwise: pass --oracle-address 0.0.0.0 (or this machine's "
                    "address) to accept workers from other machines."
                )
            oracle_address = LOOPBACK
        oracle = _make_oracle(space, settings, verbose)
        tuner = _make_tuner(oracle, None, settings, out, verbose)
        tuner.save()
        serve_oracle(oracle, oracle_address, os.environ["KERASTUNER_ORACLE_PORT"])
        return _results(out, settings, verbose)

    if where == "worker":
        if not (out / SETTINGS_FILE).exists():
            raise _error(
                f"No search settings in {out}: start the chief first, with the same --out "
                "(a folder shared by every machine)."
            )
        _check_settings(out, settings, overwrite=False, write=False)

    data = _load_data(settings, verbose)
    oracle = _make_oracle(space, settings, verbose)
    tuner = _make_tuner(oracle, data, settings, out, verbose)
    if verbose and where == "local":
        done = len(oracle.end_order)
        if done:
            print(f"Resuming: {done} trials done, population {oracle.population}", flush=True)
    tuner.search()
    if where == "worker":
        return None
    best = _results(out, settings, verbose)
    if remeasure:
        remeasure_best(out, settings, remeasure, repeats=remeasure_repeats, data=data,
                       verbose=verbose)
        best = _results(out, settings, verbose)
    return best


def remeasure_best(out, settings, seconds, repeats=1, data=None, verbose=1):
    """Trains the search's best block, the GLaM-style baseline and the dense
    baseline of the same scale for `seconds` of training each, in turns
    (`repeats` rounds, seed `seed + r` in round r), with no constraint, and
    writes `remeasure.json` and `remeasure.md` in `out`.

    Returns:
        The list of measurements (dicts with `model`, `round`, and
        `evaluate_block`'s figures).
    """

    out = pathlib.Path(out)
    space, state, trials = load_search(out / PROJECT_NAME)
    best = ranked(trial_rows(space, state, trials))
    if not best:
        raise _error(f"No accepted block in {out} to re-measure.")
    best = best[0]
    data = data or _load_data(settings, verbose)
    models = {
        f"best (trial {best['trial_id']})": json.loads(best["genome"]),
        "GLaM-style baseline": space.glam_genome(),
        "dense baseline": space.dense_genome(),
    }
    kwargs = _fitness_kwargs(settings)
    for key in ("step_time_slack", "loss_margin", "check_fraction", "seed"):
        kwargs.pop(key)
    measurements = []
    for r in range(repeats):
        for name, genome in models.items():
            if verbose:
                print(f"Re-measuring {name} ({space.describe(genome)}), round {r + 1}/{repeats}, "
                      f"{seconds:g} s ...", flush=True)
            metrics = evaluate_block(
                space.to_block_spec(genome), genome["model_dim"], data, seconds,
                seed=settings["seed"] + r, check_fraction=1.0, **kwargs,
            )
            measurements.append({"model": name, "block": space.describe(genome), "round": r,
                                 **metrics})
            if verbose:
                print(f"  step {metrics['step_ms']:.1f} ms, {int(metrics['steps'])} steps, "
                      f"val loss {metrics['val_loss']:.4f}", flush=True)
    with open(out / "remeasure.json", "w") as f:
        json.dump({"seconds": seconds, "repeats": repeats, "measurements": measurements}, f,
                  indent=2)
    lines = [
        f"Re-measured outside the search: {seconds:g} s of training each, {repeats} round(s), "
        "same data, causal-routing validation loss (nats/token).",
        "",
        "| model | block | activated / total params | step time (ms) | steps | val loss |",
        "|---|---|---|---|---|---|",
    ]
    for name in models:
        rows = [m for m in measurements if m["model"] == name]
        step = sum(m["step_ms"] for m in rows) / len(rows)
        steps = sum(m["steps"] for m in rows) / len(rows)
        losses = [m["val_loss"] for m in rows]
        loss = f"{sum(losses) / len(losses):.4f}"
        if len(losses) > 1:
            loss += " (" + ", ".join(f"{x:.4f}" for x in losses) + ")"
        lines.append(
            f"| {name} | `{rows[0]['block']}` | {rows[0]['activated_params'] / 1e6:.3f}M / "
            f"{rows[0]['params'] / 1e6:.3f}M | {step:.1f} | {steps:.0f} | {loss} |"
        )
    (out / "remeasure.md").write_text("\n".join(lines) + "\n")
    if verbose:
        print("\n".join(lines), flush=True)
    return measurements


# === Launching a chief and workers on this machine ===

_FLAG_OF = {
    "budget_per_trial": "--budget-per-trial", "trials": "--trials",
    "population_size": "--population-size", "tournament_size": "--tournament-size",
    "num_sublayers": "--num-sublayers", "scale": "--scale", "num_experts": "--num-experts",
    "num_blocks": "--num-blocks", "step_time_slack": "--step-time-slack",
    "loss_margin": "--loss-margin",
    "check_fraction": "--check-fraction", "top_k": "--top-k",
    "target_activated": "--target-activated",
}


def _argv(out, settings, oracle_address, verbose):
    argv = [sys.executable, "-m", "keras_brainformer", "search", "--out", str(out),
            "--workers", "1", "--gating", *settings["gating"]]
    for key, flag in _FLAG_OF.items():
        argv += [flag, repr(settings[key]) if isinstance(settings[key], float) else
                 str(settings[key])]
    argv += TrainingConfig.from_dict(settings).to_argv()
    if oracle_address:
        argv += ["--oracle-address", oracle_address]
    if not verbose:
        argv += ["--quiet"]
    return argv


def _launch(out, settings, oracle_address, overwrite, verbose):
    """Starts a chief and `workers` workers here; returns the chief's results."""
    if overwrite and out.exists():
        shutil.rmtree(out)
    _check_settings(out, settings, overwrite=False, write=True)
    address = oracle_address or LOOPBACK
    port = free_port(LOOPBACK if address in ("0.0.0.0", "::") else address)
    connect = LOOPBACK if address in ("0.0.0.0", "::") else address
    argv = _argv(out, settings, oracle_address, verbose)
    base_env = dict(os.environ, PYTHONUNBUFFERED="1", KERASTUNER_ORACLE_PORT=str(port))
    processes = {}
    try:
        processes["chief"] = subprocess.Popen(
            argv, env=dict(base_env, KERASTUNER_TUNER_ID="chief", KERASTUNER_ORACLE_IP=address),
        )
        time.sleep(1.0)
        for k in range(settings["workers"]):
            name = f"tuner{k}"
            processes[name] = subprocess.Popen(
                argv, env=dict(base_env, KERASTUNER_TUNER_ID=name, KERASTUNER_ORACLE_IP=connect),
            )
        if verbose:
            print(f"Launched a chief and {settings['workers']} workers (oracle on "
                  f"{address}:{port}).", flush=True)
        while True:
            codes = {name: p.poll() for name, p in processes.items()}
            failed = {n: c for n, c in codes.items() if c not in (None, 0)}
            if failed:
                raise _error(f"Search process(es) failed: {failed}; stopped the others.")
            if all(code == 0 for code in codes.values()):
                break
            time.sleep(0.5)
    finally:
        for p in processes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes.values():
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()

    space, state, trials = load_search(out / PROJECT_NAME)
    return ranked(trial_rows(space, state, trials))[: settings["top_k"]]

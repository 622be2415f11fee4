"""The KerasTuner tuner of the block search: each trial is `evaluate_block`.

Every tuner process (the only one, or each worker of a distributed search)
measures the GLaM-style baseline once when its search begins, on its own
machine, so step times are compared on the hardware that produced them. The
measurement is cached in the search folder (`baseline-<tuner id>.json`,
keyed by the settings), so a resumed search does not measure it again.
"""

import json
import os
import socket

from keras_tuner.engine import base_tuner

from keras_brainformer.search.fitness import Baseline
from keras_brainformer.search.fitness import evaluate_block


class BlockSearchTuner(base_tuner.BaseTuner):
    """Runs trials of a `RegularizedEvolutionOracle` with `evaluate_block`.

    Args:
        oracle: the `RegularizedEvolutionOracle`.
        data: the `LanguageModelData` every trial trains on.
        budget: seconds of training per trial.
        fitness_kwargs: more `evaluate_block` arguments (`num_blocks`,
            `batch_size`, `learning_rate`, `optimizer`, `seed`,
            `validation_batches`, `step_time_slack`, `loss_margin`,
            `check_fraction`).
        directory, project_name, overwrite: as for every KerasTuner tuner.
        verbose: print the baseline measurement.
    """

    def __init__(
        self,
        oracle,
        data,
        budget,
        fitness_kwargs=None,
        directory=None,
        project_name="search",
        overwrite=False,
        verbose=1,
    ):
        super().__init__(
            oracle=oracle, directory=directory, project_name=project_name, overwrite=overwrite
        )
        self.data = data
        self.budget = float(budget)
        self.fitness_kwargs = dict(fitness_kwargs or {})
        self.space = oracle.space if hasattr(oracle, "space") else oracle.oracle.space
        self.verbose = verbose
        self.baseline = None
        self.baseline_metrics = None

    # === Baseline ===

    def _baseline_settings(self):
        return {
            "budget": self.budget,
            "genome": self.space.glam_genome(),
            "num_experts": self.space.num_experts,
            "sequence_length": self.data.sequence_length,
            "vocabulary_size": self.data.vocabulary_size,
            "host": socket.gethostname(),
            **{k: v for k, v in self.fitness_kwargs.items()
               if k not in ("step_time_slack", "loss_margin")},
        }

    def baseline_path(self):
        return os.path.join(self.project_dir, f"baseline-{self.tuner_id}.json")

    def measure_baseline(self):
        """Measures (or reloads) the GLaM-style baseline of this process."""
        settings = self._baseline_settings()
        path = self.baseline_path()
        if os.path.exists(path):
            with open(path) as f:
                saved = json.load(f)
            if saved.get("settings") == json.loads(json.dumps(settings)):
                self.baseline_metrics = saved["metrics"]
                self.baseline = Baseline.from_metrics(self.baseline_metrics)
                if self.verbose:
                    print(f"Baseline reloaded from {path}: {self._describe_baseline()}")
                return self.baseline
        genome = self.space.glam_genome()
        if self.verbose:
            print(
                f"Measuring the GLaM-style baseline ({self.space.describe(genome)}, "
                f"{self.budget:g} s) on {socket.gethostname()} ..."
            )
        kwargs = {k: v for k, v in self.fitness_kwargs.items()
                  if k not in ("step_time_slack", "loss_margin")}
        self.baseline_metrics = evaluate_block(
            self.space.to_block_spec(genome),
            genome["model_dim"],
            self.data,
            self.budget,
            baseline=None,
            **kwargs,
        )
        self.baseline = Baseline.from_metrics(self.baseline_metrics)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"settings": settings, "metrics": self.baseline_metrics}, f, indent=2)
        if self.verbose:
            print(f"Baseline: {self._describe_baseline()}")
        return self.baseline

    def _describe_baseline(self):
        m = self.baseline_metrics
        return (
            f"step {m['step_ms']:.1f} ms, val loss {m['val_loss_at_check']:.4f} at 25 % "
            f"and {m['val_loss']:.4f} at the end ({int(m['steps'])} steps)"
        )

    def on_search_begin(self):
        super().on_search_begin()
        if self.baseline is None:
            self.measure_baseline()

    # === Trials ===

    def run_trial(self, trial):
        genome = {g: trial.hyperparameters.values[g] for g in self.space.gene_names()}
        if self.baseline is None:
            self.measure_baseline()
        metrics = evaluate_block(
            self.space.to_block_spec(genome),
            genome["model_dim"],
            self.data,
            self.budget,
            baseline=self.baseline,
            **self.fitness_kwargs,
        )
        metrics["baseline_step_ms"] = self.baseline.step_ms
        metrics["baseline_val_loss_at_check"] = self.baseline.val_loss_at_check
        metrics["baseline_val_loss"] = self.baseline.val_loss
        return metrics

    def save_model(self, trial_id, model, step=0):
        """Models are not kept (the search keeps block specs)."""

    def load_model(self, trial):
        raise NotImplementedError("The block search keeps block specs, not models.")

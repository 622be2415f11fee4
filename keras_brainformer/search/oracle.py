"""Regularized evolution (Real et al., 2019; the paper's Algorithm 1) as a
`keras_tuner.Oracle`.

The population is the `population_size` most recently *finished* trials (by
finish order). A new trial is:

- a random genome while fewer than `population_size` trials have been handed
  out or no trial has finished yet (the oracle never answers IDLE, which
  would make KerasTuner workers busy-loop);
- otherwise the best of `tournament_size` members sampled without
  replacement, mutated in one gene (`SearchSpace.mutate`).

When a trial finishes it joins the population and the oldest member leaves
once the population is over size ("regularized": age, not fitness, decides
who dies). Failed trials do not join. The objective is `reward` (max), see
`fitness.py`.

The population (trial ids in age order) and the counters are part of the
oracle's JSON state, so a search interrupted and restarted in the same folder
continues the same population. Random draws are seeded by `(seed, trial_id)`,
so they do not depend on how often the oracle was reloaded.
"""

import time

import keras_tuner
from keras_tuner.engine import trial as trial_module

from keras_brainformer.search.space import SearchSpace
from keras_brainformer.search.space import default_rng

OBJECTIVE = "reward"


class RegularizedEvolutionOracle(keras_tuner.Oracle):
    """Regularized-evolution search over a `SearchSpace`.

    Args:
        space: the `SearchSpace`.
        max_trials: trials in all (across resumes).
        population_size: members kept (P).
        tournament_size: members sampled per tournament (S <= P).
        seed: int seeding the random genomes and mutations.
        max_mutation_attempts: mutations tried to find a block not evaluated
            before (the last attempt is taken anyway).
        progress: callable taking one line of text per finished trial, or None.

    Example:
    >>> import keras_tuner
    >>> oracle = RegularizedEvolutionOracle(
    ...     SearchSpace(num_sublayers=2), max_trials=4, population_size=2,
    ...     tournament_size=2, seed=0)
    >>> oracle.tournament([("a", 0.1), ("b", 0.5), ("c", -1.0)], size=3, rng=None)
    'b'
    """

    def __init__(
        self,
        space,
        max_trials=40,
        population_size=10,
        tournament_size=3,
        seed=0,
        max_mutation_attempts=20,
        progress=None,
        max_consecutive_failed_trials=3,
    ):
        if not isinstance(space, SearchSpace):
            raise TypeError(f"`space` must be a SearchSpace. Received: {space!r}")
        for name, value in (
            ("max_trials", max_trials),
            ("population_size", population_size),
            ("tournament_size", tournament_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an integer >= 1. Received: {name}={value!r}")
        if tournament_size > population_size:
            raise ValueError(
                f"`tournament_size` ({tournament_size}) must be <= `population_size` "
                f"({population_size})."
            )
        hyperparameters = keras_tuner.HyperParameters()
        for gene in space.gene_names():
            hyperparameters.Choice(gene, list(space.choices(gene)), ordered=False)
        super().__init__(
            objective=keras_tuner.Objective(OBJECTIVE, "max"),
            max_trials=max_trials,
            hyperparameters=hyperparameters,
            allow_new_entries=False,
            tune_new_entries=False,
            seed=seed,
            max_consecutive_failed_trials=max_consecutive_failed_trials,
        )
        self.space = space
        self.population_size = population_size
        self.tournament_size = tournament_size
        self.max_mutation_attempts = max_mutation_attempts
        self.progress = progress
        # Trial ids of the population, oldest first.
        self.population = []
        # trial id -> "random" or "mutation of <parent id>"
        self.origins = {}
        self.started_at = time.time()

    # === Evolution ===

    @staticmethod
    def tournament(members, size, rng):
        """The id of the best of `size` members (`(id, reward)` pairs) sampled
        without replacement by `rng` (all of them when `rng` is None or
        `size >= len(members)`). Ties go to the earlier member."""
        members = list(members)
        if rng is not None and size < len(members):
            indices = sorted(rng.sample(range(len(members)), size))
            members = [members[i] for i in indices]
        best = max(range(len(members)), key=lambda i: (members[i][1], -i))
        return members[best][0]

    def _reward(self, trial_id):
        trial = self.trials[trial_id]
        if trial.score is None:
            return float("-inf")
        return float(trial.score)

    def _seen_blocks(self):
        seen = set()
        for trial in self.trials.values():
            values = trial.hyperparameters.values
            if all(g in values for g in self.space.gene_names()):
                seen.add(self._block_key(values))
        return seen

    def _block_key(self, genome):
        spec = self.space.to_block_spec(genome)
        return (genome["model_dim"], spec.to_json(sort_keys=True))

    def _genome_for(self, trial_id):
        rng = default_rng(f"{self.seed}-{trial_id}")
        finished = [t for t in self.population if t in self.trials]
        if len(self.start_order) < self.population_size or not finished:
            seen = self._seen_blocks()
            for _ in range(self.max_mutation_attempts):
                genome = self.space.sample(rng)
                if self._block_key(genome) not in seen:
                    break
            return genome, "random"
        parent = self.tournament(
            [(t, self._reward(t)) for t in finished], self.tournament_size, rng
        )
        parent_genome = {
            g: self.trials[parent].hyperparameters.values[g] for g in self.space.gene_names()
        }
        seen = self._seen_blocks()
        for _ in range(self.max_mutation_attempts):
            child = self.space.mutate(parent_genome, rng)
            if self._block_key(child) not in seen:
                break
        return child, f"mutation of {parent}"

    def populate_space(self, trial_id):
        genome, origin = self._genome_for(trial_id)
        self.origins[trial_id] = origin
        return {"status": trial_module.TrialStatus.RUNNING, "values": genome}

    @keras_tuner.synchronized
    def end_trial(self, trial):
        super().end_trial(trial)
        trial = self.trials[trial.trial_id]
        if (
            trial.status == trial_module.TrialStatus.COMPLETED
            and trial.trial_id not in self.population
        ):
            self.population.append(trial.trial_id)
            while len(self.population) > self.population_size:
                self.population.pop(0)  # the oldest member dies
        self.save()
        if self.progress is not None:
            self.progress(self.progress_line(trial))

    # === Reporting ===

    def progress_line(self, trial):
        """One line about a finished trial and the best so far."""
        metrics = trial.metrics
        done = len(self.end_order)

        def get(name):
            return metrics.get_last_value(name) if metrics.exists(name) else float("nan")

        values = trial.hyperparameters.values
        minutes = (time.time() - self.started_at) / 60
        head = f"[trial {trial.trial_id} {done}/{self.max_trials} {minutes:.1f} min]"
        if trial.status != trial_module.TrialStatus.COMPLETED:
            return f"{head} {trial.status}: {(trial.message or '').strip().splitlines()[-1:]}"
        completed = [
            t for t in self.trials.values()
            if t.status == trial_module.TrialStatus.COMPLETED and t.score is not None
        ]
        best = max(completed, key=lambda t: t.score) if completed else trial
        status = "rejected" if get("rejected") else "ok"
        return (
            f"{head} {self.origins.get(trial.trial_id, '?')}: {self.space.describe(values)} | "
            f"step {get('step_ms'):.1f} ms (base {get('baseline_step_ms'):.1f}) | "
            f"val {get('val_loss'):.4f} (base@25% {get('baseline_val_loss_at_check'):.4f}, "
            f"@25% {get('val_loss_at_check'):.4f}) | {status} reward {get('reward'):.4f} | "
            f"best #{best.trial_id} {best.score:.4f}"
        )

    # === State (JSON, saved with the tuner's) ===

    def get_state(self):
        state = super().get_state()
        state["evolution"] = {
            "population": list(self.population),
            "origins": dict(self.origins),
            "population_size": self.population_size,
            "tournament_size": self.tournament_size,
            "space": self.space.get_config(),
        }
        return state

    def set_state(self, state):
        super().set_state(state)
        evolution = state.get("evolution", {})
        saved_space = evolution.get("space")
        if saved_space is not None and saved_space != self.space.get_config():
            raise ValueError(
                "The search folder holds a search over another space "
                f"({saved_space}); this one is {self.space.get_config()}. "
                "Use another output folder or the same settings."
            )
        self.population = list(evolution.get("population", []))
        self.origins = dict(evolution.get("origins", {}))

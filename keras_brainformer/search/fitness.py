"""Fitness as the paper measures it: a fixed wall-clock budget of training.

`evaluate_block` stacks a block, trains it for `budget` seconds of training
steps (the first step, which compiles, is timed apart and not counted, as in
`keras-brainformer compare`), and reports the validation cross-entropy. At
`check_fraction` (25 %) of the budget it pauses, measures the validation loss
and the median step time so far and, given a `Baseline`, applies the paper's
constraint: a block slower than the baseline (times `step_time_slack`), or
whose loss at that point is worse than the baseline's by more than
`loss_margin`, stops there with reward -1.

Reward: `exp(-val_loss)` (the inverse perplexity, in (0, 1]) for a block that
passes, -1 for one that does not (or diverges), so -1 is below every valid
reward and a higher reward is a lower validation loss.

Validation loss is measured with causal routing (the default inference
routing of `BrainformerCausalLM`: what generation uses; expert choice's
as-trained routing would look ahead).
"""

import dataclasses
import math
import time

import keras
import numpy as np

from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.search.training_proxy import SEARCH_TRAINING
from keras_brainformer.training.callbacks import StepClock
from keras_brainformer.training.config import TrainingConfig
from keras_brainformer.training.trainer import compile_language_model
from keras_brainformer.zoo.parameter_count import count_parameters

REJECTED_REWARD = -1.0


@dataclasses.dataclass
class Baseline:
    """What the constraint compares against (measured once per search).

    Attributes:
        step_ms: the baseline's median training step time (ms).
        val_loss_at_check: its validation loss at `check_fraction` of the budget.
        val_loss: its validation loss at the end of the budget.
    """

    step_ms: float
    val_loss_at_check: float
    val_loss: float = math.nan

    @classmethod
    def from_metrics(cls, metrics):
        return cls(
            step_ms=float(metrics["step_ms"]),
            val_loss_at_check=float(metrics["val_loss_at_check"]),
            val_loss=float(metrics["val_loss"]),
        )


def constraint_violations(step_ms, val_loss_at_check, baseline, step_time_slack, loss_margin):
    """`(slow, worse)`: whether a candidate breaks the step-time or the loss
    constraint against `baseline`.

    Example:
    >>> base = Baseline(step_ms=100.0, val_loss_at_check=5.0)
    >>> constraint_violations(105.0, 5.1, base, step_time_slack=1.1, loss_margin=0.2)
    (False, False)
    >>> constraint_violations(120.0, 5.3, base, step_time_slack=1.1, loss_margin=0.2)
    (True, True)
    """
    slow = step_ms > baseline.step_ms * step_time_slack
    worse = not (val_loss_at_check <= baseline.val_loss_at_check + loss_margin)
    return bool(slow), bool(worse)


def reward_from(val_loss, rejected):
    """`exp(-val_loss)`, or -1 for a rejected or diverged candidate.

    Example:
    >>> round(reward_from(2.0, rejected=False), 4)
    0.1353
    >>> reward_from(2.0, rejected=True)
    -1.0
    """
    if rejected or not math.isfinite(val_loss):
        return REJECTED_REWARD
    return math.exp(-val_loss)


def build_language_model(backbone_config, seed=0):
    """A `BrainformerCausalLM` (no preprocessor) from backbone kwargs."""
    keras.utils.set_random_seed(seed)
    backbone = BrainformerBackbone(**backbone_config)
    return BrainformerCausalLM(backbone, preprocessor=None)


def evaluate_block(
    block,
    hidden_dim,
    data,
    budget,
    config=None,
    *,
    num_blocks=3,
    baseline=None,
    step_time_slack=1.1,
    loss_margin=0.2,
    check_fraction=0.25,
    verbose=0,
    **training,
):
    """Trains `block` stacked `num_blocks` times for `budget` seconds of
    training steps and measures it.

    Args:
        block: a `BlockSpec` (or its dict).
        hidden_dim: the model width d.
        data: a `LanguageModelData` (`training.corpus.build_language_model_data`).
        budget: seconds of training steps (compilation excluded).
        config: a `TrainingConfig`: its batch size, optimizer, learning rate
            (constant), seed (initialisation; the data order is the same for
            every candidate) and validation batches are used (the data is
            `data`). Default: `training_proxy.SEARCH_TRAINING`.
        num_blocks: times the block is stacked (the paper's proxy: 3).
        baseline: a `Baseline`, or None to measure without constraint.
        step_time_slack: allowed ratio of the candidate's to the baseline's
            step time.
        loss_margin: allowed excess (nats) of the candidate's validation loss
            over the baseline's at the check.
        check_fraction: where in the budget the constraint is checked.
        verbose: 0 silent, 1 one line per phase.
        **training: `TrainingConfig` fields replacing those of `config`.

    Returns:
        A dict of floats: `reward`, `val_loss` (at the end, or at the check for
        a rejected block), `val_loss_at_check`, `step_ms` (median),
        `step_ms_at_check`, `steps`, `train_seconds`, `compile_seconds`,
        `wall_seconds`, `tokens`, `rejected`, `rejected_step_time`,
        `rejected_loss`, `params`, `activated_params`.

    Example (about 20 s on 2 CPU cores):
    ```python
    from keras_brainformer.models import BrainformerByteTokenizer
    from keras_brainformer.search import SearchSpace, evaluate_block
    from keras_brainformer.search.fitness import Baseline
    from keras_brainformer.training.corpus import build_language_model_data

    data = build_language_model_data(BrainformerByteTokenizer(), 64, max_bytes=200_000)
    space = SearchSpace(scale=1 / 16)
    glam = space.glam_genome()
    base = evaluate_block(space.to_block_spec(glam), glam["model_dim"], data, 5)
    genome = space.dense_genome()
    result = evaluate_block(space.to_block_spec(genome), genome["model_dim"], data, 5,
                            baseline=Baseline.from_metrics(base))
    print(result["reward"], result["val_loss"], result["step_ms"])
    ```
    """
    settings = TrainingConfig.create(config or SEARCH_TRAINING, **training)
    batch_size, seed = settings.batch_size, settings.seed
    if not (isinstance(budget, (int, float)) and budget > 0):
        raise ValueError(f"`budget` must be > 0 seconds. Received: budget={budget!r}")
    if not 0 < check_fraction <= 1:
        raise ValueError(
            f"`check_fraction` must be in (0, 1]. Received: check_fraction={check_fraction!r}"
        )
    block = BlockSpec.from_dict(block)
    model_config = {
        "vocabulary_size": data.vocabulary_size,
        "hidden_dim": int(hidden_dim),
        "blocks": block.to_dict(),
        "num_layers": int(num_blocks),
        "max_sequence_length": data.sequence_length,
        "norm": "rms",
        "tie_embeddings": True,
    }
    counts = count_parameters(model_config)
    wall = time.perf_counter()
    lm = build_language_model(model_config, seed=seed)
    compile_language_model(lm, settings.optimizer, settings.learning_rate, constant_steps=10**9)
    validation = data.validation_dataset(batch_size, max_batches=settings.validation_batches)

    def validation_loss():
        result = lm.evaluate(validation, verbose=0, return_dict=True)
        return float(result["loss"])

    def train(clock, start_step):
        lm.fit(
            data.train_dataset(batch_size, seed=seed, start_step=start_step),
            epochs=1,
            steps_per_epoch=10**9,
            shuffle=False,  # the dataset is already in its seeded order
            callbacks=[clock],
            verbose=0,
        )

    # Phase 1: up to the check.
    clock = StepClock(budget * check_fraction)
    train(clock, 0)
    step_ms_at_check = _median_ms(clock.step_times)
    val_loss_at_check = validation_loss() if math.isfinite(clock.last_loss) else math.nan
    slow = worse = False
    if baseline is not None:
        slow, worse = constraint_violations(
            step_ms_at_check, val_loss_at_check, baseline, step_time_slack, loss_margin
        )
    diverged = not math.isfinite(val_loss_at_check)
    rejected = slow or worse or diverged
    if verbose:
        print(
            f"  check at {clock.seconds:.1f} s ({clock.steps} steps): step "
            f"{step_ms_at_check:.1f} ms, val loss {val_loss_at_check:.4f}"
            + (" -> rejected" if rejected else "")
        )

    # Phase 2: the rest of the budget (same data stream, no recompilation).
    val_loss = val_loss_at_check
    if not rejected and check_fraction < 1:
        rest = StepClock(budget, skip_first=False, seconds=clock.seconds)
        train(rest, clock.steps)
        clock.steps += rest.steps
        clock.seconds = rest.seconds
        clock.step_times += rest.step_times
        val_loss = validation_loss() if math.isfinite(rest.last_loss) else math.nan
        rejected = not math.isfinite(val_loss)

    wall = time.perf_counter() - wall
    return {
        "reward": reward_from(val_loss, rejected),
        "val_loss": val_loss,
        "val_loss_at_check": val_loss_at_check,
        "step_ms": _median_ms(clock.step_times),
        "step_ms_at_check": step_ms_at_check,
        "steps": float(clock.steps),
        "train_seconds": clock.seconds,
        "compile_seconds": clock.compile_seconds or 0.0,
        "wall_seconds": wall,
        "tokens": float(clock.steps * batch_size * data.sequence_length),
        "rejected": float(rejected),
        "rejected_step_time": float(slow),
        "rejected_loss": float(worse),
        "params": float(counts["total"]),
        "activated_params": float(counts["activated"]),
    }


def _median_ms(step_times):
    return 1000 * float(np.median(step_times)) if step_times else math.nan

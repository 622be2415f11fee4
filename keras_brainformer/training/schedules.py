"""The paper's learning-rate schedule and optimizer.

Brainformer [BF §5] trains with Adafactor (β1 = 0, β2 = 0.99) and a learning
rate held constant for 10K steps, then decayed as the inverse square root of
the step. `InverseSquareRootSchedule` is that schedule (with an optional
linear warm-up, 0 by default); `make_optimizer` builds the optimizer.
"""

import math
import numbers

import keras
from keras import ops

OPTIMIZERS = ("adafactor", "adamw")


def _check_int(field, value, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(
            f"`{field}` must be an integer >= {minimum}. Received: {field}={value!r}"
        )
    if value < minimum:
        raise ValueError(
            f"`{field}` must be an integer >= {minimum}. Received: {field}={value!r}"
        )
    return int(value)


@keras.saving.register_keras_serializable(package="keras_brainformer")
class InverseSquareRootSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Constant learning rate, then inverse-square-root decay [BF §5].

        lr(step) = peak * step / warmup_steps            step < warmup_steps
                 = peak                                   step <= constant_steps
                 = peak * sqrt(constant_steps / step)     step > constant_steps

    The decay is continuous at `constant_steps` (both pieces equal `peak`
    there). The warm-up, when used, counts towards `constant_steps`: decay
    always starts at step `constant_steps`. Steps are the optimizer's
    `iterations` (0 for the first update), so with a warm-up the first update
    uses a learning rate of 0, as Keras's own warm-up schedules do.
    Only `keras.ops` are used: the schedule runs inside JAX `jit` and TF
    graphs with a tensor step.

    Args:
        peak_learning_rate: float > 0, the learning rate of the constant
            phase. [BF] does not state it; secondary GLaM summaries give 0.01.
        constant_steps: int >= 1, the step at which the decay starts
            (the paper: 10_000).
        warmup_steps: int in `[0, constant_steps]`, steps of linear warm-up
            from 0 to `peak_learning_rate`. Defaults to 0 (the paper has none).
        name: name of the schedule.

    Example:

    >>> schedule = InverseSquareRootSchedule(peak_learning_rate=0.01, constant_steps=10_000)
    >>> [round(float(schedule(step)), 6) for step in (0, 10_000, 40_000, 1_000_000)]
    [0.01, 0.01, 0.005, 0.001]
    >>> warm = InverseSquareRootSchedule(1.0, constant_steps=100, warmup_steps=10)
    >>> [round(float(warm(step)), 6) for step in (0, 5, 10, 100, 400)]
    [0.0, 0.5, 1.0, 1.0, 0.5]
    """

    def __init__(
        self,
        peak_learning_rate,
        constant_steps=10_000,
        warmup_steps=0,
        name="inverse_square_root",
    ):
        super().__init__()
        if isinstance(peak_learning_rate, bool) or not isinstance(
            peak_learning_rate, numbers.Real
        ):
            raise ValueError(
                "`peak_learning_rate` must be a number > 0. "
                f"Received: peak_learning_rate={peak_learning_rate!r}"
            )
        if not math.isfinite(peak_learning_rate) or peak_learning_rate <= 0:
            raise ValueError(
                "`peak_learning_rate` must be a finite number > 0. "
                f"Received: peak_learning_rate={peak_learning_rate!r}"
            )
        self.peak_learning_rate = float(peak_learning_rate)
        self.constant_steps = _check_int("constant_steps", constant_steps, 1)
        self.warmup_steps = _check_int("warmup_steps", warmup_steps, 0)
        if self.warmup_steps > self.constant_steps:
            raise ValueError(
                "`warmup_steps` must be <= `constant_steps` (decay starts at "
                f"`constant_steps`). Received: warmup_steps={warmup_steps!r}, "
                f"constant_steps={constant_steps!r}"
            )
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak = ops.convert_to_tensor(self.peak_learning_rate, "float32")
        constant_steps = ops.convert_to_tensor(float(self.constant_steps), "float32")
        # Constant up to `constant_steps`, then peak * sqrt(constant_steps / step).
        learning_rate = peak * ops.sqrt(
            constant_steps / ops.maximum(step, constant_steps)
        )
        if self.warmup_steps > 0:
            warmup = peak * step / float(self.warmup_steps)
            learning_rate = ops.where(step < self.warmup_steps, warmup, learning_rate)
        return learning_rate

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "constant_steps": self.constant_steps,
            "warmup_steps": self.warmup_steps,
            "name": self.name,
        }


def make_optimizer(name="adafactor", learning_rate=None, weight_decay=None, **kwargs):
    """The paper's optimizer (Adafactor) or AdamW, with a learning rate.

    `"adafactor"` is `keras.optimizers.Adafactor` with Keras's defaults, which
    are the Adafactor paper's (Shazeer & Stern, 2018) and match [BF] where
    Keras can: no first moment (β1 = 0 is the only option Keras offers: its
    Adafactor keeps no momentum at all), factored second moments, update
    clipping at RMS 1 (`clip_threshold=1.0`), step sizes relative to the
    parameter scale (`epsilon_2=1e-3` floor), `epsilon_1=1e-30`.
    Two differences from [BF] to know about:

    - β2 is not a constant in Keras: it is `1 - t ** beta_2_decay`
      (`beta_2_decay=-0.8`), which reaches the paper's 0.99 at step ~316
      and keeps growing towards 1 (0.9994 at 10K steps). A constant β2 is
      not expressible with `keras.optimizers.Adafactor`'s arguments.
    - Keras's Adafactor caps the step size at `1 / sqrt(step + 1)` whatever
      the learning rate (its built-in "relative step" decay). With a peak of
      0.01 and 10K constant steps the paper's schedule, `1 / sqrt(step)`
      after step 10K, coincides with that cap (up to the off-by-one), so the
      cap changes nothing; a larger peak is cut to `1 / sqrt(step + 1)`.

    `"adamw"` is `keras.optimizers.AdamW` with β1 = 0.9 and β2 = 0.99: the
    paper's second-moment decay (an averaging horizon of ~100 steps, shorter
    and quicker to react to loss spikes than Keras's 0.999 default; small-batch
    LM recipes such as nanoGPT's character-level config use 0.99 too), and a
    `weight_decay` of 0.01 unless given (decoupled decay, applied to every
    variable; call `optimizer.exclude_from_weight_decay(var_names=[...])` to
    spare norm scales).

    Args:
        name: `"adafactor"` (the paper's) or `"adamw"`.
        learning_rate: a float, a `LearningRateSchedule` or None for the
            paper's schedule, `InverseSquareRootSchedule(0.01, 10_000)`.
        weight_decay: decoupled weight decay; None means none for Adafactor
            (the paper states none) and 0.01 for AdamW.
        **kwargs: further optimizer arguments (`clipnorm`,
            `gradient_accumulation_steps`, `beta_2_decay`, ...), overriding
            the defaults above.

    Example:

    >>> optimizer = make_optimizer("adafactor")  # the paper's schedule, peak 0.01
    >>> type(optimizer).__name__, round(float(optimizer.learning_rate), 6)
    ('Adafactor', 0.01)
    >>> optimizer = make_optimizer("adamw", learning_rate=3e-4)
    >>> optimizer.beta_2, optimizer.weight_decay
    (0.99, 0.01)
    """
    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(
            f"`name` must be one of {OPTIMIZERS}. Received: name={name!r}"
        )
    if learning_rate is None:
        learning_rate = InverseSquareRootSchedule(0.01, constant_steps=10_000)
    if name.lower() == "adafactor":
        options = dict(
            beta_2_decay=-0.8,
            epsilon_1=1e-30,
            epsilon_2=1e-3,
            clip_threshold=1.0,
            relative_step=True,
        )
        options.update(kwargs)
        return keras.optimizers.Adafactor(
            learning_rate=learning_rate, weight_decay=weight_decay, **options
        )
    options = dict(beta_1=0.9, beta_2=0.99, epsilon=1e-7)
    options.update(kwargs)
    return keras.optimizers.AdamW(
        learning_rate=learning_rate,
        weight_decay=0.01 if weight_decay is None else weight_decay,
        **options,
    )

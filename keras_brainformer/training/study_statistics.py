"""The statistics of a `compare` study: when a curve reaches a loss, the
loss at equal steps, and intervals over seeds and timing rounds.

A curve is a list of points `{"step": ..., "seconds": ..., "val_loss": ...}`
in time order (validation loss after that many steps and seconds of
training).
"""

import math

import numpy as np
from scipy import stats


def time_to_reach(points, target):
    """Training seconds at which the validation curve first reaches `target`
    (linear interpolation between evaluation points), or None.

    Example:
    >>> curve = [{"seconds": 1.0, "val_loss": 5.0}, {"seconds": 3.0, "val_loss": 3.0}]
    >>> time_to_reach(curve, 4.0)
    2.0
    >>> time_to_reach(curve, 2.0) is None
    True
    """
    previous = None
    for point in points:
        if point["val_loss"] <= target:
            if previous is None or previous["val_loss"] == point["val_loss"]:
                return point["seconds"]
            fraction = (previous["val_loss"] - target) / (
                previous["val_loss"] - point["val_loss"]
            )
            return previous["seconds"] + fraction * (point["seconds"] - previous["seconds"])
        previous = point
    return None


def interval(values, confidence=0.95):
    """Mean, sample standard deviation and the Student-t `confidence`
    interval of the mean of `values` (None entries are left out and
    counted: `n` of `of`). With one value the interval is unbounded (NaN).

    Example:
    >>> summary = interval([1.0, 2.0, 3.0, None])
    >>> summary["mean"], summary["std"], summary["n"], summary["of"]
    (2.0, 1.0, 3, 4)
    >>> round(summary["low"], 3), round(summary["high"], 3)
    (-0.484, 4.484)
    """
    present = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(present)
    result = {"n": n, "of": len(values), "mean": math.nan, "std": math.nan,
              "low": math.nan, "high": math.nan}
    if n == 0:
        return result
    mean = float(np.mean(present))
    result["mean"] = mean
    if n >= 2:
        std = float(np.std(present, ddof=1))
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
        result.update(std=std, low=mean - half, high=mean + half)
    return result


def format_interval(summary, digits=3):
    """`mean [low, high]` (or `mean` alone, or `-`), with `(n/of)` when some
    values were missing.

    Example:
    >>> format_interval(interval([1.0, 2.0, 3.0]), digits=2)
    '2.00 [-0.48, 4.48]'
    >>> format_interval(interval([1.0, None]), digits=1)
    '1.0 (1/2)'
    """
    if summary["n"] == 0:
        text = "-"
    elif math.isnan(summary["low"]):
        text = f"{summary['mean']:.{digits}f}"
    else:
        text = f"{summary['mean']:.{digits}f} [{summary['low']:.{digits}f}, " \
               f"{summary['high']:.{digits}f}]"
    if summary["n"] != summary["of"]:
        text += f" ({summary['n']}/{summary['of']})"
    return text


def loss_band(curves, grid, axis="seconds"):
    """The mean and min/max validation loss of several curves (one per seed)
    at the `axis` values (`"seconds"` or `"step"`) of `grid`, each curve
    interpolated linearly; a grid point after the end of any curve is NaN.

    Returns:
        `(mean, low, high)`, arrays shaped like `grid`.

    Example:
    >>> a = [{"seconds": 0.0, "val_loss": 4.0}, {"seconds": 2.0, "val_loss": 2.0}]
    >>> b = [{"seconds": 0.0, "val_loss": 6.0}, {"seconds": 4.0, "val_loss": 2.0}]
    >>> mean, low, high = loss_band([a, b], [1.0, 3.0])
    >>> mean.tolist(), low.tolist(), high.tolist()
    ([4.0, nan], [3.0, nan], [5.0, nan])
    """
    rows = np.array([loss_at(points, grid, axis) for points in curves])
    # NaN propagates: a point any curve lacks is NaN
    return rows.mean(axis=0), rows.min(axis=0), rows.max(axis=0)


def loss_at(points, grid, axis="step"):
    """A curve's validation loss at the `axis` values of `grid`, linearly
    interpolated between its evaluation points; NaN outside the curve.

    Example:
    >>> curve = [{"step": 100, "val_loss": 3.0}, {"step": 300, "val_loss": 2.0}]
    >>> loss_at(curve, [200, 300, 400]).tolist()
    [2.5, 2.0, nan]
    """
    grid = np.asarray(grid, "float64")
    where = np.array([p[axis] for p in points], "float64")
    losses = np.array([p["val_loss"] for p in points], "float64")
    row = np.interp(grid, where, losses)
    row[(grid > where[-1]) | (grid < where[0])] = np.nan
    return row


def equal_steps(curves, count=4):
    """Up to `count` step counts every curve has reached: `1/count, 2/count,
    ..., 1` of the shortest curve's last step, each moved to the nearest of
    that curve's evaluation steps.

    Example:
    >>> a = [{"step": s} for s in (50, 100, 150, 200, 250, 300)]
    >>> b = [{"step": s} for s in (50, 100, 150, 200)]
    >>> equal_steps([a, b], count=2)
    [100, 200]
    """
    shortest = min(curves, key=lambda points: points[-1]["step"])
    steps = np.array([p["step"] for p in shortest if p["step"] > 0])
    if len(steps) <= count:
        return steps.tolist()
    wanted = steps[-1] * np.arange(1, count + 1) / count
    return sorted({int(steps[np.abs(steps - w).argmin()]) for w in wanted})

"""Block-wise regularized-evolution architecture search on KerasTuner.

- `SearchSpace` (`space.py`): the paper's Table 1 over an N-sublayer block, scalable.
- `RegularizedEvolutionOracle` (`oracle.py`): a `keras_tuner.Oracle`.
- `evaluate_block`, `Baseline` (`fitness.py`): fixed wall-clock fitness and constraint.
- `BlockSearchTuner` (`tuner.py`): the KerasTuner tuner running `evaluate_block`.
- `run_search` (`driver.py`): local, chief, worker, or chief + N workers.
- `write_results` (`results.py`): CSV, PNG, top-k block specs and presets.

Names are imported lazily, so `keras-brainformer --help` stays fast.
"""

import importlib

_EXPORTS = {
    "SearchSpace": "keras_brainformer.search.space",
    "RegularizedEvolutionOracle": "keras_brainformer.search.oracle",
    "evaluate_block": "keras_brainformer.search.fitness",
    "Baseline": "keras_brainformer.search.fitness",
    "BlockSearchTuner": "keras_brainformer.search.tuner",
    "run_search": "keras_brainformer.search.driver",
    "write_results": "keras_brainformer.search.results",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'keras_brainformer.search' has no attribute {name!r}")

"""The zoo's tooling beside the Brainformer model family (`keras_brainformer.models`).

- Analytic sizes from a config alone, without building a model:
  `count_parameters`, `weight_specs`, `weight_shapes`.
- Sparse upcycling, a dense model's weights into an MoE target: `upcycle`,
  `save_upcycled_preset` (`upcycling.py`).
- How the preset folders are made: `preset_recipes`, `preset_building`,
  `keras_hub_presets`; task presets with checksums: `preset_writing`; the
  zoo's table: `preset_table`.

It imports the family and never the other way round: the family reads its
presets from the folders this tooling wrote.
"""

from keras_brainformer.zoo.parameter_count import count_parameters
from keras_brainformer.zoo.upcycling import save_upcycled_preset
from keras_brainformer.zoo.upcycling import upcycle
from keras_brainformer.zoo.weight_specs import weight_shapes
from keras_brainformer.zoo.weight_specs import weight_specs

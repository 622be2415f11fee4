"""Helpers of the Brainformer tasks and presets that are not model-family
modules (keras-hub keeps such helpers in `keras_hub/src/utils/`): loading
presets by name and checking their integrity, the checks of a task's input
data, in-memory shuffling for `fit`, a task's `quantize`, and saving and
loading a backbone's LoRA adapters alone.

Imported by the family (`keras_brainformer.models`) and everything above it;
imports only `keras_brainformer.layers`, `upstream_private`, `errors` and
`preset_folders` (checked by `lint-imports`). Internal: nothing here is
exported by `keras_brainformer.models`."""

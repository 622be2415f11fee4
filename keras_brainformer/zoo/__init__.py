"""The zoo's tooling beside the Brainformer model family: how the preset
folders are made (`preset_recipes`, `preset_building`, `keras_hub_presets`)
and the zoo's table (`preset_table`).

It imports the family (`keras_brainformer.models`) and never the other way
round: the family reads its presets from the folders this tooling wrote.
"""

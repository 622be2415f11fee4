"""Writes every zoo preset's keras-hub folder into `presets/<name>/`.

The folders are the family's preset registry (read by
`keras_brainformer/models/brainformer/brainformer_presets.py`); the recipes
that compute them are `keras_brainformer/zoo/preset_recipes.py`. Run after
changing a recipe:

    python presets/build_presets.py

A test checks that every folder matches its recipe.
"""

import pathlib

from keras_brainformer.zoo.preset_building import write_preset_directory
from keras_brainformer.zoo.preset_recipes import recipe_presets

HERE = pathlib.Path(__file__).resolve().parent


def main():
    recipes = recipe_presets()
    for i, name in enumerate(sorted(recipes), 1):
        directory = write_preset_directory(name, recipes[name], HERE / name)
        files = sorted(
            p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()
        )
        print(f"[{i}/{len(recipes)}] {name}: {', '.join(files)}")


if __name__ == "__main__":
    main()

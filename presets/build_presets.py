"""Writes every zoo preset's keras-hub folder into `presets/<name>/`.

Run after changing `keras_brainformer/models/brainformer/brainformer_presets.py`:

    python presets/build_presets.py

A test checks that the folders match the registry.
"""

import pathlib

from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.models.brainformer.preset_building import write_preset_directory

HERE = pathlib.Path(__file__).resolve().parent


def main():
    for i, name in enumerate(sorted(backbone_presets), 1):
        directory = write_preset_directory(name, HERE / name)
        files = sorted(
            p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()
        )
        print(f"[{i}/{len(backbone_presets)}] {name}: {', '.join(files)}")


if __name__ == "__main__":
    main()

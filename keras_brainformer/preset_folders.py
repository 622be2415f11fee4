"""Where the package's preset folders are, and their metadata as plain JSON.

Imports nothing of ours and no Keras, so the command line can list the zoo
(`keras-brainformer presets`) without loading the Keras/TensorFlow stack.
Loading a preset by name is `utils/preset_loading.py`.
"""

import json
import pathlib

# The package's own preset folders: `keras_brainformer/presets/` (in a
# checkout, a link to the top-level `presets/`; in a wheel, a copy of it).
PRESETS_ROOT = pathlib.Path(__file__).resolve().parent / "presets"
METADATA_FILE = "metadata.json"


def preset_folder_metadata(root=PRESETS_ROOT):
    """`{name: metadata}` of every preset folder under `root` (folders
    whose `metadata.json` names a `keras_brainformer_preset`), by name."""
    found = {}
    for path in sorted(pathlib.Path(root).glob(f"*/{METADATA_FILE}")):
        with open(path) as f:
            metadata = json.load(f)
        if "keras_brainformer_preset" in metadata:
            found[path.parent.name] = metadata
    return found


def human_count(n):
    """A parameter count as the zoo's tables print it: `1.4M`, `8.7B`, `873K`."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(int(n))

"""Checks a non-editable install of keras-brainformer, as `pip install` gives.

Run by `.ci/run` with the interpreter of a fresh virtual environment into
which the wheel (built from the checkout) was installed, from a working
directory outside the checkout:

    python check_installed_wheel.py CHECKOUT_DIR

It fails (exit 1, with the reason) unless:
- the package is imported from site-packages, not from the checkout;
- every registered preset resolves to a folder inside the installed package
  and passes its integrity check; every tiny and trained preset builds;
- a trained preset (`brainformer1_tiny_stdlib`) and an architecture preset
  (`glam_tiny`) load by name and generate text; keras-hub's generic
  `keras_hub.models.CausalLM.from_preset(name, load_weights=False)` resolves
  an architecture preset to our class;
- `keras-brainformer presets` lists every preset;
- nothing is written while loading: the installed package's files and the
  (temporary) home folder are unchanged, apart from Keras' own `~/.keras`.
"""

import os
import pathlib
import subprocess
import sys
import tempfile


def snapshot(root):
    root = pathlib.Path(root)
    return {
        p.relative_to(root).as_posix(): p.stat().st_mtime_ns
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def main(checkout):
    checkout = pathlib.Path(checkout).resolve()
    home = pathlib.Path(tempfile.mkdtemp(prefix="kb-home-"))
    os.environ["HOME"] = str(home)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.chdir(home)

    import keras_hub

    import keras_brainformer
    from keras_brainformer.models import BrainformerBackbone
    from keras_brainformer.models import BrainformerCausalLM
    from keras_brainformer.utils.preset_integrity import verify_preset
    from keras_brainformer.utils.preset_loading import resolve_preset

    package = pathlib.Path(keras_brainformer.__file__).resolve().parent
    if checkout in package.parents or "site-packages" not in package.parts:
        sys.exit(f"keras_brainformer was imported from {package}, not from an installed wheel")
    before = snapshot(package)
    home_before = {p for p in snapshot(home) if not p.startswith(".keras/")}

    names = sorted(BrainformerBackbone.presets)
    built = []
    for name in names:
        folder = pathlib.Path(resolve_preset(name)).resolve()
        if package not in folder.parents:
            sys.exit(f"preset {name} resolved to {folder}, outside the installed package")
        verify_preset(folder)
        if name.endswith(("_tiny", "_stdlib")):
            BrainformerBackbone.from_preset(name)
            built.append(name)
    print(f"{len(names)} presets resolve inside {package}; built {len(built)}: {', '.join(built)}")

    for name in ("brainformer1_tiny_stdlib", "glam_tiny"):
        lm = BrainformerCausalLM.from_preset(name)
        lm.preprocessor.sequence_length = 32
        text = lm.generate("def ", max_length=32)
        if not (isinstance(text, str) and text.startswith("def ") and len(text) > 4):
            sys.exit(f"{name}: generate returned {text!r}")
        print(f"{name}: generate -> {text[:60]!r}")

    generic = keras_hub.models.CausalLM.from_preset("brainformer1_tiny", load_weights=False)
    if not isinstance(generic, BrainformerCausalLM):
        sys.exit(f"keras_hub.models.CausalLM.from_preset gave {type(generic).__name__}")
    print("keras_hub.models.CausalLM.from_preset('brainformer1_tiny', load_weights=False): ok")

    listing = subprocess.run(
        ["keras-brainformer", "presets"], capture_output=True, text=True, check=True
    ).stdout
    missing = [name for name in names if name not in listing]
    if missing:
        sys.exit(f"`keras-brainformer presets` does not list {missing}")
    print(f"keras-brainformer presets: lists all {len(names)}")

    if snapshot(package) != before:
        sys.exit("loading presets changed files inside the installed package")
    home_after = {p for p in snapshot(home) if not p.startswith(".keras/")}
    if home_after != home_before:
        sys.exit(f"loading presets wrote into the home folder: {sorted(home_after - home_before)}")
    print("nothing written while loading: ok")


if __name__ == "__main__":
    main(sys.argv[1])

"""Saving and loading a backbone's LoRA adapters alone (`*.lora.h5`).

keras-hub's `Backbone.save_lora_weights` assumes one `lora_kernel_a/b` pair
per layer (its `EinsumDense` layers); our attention, dense FFN and expert-bank
layers hold one pair per projection kernel (`w_query_lora_a`, ...). These
functions store every adapter under its layer's path, so a file lists exactly
what it adapts, and loading checks the whole file before assigning anything.
"""

import h5py
import numpy as np
from keras import ops

from keras_brainformer.layers.adaptable_kernels import AdaptableKernels
from keras_brainformer.upstream_private import sublayers


def lora_layers(backbone):
    """`{path: layer}` of the LoRA-enabled layers of `backbone`."""
    return {
        layer.path: layer
        for layer in sublayers(backbone)
        if isinstance(layer, AdaptableKernels) and layer.lora_enabled
    }


def _check_filename(filepath):
    if not str(filepath).endswith(".lora.h5"):
        raise ValueError(
            f"The filename must end in `.lora.h5`. Received: filepath={filepath}"
        )


def save_lora_weights(backbone, filepath):
    """Writes the rank and every adapter of `backbone` to `filepath`."""
    _check_filename(filepath)
    layers = lora_layers(backbone)
    if not layers:
        raise ValueError(
            "There are no LoRA-enabled layers in this model. Call "
            "`backbone.enable_lora(rank)` first."
        )
    ranks = {layer.lora_rank for layer in layers.values()}
    if len(ranks) != 1:
        raise ValueError(f"LoRA layers have different ranks: {sorted(ranks)}.")
    with h5py.File(filepath, "w") as f:
        f.attrs["rank"] = ranks.pop()
        for path, layer in layers.items():
            group = f.create_group(path)
            for variable in layer._adapter_variables():
                group[variable.name] = ops.convert_to_numpy(variable)


def read_lora_rank(filepath):
    _check_filename(filepath)
    with h5py.File(filepath, "r") as f:
        return int(f.attrs["rank"])


def load_lora_weights(backbone, filepath):
    """Assigns the adapters in `filepath` to `backbone` (LoRA enabled, same
    rank). Every layer, name and shape is checked before any assignment."""
    layers = lora_layers(backbone)
    values = []
    with h5py.File(filepath, "r") as f:
        # Groups are nested by path ("block_0/0_attention"): collect leaves.
        paths = set()
        f.visit(lambda name: paths.add(name))
        missing = sorted(p for p in layers if p not in paths)
        extra = sorted(
            p for p in paths
            if isinstance(f[p], h5py.Group)
            and any(isinstance(f[p][k], h5py.Dataset) for k in f[p])
            and p not in layers
        )
        if missing or extra:
            raise ValueError(
                f"LoRA file {filepath} does not match this model: layers "
                f"missing from the file {missing}, layers in the file that this "
                f"model has no LoRA layer for {extra}."
            )
        for path, layer in layers.items():
            for variable in layer._adapter_variables():
                if variable.name not in f[path]:
                    raise ValueError(
                        f"LoRA file {filepath} lacks {path}/{variable.name}."
                    )
                value = np.asarray(f[path][variable.name])
                if value.shape != tuple(variable.shape):
                    raise ValueError(
                        f"LoRA file {filepath}: {path}/{variable.name} has shape "
                        f"{value.shape}, the model expects {tuple(variable.shape)}."
                    )
                values.append((variable, value))
    for variable, value in values:
        variable.assign(value)

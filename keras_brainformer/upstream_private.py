"""Every private Keras, keras-hub and KerasTuner API this package uses, in one place.

Keras, keras-hub and KerasTuner export no public form of these helpers; their
modules under `*.src` may change in any release. Importing them only here
keeps the rest of the package on public APIs, and
`tests/test_upstream_private.py` checks each one's signature and behaviour,
so an upstream change fails that test by name instead of deep inside a
tokenizer or the distributed search.

keras-hub (imported with the package):
    register_presets: adds preset folders to a class's `presets` registry, so
        keras-hub's generic `from_preset` finds them by name.
    load_preset_json: a preset's `config.json` (a registered name, a handle
        or a folder), fetching that file only: `convert` reads the backbone
        class and config from it to size the model before building it.
    canonicalize_python_token_inputs, convert_to_ragged_batch,
    preprocessing_function: the input conversion keras-hub's own tokenizers
        apply (Python lists, tensors of any backend, `tf.data` tracing).
    tf: keras-hub's handle on TensorFlow (the module, or None without it).
    QwenSparseMoeBlock: Qwen-MoE's sparse block (routed experts plus the
        sigmoid-gated shared expert), the reference our `MoEFeedForward` with
        `shared_expert_intermediate_dim` is tested against (`tests/
        test_shared_expert.py`); keras-hub imports its module with the
        package, so naming it here costs nothing.

Keras (imported with the package):
    weights_to_h5_bytes: the bytes of the `.weights.h5` file that
        `model.save_weights` would write, made in memory (Keras' own
        `H5IOStore` over a `BytesIO`, as its `.keras` archives do). A
        checkpoint is then written to disk by plain Python, whose write
        fails cleanly on a full disk; HDF5 writing to a full disk poisons
        the library (measured: an `OSError`, then `__dealloc__` tracebacks
        and a segfault at exit, whatever is closed).
    sublayers: every layer nested inside a layer, depth first, itself
        excluded (Keras' private `Layer._flatten_layers`; the public
        `Model.layers` lists only direct children, and a plain `Layer` has
        none).

KerasTuner's distributed oracle (`keras_tuner_distribution()`): imported on
first use only, since it pulls in gRPC, which nothing but a distributed
search needs.
"""

import io

from keras.src.saving import saving_lib as _keras_saving_lib
from keras_hub.src.models.qwen_moe.qwen_moe_decoder import QwenSparseMoeBlock
from keras_hub.src.utils.preset_utils import load_json as load_preset_json
from keras_hub.src.utils.preset_utils import register_presets
from keras_hub.src.utils.tensor_utils import canonicalize_python_token_inputs
from keras_hub.src.utils.tensor_utils import convert_to_ragged_batch
from keras_hub.src.utils.tensor_utils import preprocessing_function
from keras_hub.src.utils.tensor_utils import tf

__all__ = [
    "QwenSparseMoeBlock",
    "canonicalize_python_token_inputs",
    "load_preset_json",
    "convert_to_ragged_batch",
    "keras_tuner_distribution",
    "preprocessing_function",
    "register_presets",
    "tf",
    "weights_to_h5_bytes",
]


def sublayers(layer):
    """Every layer nested inside `layer`, depth first, `layer` excluded."""
    return list(layer._flatten_layers(include_self=False))


def weights_to_h5_bytes(model):
    """The content of `model.save_weights("x.weights.h5")`'s file, as a
    `memoryview`, made in memory (nothing is written to disk); the file
    written from it loads with `model.load_weights`."""
    if not model.built:
        raise ValueError("The model must be built before its weights are saved.")
    buffer = io.BytesIO()
    store = _keras_saving_lib.H5IOStore(buffer, mode="w")
    try:
        _keras_saving_lib._save_state(
            model,
            weights_store=store,
            assets_store=None,
            inner_path="",
            visited_saveables=set(),
        )
    finally:
        store.close()
    return buffer.getbuffer()


def keras_tuner_distribution():
    """KerasTuner's distributed-oracle modules, imported on first use (gRPC is
    heavy and only a distributed search needs it).

    Returns:
        `(dist_utils, protos, oracle_chief)`: the role helpers
        (`has_chief_oracle`, `is_chief_oracle`), the gRPC service protos
        (`get_service_grpc`) and the chief's servicer (`OracleServicer`,
        `exit_chief`).
    """
    # Optional heavy dependency (gRPC): imported here, not at module level.
    from keras_tuner.src import protos
    from keras_tuner.src.distribute import oracle_chief
    from keras_tuner.src.distribute import utils as dist_utils

    return dist_utils, protos, oracle_chief

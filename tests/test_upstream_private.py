"""The private keras-hub / KerasTuner helpers this package uses
(`keras_brainformer/upstream_private.py`): each still exists and behaves as we
rely on it. A failure here names the upstream change to adapt to."""

import inspect
import pathlib

import numpy as np

from keras_brainformer import upstream_private

PACKAGE = pathlib.Path(upstream_private.__file__).parent


def test_no_module_but_the_adapter_imports_a_private_upstream_module():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "upstream_private.py" or "presets" in path.relative_to(PACKAGE).parts:
            continue
        text = path.read_text(encoding="utf-8")
        if any(f"{name}.src" in text for name in ("keras", "keras_hub", "keras_tuner")):
            offenders.append(str(path.relative_to(PACKAGE)))
        if "._flatten_layers(" in text:  # Keras' private traversal: `sublayers`
            offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_sublayers_lists_every_nested_layer_depth_first():
    import keras

    from keras_brainformer.layers import MoEFeedForward
    from keras_brainformer.upstream_private import sublayers

    moe = MoEFeedForward(4, 8)
    moe.build((None, 5, 6))
    names = [layer.name for layer in sublayers(moe)]
    assert moe.name not in names
    assert {moe.router.name, moe.experts.name} <= set(names)
    outer = keras.Sequential([keras.layers.Dense(2), keras.Sequential([keras.layers.Dense(3)])])
    assert len(sublayers(outer)) == 3  # the nested Sequential and both Dense layers


def test_register_presets_makes_our_presets_visible_to_keras_hub():
    from keras_hub.models import Backbone

    from keras_brainformer.models import BrainformerBackbone

    params = list(inspect.signature(upstream_private.register_presets).parameters)
    assert params == ["presets", "backbone_cls"]
    assert "brainformer1_tiny" in BrainformerBackbone.presets
    assert "brainformer1_tiny" in Backbone.presets  # the generic loader sees it


def test_weights_to_h5_bytes_is_what_save_weights_writes(tmp_path):
    import keras

    def model(seed):
        keras.utils.set_random_seed(seed)
        built = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        built.compile(optimizer="adam", loss="mse")
        built.optimizer.build(built.trainable_variables)
        return built

    source = model(0)
    path = tmp_path / "from_memory.weights.h5"
    path.write_bytes(upstream_private.weights_to_h5_bytes(source))
    target = model(1)
    target.load_weights(str(path))
    for a, b in zip(source.get_weights(), target.get_weights()):
        np.testing.assert_array_equal(a, b)
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    try:
        upstream_private.weights_to_h5_bytes(unbuilt)
    except ValueError as error:
        assert "built" in str(error)
    else:
        raise AssertionError("an unbuilt model was saved")


def test_token_input_helpers_canonicalise_and_batch():
    inputs, batched = upstream_private.canonicalize_python_token_inputs([1, 2, 3])
    assert not batched
    ragged, unbatched, rectangular = upstream_private.convert_to_ragged_batch(
        upstream_private.tf.constant([[1, 2], [3, 4]])
    )
    assert not unbatched and rectangular
    np.testing.assert_array_equal(ragged.to_tensor().numpy(), [[1, 2], [3, 4]])
    assert callable(upstream_private.preprocessing_function(lambda self, x: x))


def test_keras_tuner_distribution_has_the_oracle_pieces():
    dist_utils, protos, oracle_chief = upstream_private.keras_tuner_distribution()
    for name in ("has_chief_oracle", "is_chief_oracle"):
        assert callable(getattr(dist_utils, name)), name
    assert hasattr(protos.get_service_grpc(), "add_OracleServicer_to_server")
    assert callable(oracle_chief.OracleServicer)
    class FakeOracle:  # hashable: KerasTuner locks per oracle object
        def __init__(self, trials, tuners):
            self.ongoing_trials, self.tuner_ids = trials, tuners

    idle, busy = FakeOracle({}, set()), FakeOracle({"w0": object()}, {"w0"})
    assert oracle_chief.exit_chief(idle) and not oracle_chief.exit_chief(busy)


def test_qwen_sparse_moe_block_is_the_shared_expert_reference():
    """`tests/test_shared_expert.py` copies weights into this block by its
    constructor arguments and sublayer attributes."""
    params = list(inspect.signature(upstream_private.QwenSparseMoeBlock).parameters)
    assert params[:6] == [
        "hidden_dim", "moe_intermediate_dim", "shared_expert_intermediate_dim",
        "num_experts", "top_k", "norm_top_k_prob",
    ]
    block = upstream_private.QwenSparseMoeBlock(
        hidden_dim=4, moe_intermediate_dim=3, shared_expert_intermediate_dim=5,
        num_experts=2, top_k=1, norm_top_k_prob=False,
    )
    block.build((1, 2, 4))
    shapes = {
        "router": tuple(block._sparse_feedforward_gate_dense.kernel.shape),
        "experts_in": tuple(block.expert_bank._expert_feedforward_gate_dense.shape),
        "experts_out": tuple(block.expert_bank._expert_feedforward_output_dense.shape),
        "shared_gate": tuple(block.shared_expert_dense._feedforward_gate_dense.kernel.shape),
        "shared_up": tuple(block.shared_expert_dense._feedforward_intermediate_dense.kernel.shape),
        "shared_out": tuple(block.shared_expert_dense._feedforward_output_dense.kernel.shape),
        "gate": tuple(block.shared_expert_gate_dense.kernel.shape),
    }
    assert shapes == {
        "router": (4, 2), "experts_in": (2, 4, 6), "experts_out": (2, 3, 4),
        "shared_gate": (4, 5), "shared_up": (4, 5), "shared_out": (5, 4), "gate": (4, 1),
    }
    out, logits = block(np.ones((1, 2, 4), "float32"))
    assert tuple(out.shape) == (1, 2, 4) and tuple(logits.shape) == (2, 2)


def test_load_preset_json_reads_a_zoo_preset_config_by_name_without_building():
    params = list(inspect.signature(upstream_private.load_preset_json).parameters)
    assert params[0] == "preset"
    data = upstream_private.load_preset_json("mixtral_8x7b")  # a registered zoo name
    assert data["class_name"] == "BrainformerBackbone"
    assert data["config"]["hidden_dim"] == 4096

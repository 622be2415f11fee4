"""BrainformerBackbone / BrainformerCausalLM: training, serialisation, counts."""

import os

import keras
import numpy as np
import pytest
from conftest import inference_call
from conftest import to_numpy

from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec
from keras_brainformer.models import dense_transformer_layer
from keras_brainformer.models import glam_layer_pair
from keras_brainformer.zoo import count_parameters


def tiny_brainformer_spec():
    return BlockSpec(
        [
            AttentionSpec(num_heads=2),
            MoESpec(4, 32, router="expert_choice", capacity_factor=1.0, activation="relu"),
            FeedForwardSpec(24, activation="gated_gelu"),
            MoESpec(4, 16, top_k=2, capacity_factor=1.25, z_loss_weight=1e-3),
        ]
    )


def tiny_backbone(**kwargs):
    args = dict(vocabulary_size=32, hidden_dim=16, blocks=tiny_brainformer_spec(), num_layers=2)
    args.update(kwargs)
    return BrainformerBackbone(**args)


def lm_data(n=64, length=16, vocab=32, seed=0):
    """A learnable toy language: each token is the previous one plus 1 (mod 8)."""
    rng = np.random.default_rng(seed)
    start = rng.integers(0, 8, (n, 1))
    tokens = ((start + np.arange(length + 1)) % 8 + rng.integers(0, 3, (n, 1)) * 8) % vocab
    tokens = tokens.astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, length), "int32")}
    return x, tokens[:, 1:]


def inputs(batch=2, length=16, vocab=32, seed=1):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, vocab, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }


def test_output_shape_and_counts_match_built_model():
    backbone = tiny_backbone()
    out = inference_call(backbone)(inputs())
    assert tuple(out.shape) == (2, 16, 16)
    counts = count_parameters(backbone.get_config())
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_variables)
    assert counts["total"] == trainable
    # Activated: router + k experts (top-k) or capacity-factor experts (EC).
    per_expert_ec, per_expert_topk = 2 * 16 * 32, 2 * 16 * 16
    inactive = 2 * ((4 - 1.0) * per_expert_ec + (4 - 2) * per_expert_topk)
    assert counts["activated"] == counts["total"] - inactive


@pytest.mark.parametrize(
    "blocks,num_layers,norm,tied",
    [
        (dense_transformer_layer(4, 24, activation="squared_relu"), 3, "layer", False),
        (glam_layer_pair(2, 16, 8), 2, "rms", True),
        ([tiny_brainformer_spec(), glam_layer_pair(4, 8, 2)], None, "rms", True),
    ],
)
def test_parameter_count_equals_built_model(blocks, num_layers, norm, tied):
    backbone = tiny_backbone(blocks=blocks, num_layers=num_layers, norm=norm, tie_embeddings=tied)
    trainable = sum(int(np.prod(v.shape)) for v in backbone.trainable_variables)
    assert count_parameters(backbone.get_config())["total"] == trainable


def test_list_of_block_specs_and_config_round_trip():
    specs = [tiny_brainformer_spec(), glam_layer_pair(2, 16, 4)]
    backbone = tiny_backbone(blocks=specs, num_layers=None)
    assert backbone.num_layers == 2
    config = backbone.get_config()
    clone = BrainformerBackbone.from_config(config)
    assert clone.get_config() == config
    assert [b.spec for b in clone.transformer_blocks] == specs
    with pytest.raises(ValueError, match="num_layers"):
        tiny_backbone(blocks=specs, num_layers=3)


def test_config_and_keras_file_round_trips_reproduce_outputs(tmp_path):
    backbone = tiny_backbone()
    x = inputs()
    y = to_numpy(backbone(x))
    clone = BrainformerBackbone.from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    np.testing.assert_array_equal(to_numpy(clone(x)), y)

    lm = BrainformerCausalLM(backbone)
    logits = to_numpy(lm(x))
    path = os.path.join(tmp_path, "lm.keras")
    lm.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, BrainformerCausalLM)
    np.testing.assert_array_equal(to_numpy(restored(x)), logits)


def test_causal_lm_loss_falls_and_logs_routing_statistics():
    backbone = tiny_backbone()
    lm = BrainformerCausalLM(backbone)
    lm.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=True,  # XLA on both backends: static shapes throughout
    )
    x, y = lm_data()
    history = lm.fit(x, y, batch_size=16, epochs=10, verbose=0).history
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    for name in ("moe_dropped_fraction", "moe_load_cv", "moe_router_entropy"):
        assert name in history and np.isfinite(history[name]).all()
    assert 0.0 <= history["moe_dropped_fraction"][-1] <= 1.0
    # Entropy of a 4-expert router is at most log(4).
    assert 0.0 < history["moe_router_entropy"][-1] <= np.log(4) + 1e-5
    stats = backbone.routing_statistics()
    assert len(stats) == 4
    for layer_stats in stats.values():
        assert np.isclose(sum(layer_stats["expert_load"]), 1.0, atol=1e-5)


def test_auxiliary_losses_are_added_in_training_only():
    lm = BrainformerCausalLM(tiny_backbone())
    x = inputs()
    if keras.backend.backend() == "jax":
        trainable = [v.value for v in lm.trainable_variables]
        non_trainable = [v.value for v in lm.non_trainable_variables]
        _, _, losses = lm.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        _, _, eval_losses = lm.stateless_call(
            trainable, non_trainable, x, training=False, return_losses=True
        )
    else:
        lm(x, training=True)
        losses = list(lm.losses)
        lm(x, training=False)
        eval_losses = list(lm.losses)
    # Per block: top-k layer adds load balance (0.01) and z-loss (1e-3); the
    # expert-choice layer adds nothing (its weights default to 0).
    assert len(losses) == 2 * 2
    assert all(float(to_numpy(v)) > 0 for v in losses)
    assert len(eval_losses) == 0


def test_mixed_bfloat16_training_is_finite_and_router_stays_float32():
    backbone = tiny_backbone(dtype="mixed_bfloat16")
    for moe in backbone.moe_layers:
        assert moe.router.kernel.dtype == "float32"
        assert moe.router.compute_dtype == "bfloat16"
    lm = BrainformerCausalLM(backbone)
    lm.compile(
        optimizer=keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = lm_data(n=32)
    history = lm.fit(x, y, batch_size=16, epochs=2, verbose=0).history
    assert np.isfinite(history["loss"]).all()
    hidden = inference_call(backbone)(inputs())
    assert keras.backend.standardize_dtype(hidden.dtype) == "bfloat16"


def test_padding_does_not_change_real_positions():
    backbone = tiny_backbone()
    x = inputs(batch=1)
    x["padding_mask"][:, 12:] = 0
    forward = inference_call(backbone)
    y = to_numpy(forward(x))
    x2 = {k: v.copy() for k, v in x.items()}
    x2["token_ids"][:, 12:] = (x2["token_ids"][:, 12:] + 5) % 32
    np.testing.assert_allclose(to_numpy(forward(x2))[:, :12], y[:, :12], atol=1e-6)

"""Sparse upcycling (issue 20): a dense model becomes an MoE model that keeps
every weight with a counterpart and starts exactly where the dense model was
(dropless top-k with renormalised gates), on whichever backend runs the fast
tier (CI runs it on JAX and TensorFlow)."""

import json
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_brainformer import cli
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import BrainformerCausalLMPreprocessor
from keras_brainformer.models import BrainformerTokenizer
from keras_brainformer.models.brainformer.block_spec import AttentionSpec
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.block_spec import FeedForwardSpec
from keras_brainformer.models.brainformer.block_spec import MoESpec
from keras_brainformer.utils.preset_integrity import record_checksums
from keras_brainformer.zoo.upcycling import every_nth_ffn_target
from keras_brainformer.zoo.upcycling import glam_target
from keras_brainformer.zoo.upcycling import save_upcycled_preset
from keras_brainformer.zoo.upcycling import upcycle
from tests.conftest import to_numpy

D, HIDDEN, VOCAB = 16, 32, 64
ATTENTION = AttentionSpec(num_heads=2)
FFN = FeedForwardSpec(intermediate_dim=HIDDEN, activation="gated_gelu")


def dense_backbone(num_layers=4, vocabulary_size=VOCAB):
    keras.utils.set_random_seed(0)
    return BrainformerBackbone(
        vocabulary_size=vocabulary_size,
        hidden_dim=D,
        blocks=BlockSpec([ATTENTION, FFN]),
        num_layers=num_layers,
    )


def moe(**fields):
    fields = {"num_experts": 4, "intermediate_dim": HIDDEN, "activation": "gated_gelu", **fields}
    return MoESpec(**fields)


def inputs(batch=2, length=12, vocabulary_size=VOCAB, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "token_ids": rng.integers(0, vocabulary_size, (batch, length)).astype("int32"),
        "padding_mask": np.ones((batch, length), "int32"),
    }


def logits(backbone, x, training=False):
    hidden = backbone(x, training=training)
    return to_numpy(backbone.token_embedding(hidden, reverse=True))


def test_dropless_top_k_upcycle_gives_the_dense_logits():
    dense = dense_backbone()
    target = glam_target(dense.get_config(), 4, top_k=2, capacity_factor=None)
    up = upcycle(dense, target)
    assert len(up.moe_layers) == 2 and up.count_params() > dense.count_params()
    x = inputs()
    expected = logits(dense, x)
    np.testing.assert_allclose(logits(up, x), expected, atol=2e-5, rtol=1e-5)
    # Training-mode routing is the same dropless top-k: exact too.
    np.testing.assert_allclose(logits(up, x, training=True), expected, atol=2e-5, rtol=1e-5)


def test_every_weight_with_a_counterpart_is_copied_and_experts_start_from_the_ffn():
    dense = dense_backbone()
    up = upcycle(dense, glam_target(dense.get_config(), 4))
    np.testing.assert_array_equal(
        to_numpy(up.token_embedding.embeddings), to_numpy(dense.token_embedding.embeddings)
    )
    for source_block, target_block in zip(dense.transformer_blocks, up.transformer_blocks):
        for source_norm, target_norm in zip(source_block.norms, target_block.norms):
            for s, t in zip(source_norm.weights, target_norm.weights):
                np.testing.assert_array_equal(to_numpy(s), to_numpy(t))
        attention, ffn = source_block.sublayers
        for s, t in zip(attention.weights, target_block.sublayers[0].weights):
            np.testing.assert_array_equal(to_numpy(s), to_numpy(t))
        target = target_block.sublayers[1]
        if hasattr(target, "experts"):
            for name in ("w_in", "w_gate", "w_out"):
                bank = to_numpy(getattr(target.experts, name))
                for e in range(4):
                    np.testing.assert_array_equal(bank[e], to_numpy(getattr(ffn, name)))
            router = to_numpy(target.router.kernel)
            assert 0 < np.abs(router).max() <= 2 * np.sqrt(0.1 / D) + 1e-7
        else:
            for s, t in zip(ffn.weights, target.weights):
                np.testing.assert_array_equal(to_numpy(s), to_numpy(t))


def test_router_init_zeros_and_expert_noise_are_seeded_options():
    dense = dense_backbone(num_layers=2)
    target = glam_target(dense.get_config(), 4)
    zero = upcycle(dense, target, router_init="zeros")
    assert not np.any(to_numpy(zero.moe_layers[0].router.kernel))
    a = upcycle(dense, target, expert_noise=0.01, seed=3)
    b = upcycle(dense, target, expert_noise=0.01, seed=3)
    bank_a = to_numpy(a.moe_layers[0].experts.w_in)
    np.testing.assert_array_equal(bank_a, to_numpy(b.moe_layers[0].experts.w_in))
    ffn = to_numpy(dense.transformer_blocks[0].sublayers[1].w_in)
    assert not np.allclose(bank_a[0], bank_a[1])
    np.testing.assert_allclose(bank_a, np.broadcast_to(ffn, bank_a.shape), rtol=0.1, atol=1e-6)


def test_capacity_dropping_changes_training_not_causal_inference():
    dense = dense_backbone(num_layers=2)
    up = upcycle(dense, glam_target(dense.get_config(), 4, top_k=2, capacity_factor=0.5))
    x = inputs(length=8)
    expected = logits(dense, x)
    # Inference routes causally (dropless): exact.
    np.testing.assert_allclose(logits(up, x), expected, atol=2e-5, rtol=1e-5)
    # Training routing drops tokens (capacity 0.5): not the dense model.
    assert np.abs(logits(up, x, training=True) - expected).max() > 1e-3


def test_expert_choice_compensated_zero_router_is_exact_at_causal_inference():
    dense = dense_backbone(num_layers=2)
    target = every_nth_ffn_target(
        dense.get_config(), 1, 4, router="expert_choice", capacity_factor=2.0
    )
    x = inputs()
    expected = logits(dense, x)
    exact = upcycle(dense, target, router_init="zeros")
    np.testing.assert_allclose(logits(exact, x), expected, atol=2e-5, rtol=1e-5)
    # Without the E / round(capacity_factor) scale the FFNs shrink by 2/4.
    shrunk = upcycle(dense, target, router_init="zeros", expert_choice_scale="none")
    assert np.abs(logits(shrunk, x) - expected).max() > 1e-3
    # Expert choice in training: some tokens get no expert, some several.
    assert np.abs(logits(exact, x, training=True) - expected).max() > 1e-3


def test_heterogeneous_target_blocks_and_a_repeated_block():
    dense = dense_backbone(num_layers=6)
    block = BlockSpec([ATTENTION, moe(capacity_factor=None), ATTENTION, FFN,
                       ATTENTION, moe(capacity_factor=None, top_k=3)])
    up = upcycle(dense, block)  # repeated twice over the 12 sublayers
    assert up.num_layers == 2 and len(up.moe_layers) == 4
    x = inputs()
    np.testing.assert_allclose(logits(up, x), logits(dense, x), atol=2e-5, rtol=1e-5)
    # As a list of blocks, or as JSON text.
    listed = upcycle(dense, [block.to_dict(), block.to_dict()])
    assert listed.get_config()["blocks"] == block.to_dict()
    assert upcycle(dense, block.to_json()).num_layers == 2


@pytest.mark.parametrize(
    "target,message",
    [
        (BlockSpec([ATTENTION, FFN, ATTENTION]), "does not divide"),
        ([BlockSpec([ATTENTION, FFN])] * 3, "counts must be equal"),
        (BlockSpec([ATTENTION, moe(intermediate_dim=48)]),
         "sublayer 1 \\(moe\\).*`intermediate_dim` differs"),
        (BlockSpec([ATTENTION, moe(activation="relu")]), "`activation` differs"),
        (BlockSpec([ATTENTION, FeedForwardSpec(intermediate_dim=24, activation="gated_gelu")]),
         "block_0 sublayer 1 \\(ffn\\).*`intermediate_dim`"),
        (BlockSpec([FFN, ATTENTION]), "block_0 sublayer 0 \\(ffn\\).*no counterpart"),
        (BlockSpec([AttentionSpec(num_heads=4), FFN]), "`num_heads` differs"),
        ("glam_tiny", "The target.s `vocabulary_size`=8192 differs"),
        ("not_a_preset_or_json", "Unknown target"),
    ],
)
def test_what_cannot_be_matched_is_an_error_naming_it(target, message):
    dense = dense_backbone(num_layers=2)
    with pytest.raises(ValueError, match=message):
        upcycle(dense, target)


def test_a_target_that_upcycles_nothing_is_refused():
    """An MoE source given its own layout was written as an identity copy
    whose metadata said the experts started from dense FFNs (issue 32)."""
    source = upcycle(dense_backbone(num_layers=2), BlockSpec([ATTENTION, moe(), ATTENTION, FFN]))
    same = BlockSpec([ATTENTION, moe(), ATTENTION, FFN])
    with pytest.raises(ValueError, match="none of the source's 1 dense FFN sublayers into an "
                       "MoE sublayer.*its 1 MoE sublayers would only be copied"):
        upcycle(source, same)
    with pytest.raises(ValueError, match="none of the source's 2 dense FFN"):
        upcycle(dense_backbone(num_layers=2), BlockSpec([ATTENTION, FFN]))
    all_moe = upcycle(dense_backbone(num_layers=2), BlockSpec([ATTENTION, moe()]))
    with pytest.raises(ValueError, match="no dense FFN sublayer to upcycle.*2 MoE sublayers"):
        upcycle(all_moe, BlockSpec([ATTENTION, moe()]))
    # Upcycling the remaining FFN of a partly MoE model is still upcycling.
    assert len(upcycle(source, BlockSpec([ATTENTION, moe()])).moe_layers) == 2


def test_lora_or_int8_sources_are_refused():
    dense = dense_backbone(num_layers=1)
    dense.enable_lora(2)
    with pytest.raises(ValueError, match="LoRA"):
        upcycle(dense, BlockSpec([ATTENTION, moe()]))


def language_model(num_layers=2):
    tokenizer = BrainformerTokenizer()
    backbone = dense_backbone(num_layers, vocabulary_size=tokenizer.vocabulary_size())
    preprocessor = BrainformerCausalLMPreprocessor(tokenizer, sequence_length=16)
    return BrainformerCausalLM(backbone, preprocessor=preprocessor)


def test_upcycled_preset_loads_and_takes_lora_and_int8(tmp_path):
    lm = language_model()
    target = glam_target(lm.backbone.get_config(), 4)
    up = upcycle(lm, target)
    assert up.preprocessor is lm.preprocessor
    folder = save_upcycled_preset(up, tmp_path / "up", "dense", target, {"seed": 0})
    metadata = json.loads((folder / "metadata.json").read_text())
    assert metadata["family"] == "upcycled" and "files" in metadata
    assert metadata["upcycling"]["target"][0]["sublayers"][1]["kind"] == "moe"
    loaded = BrainformerCausalLM.from_preset(str(folder))
    x = inputs(vocabulary_size=8192)
    np.testing.assert_allclose(
        to_numpy(loaded(x)), to_numpy(lm(x)), atol=2e-5, rtol=1e-5
    )
    # (`generate` from an upcycled preset: the slow CLI test.)
    loaded.backbone.enable_lora(2)
    assert to_numpy(loaded(x)).shape == (2, 12, 8192)
    quantized = BrainformerCausalLM.from_preset(str(folder))
    quantized.quantize("int8")
    assert np.isfinite(to_numpy(quantized(x))).all()
    # A second save into the now non-empty folder is refused.
    with pytest.raises(ValueError, match="not empty"):
        save_upcycled_preset(up, folder, "dense", target)


def test_cli_upcycle_writes_a_preset_and_errors_leave_nothing(tmp_path, capsys):
    lm = language_model(num_layers=2)
    source = tmp_path / "dense"
    lm.save_to_preset(str(source))
    record_checksums(source)  # else every command warns that it has none
    spec = BlockSpec([ATTENTION, moe(capacity_factor=None), ATTENTION, FFN]).to_json()
    out = tmp_path / "up"
    assert cli.main(["upcycle", "--preset", str(source), "--to", spec, "--out", str(out)]) == 0
    loaded = BrainformerCausalLM.from_preset(str(out))
    x = inputs(vocabulary_size=8192)
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(lm(x)), atol=2e-5, rtol=1e-5)
    capsys.readouterr()

    bad = BlockSpec([ATTENTION, moe(intermediate_dim=48)]).to_json()
    for args in (
        ["--to", bad, "--out", str(tmp_path / "bad")],
        ["--to", "{not json", "--out", str(tmp_path / "bad")],
        ["--to", spec, "--out", str(out)],  # exists, not empty
    ):
        code = cli.main(["upcycle", "--preset", str(source), *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == cli.EXIT_BAD_INPUT
        assert len(err) == 1 and err[0].startswith("error: "), err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad.partial").exists()
    # An MoE source with its own layout as the target: refused, not copied.
    code = cli.main(["upcycle", "--preset", str(out), "--to", spec, "--out",
                     str(tmp_path / "copy")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == cli.EXIT_BAD_INPUT and len(err) == 1, err
    assert err[0].startswith("error: The target turns none of the source's 1 dense FFN")
    assert not (tmp_path / "copy").exists()


@pytest.mark.slow
def test_cli_upcycles_the_trained_dense_preset_exactly_and_trains_it(tmp_path):
    """`dense_tiny_stdlib` -> GLaM top-2 dropless: the held-out loss is the
    dense preset's recorded one; `train --preset` and `generate` accept it."""
    from keras_brainformer.training.evaluation import heldout_loss

    spec = json.dumps(
        BlockSpec([
            AttentionSpec(num_heads=3, head_dim=20),
            MoESpec(num_experts=8, intermediate_dim=240, activation="gated_gelu",
                    capacity_factor=None),
            AttentionSpec(num_heads=3, head_dim=20),
            FeedForwardSpec(intermediate_dim=240, activation="gated_gelu"),
        ]).to_dict()
    )
    out = tmp_path / "glam_up"
    run = [sys.executable, "-m", "keras_brainformer"]
    subprocess.run(
        [*run, "upcycle", "--preset", "dense_tiny_stdlib", "--to", spec, "--out", str(out)],
        check=True,
    )
    lm = BrainformerCausalLM.from_preset(str(out))
    from tests.test_trained_presets import ROOT

    metadata = json.loads((ROOT / "presets/dense_tiny_stdlib/metadata.json").read_text())
    text = (ROOT / metadata["heldout"]["file"]).read_text(encoding="utf-8")
    loss = heldout_loss(lm, text, 128, 32)
    assert loss == pytest.approx(metadata["heldout"]["loss_causal"], abs=1e-4)
    subprocess.run(
        [*run, "train", "--preset", str(out), "--steps", "2", "--steps-per-epoch", "2",
         "--max-corpus-bytes", "200000", "--out", str(tmp_path / "run")],
        check=True,
    )
    subprocess.run([*run, "generate", "--preset", str(out), "def "], check=True)

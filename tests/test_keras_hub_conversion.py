"""keras-hub's Mixtral / Qwen-MoE / Qwen3-MoE backbones converted to
Brainformer backbones: the same logits, the same greedy generations, after
saving too; what cannot be converted exactly is refused by name. Random tiny
configs, nothing downloaded."""

import json
import pathlib

import keras
import keras_hub
import numpy as np
import pytest
from conftest import inference_call
from conftest import to_numpy

import keras_brainformer
from keras_brainformer import cli
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.zoo.keras_hub_conversion import backbone_from_keras_hub
from keras_brainformer.zoo.keras_hub_conversion import brainformer_config_from_keras_hub
from keras_brainformer.zoo.keras_hub_conversion import causal_lm_from_keras_hub

VOCAB = 64

CONFIGS = {
    "mixtral": (
        keras_hub.models.MixtralBackbone,
        keras_hub.models.MixtralCausalLM,
        dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
             hidden_dim=16, intermediate_dim=24, num_experts=4, top_k=2, sliding_window=5,
             rope_max_wavelength=500, rope_scaling_factor=2.0, layer_norm_epsilon=1e-5),
    ),
    "qwen_moe": (
        keras_hub.models.QwenMoeBackbone,
        keras_hub.models.QwenMoeCausalLM,
        dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=2,
             hidden_dim=16, intermediate_dim=20, moe_intermediate_dim=12,
             shared_expert_intermediate_dim=18, num_experts=4, top_k=2, norm_top_k_prob=False,
             use_sliding_window_attention=True, sliding_window_size=5,
             layer_norm_epsilon=1e-5),
    ),
    "qwen3_moe": (
        keras_hub.models.Qwen3MoeBackbone,
        keras_hub.models.Qwen3MoeCausalLM,
        dict(vocabulary_size=VOCAB, num_layers=3, num_query_heads=4, num_key_value_heads=2,
             hidden_dim=16, intermediate_dim=20, moe_intermediate_dim=12, num_experts=4,
             head_dim=6, top_k=2, norm_top_k_prob=True, mlp_only_layers=[1],
             # keras-hub applies Qwen3-MoE's window on TensorFlow only (its
             # JAX path drops it, keras_hub_conversion's docstring): None
             # keeps both backends comparable.
             sliding_window_size=None),
    ),
    "qwen3_moe_tied_mqa_no_renorm": (
        keras_hub.models.Qwen3MoeBackbone,
        keras_hub.models.Qwen3MoeCausalLM,
        dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=1,
             hidden_dim=16, intermediate_dim=20, moe_intermediate_dim=12, num_experts=8,
             top_k=3, norm_top_k_prob=False, tie_word_embeddings=True),
    ),
}


def keras_hub_backbone(name, seed=0, **overrides):
    """A keras-hub backbone with random weights of a useful scale (routing
    far from ties, attention not uniform)."""
    keras.utils.set_random_seed(seed)
    cls, _, kwargs = CONFIGS[name]
    backbone = cls(**{**kwargs, **overrides})
    rng = np.random.default_rng(seed)
    for variable in backbone.weights:
        scale = 1.0 if "embeddings" in variable.path else 0.3
        value = rng.normal(scale=scale, size=tuple(variable.shape))
        if variable.path.endswith("scale"):
            value = 1.0 + 0.2 * value
        variable.assign(value.astype("float32"))
    return backbone


def batch(seed=1):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(2, 9)).astype("int32")
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return {"token_ids": ids, "padding_mask": mask}


def logits(backbone, x):
    hidden = inference_call(backbone)(x)
    return to_numpy(backbone.token_embedding(hidden, reverse=True))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_backbone_computes_keras_hubs_logits(name, tmp_path):
    source = keras_hub_backbone(name)
    converted = backbone_from_keras_hub(source)
    x = batch()
    expected = logits(source, x)
    real = x["padding_mask"].astype(bool)
    got = logits(converted, x)
    np.testing.assert_allclose(got[real], expected[real], rtol=1e-4, atol=1e-4)
    # Saved and reloaded, still the same.
    path = str(tmp_path / "converted.keras")
    converted.save(path)
    restored = keras.saving.load_model(path)
    np.testing.assert_array_equal(logits(restored, x), got)


@pytest.mark.parametrize(
    "name",
    # One family in the fast tier; generation compiles two decoding loops.
    ["mixtral", pytest.param("qwen_moe", marks=pytest.mark.slow),
     pytest.param("qwen3_moe", marks=pytest.mark.slow)],
)
def test_greedy_generation_is_token_for_token_keras_hubs(name):
    # keras-hub 0.32's Qwen-MoE cannot generate with its sliding window on
    # JAX (a Python `if` on the traced cache index).
    overrides = {"use_sliding_window_attention": False} if name == "qwen_moe" else {}
    source = keras_hub_backbone(name, **overrides)
    _, task_cls, _ = CONFIGS[name]
    theirs = task_cls(backbone=source, preprocessor=None)
    ours = BrainformerCausalLM(backbone_from_keras_hub(source))
    prompt = {
        "token_ids": np.array([[5, 9, 2, 0, 0, 0, 0, 0, 0, 0], [7, 1, 3, 8, 0, 0, 0, 0, 0, 0]],
                              "int32"),
        "padding_mask": np.array([[1, 1, 1] + [0] * 7, [1, 1, 1, 1] + [0] * 6], "int32"),
    }
    for lm in (theirs, ours):
        lm.compile(sampler="greedy")
    expected = to_numpy(theirs.generate(prompt, stop_token_ids=None)["token_ids"])
    got = to_numpy(ours.generate(prompt, stop_token_ids=None)["token_ids"])
    np.testing.assert_array_equal(got, expected)


def test_the_spec_follows_keras_hubs_layer_rules():
    _, _, kwargs = CONFIGS["qwen3_moe"]
    config = brainformer_config_from_keras_hub(kwargs, "qwen3_moe")
    kinds = [[s.kind for s in spec.sublayers] for spec in config["blocks"]]
    assert kinds == [["attention", "moe"], ["attention", "ffn"], ["attention", "moe"]]
    attention, moe = config["blocks"][0].sublayers
    assert (attention.num_key_value_heads, attention.head_dim, attention.qk_norm) == (2, 6, True)
    assert attention.sliding_window is None and not attention.qkv_bias
    windowed = brainformer_config_from_keras_hub(dict(kwargs, sliding_window_size=6), "qwen3_moe")
    assert windowed["blocks"][0].sublayers[0].sliding_window == 6
    assert (moe.top_k, moe.capacity_factor, moe.normalize_gates) == (2, None, True)
    assert moe.activation == "gated_silu"
    qwen = brainformer_config_from_keras_hub(
        dict(CONFIGS["qwen_moe"][2], decoder_sparse_step=2), "qwen_moe")
    # keras-hub 0.32's QwenMoeBackbone applies the step to index 0 for every
    # layer: with decoder_sparse_step=2 all layers are dense.
    assert qwen["num_layers"] == 2 and qwen["blocks"].sublayers[1].kind == "ffn"
    qwen = brainformer_config_from_keras_hub(CONFIGS["qwen_moe"][2], "qwen_moe")
    attention, moe = qwen["blocks"].sublayers
    assert attention.qkv_bias and attention.sliding_window == 5 and not attention.qk_norm
    assert moe.shared_expert_intermediate_dim == 18 and moe.normalize_gates is False
    mixtral = brainformer_config_from_keras_hub(CONFIGS["mixtral"][2], "mixtral")
    assert mixtral["num_layers"] == 2 and mixtral["rope_scaling_factor"] == 2.0
    assert mixtral["layer_norm_epsilon"] == 1e-5 and mixtral["tie_embeddings"] is False


def test_what_cannot_be_converted_exactly_is_refused_by_name():
    _, _, kwargs = CONFIGS["mixtral"]
    with pytest.raises(ValueError, match="dropout"):
        brainformer_config_from_keras_hub(dict(kwargs, dropout=0.1), "mixtral")
    with pytest.raises(ValueError, match="router_jitter_noise"):
        brainformer_config_from_keras_hub(dict(kwargs, router_jitter_noise=0.01), "mixtral")
    with pytest.raises(ValueError, match="rope_max_wavelength"):
        brainformer_config_from_keras_hub(dict(kwargs, rope_max_wavelength=1e4 + 0.5), "mixtral")
    with pytest.raises(ValueError, match="family"):
        brainformer_config_from_keras_hub(kwargs, "llama")
    with pytest.raises(TypeError, match="MixtralBackbone"):
        backbone_from_keras_hub(BrainformerBackbone.from_preset("dense_tiny"))
    # A model with weights the mapping does not know (here LoRA adapters).
    source = keras_hub_backbone("mixtral")
    source.enable_lora(2)
    with pytest.raises(ValueError, match="lora"):
        backbone_from_keras_hub(source)


SPM = str(pathlib.Path(keras_brainformer.__file__).parent / "assets" / "brainformer_stdlib_8k.spm")


def mixtral_task():
    """A keras-hub MixtralCausalLM with a real tokenizer (the shipped 8K
    SentencePiece model) and random weights."""
    tokenizer = keras_hub.models.MixtralTokenizer(proto=SPM)
    preprocessor = keras_hub.models.MixtralCausalLMPreprocessor(tokenizer, sequence_length=12)
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.MixtralBackbone(
        **dict(CONFIGS["mixtral"][2], vocabulary_size=tokenizer.vocabulary_size())
    )
    rng = np.random.default_rng(0)
    for variable in backbone.weights:
        value = rng.normal(scale=0.3, size=tuple(variable.shape))
        if variable.path.endswith("scale"):
            value = 1.0 + 0.2 * value
        variable.assign(value.astype("float32"))
    return keras_hub.models.MixtralCausalLM(backbone=backbone, preprocessor=preprocessor)


def test_causal_lm_from_keras_hub_keeps_the_tokenizer_and_generates_the_same_text():
    theirs = mixtral_task()
    ours = causal_lm_from_keras_hub(theirs)
    assert ours.preprocessor is theirs.preprocessor
    for lm in (theirs, ours):
        lm.compile(sampler="greedy")
    prompts = ["def f(x):", "import os"]
    expected = theirs.generate(prompts, max_length=12, stop_token_ids=None)
    assert ours.generate(prompts, max_length=12, stop_token_ids=None) == expected


@pytest.mark.slow  # end to end: save, convert, load, generate, twice
def test_convert_command_writes_a_checked_preset_that_generates_the_same_text(tmp_path, capsys):
    theirs = mixtral_task()
    source = tmp_path / "keras_hub_mixtral"
    theirs.save_to_preset(str(source))
    out = tmp_path / "converted"
    assert cli.main(["convert", "--preset", source, "--out", out]) == 0
    assert "MixtralBackbone" in capsys.readouterr().out
    with open(out / "metadata.json") as f:
        metadata = json.load(f)
    assert metadata["family"] == "keras_hub_conversion" and "config.json" in metadata["files"]
    ours = BrainformerCausalLM.from_preset(str(out))
    for lm in (theirs, ours):
        lm.compile(sampler="greedy")
    assert ours.generate("def f(x):", max_length=12, stop_token_ids=None) == theirs.generate(
        "def f(x):", max_length=12, stop_token_ids=None
    )
    # A second run into the same folder is refused; --overwrite replaces it.
    assert cli.main(["convert", "--preset", source, "--out", out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["convert", "--preset", source, "--out", out, "--overwrite"]) == 0


def test_convert_command_refuses_what_it_cannot_load_in_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["convert", "--preset", tmp_path / "missing", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "missing" in err[0]
    assert not out.exists()
    # A keras-hub preset of another family: refused by class, nothing written.
    dense = tmp_path / "dense"
    BrainformerBackbone.from_preset("dense_tiny").save_to_preset(str(dense))
    assert cli.main(["convert", "--preset", dense, "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MixtralBackbone" in err[0]
    assert not out.exists() and not (tmp_path / "out.partial").exists()

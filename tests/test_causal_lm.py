"""BrainformerCausalLM: cached generation, samplers, inference routing modes."""

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

VOCAB, D, L = 64, 16, 12

SPECS = {
    "expert_choice": BlockSpec(
        [
            AttentionSpec(num_heads=2),
            MoESpec(4, 24, router="expert_choice", capacity_factor=1.0),
            AttentionSpec(num_heads=2, depthwise_conv_kernel=3),
            MoESpec(4, 24, router="expert_choice", capacity_factor=2.0, activation="gated_gelu"),
        ]
    ),
    "top2_dropping": BlockSpec(
        [
            AttentionSpec(num_heads=2),
            MoESpec(4, 24, top_k=2, capacity_factor=0.5),
            FeedForwardSpec(24, activation="squared_relu"),
        ]
    ),
    "dense": BlockSpec([AttentionSpec(num_heads=4), FeedForwardSpec(32)]),
}


def make_lm(kind, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = BrainformerBackbone(
        vocabulary_size=VOCAB, hidden_dim=D, blocks=SPECS[kind], num_layers=2
    )
    # Larger weights than the default init so that greedy choices are far
    # from ties and routing spreads over experts.
    for w in backbone.token_embedding.weights:
        w.assign(to_numpy(w) * 25.0)
    return BrainformerCausalLM(backbone)


def prompt_batch(lengths, total=L, seed=1):
    rng = np.random.default_rng(seed)
    token_ids = np.zeros((len(lengths), total), "int32")
    mask = np.zeros((len(lengths), total), "int32")
    for row, n in enumerate(lengths):
        token_ids[row, :n] = rng.integers(1, VOCAB, n)
        mask[row, :n] = 1
    return {"token_ids": token_ids, "padding_mask": mask}


def uncached_greedy(lm, prompt):
    """Greedy decoding by full forward passes, one new token at a time."""
    token_ids = prompt["token_ids"].copy()
    mask = prompt["padding_mask"].astype(bool)
    lengths = mask.sum(1)
    forward = inference_call(lm)
    for index in range(lengths.min(), token_ids.shape[1]):
        logits = to_numpy(
            forward({"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)})
        )
        best = logits[:, index - 1].argmax(-1)
        token_ids[:, index] = np.where(mask[:, index], token_ids[:, index], best)
    return token_ids


@pytest.mark.parametrize("kind", list(SPECS))
def test_cached_greedy_generation_equals_uncached_decoding(kind):
    lm = make_lm(kind)
    lm.compile(sampler="greedy")
    prompt = prompt_batch([3, 5, 3])
    expected = uncached_greedy(lm, prompt)
    out = lm.generate(prompt, stop_token_ids=None)
    np.testing.assert_array_equal(to_numpy(out["token_ids"]), expected)
    # The prompt is kept and everything after it was generated.
    np.testing.assert_array_equal(to_numpy(out["token_ids"])[0, :3], prompt["token_ids"][0, :3])
    assert to_numpy(out["padding_mask"]).all()


def test_prefill_logits_equal_full_pass_logits():
    lm = make_lm("expert_choice")
    prompt = prompt_batch([L, L])
    full = to_numpy(lm(prompt))
    _, cache = lm._build_cache(prompt["token_ids"])
    logits, _, _ = lm.call_with_cache(prompt["token_ids"], cache, 0)
    np.testing.assert_allclose(to_numpy(logits), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "sampler",
    [
        "greedy",
        "top_k",
        "top_p",
        "random",
        "beam",
        "contrastive",
    ],
)
def test_every_keras_hub_sampler_generates(sampler):
    lm = make_lm("expert_choice")
    lm.compile(sampler=sampler)
    prompt = prompt_batch([4, 2])
    out = to_numpy(lm.generate(prompt, stop_token_ids=None)["token_ids"])
    assert out.shape == (2, L)
    assert ((out >= 0) & (out < VOCAB)).all()
    np.testing.assert_array_equal(out[0, :4], prompt["token_ids"][0, :4])


def test_stop_token_masks_what_follows():
    lm = make_lm("dense")
    lm.compile(sampler="greedy")
    prompt = prompt_batch([3])
    free = to_numpy(lm.generate(prompt, stop_token_ids=None)["token_ids"])
    stop = int(free[0, 4])  # the second generated token
    out = lm.generate(prompt, stop_token_ids=(stop,))
    mask = to_numpy(out["padding_mask"])[0].astype(bool)
    first = 3 + int(np.argmax(free[0, 3:] == stop))
    assert mask[: first + 1].all() and not mask[first + 1 :].any()


def test_generation_routes_causally_even_when_evaluation_does_not():
    lm = make_lm("expert_choice")
    lm.compile(sampler="greedy")
    prompt = prompt_batch([3, 4])
    causal = to_numpy(lm.generate(prompt, stop_token_ids=None)["token_ids"])
    lm.set_inference_routing("as_trained")
    assert lm.backbone.inference_routing == "as_trained"
    again = lm.generate(prompt, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(to_numpy(again), causal)
    lm.set_inference_routing("causal")


def test_evaluate_routing_modes_reports_the_gap():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (4, L + 1)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((4, L), "int32")}
    y = tokens[:, 1:]
    results = {}
    for kind in ("expert_choice", "dense"):
        lm = make_lm(kind)
        lm.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        results[kind] = lm.evaluate_routing_modes(x, y, verbose=0, return_dict=True)
        assert lm.backbone.inference_routing in ("causal", None)  # restored
    ec = results["expert_choice"]
    assert abs(ec["causal"]["loss"] - ec["as_trained"]["loss"]) > 1e-4
    dense = results["dense"]
    assert dense["causal"]["loss"] == pytest.approx(dense["as_trained"]["loss"])


def test_inference_routing_rejects_unknown_modes():
    lm = make_lm("dense")
    with pytest.raises(ValueError, match="inference_routing"):
        lm.set_inference_routing("future")

"""keras-hub's own test contract, applied the way keras-hub tests its families.

Every public model class, tokenizer, preprocessor and layer runs the
`keras_hub.src.tests.test_case.TestCase.run_*_test` that applies to it:
serialization round trips, symbolic/eager/compiled calls, `fit` on arrays and
datasets, split preprocessing, variable sequence lengths, the mixed and pure
low-precision policies (`mixed_float16`, `mixed_bfloat16`, `bfloat16`),
saving to `.keras`, presets by name. The harness is keras-hub's test module
(not a public API), so `test_harness_is_available` fails loudly if it moves.

Not applied: `run_quantization_test`, which only quantizes layers whose exact
type is Keras' `Dense`/`EinsumDense`/`Embedding`/`ReversibleEmbedding`; none of
this project's layers is one of those, so it would pass without testing
anything. The project's own int8 tests (`test_lora_quantization.py`) cover
quantization of every layer, expert banks included.
"""

import keras
import numpy as np
import pytest
from keras_hub.src.tests.test_case import TestCase

from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.layers import ExpertBank
from keras_brainformer.layers import ExpertChoiceRouter
from keras_brainformer.layers import FeedForward
from keras_brainformer.layers import MoEFeedForward
from keras_brainformer.layers import RoutingInstructions
from keras_brainformer.layers import SlotRoutingInstructions
from keras_brainformer.layers import TopKRouter
from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerBlock
from keras_brainformer.models import BrainformerByteTokenizer
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import BrainformerCausalLMPreprocessor
from keras_brainformer.models import BrainformerTextClassifier
from keras_brainformer.models import BrainformerTextClassifierPreprocessor
from keras_brainformer.models import BrainformerTokenizer
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec

D = 16
# Backend tensors, as keras-hub's layer tests use (Keras derives a layer's
# output spec from the shapes of tensor arguments, not of NumPy arrays).
TOKENS = keras.ops.convert_to_tensor(
    np.random.default_rng(0).normal(size=(2, 8, D)).astype("float32")
)
BLOCK = BlockSpec(
    [
        AttentionSpec(num_heads=2),
        MoESpec(num_experts=4, intermediate_dim=32, router="expert_choice", capacity_factor=1.0),
        FeedForwardSpec(intermediate_dim=32, activation="gated_gelu"),
        MoESpec(num_experts=4, intermediate_dim=32, router="top_k", top_k=2, capacity_factor=1.25),
    ]
)
# Backbones and tasks use a two-sublayer block (compile time dominates the
# harness's many builds); every sublayer kind is in `BLOCK` above.
SMALL_BLOCK = BlockSpec(
    [
        AttentionSpec(num_heads=2),
        MoESpec(num_experts=4, intermediate_dim=32, router="expert_choice", capacity_factor=1.0),
    ]
)
TEXTS = ["def f(x):\n    return x", "the quick brown fox"]


def test_harness_is_available():
    """The adapter point: keras-hub's test harness lives in a private module;
    if it moves or loses a method this suite relies on, fail here, by name."""
    for method in (
        "run_layer_test",
        "run_backbone_test",
        "run_task_test",
        "run_preprocessor_test",
        "run_preprocessing_layer_test",
        "run_preset_test",
        "run_model_saving_test",
        "run_precision_test",
        "run_serialization_test",
    ):
        assert callable(getattr(TestCase, method, None)), method


def _backbone_kwargs(vocabulary_size=64):
    return {
        "vocabulary_size": vocabulary_size,
        "hidden_dim": D,
        "blocks": SMALL_BLOCK,
        "num_layers": 1,
        "max_sequence_length": 32,
    }


class LayerContractTest(TestCase):
    def test_moe_feed_forward(self):
        for router, router_options in (
            ("top_k", {"top_k": 2, "capacity_factor": 1.25}),
            ("top_k", {"top_k": 2, "capacity_factor": None}),
            ("expert_choice", {"capacity_factor": 1.0}),
        ):
            self.run_layer_test(
                cls=MoEFeedForward,
                init_kwargs={
                    "num_experts": 4,
                    "intermediate_dim": 32,
                    "router": router,
                    **router_options,
                },
                input_data=TOKENS,
                expected_output_shape=(2, 8, D),
                # Expert bank w_in/w_out and the router kernel.
                expected_num_trainable_weights=3,
                # The router's four statistics.
                expected_num_non_trainable_weights=4,
                expected_num_non_trainable_variables=4,
            )

    def test_brainformer_block(self):
        self.run_layer_test(
            cls=BrainformerBlock,
            init_kwargs={"spec": BLOCK},
            input_data=TOKENS,
            expected_output_shape=(2, 8, D),
            # attention q,k,v,o (4) + 4 norms + 2 MoE x 3 + gated FFN 3.
            expected_num_trainable_weights=17,
            expected_num_non_trainable_weights=8,
            expected_num_non_trainable_variables=8,
        )

    def test_feed_forward(self):
        self.run_layer_test(
            cls=FeedForward,
            init_kwargs={"intermediate_dim": 32, "activation": "gated_gelu"},
            input_data=TOKENS,
            expected_output_shape=(2, 8, D),
            expected_num_trainable_weights=3,
        )

    def test_causal_self_attention(self):
        plain, primer = {"num_heads": 2}, {"num_heads": 2, "depthwise_conv_kernel": 3}
        for kwargs, weights in ((plain, 4), (primer, 7)):
            self.run_layer_test(
                cls=CausalSelfAttention,
                init_kwargs=kwargs,
                input_data=TOKENS,
                expected_output_shape=(2, 8, D),
                expected_num_trainable_weights=weights,
            )

    def test_expert_bank(self):
        self.run_layer_test(
            cls=ExpertBank,
            init_kwargs={"num_experts": 4, "intermediate_dim": 32},
            input_data=keras.ops.ones((4, 2, 3, D)),  # [E, G, C, d]
            expected_output_shape=(4, 2, 3, D),
            expected_num_trainable_weights=2,
        )

    def _run_router_test(self, cls, init_kwargs, capacity, token_choice):
        G, S = TOKENS.shape[:2]
        E = init_kwargs["num_experts"]
        k = init_kwargs.get("top_k", 1)
        if token_choice:
            expected = RoutingInstructions(
                *[(G, E, capacity)] * 2, *[(G, S, k)] * 4
            )
        else:
            expected = SlotRoutingInstructions(*[(G, E, capacity)] * 2)
        self.run_layer_test(
            cls=cls,
            init_kwargs=init_kwargs,
            input_data=TOKENS,
            expected_output_shape=expected,
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=4,
            expected_num_non_trainable_variables=4,
            # Routing decisions (int32 slots, float32 gates) are not a
            # regression target; the router's variables' precision is
            # checked inside `test_moe_feed_forward`'s policies, and outputs
            # stay float32 by design (see `RoutingInstructions`).
            run_training_check=False,
            run_precision_checks=False,
        )

    def test_top_k_router(self):
        # ceil(2 * 8 * 1.25 / 4) = 5 slots per expert.
        self._run_router_test(
            TopKRouter,
            {"num_experts": 4, "top_k": 2, "capacity_factor": 1.25,
             "inference_routing": "as_trained"},
            5,
            True,
        )
        # The causal inference routing is dropless: C = S = 8.
        self._run_router_test(TopKRouter, {"num_experts": 4, "top_k": 2}, 8, True)

    def test_expert_choice_router(self):
        # ceil(8 * 2.0 / 4) = 4 slots per expert.
        self._run_router_test(
            ExpertChoiceRouter,
            {"num_experts": 4, "capacity_factor": 2.0, "inference_routing": "as_trained"},
            4,
            False,
        )

    def test_router_variables_follow_a_pure_low_precision_policy(self):
        for policy in ("bfloat16", "float16"):
            moe = MoEFeedForward(num_experts=4, intermediate_dim=32, dtype=policy)
            out = moe(TOKENS)
            self.assertDTypeEqual(out, policy)
            for weight in moe.weights:
                self.assertDTypeEqual(weight, policy)
            routing = moe.router(keras.ops.reshape(keras.ops.cast(TOKENS, policy), (2, 8, D)))
            # Gates are computed and returned in float32 whatever the policy.
            self.assertDTypeEqual(routing.slot_gate, "float32")
            self.assertDTypeEqual(routing.token_gate, "float32")
        # Mixed policy: float32 variables, bfloat16 outputs.
        moe = MoEFeedForward(num_experts=4, intermediate_dim=32, dtype="mixed_bfloat16")
        self.assertDTypeEqual(moe(TOKENS), "bfloat16")
        for weight in moe.weights:
            self.assertDTypeEqual(weight, "float32")


class BackboneContractTest(TestCase):
    def setUp(self):
        self.init_kwargs = _backbone_kwargs()
        self.input_data = {
            "token_ids": np.array([[5, 9, 3, 7, 1, 2, 0, 0]] * 2, "int32"),
            "padding_mask": np.array([[1] * 6 + [0] * 2] * 2, "int32"),
        }

    def test_backbone_basics(self):
        self.run_backbone_test(
            cls=BrainformerBackbone,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
            expected_output_shape=(2, 8, D),
            # See the module docstring: nothing of ours is a Keras Dense/Embedding.
            run_quantization_check=False,
        )

    @pytest.mark.slow
    def test_saved_model(self):
        self.run_model_saving_test(
            cls=BrainformerBackbone,
            init_kwargs=self.init_kwargs,
            input_data=self.input_data,
        )


class CausalLMContractTest(TestCase):
    def setUp(self):
        self.tokenizer = BrainformerTokenizer()
        self.preprocessor = BrainformerCausalLMPreprocessor(self.tokenizer, sequence_length=8)
        self.backbone = BrainformerBackbone(
            **_backbone_kwargs(self.tokenizer.vocabulary_size())
        )
        self.init_kwargs = {"preprocessor": self.preprocessor, "backbone": self.backbone}
        self.train_data = (np.array(TEXTS),)

    def test_causal_lm_basics(self):
        self.run_task_test(
            cls=BrainformerCausalLM,
            init_kwargs=self.init_kwargs,
            train_data=self.train_data,
            expected_output_shape=(2, 8, self.tokenizer.vocabulary_size()),
        )

    @pytest.mark.slow
    def test_saved_model(self):
        self.run_model_saving_test(
            cls=BrainformerCausalLM,
            init_kwargs=self.init_kwargs,
            input_data=self.preprocessor(*self.train_data)[0],
        )

    def test_preprocessor_basics(self):
        self.init_kwargs = {"tokenizer": self.tokenizer, "sequence_length": 8}
        self.run_preprocessor_test(
            cls=BrainformerCausalLMPreprocessor,
            init_kwargs=self.init_kwargs,
            input_data=np.array(TEXTS),
        )


class TextClassifierContractTest(TestCase):
    def setUp(self):
        self.tokenizer = BrainformerTokenizer()
        self.preprocessor = BrainformerTextClassifierPreprocessor(
            self.tokenizer, sequence_length=8
        )
        self.backbone = BrainformerBackbone(
            **_backbone_kwargs(self.tokenizer.vocabulary_size())
        )
        self.init_kwargs = {
            "preprocessor": self.preprocessor,
            "backbone": self.backbone,
            "num_classes": 3,
        }
        self.train_data = (np.array(TEXTS), np.array([0, 2]))

    def test_classifier_basics(self):
        self.run_task_test(
            cls=BrainformerTextClassifier,
            init_kwargs=self.init_kwargs,
            train_data=self.train_data,
            expected_output_shape=(2, 3),
        )

    def test_preprocessor_basics(self):
        self.init_kwargs = {"tokenizer": self.tokenizer, "sequence_length": 8}
        self.run_preprocessor_test(
            cls=BrainformerTextClassifierPreprocessor,
            init_kwargs=self.init_kwargs,
            input_data=self.train_data,
        )


class TokenizerContractTest(TestCase):
    def test_sentencepiece_tokenizer(self):
        self.run_preprocessing_layer_test(
            cls=BrainformerTokenizer,
            init_kwargs={},
            input_data=TEXTS,
        )

    def test_byte_tokenizer(self):
        self.run_preprocessing_layer_test(
            cls=BrainformerByteTokenizer,
            init_kwargs={},
            input_data=TEXTS,
        )


class PresetContractTest(TestCase):
    def test_architecture_preset(self):
        self.run_preset_test(
            cls=BrainformerBackbone,
            preset="glam_tiny",
            input_data={
                "token_ids": np.array([[5, 9, 3, 7]], "int32"),
                "padding_mask": np.ones((1, 4), "int32"),
            },
            expected_output_shape=(1, 4, 70),  # glam_tiny's hidden_dim
        )

    def test_trained_preset(self):
        self.run_preset_test(
            cls=BrainformerCausalLM,
            preset="brainformer1_tiny_stdlib",
            input_data={
                "token_ids": np.array([[5, 9, 3, 7]], "int32"),
                "padding_mask": np.ones((1, 4), "int32"),
            },
            expected_output_shape=(1, 4, 8192),
        )

    def test_tokenizer_preset(self):
        self.run_preset_test(
            cls=BrainformerTokenizer,
            preset="brainformer1_tiny_stdlib",
            input_data=["def f(x):"],
        )

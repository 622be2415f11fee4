"""Every weight draws its own initial values (an unseeded Keras initializer
object reused for two same-shaped weights would give them equal values)."""

import numpy as np
from conftest import to_numpy

from keras_brainformer.layers import CausalSelfAttention
from keras_brainformer.layers import FeedForward
from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec


def _distinct(*weights):
    arrays = [to_numpy(w).ravel() for w in weights]
    for i in range(len(arrays)):
        for j in range(i + 1, len(arrays)):
            n = min(arrays[i].size, arrays[j].size)
            assert not np.array_equal(arrays[i][:n], arrays[j][:n]), (i, j)


def test_attention_projections_differ():
    attn = CausalSelfAttention(num_heads=2)
    attn.build((None, None, 8))
    _distinct(attn.w_query, attn.w_key, attn.w_value, attn.w_output)


def test_gated_ffn_weights_differ():
    ffn = FeedForward(16, activation="swiglu")
    ffn.build((None, None, 8))
    _distinct(ffn.w_in, ffn.w_gate, ffn.w_out)


def test_same_shaped_sublayers_of_a_block_differ_and_untied_output_embedding():
    spec = BlockSpec(
        [
            AttentionSpec(num_heads=2),
            MoESpec(4, 16, activation="gated_gelu"),
            FeedForwardSpec(16),
            AttentionSpec(num_heads=2),
            MoESpec(4, 16, activation="gated_gelu"),
            FeedForwardSpec(16),
        ]
    )
    backbone = BrainformerBackbone(
        vocabulary_size=32, hidden_dim=8, blocks=spec, num_blocks=2, tie_embeddings=False
    )
    sub = [b.sublayers for b in backbone.transformer_blocks]
    _distinct(sub[0][0].w_query, sub[0][3].w_query, sub[1][0].w_query)
    _distinct(sub[0][1].experts.w_in, sub[0][1].experts.w_gate, sub[0][4].experts.w_in)
    _distinct(sub[0][1].router.kernel, sub[0][4].router.kernel)
    _distinct(sub[0][2].w_in, sub[0][5].w_in)
    embedding = backbone.token_embedding
    _distinct(embedding.embeddings, embedding.reverse_embeddings)

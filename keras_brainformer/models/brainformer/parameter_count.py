"""Parameter counts computed from a config alone, without allocating weights.

Convention (documented in docs/): the token embedding is counted once when tied
(twice when untied) and is part of both the total and the activated count;
norms (one per sublayer plus the final one) are counted; attention is
`4 · d · heads · head_dim` (Q, K, V, O; rotary positions have no weights),
plus `3 · kernel · heads · head_dim` with Primer's depthwise convolution
(`depthwise_conv_kernel=kernel > 0`, one bias-free filter per Q/K/V channel); a
dense FFN is `2 · d · h`, or `3 · d · h` with a gated activation; an MoE layer
is its router `d · E` plus `E` experts of the FFN size. *Activated* counts the
router and the experts one token uses on average: `k` for top-k routing, the
capacity factor for expert choice.
"""

from keras_brainformer.layers.activations import is_gated
from keras_brainformer.models.brainformer.brainformer_backbone import resolve_block_specs


def _ffn_params(d, hidden_dim, activation):
    return (3 if is_gated(activation) else 2) * d * hidden_dim


def sublayer_parameters(sub, d):
    """`(total, activated)` parameters of one sublayer, norm excluded."""
    if sub.kind == "attention":
        head_dim = sub.head_dim or d // sub.num_heads
        n = 4 * d * sub.num_heads * head_dim
        n += 3 * sub.depthwise_conv_kernel * sub.num_heads * head_dim
        return n, n
    if sub.kind == "ffn":
        n = _ffn_params(d, sub.hidden_dim, sub.activation)
        return n, n
    expert = _ffn_params(d, sub.hidden_dim, sub.activation)
    router = d * sub.num_experts
    total = router + sub.num_experts * expert
    activated = router + sub.experts_per_token * expert
    return total, activated


def count_parameters(config):
    """Total and activated-per-token parameters of a `BrainformerBackbone`.

    Args:
        config: the backbone's config dict (`backbone.get_config()`, a preset's
            `config.json` `"config"` entry) or the constructor kwargs.

    Returns:
        dict with `total`, `activated`, `embedding` and `non_embedding_total`
        (ints; `activated` may be fractional for expert choice with a
        fractional capacity factor and is rounded).

    Example:
    >>> from keras_brainformer.models import dense_transformer_layer
    >>> counts = count_parameters({"vocabulary_size": 100, "hidden_dim": 8,
    ...     "blocks": dense_transformer_layer(2, 16).to_dict(), "num_blocks": 2})
    >>> counts["total"]  # 100*8 + 8 + 2 * (4*8*8 + 2*8*16 + 2*8)
    1864
    """
    d = config["hidden_dim"]
    specs = resolve_block_specs(config["blocks"], config.get("num_blocks"))
    norm_size = d if config.get("norm", "rms") == "rms" else 2 * d
    tied = config.get("tie_embeddings", True)
    embedding = config["vocabulary_size"] * d * (1 if tied else 2)
    total = activated = embedding + norm_size  # final norm
    for spec in specs:
        for sub in spec.sublayers:
            t, a = sublayer_parameters(sub, d)
            total += t + norm_size
            activated += a + norm_size
    return {
        "total": int(total),
        "activated": int(round(activated)),
        "embedding": int(embedding),
        "non_embedding_total": int(total - embedding),
    }

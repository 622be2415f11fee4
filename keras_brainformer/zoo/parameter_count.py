"""Parameter counts computed from a config alone, without allocating weights.

Convention (documented in docs/): the token embedding is counted once when tied
(twice when untied) and is part of both the total and the activated count;
norms (one per sublayer plus the final one) are counted; attention is
`4 · d · heads · head_dim` (Q, K, V, O; rotary positions have no weights),
plus `3 · kernel · heads · head_dim` with Primer's depthwise convolution
(`depthwise_conv_kernel=kernel > 0`, one bias-free filter per Q/K/V channel); a
dense FFN is `2 · d · h`, or `3 · d · h` with a gated activation; an MoE layer
is its router `d · E` plus `E` experts of the FFN size, plus, with a shared
expert (Qwen-MoE), that dense FFN and its gate `d`. *Activated* counts the
router, the shared expert and its gate (every token uses them) and the experts
one token uses on average: `k` for top-k routing, the capacity factor for
expert choice.

The counts are sums over `weight_specs` (the family's one analytic weight
model, checked against built backbones): trainable weights only, so the
routers' statistics are not parameters.
"""

from keras_brainformer.models.brainformer.block_spec import config_block_specs
from keras_brainformer.zoo.weight_specs import sublayer_weight_specs
from keras_brainformer.zoo.weight_specs import weight_specs


def _inactive_expert_share(sub, bank_size):
    """Parameters of an MoE sublayer's bank that a token does not use on
    average: all but `experts_per_token` of its `num_experts` experts."""
    return bank_size * (1 - sub.experts_per_token / sub.num_experts)


def _bank_sizes(specs):
    """`{sublayer prefix: size of its expert bank}` over trainable `specs`."""
    sizes = {}
    for spec in specs:
        prefix, found, _ = spec.path.partition("/experts/")
        if found and spec.trainable:
            sizes[prefix] = sizes.get(prefix, 0) + spec.size
    return sizes


def sublayer_parameters(sub, d):
    """`(total, activated)` parameters of one sublayer, norm excluded."""
    specs = sublayer_weight_specs("sublayer", sub, d)
    total = sum(s.size for s in specs if s.trainable)
    if sub.kind != "moe":
        return total, total
    return total, total - _inactive_expert_share(sub, _bank_sizes(specs)["sublayer"])


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
    ...     "blocks": dense_transformer_layer(2, 16).to_dict(), "num_layers": 2})
    >>> counts["total"]  # 100*8 + 8 + 2 * (4*8*8 + 2*8*16 + 2*8)
    1864
    """
    specs = [s for s in weight_specs(config, dtype="float32").values() if s.trainable]
    total = sum(s.size for s in specs)
    embedding = sum(s.size for s in specs if s.path.startswith("token_embedding/"))
    activated = total
    banks = _bank_sizes(specs)
    blocks = config_block_specs(config)
    for i, spec in enumerate(blocks):
        for j, sub in enumerate(spec.sublayers):
            if sub.kind == "moe":
                activated -= _inactive_expert_share(sub, banks[f"block_{i}/{j}_moe"])
    return {
        "total": int(total),
        "activated": int(round(activated)),
        "embedding": int(embedding),
        "non_embedding_total": int(total - embedding),
    }

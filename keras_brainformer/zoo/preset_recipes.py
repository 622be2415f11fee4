"""How the zoo's architecture presets were made: the recipes that compute
each preset's backbone config and metadata (Brainformer, GLaM, GLaM with
expert choice, dense and Primer baselines at the paper's scales and the tiny
and small CPU tiers, and keras-hub's MoE architectures).

The registry is the preset folders (`models/brainformer/brainformer_presets.py`
reads them); these recipes only write them: `python presets/build_presets.py`
runs `recipe_presets()` and writes one folder per preset
(`preset_building.py`), and a test checks that every folder still equals its
recipe. Nothing here runs when the model family is imported.

`recipe_presets()[name]["config"]` holds `BrainformerBackbone` constructor
kwargs (JSON-serialisable); `"metadata"` holds our parameter counts of that
exact config (`count_parameters`) and, where the paper gives one, its figure.

Full-size presets use the paper's 256K SentencePiece vocabulary, so their
counts include a 256000 x d tied embedding. The paper's Tables 2 and 3 are
reproduced by `paper_convention_counts` instead: the same config with a 32K
tied embedding (see `docs/presets.md`).

The Brainformer blocks are a reconstruction (the paper's exact blocks are
only in its Figures 8 and 9): their widths come from
`presets/reconstruct_brainformer.py`.

The zoo's table (the one in `docs/presets.md`) is `preset_table.py`.
"""

from keras_brainformer.models.brainformer.block_spec import GLAM_CAPACITY_FACTOR
from keras_brainformer.models.brainformer.block_spec import GLAM_LOAD_BALANCE_LOSS_WEIGHT
from keras_brainformer.models.brainformer.block_spec import AttentionSpec
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.block_spec import FeedForwardSpec
from keras_brainformer.models.brainformer.block_spec import MoESpec
from keras_brainformer.models.brainformer.block_spec import glam_layer_pair
from keras_brainformer.zoo.keras_hub_presets import KERAS_HUB_ARCHITECTURES
from keras_brainformer.zoo.keras_hub_presets import keras_hub_architecture_config
from keras_brainformer.zoo.parameter_count import count_parameters

# The paper's training vocabulary (SentencePiece 256K) and sequence length.
PAPER_TRAINING_VOCABULARY_SIZE = 256000
PAPER_SEQUENCE_LENGTH = 1024
# The embedding size that reproduces the paper's Tables 2 and 3 (see
# `paper_convention_counts`; 32000 fits better than 32768).
PAPER_VOCABULARY_SIZE = 32000
# The project's shipped SentencePiece vocabulary, for the tiny presets.
TINY_VOCABULARY_SIZE = 8192
TINY_SEQUENCE_LENGTH = 256
TINY_EXPERTS = 8
# The small tier (`*_small`): byte-level (256 ids: the output layer is a
# small part of a step) with ~1.05M activated non-embedding parameters, so
# that the blocks, not the vocabulary, decide the step time on a CPU.
SMALL_VOCABULARY_SIZE = 256
SMALL_SEQUENCE_LENGTH = 512
# tier: family -> (d, heads, head_dim, blocks or layers); GLaM: 2 blocks.
CPU_TIERS = {
    "tiny": {
        "brainformer1": (64, 4, 16, 2),
        "brainformer2": (48, 3, 16, 2),
        "glam": (70, 5, 14),
        "dense": (60, 3, 20, 6),
        "primer": (64, 4, 16, 7),
    },
    "small": {
        "brainformer1": (108, 4, 32, 2),
        "brainformer2": (80, 4, 32, 2),
        "glam": (120, 4, 32),
        "dense": (128, 4, 32, 4),
        "primer": (132, 4, 32, 5),
    },
}
CPU_TIER_WORDS = {"tiny": "", "small": "byte-level: "}

PRIMER_DEPTHWISE_CONV_KERNEL = 3

# === The Brainformer reconstruction ===
# Layout (the same at every scale): A M F M A M F M (A attention, M MoE with
# expert choice, F dense FFN). Per sublayer (kind, activation, hidden width);
# `None` marks attention. Output of `python presets/reconstruct_brainformer.py`
# (its "CHOSEN" candidate): 3 / 6 / 8 blocks, d = 1024 / 2048 / 4096,
# 32 / 64 / 64 experts, heads 16 x 64 / 16 x 128 / 32 x 128.
BRAINFORMER_WIDTHS = {
    ("brainformer1", "100m"): (
        None,
        ("moe", "gated_gelu", 3072),
        ("ffn", "gelu", 1536),
        ("moe", "gated_gelu", 3072),
        None,
        ("moe", "gated_gelu", 1536),
        ("ffn", "gelu", 1536),
        ("moe", "gelu", 3072),
    ),
    ("brainformer1", "1b"): (
        None,
        ("moe", "gated_gelu", 3072),
        ("ffn", "gated_gelu", 8192),
        ("moe", "gelu", 8192),
        None,
        ("moe", "gelu", 3072),
        ("ffn", "gated_gelu", 8192),
        ("moe", "gelu", 3072),
    ),
    ("brainformer1", "8b"): (
        None,
        ("moe", "gelu", 16384),
        ("ffn", "gated_gelu", 16384),
        ("moe", "gelu", 8192),
        None,
        ("moe", "gelu", 8192),
        ("ffn", "gated_gelu", 16384),
        ("moe", "gelu", 6144),
    ),
    ("brainformer2", "100m"): (
        None,
        ("moe", "gated_gelu", 3072),
        ("ffn", "gelu", 2048),
        ("moe", "gated_gelu", 3072),
        None,
        ("moe", "gated_gelu", 3072),
        ("ffn", "gelu", 1536),
        ("moe", "gelu", 2048),
    ),
}
BRAINFORMER_SCALES = {
    # scale: (hidden_dim, num_experts, num_layers, num_heads, head_dim)
    "100m": (1024, 32, 3, 16, 64),
    "1b": (2048, 64, 6, 16, 128),
    "8b": (4096, 64, 8, 32, 128),
}
BRAINFORMER_CAPACITY_FACTORS = {"brainformer1": 1.0, "brainformer2": 2.0}


def _brainformer_block(
    widths, num_experts, num_heads, head_dim, capacity_factor, width_scale=1
):
    sublayers = []
    for item in widths:
        if item is None:
            sublayers.append(AttentionSpec(num_heads=num_heads, head_dim=head_dim))
            continue
        kind, activation, width = item
        width = int(round(width * width_scale))
        if kind == "ffn":
            sublayers.append(FeedForwardSpec(intermediate_dim=width, activation=activation))
        else:
            sublayers.append(
                MoESpec(
                    num_experts=num_experts,
                    intermediate_dim=width,
                    activation=activation,
                    router="expert_choice",
                    capacity_factor=capacity_factor,
                )
            )
    return BlockSpec(sublayers)


def _dense_block(num_heads, head_dim, intermediate_dim, primer=False):
    """A decoder layer: attention then FFN (gated GELU; Primer: squared ReLU
    and a depthwise convolution after Q/K/V)."""
    return BlockSpec(
        [
            AttentionSpec(
                num_heads=num_heads,
                head_dim=head_dim,
                depthwise_conv_kernel=PRIMER_DEPTHWISE_CONV_KERNEL if primer else 0,
            ),
            FeedForwardSpec(
                intermediate_dim=intermediate_dim,
                activation="squared_relu" if primer else "gated_gelu",
            ),
        ]
    )


_VOCABULARY_AND_LENGTH = {
    "paper": (PAPER_TRAINING_VOCABULARY_SIZE, PAPER_SEQUENCE_LENGTH),
    "tiny": (TINY_VOCABULARY_SIZE, TINY_SEQUENCE_LENGTH),
    "small": (SMALL_VOCABULARY_SIZE, SMALL_SEQUENCE_LENGTH),
}


def backbone_config(block, num_layers, hidden_dim, tier="paper"):
    """The backbone config of `num_layers` x `block` (a `BlockSpec`) at width
    `hidden_dim`, with the vocabulary and length of `tier` (`"paper"`,
    `"tiny"` or `"small"`)."""
    vocabulary_size, max_sequence_length = _VOCABULARY_AND_LENGTH[tier]
    return {
        "vocabulary_size": vocabulary_size,
        "hidden_dim": hidden_dim,
        "blocks": block.to_dict(),
        "num_layers": num_layers,
        "max_sequence_length": max_sequence_length,
        "norm": "rms",
        "tie_embeddings": True,
    }


def paper_convention_counts(config, vocabulary_size=PAPER_VOCABULARY_SIZE):
    """Counts under the convention that reproduces the paper's Tables 2 and 3.

    `count_parameters` of the same architecture with a 32K-entry tied
    embedding (counted in both total and activated). Everything else is the
    config's own: gated dense FFNs count 3 matrices, plain (GELU) experts 2,
    attention `4 · d · heads · head_dim`, routers `d · E`, norms `d`.

    32000 rather than 32768: over the six rows of Table 2 plus the Table 3
    rows, 32000 gives the smaller worst error (the difference is
    `768 · d`, under 1 % everywhere; docs/presets.md shows both).

    Returns:
        `count_parameters`'s dict.
    """
    config = dict(config, vocabulary_size=vocabulary_size, tie_embeddings=True)
    return count_parameters(config)


def _preset(description, family, config, paper=None):
    counts = count_parameters(config)
    return {
        "metadata": {
            "description": description,
            "family": family,
            "params": counts["total"],
            "activated_params": counts["activated"],
            "paper": paper,
        },
        "config": config,
    }


def _paper(total, activated, source):
    return {"total": float(total), "activated": float(activated), "source": source}


def recipe_presets():
    """`{name: {"config": ..., "metadata": ...}}` of every architecture
    preset, computed from the recipes (what `presets/build_presets.py` writes)."""
    presets = {}
    random_init = "Random initialisation (architecture preset)."

    # === Brainformer (reconstruction of Figures 8 / 9) ===
    brainformer_paper = {
        ("brainformer1", "100m"): _paper(3.19e9, 156e6, "Table 3"),
        ("brainformer1", "1b"): _paper(30e9, 1.38e9, "Table 3"),
        ("brainformer1", "8b"): _paper(158e9, 7.4e9, "Table 3"),
        ("brainformer2", "100m"): _paper(3.33e9, 266e6, "Table 3"),
    }
    scale_words = {"100m": "100M", "1b": "1B", "8b": "8B"}
    for (family, scale), widths in BRAINFORMER_WIDTHS.items():
        d, experts, blocks, heads, head_dim = BRAINFORMER_SCALES[scale]
        cf = BRAINFORMER_CAPACITY_FACTORS[family]
        block = _brainformer_block(widths, experts, heads, head_dim, cf)
        number = family[-1]
        presets[f"{family}_{scale}"] = _preset(
            f"Brainformer block {number} at the {scale_words[scale]}/{experts}E scale: "
            f"{blocks} x an 8-sublayer block ({block.count('attention')} attention, "
            f"{block.count('ffn')} dense FFN, {block.count('moe')} MoE), d={d}, "
            f"expert-choice routing with capacity factor {cf:g}. A reconstruction "
            f"(layout and widths fitted to Table 3; the paper's exact block is only "
            f"in its Figure {7 + int(number)}). {random_init}",
            family,
            backbone_config(block, blocks, d),
            brainformer_paper[(family, scale)],
        )

    # === GLaM (Table 2) and GLaM with expert choice ===
    # name: (layers, d, hidden, heads, head_dim, experts, paper)
    glam = {
        "glam_100m_32e": (12, 768, 3072, 12, 64, 32, _paper(1.0e9, 145e6, "Table 3")),
        "glam_100m_64e": (12, 768, 3072, 12, 64, 64, _paper(1.9e9, 145e6, "Table 2")),
        "glam_1b7_64e": (24, 2048, 8192, 16, 128, 64, _paper(27e9, 1.879e9, "Table 2")),
        "glam_8b_64e": (32, 4096, 16384, 32, 128, 64, _paper(143e9, 9.8e9, "Table 2")),
        "glam_ec_100m_32e": (12, 768, 3072, 12, 64, 32, None),
        "glam_ec_8b_64e": (32, 4096, 16384, 32, 128, 64, _paper(143e9, 9.8e9, "Table 3")),
    }
    for name, (layers, d, hidden, heads, head_dim, experts, paper) in glam.items():
        ec = name.startswith("glam_ec")
        block = glam_layer_pair(
            heads, hidden, experts, router="expert_choice" if ec else "top_k", head_dim=head_dim
        )
        routing = (
            f"expert-choice routing (capacity factor {GLAM_CAPACITY_FACTOR:g})"
            if ec
            else f"top-2 routing (capacity factor {GLAM_CAPACITY_FACTOR:g}, "
            f"load-balance loss {GLAM_LOAD_BALANCE_LOSS_WEIGHT:g})"
        )
        presets[name] = _preset(
            f"{'GLaM with expert choice' if ec else 'GLaM'}: {layers} layers, d={d}, "
            f"MoE ({experts} GELU experts of width {hidden}) in every other layer, "
            f"{routing}, gated-GELU dense FFNs; sizes from Table 2. {random_init}",
            "glam_ec" if ec else "glam",
            backbone_config(block, layers // 2, d),
            paper,
        )

    # === Dense and Primer baselines ===
    # name: (layers, d, hidden, heads, head_dim, paper)
    dense = {
        "dense_100m": (12, 768, 3072, 12, 64, _paper(130e6, 130e6, "Table 2")),
        "dense_1b7": (24, 2048, 8192, 16, 128, _paper(1.7e9, 1.7e9, "Table 2")),
        "dense_8b": (32, 4096, 16384, 32, 128, _paper(8.7e9, 8.7e9, "Table 2")),
        "primer_100m": (12, 768, 3072, 12, 64, None),
        "primer_1b7": (24, 2048, 8192, 16, 128, None),
    }
    for name, (layers, d, hidden, heads, head_dim, paper) in dense.items():
        primer = name.startswith("primer")
        block = _dense_block(heads, head_dim, hidden, primer=primer)
        what = (
            "Primer baseline: squared-ReLU FFNs and a width-3 depthwise convolution "
            "after Q/K/V, sized like the dense model of Table 2 (no paper count)"
            if primer
            else "Dense Transformer baseline with gated-GELU FFNs (Table 2)"
        )
        presets[name] = _preset(
            f"{what}: {layers} layers, d={d}, FFN width {hidden}. {random_init}",
            "primer" if primer else "dense",
            backbone_config(block, layers, d),
            paper,
        )

    # === CPU tiers: tiny and small ===
    # Each keeps its family's layout and width ratios and picks d and depth so
    # the activated non-embedding parameters match within the tier (see
    # `activated_non_embedding`).
    for tier, shapes in CPU_TIERS.items():
        vocabulary_size, length = _VOCABULARY_AND_LENGTH[tier]
        words = f"{tier.capitalize()} CPU-scale variant ({CPU_TIER_WORDS[tier]}vocabulary " \
                f"{vocabulary_size}, sequences of {length}) "
        for family in ("brainformer1", "brainformer2"):
            d, heads, head_dim, blocks = shapes[family]
            cf = BRAINFORMER_CAPACITY_FACTORS[family]
            block = _brainformer_block(
                BRAINFORMER_WIDTHS[(family, "100m")],
                TINY_EXPERTS,
                heads,
                head_dim,
                cf,
                width_scale=d / BRAINFORMER_SCALES["100m"][0],
            )
            presets[f"{family}_{tier}"] = _preset(
                f"{words}of the Brainformer block {family[-1]} reconstruction: {blocks} x the "
                f"100M block's layout with widths scaled by d/1024, d={d}, {TINY_EXPERTS} "
                f"experts, expert choice with capacity factor {cf:g}. {random_init}",
                family,
                backbone_config(block, blocks, d, tier=tier),
            )
        d, heads, head_dim = shapes["glam"]
        for family, router in (("glam", "top_k"), ("glam_ec", "expert_choice")):
            block = glam_layer_pair(heads, 4 * d, TINY_EXPERTS, router=router, head_dim=head_dim)
            presets[f"{family}_{tier}"] = _preset(
                f"{words}of {'GLaM with expert choice' if router != 'top_k' else 'GLaM'}: "
                f"4 layers (2 x [attention, MoE, attention, FFN]), d={d}, FFN and "
                f"expert width 4d, {TINY_EXPERTS} experts. {random_init}",
                family,
                backbone_config(block, 2, d, tier=tier),
            )
        d, heads, head_dim, layers = shapes["dense"]
        presets[f"dense_{tier}"] = _preset(
            f"{words}of the dense baseline: {layers} layers, d={d}, gated-GELU FFN width 4d. "
            f"{random_init}",
            "dense",
            backbone_config(_dense_block(heads, head_dim, 4 * d), layers, d, tier=tier),
        )
        d, heads, head_dim, layers = shapes["primer"]
        presets[f"primer_{tier}"] = _preset(
            f"{words}of the Primer baseline: {layers} layers, d={d}, squared-ReLU FFN width "
            f"4d, depthwise convolution width 3. {random_init}",
            "primer",
            backbone_config(
                _dense_block(heads, head_dim, 4 * d, primer=True), layers, d, tier=tier
            ),
        )
    # === keras-hub's MoE models, architecture only (keras_hub_presets.py) ===
    for name in KERAS_HUB_ARCHITECTURES:
        config, metadata = keras_hub_architecture_config(name)
        preset = _preset(metadata.pop("description"), metadata.pop("family"), config)
        preset["metadata"].update(metadata)
        presets[name] = preset
    return presets


def activated_non_embedding(presets, suffix="_tiny"):
    """Activated non-embedding parameters of each preset of a CPU tier
    (`"_tiny"` or `"_small"`) among `presets` (`{name: {"config": ...}}`)."""
    out = {}
    for name, preset in presets.items():
        if name.endswith(suffix):
            counts = count_parameters(preset["config"])
            out[name] = counts["activated"] - counts["embedding"]
    return out

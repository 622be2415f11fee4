"""Architecture presets of keras-hub's MoE models, named after the originals.

Each entry is the keras-hub backbone config of a keras-hub preset, turned into
Brainformer backbone arguments by `brainformer_config_from_keras_hub`. They
carry no weights: the weights are the user's own keras-hub download, brought
over by `keras-brainformer convert --preset <keras-hub preset>`. Their
parameter counts equal the counts keras-hub records for the originals
(`keras_hub_params`, from keras-hub 0.32's preset registry), which a test
checks; they let `plan` and the step-time model size these models on any mesh
without a download.
"""

from keras_brainformer.zoo.keras_hub_conversion import brainformer_config_from_keras_hub

# Our name: (keras-hub preset, family, keras-hub backbone config, keras-hub's
# parameter count, longest context).
KERAS_HUB_ARCHITECTURES = {
    "mixtral_8x7b": (
        "mixtral_8_7b_en", "mixtral",
        dict(vocabulary_size=32000, num_layers=32, num_query_heads=32, num_key_value_heads=8,
             hidden_dim=4096, intermediate_dim=14336, num_experts=8, top_k=2,
             rope_max_wavelength=1000000, layer_norm_epsilon=1e-5, sliding_window=None),
        46702792704, 32768,
    ),
    "qwen1_5_moe_a2_7b": (
        "qwen1.5_moe_2.7b_en", "qwen_moe",
        dict(vocabulary_size=151936, num_layers=24, num_query_heads=16, num_key_value_heads=16,
             hidden_dim=2048, intermediate_dim=5632, moe_intermediate_dim=1408,
             shared_expert_intermediate_dim=5632, num_experts=60, top_k=4,
             norm_top_k_prob=False, rope_max_wavelength=1000000, layer_norm_epsilon=1e-6),
        14315784192, 8192,
    ),
    "qwen3_moe_30b_a3b": (
        "qwen3_moe_30b_a3b_en", "qwen3_moe",
        dict(vocabulary_size=151936, num_layers=48, num_query_heads=32, num_key_value_heads=4,
             head_dim=128, hidden_dim=2048, intermediate_dim=6144, moe_intermediate_dim=768,
             num_experts=128, top_k=8, norm_top_k_prob=True, rope_max_wavelength=1000000,
             layer_norm_epsilon=1e-6, sliding_window_size=None),
        30532122624, 40960,
    ),
    "qwen3_moe_235b_a22b": (
        "qwen3_moe_235b_a22b_en", "qwen3_moe",
        dict(vocabulary_size=151936, num_layers=94, num_query_heads=64, num_key_value_heads=4,
             head_dim=128, hidden_dim=4096, intermediate_dim=12288, moe_intermediate_dim=1536,
             num_experts=128, top_k=8, norm_top_k_prob=True, rope_max_wavelength=1000000,
             layer_norm_epsilon=1e-6, sliding_window_size=None),
        235093634560, 40960,
    ),
}
KERAS_HUB_PRESET_FAMILIES = ("mixtral", "qwen_moe", "qwen3_moe")


def keras_hub_architecture_config(name):
    """The `BrainformerBackbone` config (JSON-ready) of architecture preset
    `name`, and the entries its metadata records."""
    keras_hub_preset, family, config, params, length = KERAS_HUB_ARCHITECTURES[name]
    kwargs = brainformer_config_from_keras_hub(config, family, length)
    blocks = kwargs["blocks"]
    kwargs["blocks"] = (
        [b.to_dict() for b in blocks] if isinstance(blocks, list) else blocks.to_dict()
    )
    kwargs.pop("dtype")
    metadata = {
        "family": family,
        "keras_hub_preset": keras_hub_preset,
        "keras_hub_params": params,
        "description": (
            f"The architecture of keras-hub's {keras_hub_preset} as Brainformer blocks "
            f"({config['num_layers']} x [attention, {config['num_experts']}-expert top-"
            f"{config['top_k']} MoE]), computing routed tokens only. Random initialisation "
            f"(architecture preset); the weights: `keras-brainformer convert --preset "
            f"{keras_hub_preset} --out DIR` from your keras-hub cache."
        ),
    }
    return kwargs, metadata

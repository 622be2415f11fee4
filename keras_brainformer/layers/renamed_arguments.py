"""Arguments renamed after 0.1.0 to keras-hub's names, translated when an
old config is loaded, so that configs, preset folders, block-spec JSON and
`.keras` files written by 0.1 keep loading.

| 0.1 name | name now (keras-hub's) | in |
|---|---|---|
| `num_blocks` | `num_layers` | the backbone |
| `norm_epsilon` | `layer_norm_epsilon` | backbone, block, attention |
| `rotary_max_wavelength` | `rope_max_wavelength` | backbone, block, attention |
| `rotary_scaling_factor` | `rope_scaling_factor` | backbone, block, attention |
| `hidden_dim` | `intermediate_dim` | `FeedForward`, `ExpertBank`, specs |
| `expert_hidden_dim` | `intermediate_dim` | `MoEFeedForward` |
| `shared_expert_hidden_dim` | `shared_expert_intermediate_dim` | MoE layer, `MoESpec` |
| `k` | `top_k` | `TopKRouter`, `MoEFeedForward`, `MoESpec` |

(specs: `FeedForwardSpec` and `MoESpec`, or `"kind": "ffn"` / `"moe"`
in a block spec dict.)

`MoEFeedForward`'s `router_kwargs={...}` (the router's options, nested)
was replaced by the options as arguments of their own (`top_k=...`,
`capacity_factor=...`): its `from_config` translates a `router_kwargs`
dict (`k` included) and its constructor refuses the argument, naming them.

`hidden_dim` now means one thing: the model width (the backbone's, as in
keras-hub); a feed-forward or expert width is `intermediate_dim`.
"""

_ROPE_AND_NORM = {
    "norm_epsilon": "layer_norm_epsilon",
    "rotary_max_wavelength": "rope_max_wavelength",
    "rotary_scaling_factor": "rope_scaling_factor",
}

# Per config kind: {0.1 name: name now}.
RENAMED_AFTER_0_1 = {
    "BrainformerBackbone": {"num_blocks": "num_layers", **_ROPE_AND_NORM},
    "BrainformerBlock": dict(_ROPE_AND_NORM),
    "CausalSelfAttention": dict(_ROPE_AND_NORM),
    "FeedForward": {"hidden_dim": "intermediate_dim"},
    "MoEFeedForward": {
        "expert_hidden_dim": "intermediate_dim",
        "shared_expert_hidden_dim": "shared_expert_intermediate_dim",
        "k": "top_k",
    },
    "TopKRouter": {"k": "top_k"},
    "ffn": {"hidden_dim": "intermediate_dim"},
    "moe": {
        "hidden_dim": "intermediate_dim",
        "k": "top_k",
        "shared_expert_hidden_dim": "shared_expert_intermediate_dim",
    },
}


def with_current_names(config, kind, where=None):
    """A copy of `config` (a constructor-argument dict of `kind`, a key of
    `RENAMED_AFTER_0_1`) with every 0.1 name replaced by today's. A config
    that gives both names of one argument is refused, naming both and
    `where` (default: `kind`)."""
    config = dict(config)
    for old, new in RENAMED_AFTER_0_1[kind].items():
        if old not in config:
            continue
        if new in config:
            raise ValueError(
                f"{where or kind}: the config gives both `{old}` (its name in 0.1) and "
                f"`{new}`; keep `{new}` only. Received: {old}={config[old]!r}, "
                f"{new}={config[new]!r}"
            )
        config[new] = config.pop(old)
    return config


def refuse_old_names(kwargs, kind):
    """For constructors: one clear error when a 0.1 name is passed as a
    keyword argument (configs are translated by `with_current_names`; code
    is told the new name)."""
    for old, new in RENAMED_AFTER_0_1[kind].items():
        if old in kwargs:
            raise TypeError(
                f"{kind}: `{old}` was renamed `{new}` after 0.1 (keras-hub's name). "
                f"Received: {old}={kwargs[old]!r}"
            )

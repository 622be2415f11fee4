"""Arguments renamed after 0.1.0 to keras-hub's names, translated when an
old config is loaded, so that configs, preset folders and `.keras` files
written by 0.1 keep loading.

| 0.1 name | name now (keras-hub's) |
|---|---|
| `norm_epsilon` | `layer_norm_epsilon` |
| `rotary_max_wavelength` | `rope_max_wavelength` |
| `rotary_scaling_factor` | `rope_scaling_factor` |
"""

RENAMED_AFTER_0_1 = {
    "norm_epsilon": "layer_norm_epsilon",
    "rotary_max_wavelength": "rope_max_wavelength",
    "rotary_scaling_factor": "rope_scaling_factor",
}


def with_current_names(config, where):
    """A copy of `config` (a constructor-argument dict) with every 0.1 name
    replaced by today's. A config that gives both names of one argument is
    refused, naming both and `where` (the class)."""
    config = dict(config)
    for old, new in RENAMED_AFTER_0_1.items():
        if old not in config:
            continue
        if new in config:
            raise ValueError(
                f"{where}: the config gives both `{old}` (its name in 0.1) and `{new}`; "
                f"keep `{new}` only. Received: {old}={config[old]!r}, {new}={config[new]!r}"
            )
        config[new] = config.pop(old)
    return config

"""`keras-brainformer plan`: per-device memory of training a preset on a mesh,
and with `--hardware` the predicted step time.

    keras-brainformer plan --preset brainformer1_8b --mesh batch=16,expert=16 \\
        --batch-size 256 --seq-len 1024 --dtype mixed_bfloat16 --device-memory 16GB
    keras-brainformer plan --preset glam_8b_64e --mesh batch=64,model=8 --fsdp \\
        --batch-size 256 --dtype mixed_bfloat16 --hardware tpu-v4 --chips 512 --json

Reads the preset's config (a zoo name, or a preset folder's `config.json`)
without building the model, and prints `plan_memory`'s table for each
optimizer asked for, then a verdict per optimizer when `--device-memory` is
given (the hardware's own memory when `--hardware` is given without it).
With `--hardware`, also `predict_step_time`'s table per optimizer; with
`--json`, one JSON object instead of the tables. Exit codes: 0 when every
plan fits (or no device memory was given), 1 when one does not fit, 2 on bad
input (unknown preset or hardware, bad mesh spec, chips that do not match
the mesh, indivisible shapes), printed as one `error:` line.
"""

import json
import os

from keras_brainformer.distribution.hardware import HARDWARE_NAMES
from keras_brainformer.distribution.hardware import get_hardware
from keras_brainformer.distribution.memory_plan import OPTIMIZERS
from keras_brainformer.distribution.memory_plan import parse_bytes
from keras_brainformer.distribution.memory_plan import plan_memory
from keras_brainformer.distribution.mesh import expert_axis
from keras_brainformer.distribution.mesh import parse_mesh_spec
from keras_brainformer.distribution.step_time import predict_step_time
from keras_brainformer.errors import TrainingError
from keras_brainformer.models.brainformer.brainformer_presets import backbone_presets
from keras_brainformer.models.brainformer.brainformer_presets import get_preset_config
from keras_brainformer.models.brainformer.brainformer_presets import read_backbone_config
from keras_brainformer.zoo.weight_specs import DTYPE_POLICIES

EXIT_DOES_NOT_FIT = 1


def add_step_shape_arguments(parser):
    """The training step's shape, the same flags for `plan` and `compile`."""
    parser.add_argument(
        "--batch-size", type=int, default=None,
        help="global batch size, divisible by the batch axis (default: one "
        "sequence per batch shard, i.e. the batch axis size)",
    )
    parser.add_argument(
        "--seq-len", type=int, default=None,
        help="tokens per sequence (default: the preset's max_sequence_length)",
    )
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPE_POLICIES,
        help="dtype policy (mixed_bfloat16: float32 weights, bfloat16 activations)",
    )


def add_arguments(parser):
    parser.add_argument(
        "--preset",
        required=True,
        help="zoo preset name (see `keras-brainformer presets`) or a preset folder",
    )
    parser.add_argument(
        "--mesh", default="batch=1",
        help="device mesh, e.g. batch=16,expert=16 (axes: batch, expert, model; "
        "default batch=1)",
    )
    add_step_shape_arguments(parser)
    parser.add_argument(
        "--optimizer", default="both", choices=OPTIMIZERS + ("both",),
        help="Keras optimizer whose state is counted (default: both)",
    )
    parser.add_argument(
        "--fsdp", action="store_true",
        help="also split weights along the batch axis (ZeRO-3 style)",
    )
    parser.add_argument(
        "--experts-on", choices=("expert", "batch"), default=None,
        help="mesh axis of the expert banks, as `keras-brainformer train --experts-on` "
        "(default: expert if the mesh has it, else batch unless the mesh is batch-only "
        "without --fsdp, which replicates them)",
    )
    parser.add_argument(
        "--device-memory", default=None,
        help="memory of one device, e.g. 16GB (10^9 bytes) or 16GiB (2^30 bytes); "
        "prints whether the plan fits and exits 1 if not",
    )
    parser.add_argument(
        "--hardware", default=None,
        help=f"also predict the step time on this accelerator ({', '.join(HARDWARE_NAMES)}); "
        "see docs/performance_model.md",
    )
    parser.add_argument(
        "--chips", type=int, default=None,
        help="number of chips (with --hardware), at least 1; must equal the mesh size",
    )
    parser.add_argument(
        "--json", action="store_true",
        help="print one JSON object (memory totals and step-time predictions) instead of tables",
    )


def load_config(preset):
    """The backbone config of a zoo preset name or a preset folder."""

    if preset in backbone_presets:
        return get_preset_config(preset)
    path = os.path.join(preset, "config.json") if os.path.isdir(preset) else None
    if path is None or not os.path.exists(path):
        raise TrainingError(
            f"Unknown preset {preset!r}: not a zoo preset nor a preset folder "
            f"with a config.json. Zoo presets: {sorted(backbone_presets)}."
        )
    config = read_backbone_config(preset)
    if not {"vocabulary_size", "hidden_dim", "blocks"} <= set(config):
        raise TrainingError(f"{path} is not a BrainformerBackbone config.")
    return config


def plans(args):
    """The `MemoryPlan`s asked for by parsed `args` (bad input raises
    `TrainingError`)."""

    return [memory for memory, _ in plan_pairs(args)]


def plan_pairs(args):
    """`(MemoryPlan, StepTimePlan or None)` per optimizer asked for by parsed
    `args` (bad input raises `TrainingError`)."""

    config = load_config(args.preset)
    hardware_name = getattr(args, "hardware", None)
    chips = getattr(args, "chips", None)
    if chips is not None and chips < 1:
        raise TrainingError(
            f"--chips must be at least 1 (the number of chips whose step time is predicted, "
            f"equal to the mesh size). Received: --chips {chips}."
        )
    try:
        hardware = get_hardware(hardware_name) if hardware_name is not None else None
        if chips is not None and hardware is None:
            raise ValueError("--chips needs --hardware (the chips whose step time is predicted).")
        mesh = parse_mesh_spec(args.mesh)
        batch_size = args.batch_size if args.batch_size is not None else mesh["batch"]
        seq_len = (
            args.seq_len if args.seq_len is not None else config.get("max_sequence_length", 2048)
        )
        optimizers = OPTIMIZERS if args.optimizer == "both" else (args.optimizer,)
        axis = expert_axis(mesh, args.experts_on, args.fsdp)
        # On a TPU, the activations and peak as XLA's TPU compiler schedules
        # them (checked against compiled programs).
        on_tpu = hardware is not None and hardware.name.startswith("tpu")
        target = "tpu" if on_tpu else "default"
        pairs = []
        for optimizer in optimizers:
            memory = plan_memory(
                config, mesh, batch_size, seq_len, dtype=args.dtype,
                optimizer=optimizer, fsdp=args.fsdp, expert_dim_name=axis, target=target,
            )
            step = None
            if hardware is not None:
                step = predict_step_time(
                    config, mesh, batch_size, seq_len, hardware, chips=chips,
                    dtype=args.dtype, optimizer=optimizer, fsdp=args.fsdp,
                    expert_dim_name=axis,
                )
            pairs.append((memory, step))
        return pairs
    except (TypeError, ValueError) as error:
        raise TrainingError(str(error)) from None


def run(args):
    """Prints the plan table(s) (or JSON); exits with code 1 if a plan does
    not fit."""

    device_memory = None
    if args.device_memory is not None:
        try:
            device_memory = parse_bytes(args.device_memory)
        except ValueError as error:
            raise TrainingError(f"--device-memory: {error}") from None
    pairs = plan_pairs(args)
    if device_memory is None and pairs[0][1] is not None:
        device_memory = pairs[0][1].hardware.memory_bytes
    fits = device_memory is None or all(m.fits(device_memory) for m, _ in pairs)
    if getattr(args, "json", False):
        print(json.dumps({
            "preset": args.preset,
            "device_memory": device_memory,
            "fits": fits if device_memory is not None else None,
            "plans": [
                {
                    "optimizer": memory.optimizer,
                    "memory": {
                        "parameters": memory.parameters, "gradients": memory.gradients,
                        "optimizer_state": memory.optimizer_state,
                        "activations": memory.activations, "total": memory.total,
                    },
                    "step_time": step.to_dict() if step is not None else None,
                }
                for memory, step in pairs
            ],
        }, indent=2))
        return 0 if fits else EXIT_DOES_NOT_FIT
    print(f"preset {args.preset}")
    for memory, step in pairs:
        print()
        print(memory.table())
        if step is not None:
            print()
            print(step.table())
    if device_memory is not None:
        print()
        for memory, _ in pairs:
            print(f"{memory.optimizer}: {memory.verdict(device_memory)}")
        if not fits:
            return EXIT_DOES_NOT_FIT
    return 0

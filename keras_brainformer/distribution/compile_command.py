"""`keras-brainformer compile`: the train step `fit` runs, compiled by XLA's TPU
compiler for a Cloud TPU slice, on a machine without one.

    keras-brainformer compile --preset glam_tiny --topology v4:2x2x1 \\
        --mesh batch=2,expert=2 --batch-size 8 --seq-len 256
    keras-brainformer compile --preset brainformer1_8b --topology v4:8x8x8 \\
        --mesh batch=64,model=8 --fsdp --batch-size 64 --seq-len 1024 \\
        --dtype mixed_bfloat16 --optimizer adafactor --json

Builds the model without allocating a weight (`abstract_build.py`), lowers
Keras' JAX train step under the same `keras.distribution` as `train --mesh`
and compiles it with libtpu (`tpu_compile.py`). Prints, per chip, the
compiler's peak memory against the chip's HBM, the argument / working split,
FLOPs, bytes accessed, `optimal_seconds` as the compiler returns it (-1 s for
each custom call its cost model cannot time), the cost model's step time with
those taken back out (steps/s, tokens/s, MFU; a model, not a measurement:
docs/tpu.md), the roofline of the FLOPs and bytes, the collectives of the
partitioned program and the compile time; `--json` prints one object. Exit
codes: 0 when the step fits the chip's HBM, 1 when it does not or when libtpu
is missing (one `error:` line naming the install command),
2 on bad input (one `error:` line).
"""

import keras

from keras_brainformer.distribution.memory_plan import OPTIMIZERS
from keras_brainformer.distribution.plan_command import add_step_shape_arguments
from keras_brainformer.distribution.plan_command import load_config
from keras_brainformer.distribution.tpu_compile import compile_train_step
from keras_brainformer.distribution.tpu_compile import parse_topology
from keras_brainformer.errors import TrainingError

EXIT_DOES_NOT_FIT = 1


def add_arguments(parser):
    parser.add_argument(
        "--preset", required=True,
        help="zoo preset name (see `keras-brainformer presets`) or a preset folder",
    )
    parser.add_argument(
        "--topology", required=True,
        help="Cloud TPU slice to compile for: v4:2x2x1, v4:4x4x4, v4:8x8x8, v5e:2x2, "
        "v5e:16x16, v5p:2x2x1, ... (chips = product of the dimensions)",
    )
    parser.add_argument(
        "--mesh", default=None,
        help="device mesh, e.g. batch=16,expert=16 (axes: batch, expert, model); the "
        "product must equal the slice's chips (default: batch=<chips>)",
    )
    parser.add_argument(
        "--fsdp", action="store_true",
        help="also split weights along the batch axis (ZeRO-3 style)",
    )
    parser.add_argument(
        "--experts-on", choices=("expert", "batch"), default=None,
        help="mesh axis of the expert banks, as `train --experts-on`",
    )
    add_step_shape_arguments(parser)
    parser.add_argument(
        "--optimizer", default="adafactor", choices=OPTIMIZERS,
        help="optimizer of the train step, as `train --optimizer` (default adafactor)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def run(args, compile_model=None):
    """Compiles and prints the report; exit code 1 if the step does not fit.

    `compile_model(lm, optimizer)` compiles the task as training would (the
    command line passes `train`'s own); None uses `default_compile_model`.
    """
    if keras.backend.backend() != "jax":
        raise TrainingError(
            "compile needs the JAX backend (XLA's TPU compiler through JAX); the backend "
            f"is {keras.backend.backend()!r}. Set KERAS_BACKEND=jax."
        )
    config = load_config(args.preset)
    for name in ("batch_size", "seq_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TrainingError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
    try:
        mesh = args.mesh
        if mesh is None:
            dims = parse_topology(args.topology)[1]
            chips = 1
            for d in dims:
                chips *= d
            mesh = f"batch={chips}"
        report = compile_train_step(
            config, mesh, args.topology, batch_size=args.batch_size,
            sequence_length=args.seq_len, optimizer=args.optimizer, dtype=args.dtype,
            fsdp=args.fsdp, experts_on=args.experts_on, compile_model=compile_model,
            preset=args.preset, verbose=not args.json,
        )
    except (TypeError, ValueError) as error:
        if isinstance(error, TrainingError):
            raise
        raise TrainingError(str(error)) from None
    print(report.to_json() if args.json else report.table())
    return 0 if report.fits else EXIT_DOES_NOT_FIT

"""int8 quantization and LoRA fine-tuning of the trained presets, measured.

For each trained preset (Brainformer, GLaM, dense; trained on the embedded
standard-library corpus):

1. **int8**: held-out loss (nats/token, causal routing) of the float model and
   of the same model after `lm.quantize("int8")` — every attention, dense FFN
   and expert kernel and the token embedding become int8 with float scales;
   routers and norms stay float32 — and the bytes of the weights before/after.
2. **LoRA**: `lm.backbone.enable_lora(rank)` (adapters on attention, dense FFN
   and every expert), fine-tuned on the even 128-token windows of the
   held-out text (documents the preset never saw) and evaluated on the odd
   windows (disjoint text from the same documents) before and after, with
   the trainable share of the parameters; the frozen weights are checked
   unchanged. Then the same on the int8 model (QLoRA style).

Writes `int8_and_lora.md` and `.csv` to `--out` and prints the table.

    KERAS_BACKEND=jax python examples/quantize_and_lora.py
    KERAS_BACKEND=jax python examples/quantize_and_lora.py --lora-steps 20  # quicker
"""

import argparse
import csv
import os
import pathlib
import shlex
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_brainformer.layers.adaptable_kernels import AdaptableKernels  # noqa: E402
from keras_brainformer.models import BrainformerCausalLM  # noqa: E402
from keras_brainformer.training.evaluation import heldout_loss  # noqa: E402
from keras_brainformer.training.evaluation import heldout_windows  # noqa: E402
from keras_brainformer.training.evaluation import windows_loss  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
PRESETS = ["brainformer1_tiny_stdlib", "glam_tiny_stdlib", "dense_tiny_stdlib"]
HELDOUT = ROOT / "presets" / "heldout" / "stdlib_validation.txt"


def weight_bytes(model):
    return sum(
        int(np.prod(w.shape)) * np.dtype(keras.backend.standardize_dtype(w.dtype)).itemsize
        for w in model.weights
    )


def frozen_kernels(backbone):
    return {
        f"{layer.path}/{name}": keras.ops.convert_to_numpy(getattr(layer, name))
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, AdaptableKernels)
        for name in layer._kernel_specs
    }


def lora_finetune(lm, text, args):
    """LoRA fit on the even windows of `text`, evaluated on the odd ones;
    returns (before, after, trainable share)."""
    windows = heldout_windows(
        text, lm.preprocessor.tokenizer, args.sequence_length, max_windows=10**6
    )
    train_windows, eval_windows = windows[0::2], windows[1::2][: args.eval_windows]
    before = windows_loss(lm, eval_windows)
    lm.backbone.enable_lora(args.lora_rank)
    total = sum(int(np.prod(w.shape)) for w in lm.backbone.weights)
    trainable = sum(int(np.prod(w.shape)) for w in lm.backbone.trainable_weights)
    kernels = frozen_kernels(lm.backbone)
    rng = np.random.default_rng(args.seed)
    rows = rng.integers(0, len(train_windows), args.lora_steps * args.batch_size)
    x = {
        "token_ids": train_windows[rows, :-1],
        "padding_mask": np.ones_like(train_windows[rows, :-1]),
    }
    y = train_windows[rows, 1:]
    preprocessor, lm.preprocessor = lm.preprocessor, None  # feed token ids
    lm.compile(
        optimizer=keras.optimizers.AdamW(args.lora_learning_rate, weight_decay=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    lm.fit(x, y, batch_size=args.batch_size, epochs=1, shuffle=False, verbose=2)
    lm.preprocessor = preprocessor
    after = windows_loss(lm, eval_windows)
    for key, value in frozen_kernels(lm.backbone).items():
        if not np.array_equal(value, kernels[key]):
            raise AssertionError(f"frozen kernel {key} changed during LoRA training")
    return before, after, trainable / total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=PRESETS)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-steps", type=int, default=60)
    parser.add_argument("--lora-learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/int8_and_lora")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)

    text = HELDOUT.read_text(encoding="utf-8")
    rows = []
    start = time.time()
    for name in args.presets:
        print(f"== {name}", flush=True)
        lm = BrainformerCausalLM.from_preset(name)
        float_loss = heldout_loss(lm, text, args.sequence_length, args.eval_windows)
        float_bytes = weight_bytes(lm)
        lm.quantize("int8")
        int8_loss = heldout_loss(lm, text, args.sequence_length, args.eval_windows)
        int8_bytes = weight_bytes(lm)
        print(f"   held-out loss float {float_loss:.4f}, int8 {int8_loss:.4f}", flush=True)

        lora_before, lora_after, share = lora_finetune(
            BrainformerCausalLM.from_preset(name), text, args
        )
        quantized = BrainformerCausalLM.from_preset(name)
        quantized.quantize("int8")
        qlora_before, qlora_after, _ = lora_finetune(quantized, text, args)
        rows.append(
            {
                "preset": name,
                "float loss": round(float_loss, 4),
                "int8 loss": round(int8_loss, 4),
                "int8 - float": round(int8_loss - float_loss, 4),
                "weights MB float": round(float_bytes / 1e6, 2),
                "weights MB int8": round(int8_bytes / 1e6, 2),
                "LoRA trainable share": f"{share:.2%}",
                "odd windows before": round(lora_before, 4),
                "after LoRA": round(lora_after, 4),
                "int8 before": round(qlora_before, 4),
                "after int8 LoRA": round(qlora_after, 4),
            }
        )
    elapsed = time.time() - start

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "int8_and_lora.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = "| " + " | ".join(rows[0]) + " |"
    lines = [header, "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(str(v) for v in row.values()) + " |" for row in rows]
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    report = (
        f"Command: `{command}` (backend {keras.backend.backend()}, "
        f"{elapsed:.0f} s)\n\n" + "\n".join(lines) + "\n"
    )
    (out / "int8_and_lora.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()

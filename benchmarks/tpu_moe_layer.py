"""The MoE layer on TPU, from compiled programs: MoE / equal-FLOP dense FFN
and dropless / dense, by XLA's TPU compiler on a machine without a TPU.

Each variant is a one-block model whose only sublayer is the FFN under test
(an MoE layer, or the dense FFN with `k` times an expert's hidden width: the
same matmul FLOPs per token as top-k routing), with a small vocabulary so that
the embedding and logits are a few per cent of the step. Its real `fit` train
step (forward, the router's auxiliary loss, backward, Adafactor, metrics) is
compiled by `keras-brainformer compile`'s `compile_train_step` for a TPU
slice, and timed by the compiler's cost model (`TpuCompileReport.
estimated_seconds`, see docs/tpu.md) and by its roofline
(`roofline_seconds`). Nothing runs on a TPU.

    PYTHONPATH=. python benchmarks/tpu_moe_layer.py --quick          # v4:2x2x1, small
    PYTHONPATH=. python benchmarks/tpu_moe_layer.py --out runs/tpu_moe.jsonl \\
        --topology v4:4x4x4 --mesh batch=64 --experts-on batch \\
        --d 2048 --experts 64 --k 2 --batch-size 512 --seq-len 2048

Each variant compiles in its own process (`--variant NAME` runs one).
"""

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import time

VARIANTS = ("dense", "moe", "dropless")


def variant_config(name, d, experts, k, expert_hidden, capacity_factor, vocab, seq_len,
                   dropless_impl="auto"):
    if name == "dense":
        sublayer = {"kind": "ffn", "intermediate_dim": k * expert_hidden, "activation": "gelu"}
    else:
        sublayer = {
            "kind": "moe", "num_experts": experts, "intermediate_dim": expert_hidden,
            "activation": "gelu", "router": "top_k", "top_k": k,
            "capacity_factor": None if name == "dropless" else capacity_factor,
            "eval_capacity_factor": "same", "load_balance_loss_weight": 0.01,
            "z_loss_weight": 0.0, "group_size": None, "jitter": 0.0,
            "dropless_impl": dropless_impl,
        }
    return {
        "vocabulary_size": vocab, "hidden_dim": d, "blocks": {"sublayers": [sublayer]},
        "num_layers": 1, "max_sequence_length": seq_len, "norm": "rms",
        "tie_embeddings": True,
    }


def compile_variant(args):
    import jax

    jax.config.update("jax_disable_most_optimizations", False)
    if args.save_hlo:
        # Keep the compiled program's text for `--attribute`.
        compile_lowered = jax.stages.Lowered.compile

        def compile_and_save(lowered, *a, **kw):
            compiled = compile_lowered(lowered, *a, **kw)
            os.makedirs(args.save_hlo, exist_ok=True)
            with open(os.path.join(args.save_hlo, f"{args.variant}.hlo"), "w") as f:
                f.write(compiled.as_text())
            return compiled

        jax.stages.Lowered.compile = compile_and_save
    from keras_brainformer.distribution import tpu_compile

    config = variant_config(
        args.variant, args.d, args.experts, args.k, args.expert_hidden or 4 * args.d,
        args.capacity_factor, args.vocab, args.seq_len, args.dropless_impl,
    )
    mesh = args.mesh if args.variant != "dense" else args.dense_mesh or args.mesh
    experts_on = args.experts_on if args.variant != "dense" else None
    report = tpu_compile.compile_train_step(
        config, mesh, args.topology, batch_size=args.batch_size,
        sequence_length=args.seq_len, optimizer="adafactor", dtype=args.dtype,
        experts_on=experts_on, preset=f"{args.variant}",
    )
    out = report.to_dict()
    out.update(variant=args.variant, dropless_impl=args.dropless_impl, d=args.d,
               experts=args.experts, k=args.k, expert_hidden=args.expert_hidden or 4 * args.d,
               capacity_factor=args.capacity_factor, vocab=args.vocab)
    print(json.dumps(out))


# Parts of the step, matched in this order against an op's `op_name` metadata.
PARTS = (
    ("optimizer", r"adafactor|adamw|/optimizer"),
    ("router", r"/router"),
    ("experts (matmuls, activation)", r"/experts"),
    ("dispatch / combine (gather, scatter, one-hot)", r"_moe/|moe_feed_forward"),
    ("dense FFN", r"_ffn/"),
    ("embedding, logits, loss", r"embedding|token_logits|reversible|loss|cross_entropy|"
     r"final_norm|log_softmax|logsumexp"),
    ("norms", r"_norm/"),
)
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def attribute(hlo_text):
    """`{part: share}` of the compiled program's `estimated_cycles` (the TPU
    compiler's per-op cycle estimates in each fusion's backend config, a
    schedule model beside `optimal_seconds`), by the `op_name` of each op of
    the entry computation; collectives carry no estimate and are left out."""
    entry = hlo_text[hlo_text.index("\nENTRY "):]
    entry = entry[:entry.index("\n}\n")]
    cycles = collections.Counter()
    for line in entry.splitlines():
        found = _CYCLES.search(line)
        if not found:
            continue
        name = (_OP_NAME.search(line) or [None, ""])[1]
        part = next((p for p, pattern in PARTS if re.search(pattern, name)), "other")
        cycles[part] += int(found.group(1))
    total = sum(cycles.values()) or 1
    return {part: n / total for part, n in cycles.most_common()}


def ratio(a, b):
    return f"{a / b:.2f}" if a and b else "n/a"


def table(rows):
    by = {r["variant"]: r for r in rows if "error" not in r}
    print("| variant | slice | mesh | tokens | compiler estimate ms | unknown ops | roofline ms | "
          "FLOPs / chip | bytes / chip | XLA peak GiB | fits | compile s |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | error: {r['error'][:150]} |")
            continue
        mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
        est = r.get("estimated_seconds")
        print(
            f"| {r['variant']} | {r['topology']} | `{mesh}` experts on {r['experts_on']} | "
            f"{r['batch_size'] * r['sequence_length']:,} | "
            f"{est * 1e3:.2f} | {r.get('uncosted_custom_calls', 0)} | "
            f"{r['roofline_seconds'] * 1e3:.2f} | {r['flops']:.3g} | {r['bytes_accessed']:.3g} | "
            f"{r['peak_bytes'] / 2**30:.2f} | {'yes' if r['fits'] else 'no'} | "
            f"{r['compile_seconds']:.0f} |" if est else
            f"| {r['variant']} | {r['topology']} | `{mesh}` | "
            f"{r['batch_size'] * r['sequence_length']:,} | "
            + (f"refused by the compiler: {r['compiler_error'][:160]} |" if r["compiler_error"]
               else f"no estimate (optimal_seconds {r['optimal_seconds']:.4g}, custom calls "
               f"{r['custom_calls']}) |")
        )
    dense = by.get("dense")
    for name in ("moe", "dropless"):
        if dense and name in by:
            a, b = by[name], dense
            print(f"{name} / dense: compiler estimate "
                  f"{ratio(a.get('estimated_seconds'), b.get('estimated_seconds'))}, roofline "
                  f"{ratio(a['roofline_seconds'], b['roofline_seconds'])}, FLOPs "
                  f"{ratio(a['flops'], b['flops'])}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=VARIANTS, help="compile one variant here")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--topology", default="v4:4x4x4")
    parser.add_argument("--mesh", default="batch=64")
    parser.add_argument("--dense-mesh", default=None, help="mesh of the dense FFN (default --mesh)")
    parser.add_argument("--experts-on", default="batch", choices=("batch", "expert"))
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=None, help="default 4 d")
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--dropless-impl", default="auto",
                        choices=("auto", "slots", "blocks", "ragged"),
                        help="MoEFeedForward's dropless_impl (under a keras.distribution "
                        "with an expert layout the slot path is used whatever this says)")
    parser.add_argument("--vocab", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--dtype", default="mixed_bfloat16")
    parser.add_argument("--quick", action="store_true",
                        help="v4:2x2x1, batch=4, d=256, E=8, 16 x 512 tokens (a smoke run)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--out", help="JSON lines to append to")
    parser.add_argument("--save-hlo", help="folder for each variant's compiled HLO text")
    parser.add_argument("--attribute", nargs="*",
                        help="print each saved HLO file's estimated cycles by part and exit")
    parser.add_argument("--table", help="print the table of a JSON lines file and exit")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as f:
            table([json.loads(line) for line in f if line.strip()])
        return
    if args.attribute:
        for path in args.attribute:
            with open(path) as f:
                shares = attribute(f.read())
            print(path + ": " + ", ".join(f"{p} {v:.0%}" for p, v in shares.items()))
        return
    if args.quick:
        args.topology, args.mesh, args.d, args.experts = "v4:2x2x1", "batch=4", 256, 8
        args.batch_size, args.seq_len = 16, 512
    if args.variant:
        compile_variant(args)
        return
    rows = []
    for name in args.variants:
        command = [sys.executable, __file__, "--variant", name]
        for option in ("topology", "mesh", "dense_mesh", "experts_on", "d", "experts", "k",
                       "expert_hidden", "capacity_factor", "vocab", "batch_size", "seq_len",
                       "dtype", "save_hlo", "dropless_impl"):
            value = getattr(args, option)
            if value is not None:
                command += [f"--{option.replace('_', '-')}", str(value)]
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout,
                              env=dict(os.environ, KERAS_BACKEND="jax"))
        try:
            row = json.loads(done.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            row = {"variant": name, "error": " | ".join(tail)}
        row["wall_seconds"] = time.time() - start
        rows.append(row)
        print(f"{name}: {row.get('error') or 'compiled'} ({row['wall_seconds']:.0f} s)", flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    table(rows)


if __name__ == "__main__":
    main()

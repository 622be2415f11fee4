"""What is alive at the peak of a program compiled by XLA's TPU compiler,
grouped by the model op that made each buffer (issue 34).

Compile with XLA's dumps on, then read the dump of the train step:

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*train_step.*" \\
        KERAS_BACKEND=jax keras-brainformer compile --preset dense_8b --topology v4:8x8x8 \\
        --mesh batch=64,model=8 --fsdp --batch-size 64 --seq-len 1024 --dtype mixed_bfloat16
    python docs/tpu_evidence/peak_breakdown.py /tmp/dump/module_0000.jit_train_step.*.after_optimizations.txt

It reads `*-live-range.txt` ("Live ranges at N (peak)": the heap's buffers
at its peak, arguments not included) beside the given HLO text, follows each
buffer through copies and bitcasts to the instruction that made it, and sums
the bytes by that instruction's `op_name` (block and layer indices folded).
"""

import collections
import re
import sys

FOLLOW = ("copy-start", "copy-done", "bitcast", "get-tuple-element", "copy")


def peak_buffers(live_range_text):
    section = live_range_text[
        live_range_text.index("(peak):"):live_range_text.index("Stack trace breakdown")
    ]
    return [(name, int(size)) for name, _, size in
            re.findall(r"^\s+([\w.\-]+)\{([\d,]*)\}: (\d+) bytes", section, re.M)]


def instruction_lines(hlo_text):
    lines = {}
    for line in hlo_text.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line)
        if match:
            lines[match.group(1)] = line
    return lines


def origin(name, lines, depth=0):
    """The `op_name` of the model op that made buffer `name`."""
    line = lines.get(name)
    if line is None:
        return "?"
    meta = re.search(r'op_name="([^"]+)"', line)
    op = re.search(r"[)}\]] ([\w\-]+)\(", line)
    opcode = op.group(1) if op else "?"
    if (opcode in FOLLOW or not meta) and depth < 8:
        operands = re.search(re.escape(opcode) + r"\(([^)]*)\)", line)
        names = re.findall(r"%([\w.\-]+)", operands.group(1)) if operands else []
        if names:
            found = origin(names[0], lines, depth + 1)
            if found != "?":
                return found
    return meta.group(1) if meta else opcode


def main(hlo_path):
    live_path = hlo_path.replace(".after_optimizations.txt", ".after_optimizations-live-range.txt")
    buffers = peak_buffers(open(live_path).read())
    lines = instruction_lines(open(hlo_path).read())
    groups, counts, shapes = collections.Counter(), collections.Counter(), {}
    for name, size in buffers:
        key = re.sub(r"block_\d+/\d+_", "block/", origin(name, lines))
        key = re.sub(r"\[\d+\]", "[#]", key)
        groups[key] += size
        counts[key] += 1
        shape = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\S+)", lines.get(name, ""))
        shapes.setdefault(key, re.sub(r"\{[^}]*\}", "", shape.group(1)) if shape else "?")
    total = sum(size for _, size in buffers)
    print(f"heap at its peak: {total / 2**20:.1f} MiB in {len(buffers)} buffers\n")
    print("| MiB | buffers | e.g. | made by |")
    print("|---:|---:|---|---|")
    for key, size in groups.most_common():
        if size >= 2**20:
            print(f"| {size / 2**20:.1f} | {counts[key]} | `{shapes[key]}` | `{key}` |")


if __name__ == "__main__":
    main(sys.argv[1])

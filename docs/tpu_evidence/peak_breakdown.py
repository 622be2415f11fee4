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

`--at logits` reads instead what is alive when the logits are made (the end
of the forward pass, where the saved activations are all alive), from the
live ranges of every buffer and their sizes in `*-buffer-assignment.txt`;
this set includes the arguments (the `state[...]` rows), and it is this
tally's own sum, which need not equal XLA's `peak_memory_in_bytes`.
`--at N` reads it at position N of the program's instruction sequence.
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


def buffers_at(live_range_text, assignment_text, lines, at):
    """`(buffer, bytes)` of every buffer alive at schedule position `at`
    (`"logits"`: where the last `jvp(token_embedding)/dot_general` is)."""
    sizes = {}
    for name, size in re.findall(r"value: <\d+ ([\w.\-]+(?:\{[\d,]*\})?) @\d+> \(size=(\d+)",
                                 assignment_text):
        name = name if "{" in name else name + "{}"
        sizes[name] = max(sizes.get(name, 0), int(size))
    head = live_range_text[:live_range_text.index("BufferLiveRange")]
    position = {name: int(i) for i, name in re.findall(r"^\s+(\d+):([\w.\-]+)$", head, re.M)}
    if at == "logits":
        at = max(i for name, i in position.items()
                 if re.search(r'op_name="[^"]*jvp\(token_embedding\)/dot_general"',
                              lines.get(name, "")))
    ranges = live_range_text[live_range_text.index("BufferLiveRange"):
                             live_range_text.index("Live ranges at")]
    alive = [(name, sizes[name]) for name, start, end in
             re.findall(r"^\s+([\w.\-]+\{[\d,]*\}):(\d+)-(\d+)$", ranges, re.M)
             if int(start) <= int(at) <= int(end) and name in sizes]
    return int(at), [(name.split("{")[0], size) for name, size in alive]


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


def main(hlo_path, at=None):
    live_path = hlo_path.replace(".after_optimizations.txt", ".after_optimizations-live-range.txt")
    lines = instruction_lines(open(hlo_path).read())
    if at is None:
        buffers = peak_buffers(open(live_path).read())
        where = "heap at its peak"
    else:
        assignment = hlo_path.replace(".after_optimizations.txt",
                                      ".after_optimizations-buffer-assignment.txt")
        at, buffers = buffers_at(open(live_path).read(), open(assignment).read(), lines, at)
        where = f"alive at position {at} (arguments included)"
    groups, counts, shapes = collections.Counter(), collections.Counter(), {}
    for name, size in buffers:
        key = re.sub(r"block_\d+/\d+_", "block/", origin(name, lines))
        key = re.sub(r"\[\d+\]", "[#]", key)
        key = re.sub(r"block/\d+_", "block/", key)
        groups[key] += size
        counts[key] += 1
        shape = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = (\S+)", lines.get(name, ""))
        shapes.setdefault(key, re.sub(r"\{[^}]*\}", "", shape.group(1)) if shape else "?")
    total = sum(size for _, size in buffers)
    print(f"{where}: {total / 2**20:.1f} MiB in {len(buffers)} buffers\n")
    print("| MiB | buffers | e.g. | made by |")
    print("|---:|---:|---|---|")
    for key, size in groups.most_common():
        if size >= 2**20:
            print(f"| {size / 2**20:.1f} | {counts[key]} | `{shapes[key]}` | `{key}` |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--at" else None)

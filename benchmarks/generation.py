"""Cached `generate()` against uncached greedy decoding, tokens per second.

    KERAS_BACKEND=jax python benchmarks/generation.py            # batch 1 and 8, 256 new tokens
    KERAS_BACKEND=jax python benchmarks/generation.py --quick    # smoke run

Both decode greedily from the same prompt with the same model:
- cached: `BrainformerCausalLM.generate` (one prefill pass, then one token per
  step through the KV caches; compiled once);
- uncached: a compiled full forward pass over the whole fixed-length buffer
  for every new token (what decoding costs without a cache; static shapes,
  so one compilation too).
Each is compiled and warmed up first, then timed `--reps` times (median).
The outputs are checked to be identical. Prints a markdown table; the ratio
is the result, absolute times are context (shared machines are noisy).
"""

import argparse
import time

import keras
import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="brainformer1_tiny_stdlib")
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.new_tokens, args.batch_sizes, args.reps = 16, [1], 1

    from keras_brainformer.models import BrainformerCausalLM

    lm = BrainformerCausalLM.from_preset(args.preset, preprocessor=None)
    lm.compile(sampler="greedy")
    total = args.prompt_length + args.new_tokens
    vocabulary = lm.backbone.vocabulary_size
    print(
        f"{args.preset}, backend {keras.config.backend()}, prompt {args.prompt_length}, "
        f"{args.new_tokens} new tokens, median of {args.reps}"
    )
    rows = []
    for batch in args.batch_sizes:
        rng = np.random.default_rng(0)
        token_ids = np.zeros((batch, total), "int32")
        prompt_ids = rng.integers(4, vocabulary, (batch, args.prompt_length))
        token_ids[:, : args.prompt_length] = prompt_ids
        mask = np.zeros((batch, total), "int32")
        mask[:, : args.prompt_length] = 1
        prompt = {"token_ids": token_ids, "padding_mask": mask}

        def cached():
            out = lm.generate(prompt, stop_token_ids=None)
            return np.asarray(keras.ops.convert_to_numpy(out["token_ids"]))

        def uncached():
            ids = token_ids.copy()
            ones = np.ones_like(ids)
            for index in range(args.prompt_length, total):
                logits = lm.predict_on_batch({"token_ids": ids, "padding_mask": ones})
                ids[:, index] = np.asarray(logits)[:, index - 1].argmax(-1)
            return ids

        results = {}
        for name, fn in (("cached", cached), ("uncached", uncached)):
            output = fn()  # compile + warm up
            times = []
            for _ in range(args.reps):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            results[name] = (float(np.median(times)), output)
        same = np.array_equal(results["cached"][1], results["uncached"][1])
        tokens = batch * args.new_tokens
        cached_s, uncached_s = results["cached"][0], results["uncached"][0]
        rows.append(
            f"| {batch} | {tokens / cached_s:.0f} | {tokens / uncached_s:.0f} | "
            f"{uncached_s / cached_s:.1f} | {'yes' if same else 'NO'} |"
        )
    print("| batch | cached tokens/s | uncached tokens/s | speed-up | same tokens |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()

"""Train a tiny Brainformer for a few hundred steps on the Python reference text.

Run: `keras-brainformer-demo` (or `python -m keras_brainformer.cli.demo`). Prints
parameter counts, a Keras progress bar with loss and routing statistics, and
the validation loss before and after training.
"""

import argparse
import math
import time

import keras
import numpy as np

from keras_brainformer.models import AttentionSpec
from keras_brainformer.models import BlockSpec
from keras_brainformer.models import BrainformerBackbone
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.models import FeedForwardSpec
from keras_brainformer.models import MoESpec
from keras_brainformer.training.builtin_text import BYTE_VOCABULARY_SIZE
from keras_brainformer.training.builtin_text import byte_lm_arrays
from keras_brainformer.training.builtin_text import pydoc_text
from keras_brainformer.zoo import count_parameters


def tiny_brainformer_block(hidden_dim=64, num_experts=8):
    """An 8-sublayer Brainformer-style block at toy width: 2 attention, 2 dense
    FFN and 4 MoE sublayers (expert choice, capacity factor 1, as block 1)."""
    moe = dict(num_experts=num_experts, router="expert_choice", capacity_factor=1.0)
    return BlockSpec(
        [
            AttentionSpec(num_heads=4),
            MoESpec(intermediate_dim=2 * hidden_dim, activation="gated_gelu", **moe),
            FeedForwardSpec(intermediate_dim=2 * hidden_dim, activation="gated_gelu"),
            MoESpec(intermediate_dim=2 * hidden_dim, activation="relu", **moe),
            AttentionSpec(num_heads=4),
            MoESpec(intermediate_dim=2 * hidden_dim, activation="gated_gelu", **moe),
            FeedForwardSpec(intermediate_dim=2 * hidden_dim, activation="gated_gelu"),
            MoESpec(intermediate_dim=2 * hidden_dim, activation="relu", **moe),
        ]
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sequence-length", type=int, default=128)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--num-blocks", type=int, default=2)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    keras.utils.set_random_seed(args.seed)
    (x, y), (x_val, y_val) = byte_lm_arrays(pydoc_text(), args.sequence_length)
    print(
        f"Corpus: pydoc_data.topics, {x['token_ids'].size + x_val['token_ids'].size:,} "
        f"bytes; {len(y):,} training and {len(y_val):,} validation sequences of "
        f"{args.sequence_length} bytes. Backend: {keras.backend.backend()}."
    )
    backbone = BrainformerBackbone(
        vocabulary_size=BYTE_VOCABULARY_SIZE,
        hidden_dim=args.hidden_dim,
        blocks=tiny_brainformer_block(args.hidden_dim),
        num_layers=args.num_blocks,
        max_sequence_length=args.sequence_length,
    )
    counts = count_parameters(backbone.get_config())
    print(f"Parameters: {counts['total']:,} total, {counts['activated']:,} activated per token.")
    lm = BrainformerCausalLM(backbone)
    lm.compile(
        optimizer=keras.optimizers.Adam(args.learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = lm.evaluate(x_val, y_val, batch_size=args.batch_size, verbose=0, return_dict=True)
    # Exactly `steps` batches: successive shuffles of the training set.
    rng = np.random.default_rng(args.seed)
    needed = args.steps * args.batch_size
    order = np.concatenate(
        [rng.permutation(len(y)) for _ in range(-(-needed // len(y)))]
    )[:needed]
    start = time.time()
    lm.fit(
        {name: array[order] for name, array in x.items()},
        y[order],
        batch_size=args.batch_size,
        epochs=1,
        shuffle=False,
        validation_data=(x_val, y_val),
    )
    seconds = time.time() - start
    modes = lm.evaluate_routing_modes(
        x_val, y_val, batch_size=args.batch_size, verbose=0, return_dict=True
    )
    after, leaky = modes["causal"], modes["as_trained"]
    print(
        f"Validation loss: {before['loss']:.3f} -> {after['loss']:.3f} nats/byte "
        f"({after['loss'] / math.log(2):.2f} bits/byte) after "
        f"{args.steps} steps in {seconds:.0f} s, causal routing (what generation "
        f"uses); {leaky['loss']:.3f} with the trained expert-choice routing, "
        "which sees later tokens of the sequence."
    )
    for path, stats in backbone.routing_statistics().items():
        print(
            f"  {path}: dropped {stats['dropped_fraction']:.3f}, "
            f"load cv {stats['load_cv']:.3f}, entropy {stats['router_entropy']:.3f}"
        )
    return after["loss"]


if __name__ == "__main__":
    main()

"""Issue 33: glam_small (per-expert init, and the old init) vs dense_small at equal steps;
8 experts vs 2 experts (k=2, equal activated compute)."""
import sys
from keras_brainformer.layers import experts
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.training.compare import compare_families

arm = sys.argv[1]
common = dict(steps=600, seeds=(0, 1, 2), eval_every=100, tokenizer="preset", sequence_length=128,
              batch_size=16, optimizer="adafactor", learning_rate=0.01, validation_batches=8)
if arm == "new":
    compare_families(("glam_small", "dense_small"), out="docs/study_evidence/per_step_600/fixed_init",
                     reference="dense_small", **common)
elif arm == "e2":
    compare_families(("/work/exp/glam_small_2e",)  # presets/glam_small copied, num_experts 8 -> 2 in config.json, out="docs/study_evidence/per_step_600/fixed_init_2_experts",
                     reference=None, **common)
elif arm == "old":
    print("the old-init arm runs as 'old_now'")
else:
    # The initialisation before issue 33: Keras' fans over the whole [E, d, h] kernel.
    experts.expert_initializer = lambda initializer, num_experts: clone_initializer(initializer)
    compare_families(("glam_small",), out="docs/study_evidence/per_step_600/old_init",
                     reference=None, **common)

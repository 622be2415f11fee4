"""The slow test's setting (tests/test_experts_earn_their_parameters.py), seeds 0-2, with the
default router since issue 33 (std 1/sqrt(d)): `new` runs 8 experts, dense and 2 experts; `old` 8 experts
with the expert initialisation before issue 33. Run from the repository root."""
import json
import sys

sys.path.insert(0, "tests")
import test_experts_earn_their_parameters as t

from keras_brainformer.layers import experts
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.training.builtin_text import byte_lm_arrays
from keras_brainformer.training.builtin_text import pydoc_text

if sys.argv[1] == "old":
    experts.expert_initializer = lambda initializer, num_experts: clone_initializer(initializer)
train, (x_val, y_val) = byte_lm_arrays(pydoc_text()[:1_500_000], t.SEQUENCE, 0.05)
validation = ({k: v[:256] for k, v in x_val.items()}, y_val[:256])
seeds = (0, 1, 2)
variants = ["8 experts", "dense", "2 experts"] if sys.argv[1] == "new" else ["8 experts"]
out = {v: [t._validation_loss(v, s, train, validation) for s in seeds] for v in variants}
print(sys.argv[1], json.dumps({k: [round(x, 4) for x in v] for k, v in out.items()}))

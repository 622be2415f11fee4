"""Why does Brainformer-1's causal (top-1) inference loss trail its as-trained (expert choice) loss more
with per-expert initialised experts? Train brainformer1_small, seed 0, for study 2's 826 steps, then
evaluate causally with k = 1, 2, 3 experts per token (the routers' eval_capacity_factor) and as trained.

    python ec_inference_k.py new | old    (old: the expert initialisation before issue 33)

Both ran with the router default of issue 33; results in ec_inference_k.csv."""
import json, sys
from keras_brainformer.layers import ExpertChoiceRouter
from keras_brainformer.models import BrainformerCausalLM
from keras_brainformer.training import compare

if sys.argv[1] == "old":
    from keras_brainformer.layers import experts
    from keras_brainformer.layers.initializers import clone_initializer
    experts.expert_initializer = lambda initializer, num_experts: clone_initializer(initializer)
orig = BrainformerCausalLM.evaluate_routing_modes
extra = {}
def patched(self, *args, **kwargs):
    results = orig(self, *args, **kwargs)
    routers = [l for l in self._flatten_layers() if isinstance(l, ExpertChoiceRouter)]
    # tokens taken per token in training: the routers' last expert_load not enough; record eval losses
    for k in (1.0, 2.0, 3.0):
        for r in routers:
            r.eval_capacity_factor = k
        self.set_inference_routing("causal")
        extra[f"causal_k{int(k)}"] = self.evaluate(*args, **kwargs)["loss"]
    for r in routers:
        r.eval_capacity_factor = 1.0
    print("EXTRA", json.dumps(extra), "modes", {m: v["loss"] for m, v in results.items()}, flush=True)
    return results
BrainformerCausalLM.evaluate_routing_modes = patched
compare.compare_families(("brainformer1_small",), out=f"/tmp/ec_gap_{sys.argv[1]}", steps=826, seeds=(0,),
    eval_every=50, tokenizer="preset", sequence_length=128, batch_size=16, optimizer="adafactor",
    learning_rate=0.01, validation_batches=8, max_corpus_bytes=2000000, reference=None, verbose=0)

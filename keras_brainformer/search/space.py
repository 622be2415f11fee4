"""The block search space of the paper's Table 1, scalable to a CPU proxy.

A *genome* is a flat dict of genes (KerasTuner hyper-parameter values: ints,
floats and strings, so it travels through KerasTuner's trial files and gRPC
unchanged):

    model_dim         the backbone width d, shared by every sublayer
    gating            "top_2" (token choice, k=2) or "expert_choice"
    capacity_factor   of every MoE sublayer of the block
    s{i}_type         slot i: "attention", "moe" or "ffn"
    s{i}_heads        attention heads of slot i (if attention)
    s{i}_hidden       hidden width of slot i's dense FFN or of each expert
    s{i}_activation   activation of slot i's FFN or experts

Table 1 lists separate value sets for the MoE and the dense-FFN hidden width;
they are the same set, and a slot is one type at a time, so one `s{i}_hidden`
gene serves both. Gating and capacity factor are per block (the paper's
Brainformer-1 uses expert choice with capacity factor 1 throughout).

Heads: the head width is fixed (`64 * scale`, kept even for rotary
positions) and the attention width is `heads * head_dim`, which
`AttentionSpec(head_dim=...)` allows to differ from d. So every head count of
Table 1 (12, 16, 20) is valid with every model dim (512, 768, 1024), and at a
proxy scale the heads keep the paper's counts. The number of experts is not
searched (the paper fixes 32 at 100M scale; the CPU proxy default is 8).

Genes that do not shape the block (the heads of an FFN slot, the gating of a
block without MoE) are kept, inactive: mutation only touches *active* genes,
so every mutation changes the block.
"""

import random

from keras_brainformer.models.brainformer.block_spec import GLAM_LOAD_BALANCE_LOSS_WEIGHT
from keras_brainformer.models.brainformer.block_spec import AttentionSpec
from keras_brainformer.models.brainformer.block_spec import BlockSpec
from keras_brainformer.models.brainformer.block_spec import FeedForwardSpec
from keras_brainformer.models.brainformer.block_spec import MoESpec

# === The paper's Table 1 (100M scale) ===
LAYER_TYPES = ("attention", "moe", "ffn")
MODEL_DIMS = (512, 768, 1024)
HIDDEN_DIMS = (1536, 2048, 3072, 4096)
NUM_HEADS = (12, 16, 20)
GATINGS = ("top_2", "expert_choice")
CAPACITY_FACTORS = (1.0, 2.0, 3.0, 4.0)
ACTIVATIONS = ("gated_relu", "gated_gelu", "relu", "gelu")
HEAD_DIM = 64
PAPER_NUM_EXPERTS = 32
PROXY_NUM_EXPERTS = 8

BLOCK_GENES = ("model_dim", "gating", "capacity_factor")
SLOT_GENES = ("type", "heads", "hidden", "activation")
LAYER_LETTERS = {"attention": "A", "moe": "M", "ffn": "F"}


def slot_gene(index, name):
    """The name of gene `name` (`type`, `heads`, `hidden`, `activation`) of slot `index`."""
    return f"s{index}_{name}"


def _scaled(values, scale, name, even=False):
    out = []
    for value in values:
        scaled = max(1, int(round(value * scale)))
        if even:
            scaled = max(2, 2 * int(round(scaled / 2)))
        out.append(scaled)
    if len(set(out)) != len(out):
        raise ValueError(
            f"`scale`={scale!r} maps distinct {name} values {tuple(values)} onto the "
            f"same widths {tuple(out)}: use a larger scale."
        )
    return tuple(out)


class SearchSpace:
    """The search space of an N-sublayer block over the paper's Table 1.

    Widths (model dim, hidden dims, head width) are the paper's values times
    `scale`, so the same space runs as a CPU proxy (`scale=1/8`: d in
    64/96/128) and at paper size (`scale=1`).

    Args:
        num_sublayers: sublayers per block (the paper: 8).
        scale: factor on every width (0 < scale <= 1 typically).
        gating: the gating options searched; `("top_2",)` is the paper's
            "Search-w-Top2".
        num_experts: experts of every MoE sublayer (fixed, not searched).
        model_dims, hidden_dims, num_heads, capacity_factors, activations:
            the value sets at paper scale (default: Table 1).

    Example:
    >>> import random
    >>> space = SearchSpace(num_sublayers=4, scale=1 / 8, num_experts=4)
    >>> genome = space.sample(random.Random(0))
    >>> child = space.mutate(genome, random.Random(1))
    >>> sum(genome[g] != child[g] for g in genome)
    1
    >>> spec = space.to_block_spec(child)
    >>> len(spec.sublayers)
    4
    >>> space.model_dims
    (64, 96, 128)
    """

    def __init__(
        self,
        num_sublayers=8,
        scale=1 / 8,
        gating=GATINGS,
        num_experts=PROXY_NUM_EXPERTS,
        model_dims=MODEL_DIMS,
        hidden_dims=HIDDEN_DIMS,
        num_heads=NUM_HEADS,
        capacity_factors=CAPACITY_FACTORS,
        activations=ACTIVATIONS,
    ):
        if isinstance(num_sublayers, bool) or not isinstance(num_sublayers, int) or (
            num_sublayers < 1
        ):
            raise ValueError(
                "`num_sublayers` must be an integer >= 1. "
                f"Received: num_sublayers={num_sublayers!r}"
            )
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
            raise ValueError(f"`scale` must be a number > 0. Received: scale={scale!r}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
            raise ValueError(
                f"`num_experts` must be an integer >= 2 (top-2 gating). "
                f"Received: num_experts={num_experts!r}"
            )
        if isinstance(gating, str):
            gating = (gating,)
        gating = tuple(gating)
        unknown = [g for g in gating if g not in GATINGS]
        if not gating or unknown:
            raise ValueError(
                f"`gating` must be a non-empty subset of {GATINGS}. Received: gating={gating!r}"
            )
        for name, values in (
            ("model_dims", model_dims),
            ("hidden_dims", hidden_dims),
            ("num_heads", num_heads),
            ("capacity_factors", capacity_factors),
            ("activations", activations),
        ):
            if isinstance(values, (str, bytes)) or not values:
                raise ValueError(f"`{name}` must be a non-empty list. Received: {values!r}")
        for value in capacity_factors:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(
                    f"`capacity_factors` must hold numbers > 0. Received: {tuple(capacity_factors)}"
                )
        # Raises for unknown activations / bad head counts.
        for activation in activations:
            FeedForwardSpec(intermediate_dim=1, activation=activation)
        for heads in num_heads:
            AttentionSpec(num_heads=heads)

        self.num_sublayers = num_sublayers
        self.scale = float(scale)
        self.gating = gating
        self.num_experts = num_experts
        self.model_dims = _scaled(model_dims, scale, "model_dims")
        self.hidden_dims = _scaled(hidden_dims, scale, "hidden_dims")
        self.head_dim = _scaled((HEAD_DIM,), scale, "head_dim", even=True)[0]
        self.num_heads = tuple(int(h) for h in num_heads)
        self.capacity_factors = tuple(float(c) for c in capacity_factors)
        self.activations = tuple(activations)
        self.paper_model_dims = tuple(model_dims)
        self.paper_hidden_dims = tuple(hidden_dims)

    # === Genes ===

    def choices(self, gene):
        """The values gene `gene` may take."""
        if gene == "model_dim":
            return self.model_dims
        if gene == "gating":
            return self.gating
        if gene == "capacity_factor":
            return self.capacity_factors
        slot, _, name = gene.partition("_")
        if slot.startswith("s") and slot[1:].isdigit() and int(slot[1:]) < self.num_sublayers:
            options = {
                "type": LAYER_TYPES,
                "heads": self.num_heads,
                "hidden": self.hidden_dims,
                "activation": self.activations,
            }
            if name in options:
                return options[name]
        raise ValueError(f"Unknown gene {gene!r}. Genes: {self.gene_names()}.")

    def gene_names(self):
        """Every gene, block genes first, then slot by slot."""
        names = list(BLOCK_GENES)
        for i in range(self.num_sublayers):
            names.extend(slot_gene(i, name) for name in SLOT_GENES)
        return tuple(names)

    def active_genes(self, genome):
        """The genes that shape the block of `genome` (what mutation may change)."""
        self.check_genome(genome)
        types = [genome[slot_gene(i, "type")] for i in range(self.num_sublayers)]
        active = ["model_dim"]
        if "moe" in types:
            active += ["gating", "capacity_factor"]
        for i, kind in enumerate(types):
            active.append(slot_gene(i, "type"))
            if kind == "attention":
                active.append(slot_gene(i, "heads"))
            else:
                active += [slot_gene(i, "hidden"), slot_gene(i, "activation")]
        return tuple(active)

    def check_genome(self, genome):
        """Raises a ValueError naming the gene if `genome` is not in the space."""
        if not isinstance(genome, dict):
            raise TypeError(f"A genome must be a dict of genes. Received: {genome!r}")
        missing = [g for g in self.gene_names() if g not in genome]
        extra = sorted(set(genome) - set(self.gene_names()))
        if missing or extra:
            raise ValueError(
                f"Genome genes do not match the space: missing {missing}, unknown {extra}."
            )
        for gene in self.gene_names():
            if genome[gene] not in self.choices(gene):
                raise ValueError(
                    f"Gene {gene!r}={genome[gene]!r} is not in the space. "
                    f"Allowed values: {self.choices(gene)}."
                )
        return genome

    # === Sampling and mutation ===

    def sample(self, rng):
        """A genome with every gene drawn uniformly (`rng`: a `random.Random`)."""
        return {gene: rng.choice(self.choices(gene)) for gene in self.gene_names()}

    def mutate(self, genome, rng):
        """A copy of `genome` with exactly one active gene changed to another value."""
        mutable = [g for g in self.active_genes(genome) if len(self.choices(g)) > 1]
        if not mutable:
            raise ValueError("No active gene of this genome has more than one value to mutate.")
        gene = rng.choice(mutable)
        child = dict(genome)
        child[gene] = rng.choice([v for v in self.choices(gene) if v != genome[gene]])
        return child

    # === Genome -> block ===

    def to_block_spec(self, genome):
        """The `BlockSpec` of `genome` (the model dim is `genome["model_dim"]`)."""
        sublayers = []
        for i in range(self.num_sublayers):
            kind = genome[slot_gene(i, "type")]
            if kind == "attention":
                heads = int(genome[slot_gene(i, "heads")])
                sublayers.append(AttentionSpec(num_heads=heads, head_dim=self.head_dim))
                continue
            hidden = int(genome[slot_gene(i, "hidden")])
            activation = genome[slot_gene(i, "activation")]
            if kind == "ffn":
                sublayers.append(FeedForwardSpec(intermediate_dim=hidden, activation=activation))
            elif kind == "moe":
                sublayers.append(self._moe(genome, hidden, activation))
            else:
                raise ValueError(
                    f"Gene {slot_gene(i, 'type')!r}={kind!r}: allowed values {LAYER_TYPES}."
                )
        return BlockSpec(sublayers)

    def _moe(self, genome, hidden, activation):
        gating = genome["gating"]
        capacity_factor = float(genome["capacity_factor"])
        if gating == "top_2":
            return MoESpec(
                num_experts=self.num_experts,
                intermediate_dim=hidden,
                activation=activation,
                router="top_k",
                top_k=2,
                capacity_factor=capacity_factor,
                load_balance_loss_weight=GLAM_LOAD_BALANCE_LOSS_WEIGHT,
            )
        if gating == "expert_choice":
            return MoESpec(
                num_experts=self.num_experts,
                intermediate_dim=hidden,
                activation=activation,
                router="expert_choice",
                capacity_factor=capacity_factor,
            )
        raise ValueError(f"Gene 'gating'={gating!r}: allowed values {GATINGS}.")

    def to_backbone_config(
        self, genome, vocabulary_size, num_blocks=3, max_sequence_length=1024
    ):
        """`BrainformerBackbone` kwargs: the block of `genome` stacked `num_blocks` times."""
        return {
            "vocabulary_size": int(vocabulary_size),
            "hidden_dim": int(genome["model_dim"]),
            "blocks": self.to_block_spec(genome).to_dict(),
            "num_layers": int(num_blocks),
            "max_sequence_length": int(max_sequence_length),
            "norm": "rms",
            "tie_embeddings": True,
        }

    def describe(self, genome):
        """A one-line summary, e.g. `d=96 EC cf1: A12 M384gg F192g ...`."""
        parts = []
        for i in range(self.num_sublayers):
            kind = genome[slot_gene(i, "type")]
            if kind == "attention":
                parts.append(f"A{genome[slot_gene(i, 'heads')]}")
            else:
                short = {"gated_relu": "gr", "gated_gelu": "gg", "relu": "r", "gelu": "g"}
                act = genome[slot_gene(i, "activation")]
                parts.append(
                    f"{LAYER_LETTERS[kind]}{genome[slot_gene(i, 'hidden')]}{short.get(act, act)}"
                )
        head = f"d={genome['model_dim']}"
        if any(genome[slot_gene(i, "type")] == "moe" for i in range(self.num_sublayers)):
            gating = "EC" if genome["gating"] == "expert_choice" else "top2"
            head += f" {gating} cf{genome['capacity_factor']:g}"
        return f"{head}: {' '.join(parts)}"

    # === Baselines at the space's scale ===

    def _layer_pairs(self, second_layer):
        """A genome of repeated (attention, X) pairs at GLaM's 100M widths."""
        d = max(1, int(round(768 * self.scale)))
        hidden = max(1, int(round(3072 * self.scale)))
        genome = {"model_dim": d, "gating": "top_2", "capacity_factor": 2.0}
        for i in range(self.num_sublayers):
            kind = "attention" if i % 2 == 0 else second_layer(i)
            genome[slot_gene(i, "type")] = kind
            genome[slot_gene(i, "heads")] = 12
            genome[slot_gene(i, "hidden")] = hidden
            genome[slot_gene(i, "activation")] = "gelu" if kind == "moe" else "gated_gelu"
        return genome

    def glam_genome(self):
        """GLaM's layout at the space's scale: (attention, top-2 MoE, attention,
        gated-GELU FFN) repeated, d=768·scale, 12 heads, hidden 3072·scale,
        capacity factor 2 (GLaM's, as the `glam_*` presets). Not necessarily
        inside the space (e.g. if gating excludes top-2)."""
        return self._layer_pairs(lambda i: "moe" if i % 4 == 1 else "ffn")

    def dense_genome(self):
        """A dense Transformer at the space's scale: (attention, gated-GELU FFN)
        repeated, d=768·scale, 12 heads, FFN 3072·scale."""
        return self._layer_pairs(lambda i: "ffn")

    def get_config(self):
        return {
            "num_sublayers": self.num_sublayers,
            "scale": self.scale,
            "gating": list(self.gating),
            "num_experts": self.num_experts,
            "model_dims": list(self.paper_model_dims),
            "hidden_dims": list(self.paper_hidden_dims),
            "num_heads": list(self.num_heads),
            "capacity_factors": list(self.capacity_factors),
            "activations": list(self.activations),
        }

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def default_rng(seed):
    """A `random.Random` seeded from anything hashable-to-string (stable across runs)."""
    return random.Random(str(seed))

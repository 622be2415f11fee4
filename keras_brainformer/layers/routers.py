"""Routers: *who goes where*. They turn tokens into routing instructions for the
MoE layer, compute the auxiliary losses and keep routing statistics.

Shapes: `G` routing groups of `S` tokens, `E` experts, `C` slots per expert
(the capacity), `k` choices per token, `d` model width.

Every router returns routing instructions (`RoutingInstructions` for token
choice, `SlotRoutingInstructions` for expert choice): a slot table `slot_token[G, E, C]`
(which token of the group sits in each expert slot; `S` marks an empty slot) and
`slot_gate[G, E, C]` (the weight of that expert's output for that token). The
MoE layer gathers tokens into slots by these indices and sums the weighted
expert outputs back, so no token is ever multiplied by an expert it was not
routed to.

Router maths (logits, softmax, top-k, losses) always runs in float32.

Causality (decoders): a token's routing may depend on *later* tokens of its
group. Settings that are exactly causal when each group is one sequence:
top-k with `capacity_factor=None` (dropless) or capacity >= group size, and
top-1 with dropping in position order (a token competes only with earlier
tokens). Not causal: top-k with k >= 2 and dropping (all first choices of the
group, including later tokens', are served before any second choice),
batch-prioritized routing (ordered by confidence), and expert choice (experts
rank all tokens of the group). A group that spans several sequences couples
them (later sequences depend on earlier ones).

Causal inference: every router has `inference_routing`. `"causal"` (the
default) routes at inference (`training=False`) by dropless token choice on
the same router probabilities: top-k with `k` its own `k` (gates as in
training), and for expert choice top-`round(eval_capacity_factor)` with the raw
softmax scores as gates (the weights expert choice gives its tokens). Each
token's routing then depends on that token alone, so full-sequence evaluation
is exactly causal and equals token-by-token cached decoding. `"as_trained"`
keeps the training-time scheme (eval capacity factor) at inference, leaks
included: the gap between the two is what leaking was worth.
"""

import math
from typing import Any
from typing import NamedTuple

import keras
from keras import ops

from keras_brainformer.layers.grouped_scatter import segment_sum_per_group
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.renamed_arguments import refuse_old_names
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.layers.validation import check_capacity_factor
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.layers.validation import check_non_negative_float
from keras_brainformer.layers.validation import check_positive_int
from keras_brainformer.layers.validation import check_rate

INFERENCE_ROUTING = ("causal", "as_trained")

# The routers' argument defaults, one table each: the constructors'
# signatures below take them from here, and `MoEFeedForward` (its router
# arguments left unset) through `ROUTER_OPTIONS`.
ROUTER_DEFAULTS = {
    "eval_capacity_factor": "same",
    "z_loss_weight": 0.0,
    "jitter": 0.0,
    "inference_routing": "causal",
    "load_balance_loss_mode": "per_group",
}
TOP_K_DEFAULTS = {
    "top_k": 2,
    "capacity_factor": 1.25,
    "normalize_gates": None,
    "batch_prioritized": False,
    "load_balance_loss_weight": 0.01,  # GLaM's
}
EXPERT_CHOICE_DEFAULTS = {"capacity_factor": 2.0, "load_balance_loss_weight": 0.0}


class RoutingInstructions(NamedTuple):
    """What a token-choice router decided for a batch of groups: a named
    tuple of tensors, so a router also runs on symbolic tensors like any
    Keras layer.

    Attributes:
        slot_gate: float32 `[G, E, C]`, combine weight of each slot (0 if empty).
        slot_token: int32 `[G, E, C]`, the token (index within its group) in
            each expert slot; `S` (the group size) marks an empty slot.
        token_expert, token_position, token_gate, token_keep: `[G, S, k]`
            per-token choices: chosen expert, position in that expert's
            queue, gate, and whether the choice fits in capacity.
        capacity: `C`, the slots per expert (a property: the last axis of
            `slot_token`).

    Gates stay float32 whatever the layer's dtype policy: they are routing
    decisions, and the MoE layer combines expert outputs in float32.
    """

    slot_gate: Any
    slot_token: Any
    token_expert: Any
    token_position: Any
    token_gate: Any
    token_keep: Any

    @property
    def capacity(self):
        return self.slot_token.shape[-1]


class SlotRoutingInstructions(NamedTuple):
    """What an expert-choice router decided: only the slot table (experts pick
    tokens, so there are no per-token choices; `token_*` read None).
    Attributes as in `RoutingInstructions`."""

    slot_gate: Any
    slot_token: Any

    @property
    def capacity(self):
        return self.slot_token.shape[-1]

    token_expert = token_position = token_gate = token_keep = property(lambda self: None)


def compute_capacity(num_tokens, group_size, capacity_factor, num_experts):
    """Slots per expert: `ceil(num_tokens * capacity_factor / num_experts)`,
    at least 1 and at most `group_size` (no expert can take a token twice).

    `num_tokens` is `k * group_size` for top-k routing and `group_size` for
    expert choice. `capacity_factor=None` means dropless: `group_size` slots.
    """
    if capacity_factor is None:
        return group_size
    capacity = math.ceil(num_tokens * capacity_factor / num_experts - 1e-9)
    return int(min(max(capacity, 1), group_size))


LOAD_BALANCE_MODES = ("per_group", "pooled")


def load_balance_loss(probs, first_choice, mask, mode="per_group"):
    """Switch/GShard load-balance loss `E · Σ_e f_e · P_e`.

    Args:
        probs: float32 `[G, S, E]` router probabilities.
        first_choice: int `[G, S]` each token's top-1 expert.
        mask: float32 `[G, S]`, 1 for real tokens, 0 for padding.
        mode: `"per_group"` (default; GShard's Algorithm 1): `f_e`, `P_e` and
            the loss per routing group, then the mean over groups that hold
            at least one real token. `"pooled"`: `f_e` and `P_e` over all
            tokens of all groups at once (what this package used before),
            which can call an imbalanced batch balanced: two groups each
            routed entirely to a different expert pool to a balanced `f`.

    `f_e` is the fraction of (real) tokens whose first choice is `e`; `P_e` the
    mean router probability of `e`. Equals 1 under perfect balance.
    """
    check_choice("mode", mode, LOAD_BALANCE_MODES)
    num_experts = ops.shape(probs)[-1]
    one_hot = ops.one_hot(first_choice, num_experts, dtype="float32")
    axes = (0, 1) if mode == "pooled" else (1,)
    count = ops.sum(mask, axis=axes)  # [] or [G]
    safe = ops.maximum(count, 1.0)[..., None]
    fraction = ops.sum(one_hot * mask[..., None], axis=axes) / safe
    mean_prob = ops.sum(probs * mask[..., None], axis=axes) / safe
    loss = ops.cast(num_experts, "float32") * ops.sum(fraction * mean_prob, axis=-1)
    if mode == "pooled":
        return loss
    real_groups = ops.cast(count > 0, "float32")
    return ops.sum(loss * real_groups) / ops.maximum(ops.sum(real_groups), 1.0)


def router_z_loss(logits, mask):
    """ST-MoE router z-loss: mean over real tokens of `logsumexp(logits)²`."""
    z = ops.logsumexp(logits, axis=-1)
    count = ops.maximum(ops.sum(mask), 1.0)
    return ops.sum(ops.square(z) * mask) / count


class Router(keras.layers.Layer):
    """Base class: the router weight, float32 logits, losses and statistics.

    Subclasses set `allows_dropless` and implement `slots_per_token()` (how
    many slots a token asks for: `k`, or 1 for expert choice) and
    `route(probs, mask, training)`.

    A router is an ordinary Keras layer: called on `[G, S, d]` tokens (eager or
    symbolic) it returns `RoutingInstructions`, a named tuple of tensors. Its
    variables (the `[d, E]` kernel and the statistics) follow the layer's dtype
    policy (float32 under `mixed_bfloat16`, bfloat16 under a pure `bfloat16`
    policy); the logits, softmax, top-k, gates and losses are computed in
    float32 inside `call` whatever the policy.

    Routing statistics of the latest call are kept in non-trainable
    variables: `dropped_fraction` (share of token-choices that found no slot;
    for expert choice, share of tokens that no expert took), `expert_load`
    (`[E]`, share of filled slots per expert), `load_cv` (coefficient of
    variation of `expert_load`) and `router_entropy` (mean entropy of the
    router distribution, in nats).
    """

    allows_dropless = False

    def __init__(
        self,
        num_experts,
        capacity_factor=1.0,
        eval_capacity_factor=ROUTER_DEFAULTS["eval_capacity_factor"],
        load_balance_loss_weight=0.0,
        z_loss_weight=ROUTER_DEFAULTS["z_loss_weight"],
        jitter=ROUTER_DEFAULTS["jitter"],
        seed=None,
        kernel_initializer=None,
        inference_routing=ROUTER_DEFAULTS["inference_routing"],
        load_balance_loss_mode=ROUTER_DEFAULTS["load_balance_loss_mode"],
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.load_balance_loss_mode = check_choice(
            "load_balance_loss_mode", load_balance_loss_mode, LOAD_BALANCE_MODES
        )
        self.inference_routing = check_choice(
            "inference_routing", inference_routing, INFERENCE_ROUTING
        )
        self.capacity_factor = check_capacity_factor(
            "capacity_factor", capacity_factor, allow_none=self.allows_dropless
        )
        if eval_capacity_factor == "same":
            eval_capacity_factor = self.capacity_factor
        self.eval_capacity_factor = check_capacity_factor(
            "eval_capacity_factor", eval_capacity_factor, allow_none=self.allows_dropless
        )
        self.load_balance_loss_weight = check_non_negative_float(
            "load_balance_loss_weight", load_balance_loss_weight
        )
        self.z_loss_weight = check_non_negative_float(
            "z_loss_weight", z_loss_weight
        )
        self.jitter = check_rate("jitter", jitter)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"`seed` must be an int or None. Received: seed={seed!r}")
        self.seed = seed
        # GShard's gate: std 1/sqrt(d) (docs/moe_layers.md#initialisation).
        # Switch's scale 0.1 (the default up to release 0.1.0) kept routers near uniform
        # under Adafactor, whose updates scale with a weight's RMS (issue 33).
        self.kernel_initializer = keras.initializers.get(
            kernel_initializer
            or keras.initializers.VarianceScaling(1.0, "fan_in", "truncated_normal")
        )
        self.seed_generator = keras.random.SeedGenerator(seed) if jitter else None

    def build(self, input_shape):
        model_dim = input_shape[-1]
        self.kernel = self.add_weight(
            name="kernel",
            shape=(model_dim, self.num_experts),
            initializer=clone_initializer(self.kernel_initializer),
            dtype=self.variable_dtype,
            autocast=False,
        )

        def stat(name, shape=()):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer="zeros",
                dtype=self.variable_dtype,
                trainable=False,
                autocast=False,
            )

        self.dropped_fraction = stat("dropped_fraction")
        self.expert_load = stat("expert_load", (self.num_experts,))
        self.load_cv = stat("load_cv")
        self.router_entropy = stat("router_entropy")

    def slots_per_token(self):
        raise NotImplementedError

    def causal_k(self):
        """Experts per token of the causal inference routing."""
        raise NotImplementedError

    def causal_normalize_gates(self):
        """Whether the causal inference routing renormalises its k gates."""
        raise NotImplementedError

    def route_causally(self, probs, mask):
        """Dropless token choice: each token's routing depends on it alone."""
        S = ops.shape(probs)[1]
        return token_choice_route(
            probs,
            mask,
            k=self.causal_k(),
            capacity=S,
            normalize_gates=self.causal_normalize_gates(),
        )

    def capacity(self, group_size, training=False):
        """Slots per expert and group, from the train or eval capacity factor."""
        factor = self.capacity_factor if training else self.eval_capacity_factor
        return compute_capacity(
            self.slots_per_token() * group_size, group_size, factor, self.num_experts
        )

    def router_logits(self, x, training=False):
        """float32 logits `[G, S, E]`; multiplicative input jitter in training."""
        x = ops.cast(x, "float32")
        if training and self.jitter > 0:
            noise = keras.random.uniform(
                ops.shape(x),
                minval=1.0 - self.jitter,
                maxval=1.0 + self.jitter,
                seed=self.seed_generator,
                dtype="float32",
            )
            x = x * noise
        return ops.matmul(x, ops.cast(self.kernel, "float32"))

    def call(self, x, token_mask=None, training=False, causal=None):
        """Routes `x` `[G, S, d]`; `token_mask` `[G, S]` marks real tokens.

        At inference (`training=False`), `causal=True` forces the causal
        routing, `False` the training scheme, None follows
        `inference_routing`.
        """
        shape = ops.shape(x)
        if not isinstance(shape[1], int):
            raise ValueError(
                f"{type(self).__name__} needs a static group size to compute "
                f"its capacity; got a group of unknown length ({shape[1]})."
            )
        if token_mask is None:
            token_mask = ops.ones(shape[:2], "float32")
        # Any nonzero value marks a real token; routing and statistics use 0/1.
        mask = ops.cast(ops.not_equal(ops.cast(token_mask, "float32"), 0.0), "float32")
        logits = self.router_logits(x, training=training)
        probs = ops.softmax(logits, axis=-1)
        if causal is None:
            causal = self.inference_routing == "causal"
        if not training and causal:
            instructions, dropped = self.route_causally(probs, mask)
        else:
            instructions, dropped = self.route(probs, mask, training=training)
        if training:
            if self.load_balance_loss_weight > 0:
                first_choice = ops.argmax(probs, axis=-1)
                self.add_loss(
                    self.load_balance_loss_weight
                    * load_balance_loss(
                        probs, first_choice, mask, self.load_balance_loss_mode
                    )
                )
            if self.z_loss_weight > 0:
                self.add_loss(self.z_loss_weight * router_z_loss(logits, mask))
        self._update_statistics(probs, mask, instructions, dropped)
        return instructions

    def _update_statistics(self, probs, mask, instructions, dropped_fraction):
        count = ops.maximum(ops.sum(mask), 1.0)
        entropy = -ops.sum(probs * ops.log(probs + 1e-9), axis=-1)
        filled = ops.cast(
            instructions.slot_token < ops.shape(probs)[1], "float32"
        )  # [G, E, C]
        per_expert = ops.sum(filled, axis=(0, 2))
        load = per_expert / ops.maximum(ops.sum(per_expert), 1.0)
        mean = ops.mean(load)
        cv = ops.sqrt(ops.mean(ops.square(load - mean))) / ops.maximum(
            mean, 1e-9
        )
        for variable, value in (
            (self.dropped_fraction, dropped_fraction),
            (self.expert_load, load),
            (self.load_cv, cv),
            (self.router_entropy, ops.sum(entropy * mask) / count),
        ):
            variable.assign(ops.cast(value, variable.dtype))

    def routing_statistics(self):
        """The statistics of the latest call as a dict of Python floats/lists."""
        return {
            "dropped_fraction": float(ops.convert_to_numpy(self.dropped_fraction)),
            "load_cv": float(ops.convert_to_numpy(self.load_cv)),
            "router_entropy": float(ops.convert_to_numpy(self.router_entropy)),
            "expert_load": ops.convert_to_numpy(self.expert_load).tolist(),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "load_balance_loss_weight": self.load_balance_loss_weight,
                "load_balance_loss_mode": self.load_balance_loss_mode,
                "z_loss_weight": self.z_loss_weight,
                "jitter": self.jitter,
                "seed": self.seed,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "inference_routing": self.inference_routing,
            }
        )
        return config


def slot_choices(slot, keep, num_slots):
    """The choice in each slot, int32 `[G, num_slots]` (-1 if empty), from the
    slot each choice asks for (`slot`, `keep`: `[G, N]`, see `fill_slots`).

    Built by an integer scatter: not-kept choices go to a scratch slot (index
    `num_slots`) that is cut off afterwards; each slot sums its choice's index
    plus 1, so 0 marks an empty slot.
    """
    N = ops.shape(slot)[1]
    choice_index = ops.arange(N, dtype="int32")[None, :]
    slot = ops.where(keep, ops.cast(slot, "int32"), num_slots)
    slot_choice = segment_sum_per_group(
        (choice_index + 1) * ops.cast(keep, "int32"), slot, num_slots + 1
    )
    return slot_choice[:, :num_slots] - 1


def fill_slots(slot, keep, gates, num_slots, k):
    """The slot table of token choices: who sits in each slot, with what gate.

    Args:
        slot: int `[G, N]`, the slot each of the `N = S·k` choices of a group
            asks for (choice `n` is token `n // k`'s `(n % k)`-th choice); any
            value for a choice that is not kept.
        keep: bool `[G, N]`, whether each choice gets its slot (kept choices
            ask for distinct slots in `[0, num_slots)`).
        gates: float `[G, N]`, each choice's gate.
        num_slots: int, slots per group.
        k: int, choices per token.

    Returns:
        `(slot_token, slot_gate)`, int32 and float `[G, num_slots]`: the token
        in each slot (`N // k`, the group size, marks an empty slot) and its
        gate (0 if empty).

    The slots' choices come from `slot_choices` (an integer scatter); gates
    are then *gathered* by choice, so the gradient flows through a gather,
    never through a scatter.
    """
    N = ops.shape(slot)[1]
    slot_choice = slot_choices(slot, keep, num_slots)
    filled = slot_choice >= 0
    slot_token = ops.cast(ops.where(filled, slot_choice // k, N // k), "int32")
    # Empty slots read choice 0, masked to 0.
    slot_gate = ops.take_along_axis(gates, ops.where(filled, slot_choice, 0), axis=1)
    return slot_token, slot_gate * ops.cast(filled, slot_gate.dtype)


def token_choice_route(
    probs, mask, k, capacity, normalize_gates=True, batch_prioritized=False
):
    """Top-k token-choice routing with capacity `C` per expert and group.

    Args:
        probs: float32 `[G, S, E]` router probabilities.
        mask: float32 `[G, S]`, 1 for real tokens.
        k: experts per token.
        capacity: slots per expert, `C` (`S` makes it dropless).
        normalize_gates: renormalise the k gates to sum to 1.
        batch_prioritized: rank tokens by top-1 probability instead of position.

    Returns:
        `(RoutingInstructions, dropped_fraction)`.
    """
    G, S, E = ops.shape(probs)
    C = capacity
    gates, experts = ops.top_k(probs, k)  # [G, S, k]
    if normalize_gates:
        gates = gates / ops.maximum(ops.sum(gates, axis=-1, keepdims=True), 1e-9)

    # Position of each choice in its expert's queue, in priority order:
    # choice-major (all first choices first), then position or confidence.
    if batch_prioritized:
        confidence = ops.where(mask > 0, ops.max(probs, axis=-1), -1.0)
        order = ops.argsort(-confidence, axis=1)  # [G, S]
        inverse = ops.argsort(order, axis=1)
        ranked_experts = ops.take_along_axis(experts, order[..., None], axis=1)
        ranked_mask = ops.take_along_axis(mask, order, axis=1)
    else:
        ranked_experts, ranked_mask = experts, mask
    choice = ops.one_hot(ranked_experts, E, dtype="int32")  # [G, S, k, E]
    choice = choice * ops.cast(ranked_mask, "int32")[:, :, None, None]
    choice = ops.reshape(ops.transpose(choice, (0, 2, 1, 3)), (G, k * S, E))
    position = ops.sum((ops.cumsum(choice, axis=1) - 1) * choice, axis=-1)
    position = ops.transpose(ops.reshape(position, (G, k, S)), (0, 2, 1))
    if batch_prioritized:
        position = ops.take_along_axis(position, inverse[..., None], axis=1)
    keep = ops.logical_and(position < C, mask[..., None] > 0)  # [G, S, k]

    slot_token, slot_gate = fill_slots(
        ops.reshape(experts * C + position, (G, S * k)),
        ops.reshape(keep, (G, S * k)),
        ops.reshape(gates, (G, S * k)),
        E * C,
        k,
    )
    keep_f = ops.cast(keep, "float32")
    instructions = RoutingInstructions(
        slot_token=ops.reshape(slot_token, (G, E, C)),
        slot_gate=ops.reshape(slot_gate, (G, E, C)),
        token_expert=experts,
        token_position=position,
        token_gate=gates,
        token_keep=keep,
    )
    choices = ops.sum(mask) * k
    dropped = (choices - ops.sum(keep_f)) / ops.maximum(choices, 1.0)
    return instructions, dropped


@keras.saving.register_keras_serializable(package="keras_brainformer")
class TopKRouter(Router):
    """Token choice: every token picks its `top_k` experts (Switch: 1, GShard/GLaM: 2).

    Each expert has `C = ceil(top_k · S · capacity_factor / E)` slots per group of
    `S` tokens. Slots are filled in priority order: all first choices before
    any second choice, and within a choice rank by position in the group (or,
    with `batch_prioritized=True`, by the token's top-1 router probability,
    highest first). A choice that finds its expert full is dropped: the token
    then gets less (or no) expert output and keeps its residual.

    Args:
        num_experts: int, `E`.
        top_k: int, `k`, experts per token, `1 <= k <= E`.
        capacity_factor: float > 0 used in training, or None for dropless
            routing (`C = S`: nothing is ever dropped).
        eval_capacity_factor: float > 0 or None used at inference; defaults to
            `capacity_factor`.
        normalize_gates: renormalise the k gates to sum to 1 (GShard). Default
            (None): True for k > 1, False for k = 1 (Switch: a renormalised
            single gate is always 1 and the router would get no gradient).
        batch_prioritized: rank tokens by router confidence instead of position.
        load_balance_loss_weight: coefficient of the load-balance loss
            (GLaM: 0.01).
        z_loss_weight: coefficient of the router z-loss (ST-MoE: 1e-3).
        jitter: multiplicative input noise `U(1-jitter, 1+jitter)` in training.
        seed: seed of the jitter noise.
        inference_routing: `"causal"` (default; dropless top-k at inference,
            see the module docstring) or `"as_trained"` (the training scheme
            with `eval_capacity_factor`).
        kernel_initializer: initializer of the `[d, E]` router kernel.
            Default (None): `VarianceScaling(1.0, "fan_in",
            "truncated_normal")`, std `1/sqrt(d)` like GShard's gate.

    Example:
    >>> import numpy as np
    >>> router = TopKRouter(num_experts=4, top_k=2, capacity_factor=1.0)
    >>> x = np.random.rand(1, 8, 16).astype("float32")
    >>> tuple(router(x, training=True).slot_token.shape)  # C = ceil(2 * 8 * 1.0 / 4)
    (1, 4, 4)
    >>> tuple(router(x).slot_token.shape)  # inference: causal (dropless), C = S
    (1, 4, 8)
    """

    def __init__(
        self,
        num_experts,
        top_k=TOP_K_DEFAULTS["top_k"],
        capacity_factor=TOP_K_DEFAULTS["capacity_factor"],
        eval_capacity_factor=ROUTER_DEFAULTS["eval_capacity_factor"],
        normalize_gates=TOP_K_DEFAULTS["normalize_gates"],
        batch_prioritized=TOP_K_DEFAULTS["batch_prioritized"],
        load_balance_loss_weight=TOP_K_DEFAULTS["load_balance_loss_weight"],
        z_loss_weight=ROUTER_DEFAULTS["z_loss_weight"],
        jitter=ROUTER_DEFAULTS["jitter"],
        seed=None,
        **kwargs,
    ):
        refuse_old_names(kwargs, "TopKRouter")
        super().__init__(
            num_experts,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            load_balance_loss_weight=load_balance_loss_weight,
            z_loss_weight=z_loss_weight,
            jitter=jitter,
            seed=seed,
            **kwargs,
        )
        self.top_k = check_positive_int("top_k", top_k)
        if self.top_k > self.num_experts:
            raise ValueError(
                f"`top_k` must be <= num_experts={self.num_experts}. Received: top_k={top_k}"
            )
        if normalize_gates not in (None, True, False):
            raise TypeError(
                "`normalize_gates` must be True, False or None. "
                f"Received: normalize_gates={normalize_gates!r}"
            )
        self.normalize_gates = normalize_gates
        if not isinstance(batch_prioritized, bool):
            raise TypeError(
                "`batch_prioritized` must be a bool. "
                f"Received: batch_prioritized={batch_prioritized!r}"
            )
        self.batch_prioritized = batch_prioritized

    allows_dropless = True

    def slots_per_token(self):
        return self.top_k

    def route(self, probs, mask, training=False):
        normalize = self.top_k > 1 if self.normalize_gates is None else self.normalize_gates
        return token_choice_route(
            probs,
            mask,
            k=self.top_k,
            capacity=self.capacity(ops.shape(probs)[1], training=training),
            normalize_gates=normalize,
            batch_prioritized=self.batch_prioritized,
        )

    def causal_k(self):
        return self.top_k

    def causal_normalize_gates(self):
        return self.top_k > 1 if self.normalize_gates is None else self.normalize_gates

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "top_k": self.top_k,
                "normalize_gates": self.normalize_gates,
                "batch_prioritized": self.batch_prioritized,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        # Configs written by 0.1 say `k` (layers/renamed_arguments.py).
        return super().from_config(with_current_names(config, "TopKRouter", cls.__name__))


@keras.saving.register_keras_serializable(package="keras_brainformer")
class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al., 2022): each expert takes its top-`C` tokens.

    Scores are the softmax over experts of the router logits, `[G, S, E]`.
    Each expert ranks the `S` tokens of a group by its score column and takes
    the best `C = ceil(S · capacity_factor / E)` (at least 1). A token's output
    is the score-weighted sum of the experts that took it: some tokens get
    several experts, some none. Load is perfectly balanced by construction, so
    the load-balance loss defaults to 0. Not causal in training (see the
    module docstring); inference uses the causal scheme by default.

    Args:
        num_experts: int, `E`.
        capacity_factor: float > 0, average experts per token (paper: 2;
            Brainformer block 1: 1).
        eval_capacity_factor: float > 0 used at inference; defaults to
            `capacity_factor`.
        load_balance_loss_weight, z_loss_weight, jitter, seed,
            kernel_initializer: as in `TopKRouter`.
        inference_routing: `"causal"` (default): at inference each token
            takes its top-`round(eval_capacity_factor)` experts by the same
            scores (dropless token choice, exactly causal); `"as_trained"`:
            expert choice at inference too (leaks the future in a decoder).

    Example:
    >>> import numpy as np
    >>> router = ExpertChoiceRouter(num_experts=4, capacity_factor=1.0)
    >>> x = np.random.rand(2, 8, 16).astype("float32")
    >>> tuple(router(x, training=True).slot_token.shape)  # [G, E, C], C = 8 * 1.0 / 4
    (2, 4, 2)
    >>> tuple(router(x).slot_token.shape)  # inference: causal top-1, C = S
    (2, 4, 8)
    """

    def __init__(
        self,
        num_experts,
        capacity_factor=EXPERT_CHOICE_DEFAULTS["capacity_factor"],
        eval_capacity_factor=ROUTER_DEFAULTS["eval_capacity_factor"],
        load_balance_loss_weight=EXPERT_CHOICE_DEFAULTS["load_balance_loss_weight"],
        z_loss_weight=ROUTER_DEFAULTS["z_loss_weight"],
        jitter=ROUTER_DEFAULTS["jitter"],
        seed=None,
        **kwargs,
    ):
        super().__init__(
            num_experts,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            load_balance_loss_weight=load_balance_loss_weight,
            z_loss_weight=z_loss_weight,
            jitter=jitter,
            seed=seed,
            **kwargs,
        )

    def slots_per_token(self):
        return 1

    def causal_k(self):
        # Expert choice serves `capacity_factor` experts per token on average;
        # the causal scheme gives each token that many (rounded, at least 1).
        factor = self.eval_capacity_factor
        return int(min(self.num_experts, max(1, math.floor(factor + 0.5))))

    def causal_normalize_gates(self):
        return False

    def route(self, probs, mask, training=False):
        G, S = ops.shape(probs)[0], ops.shape(probs)[1]
        C = self.capacity(S, training=training)
        # Padding tokens score -1 (below any probability) so experts take
        # them last; if taken anyway they are marked empty below.
        scores = ops.where(mask[..., None] > 0, probs, -1.0)
        scores = ops.transpose(scores, (0, 2, 1))  # [G, E, S]
        gate, token = ops.top_k(scores, C)  # [G, E, C]
        taken = gate >= 0
        slot_token = ops.where(taken, ops.cast(token, "int32"), S)
        slot_gate = ops.where(taken, gate, 0.0)
        # A token is dropped when no expert took it.
        flat_token = ops.reshape(slot_token, (G, -1))
        hits = segment_sum_per_group(
            ops.ones_like(flat_token, dtype="float32"), flat_token, S + 1
        )
        hits = hits[:, :S]
        served = ops.sum(ops.cast(hits > 0, "float32") * mask)
        real = ops.sum(mask)
        dropped = (real - served) / ops.maximum(real, 1.0)
        instructions = SlotRoutingInstructions(slot_gate=slot_gate, slot_token=slot_token)
        return instructions, dropped


ROUTERS = {"top_k": TopKRouter, "expert_choice": ExpertChoiceRouter}
# The options each router of `ROUTERS` takes (all its arguments but
# `num_experts`, `seed` and `kernel_initializer`), with its defaults: the
# router arguments of `MoEFeedForward` and fields of `MoESpec`.
ROUTER_OPTIONS = {
    "top_k": {**ROUTER_DEFAULTS, **TOP_K_DEFAULTS},
    "expert_choice": {**ROUTER_DEFAULTS, **EXPERT_CHOICE_DEFAULTS},
}

"""The sparsely gated Mixture-of-Experts feed-forward sublayer."""

import keras
from keras import ops

import keras_brainformer.layers.dropless_blocks as dropless_blocks
from keras_brainformer.layers.expert_computation import choose_expert_path
from keras_brainformer.layers.expert_computation import routed_output
from keras_brainformer.layers.experts import ExpertBank
from keras_brainformer.layers.feed_forward import FeedForward
from keras_brainformer.layers.initializers import clone_initializer
from keras_brainformer.layers.renamed_arguments import refuse_old_names
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.layers.routers import INFERENCE_ROUTING
from keras_brainformer.layers.routers import ROUTER_DEFAULTS
from keras_brainformer.layers.routers import ROUTER_OPTIONS
from keras_brainformer.layers.routers import ROUTERS
from keras_brainformer.layers.routers import TOP_K_DEFAULTS
from keras_brainformer.layers.routers import Router
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.layers.validation import check_positive_int

DISPATCH_MODES = ("index", "one_hot")
# A router option left at this value takes the router's own default: the
# capacity factor's, which differs between the routers (1.25 for top-k, 2.0
# for expert choice). None does the same for the load-balance loss weight
# (0.01 and 0).
ROUTER_DEFAULT = "router_default"
# The layer's argument defaults, one table: its signature and `MoESpec`'s
# fields (models/brainformer/block_spec.py) take them from here. A router
# option (`top_k` to `inference_routing`) left at its value here is unset:
# the router takes its own default (`routers.ROUTER_OPTIONS`).
MOE_DEFAULTS = {
    "router": "top_k",
    "top_k": TOP_K_DEFAULTS["top_k"],
    "capacity_factor": ROUTER_DEFAULT,
    "eval_capacity_factor": ROUTER_DEFAULTS["eval_capacity_factor"],
    "load_balance_loss_weight": None,
    "load_balance_loss_mode": ROUTER_DEFAULTS["load_balance_loss_mode"],
    "z_loss_weight": ROUTER_DEFAULTS["z_loss_weight"],
    "jitter": ROUTER_DEFAULTS["jitter"],
    "batch_prioritized": TOP_K_DEFAULTS["batch_prioritized"],
    "normalize_gates": TOP_K_DEFAULTS["normalize_gates"],
    "inference_routing": ROUTER_DEFAULTS["inference_routing"],
    "activation": "gelu",
    "group_size": None,
    "dispatch": "index",
    "dropless_impl": "auto",
    "dropless_block_size": None,
    "shared_expert_intermediate_dim": None,
}
# The layer's router options: every option of a built-in router.
ROUTER_OPTION_NAMES = tuple(
    name for name in MOE_DEFAULTS if any(name in options for options in ROUTER_OPTIONS.values())
)


def _unset(name, value):
    """Whether router option `name` holds its unset value (`MOE_DEFAULTS`)."""
    unset = MOE_DEFAULTS[name]
    return value is unset or (type(value) is type(unset) and value == unset)


def router_arguments(router, options):
    """The options `options` (`{name: value}` over `ROUTER_OPTION_NAMES`) as
    arguments of the router named `router` (a key of `ROUTERS`): each unset
    option takes the router's own default, and an option the router does not
    take (a top-k option for expert choice) is refused unless unset.

    `MoEFeedForward` builds its router with them; `MoESpec` checks its
    fields and resolves its capacity factor with them."""
    defaults = ROUTER_OPTIONS[router]
    arguments = {}
    for name, value in options.items():
        if name in defaults:
            arguments[name] = defaults[name] if _unset(name, value) else value
        elif not _unset(name, value):
            takers = " or ".join(f"router={r!r}" for r, o in ROUTER_OPTIONS.items() if name in o)
            raise ValueError(
                f"`{name}={value!r}` applies only to {takers}. Received: router={router!r}"
            )
    return arguments


@keras.saving.register_keras_serializable(package="keras_brainformer")
class MoEFeedForward(keras.layers.Layer):
    """Mixture-of-Experts FFN: router → index dispatch → experts → combine.

    Tokens `[B, T, d]` are cut into routing groups of `group_size` tokens
    (default: one group per sequence). The router decides which expert slots
    each token fills; tokens are gathered into `[E, G, C, d]` by index, each
    expert runs one batched matmul over its `C` slots, and the gate-weighted
    outputs are segment-summed back to their tokens. A token is multiplied
    only by the experts it was routed to; a token that reaches no expert gets
    a zero output (the block's residual carries it).

    Args:
        num_experts: int, `E`.
        intermediate_dim: int, hidden width of each expert.
        router: `"top_k"` (`TopKRouter`), `"expert_choice"`
            (`ExpertChoiceRouter`), or a `Router` instance (for a router of
            your own, or a router's `seed` or `kernel_initializer`; the
            router options below then stay unset).
        top_k, capacity_factor, eval_capacity_factor,
        load_balance_loss_weight, load_balance_loss_mode, z_loss_weight,
        jitter, batch_prioritized, normalize_gates, inference_routing: the
            options of a router given by name (see `TopKRouter` and
            `ExpertChoiceRouter`). Left unset, each takes the router's own
            default: `capacity_factor` (`"router_default"`) 1.25 for top-k
            and 2.0 for expert choice, `load_balance_loss_weight` (None) 0.01
            and 0. `top_k`, `batch_prioritized` and `normalize_gates` are
            top-k options: set for expert choice they raise a `ValueError`.
        activation: expert activation (see `FeedForward`).
        group_size: tokens per routing group, or None for one group per
            sequence. `batch * sequence_length` must be divisible by it.
        dispatch: `"index"` (default, sparse) or `"one_hot"` (the GShard
            `[G, S, E, C]` einsum; a slow reference for tests).
        kernel_initializer: initializer of the expert weights.
        dropless_impl: how dropless token-choice routing (top-k with
            `capacity_factor=None`, and the causal inference routing) is
            computed. `"slots"`: the slot path above, with `C = S` slots per
            expert (`E/k` times the useful work). `"blocks"` (every backend):
            the `T·k` token choices of all groups laid out expert by expert
            in blocks of `b` rows and multiplied block by block (in runs
            of blocks on a TensorFlow training step;
            `layers/dropless_blocks.py`), about `T·k + E·b` rows. `"ragged"`
            (JAX only): the choices sorted by expert and multiplied with
            grouped matmuls (`jax.lax.ragged_dot`, `layers/ragged_experts.py`).
            All three give the same outputs, losses, statistics and
            gradients. `"auto"` (default): `"ragged"` on JAX with a TPU
            default backend, else `"blocks"` where its cost model
            (`dropless_blocks.blocks_pay`, measured on CPU; the same rule
            for training and inference) beats the slot path, else
            `"slots"`; always `"slots"` under an active
            `keras.distribution` (the slot path carries its layouts). Routing
            that can drop tokens, `dispatch="one_hot"`, and an expert-parallel
            layout (the dispatched tensors split on an expert mesh axis)
            always use the slot path; `"ragged"` also needs a plain float
            expert bank (no int8, no LoRA), `"blocks"` does not.
        dropless_block_size: rows per block of the `"blocks"` path, or None
            (default) to pick it from the shapes (`dropless_blocks.block_size`;
            on TensorFlow a training step, which multiplies runs of blocks,
            picks smaller ones). Inference with the block path is exactly
            causal on every backend; TensorFlow's training step is causal up
            to rounding (~1e-8), for speed (`dropless_blocks.chunk_rows`).
        shared_expert_intermediate_dim: hidden width of a shared expert, or None
            (default) for none. When set, every token also goes through one
            dense FFN (`FeedForward` named `"shared_expert"`, with this
            layer's `activation`; `"gated_silu"` gives Qwen-MoE's MLP), scaled
            by a per-token sigmoid gate (`shared_expert_gate [d, 1]`, no bias,
            the sigmoid in float32): `out = routed(x) + shared_expert(x) *
            sigmoid(x @ shared_expert_gate)`, Qwen-MoE's sparse block. It is
            added after the combine, on every dispatch and dropless path, and
            to padding tokens too (as in Qwen-MoE).

    Call arguments:
        x: `[B, T, d]` tokens.
        padding_mask: optional `[B, T]`, nonzero for real tokens; padding
            tokens are never routed and do not count in losses or statistics.
        training: selects the training capacity factor, adds the auxiliary
            losses and the router jitter.
        causal: at inference, True forces the router's causal routing (dropless
            token choice, see `layers/routers.py`), False the training scheme,
            None (default) follows `inference_routing`.

    Example:
    >>> import numpy as np
    >>> moe = MoEFeedForward(num_experts=4, intermediate_dim=32,
    ...                      router="top_k", top_k=2, capacity_factor=1.0)
    >>> tuple(moe(np.random.rand(2, 8, 16).astype("float32")).shape)
    (2, 8, 16)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        router=MOE_DEFAULTS["router"],
        top_k=MOE_DEFAULTS["top_k"],
        capacity_factor=MOE_DEFAULTS["capacity_factor"],
        eval_capacity_factor=MOE_DEFAULTS["eval_capacity_factor"],
        load_balance_loss_weight=MOE_DEFAULTS["load_balance_loss_weight"],
        load_balance_loss_mode=MOE_DEFAULTS["load_balance_loss_mode"],
        z_loss_weight=MOE_DEFAULTS["z_loss_weight"],
        jitter=MOE_DEFAULTS["jitter"],
        batch_prioritized=MOE_DEFAULTS["batch_prioritized"],
        normalize_gates=MOE_DEFAULTS["normalize_gates"],
        inference_routing=MOE_DEFAULTS["inference_routing"],
        activation=MOE_DEFAULTS["activation"],
        group_size=MOE_DEFAULTS["group_size"],
        dispatch=MOE_DEFAULTS["dispatch"],
        kernel_initializer="glorot_uniform",
        dropless_impl=MOE_DEFAULTS["dropless_impl"],
        dropless_block_size=MOE_DEFAULTS["dropless_block_size"],
        shared_expert_intermediate_dim=MOE_DEFAULTS["shared_expert_intermediate_dim"],
        **kwargs,
    ):
        # The router options above, by name.
        options = {name: value for name, value in locals().items() if name in ROUTER_OPTION_NAMES}
        refuse_old_names(kwargs, "MoEFeedForward")
        if "router_kwargs" in kwargs:
            raise TypeError(
                "MoEFeedForward: `router_kwargs` was replaced after 0.1 by arguments of their "
                f"own (as keras-hub's MoE layers take them): {', '.join(ROUTER_OPTION_NAMES)}; "
                "a router's `seed` or `kernel_initializer` go to a Router instance "
                f"(`router=TopKRouter(...)`). Received: router_kwargs={kwargs['router_kwargs']!r}"
            )
        super().__init__(**kwargs)
        self.dropless_impl = check_choice(
            "dropless_impl", dropless_impl, dropless_blocks.DROPLESS_IMPLS
        )
        self.dropless_block_size = check_optional_positive_int(
            "dropless_block_size", dropless_block_size
        )
        if self.dropless_impl == "ragged" and keras.config.backend() != "jax":
            raise ValueError(
                "`dropless_impl`='ragged' needs the JAX backend (it uses "
                f"jax.lax.ragged_dot); the backend is {keras.config.backend()!r}, "
                "where the allowed values are ('auto', 'blocks', 'slots')."
            )
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.intermediate_dim = check_positive_int(
            "intermediate_dim", intermediate_dim
        )
        self.group_size = check_optional_positive_int("group_size", group_size)
        self.dispatch = check_choice("dispatch", dispatch, DISPATCH_MODES)
        if isinstance(router, dict):
            # Without its `build_config`: the layer builds it, in its own name
            # scope (as it does a router given by name), so its weights' paths
            # are the layer's (`<layer>/router/kernel`), not `router/kernel`.
            router = keras.saving.deserialize_keras_object(
                {key: value for key, value in router.items() if key != "build_config"}
            )
        # The router's name when the layer builds it (its config is then the
        # flat options), else None.
        self.router_name = None
        if isinstance(router, str):
            self.router_name = check_choice("router", router, tuple(ROUTERS))
            router = ROUTERS[router](
                num_experts=self.num_experts,
                name="router",
                dtype=self.dtype_policy,
                **router_arguments(router, options),
            )
        elif not isinstance(router, Router):
            raise TypeError(
                f"`router` must be one of {tuple(ROUTERS)} or a Router instance. "
                f"Received: router={router!r}"
            )
        else:
            given = [f"{name}={value!r}" for name, value in options.items()
                     if not _unset(name, value)]
            if given:
                raise ValueError(
                    "The router options apply only to a router given by name; set them "
                    f"on the Router instance. Received: {', '.join(given)}"
                )
        if router.num_experts != self.num_experts:
            raise ValueError(
                f"`router.num_experts`={router.num_experts} must equal "
                f"`num_experts`={self.num_experts}."
            )
        self.router = router
        self.experts = ExpertBank(
            num_experts,
            intermediate_dim,
            activation=activation,
            kernel_initializer=kernel_initializer,
            dtype=self.dtype_policy,
            name="experts",
        )
        self.activation = self.experts.activation
        self.shared_expert_intermediate_dim = check_optional_positive_int(
            "shared_expert_intermediate_dim", shared_expert_intermediate_dim
        )
        self.shared_expert = None
        if self.shared_expert_intermediate_dim is not None:
            self.shared_expert = FeedForward(
                self.shared_expert_intermediate_dim,
                activation=self.activation,
                kernel_initializer=clone_initializer(self.experts.kernel_initializer),
                dtype=self.dtype_policy,
                name="shared_expert",
            )

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if not self.router.built:
            self.router.build((None, None, model_dim))
        self.experts.build((self.num_experts, None, None, model_dim))
        if self.shared_expert is not None:
            self.shared_expert_gate = self.add_weight(
                name="shared_expert_gate",
                shape=(model_dim, 1),
                initializer=clone_initializer(self.experts.kernel_initializer),
            )
            self.shared_expert.build((None, None, model_dim))

    def _group_size(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        if self.group_size is None:
            if not isinstance(length, int):
                raise ValueError(
                    "MoEFeedForward with group_size=None needs a static "
                    "sequence length; set `group_size` or feed fixed-length "
                    "sequences."
                )
            return length
        if isinstance(batch, int) and isinstance(length, int):
            if (batch * length) % self.group_size:
                raise ValueError(
                    f"batch * sequence_length = {batch} * {length} is not "
                    f"divisible by `group_size`={self.group_size}."
                )
        return self.group_size

    @property
    def inference_routing(self):
        """`"causal"` or `"as_trained"`: how the router routes at inference."""
        return self.router.inference_routing

    @inference_routing.setter
    def inference_routing(self, mode):
        self.router.inference_routing = check_choice(
            "inference_routing", mode, INFERENCE_ROUTING
        )

    def _constrain(self, tensor, name):
        """Applies the active distribution's layout for `<path>/<name>`, if
        any (`keras_brainformer.distribution.get_layout_map` gives the
        dispatched `[E, G, C, d]` tensors `(expert, batch, None, None)`, so
        XLA moves tokens to the experts' devices instead of gathering expert
        weights)."""
        distribution = keras.distribution.distribution()
        if distribution is None or self.path is None:
            return tensor
        layout = distribution.get_tensor_layout(f"{self.path}/{name}")
        if layout is None:
            return tensor
        return keras.distribution.distribute_tensor(tensor, layout)

    def _expert_parallel(self):
        """Whether the active distribution splits the dispatched tensors on a
        mesh axis along experts (an expert-parallel layout)."""
        distribution = keras.distribution.distribution()
        if distribution is None or self.path is None:
            return False
        layout = distribution.get_tensor_layout(f"{self.path}/dispatched")
        return layout is not None and layout.axes[0] is not None

    def _block_size(self, num_tokens, k, training=False):
        if self.dropless_block_size is not None:
            return self.dropless_block_size
        return dropless_blocks.block_size(
            num_tokens * k, self.num_experts,
            dropless_blocks.block_cost_rows(self.experts, training),
        )

    def expert_path(self, routing, group_size, num_tokens):
        """The path this call computes its experts on (`"one_hot"`,
        `"slots"`, `"blocks"` or `"ragged"`), chosen by
        `expert_computation.choose_expert_path` from the layer's settings,
        the routing, the bank and the active distribution."""
        return choose_expert_path(
            routing, group_size, num_tokens, self.experts, dispatch=self.dispatch,
            dropless_impl=self.dropless_impl, expert_parallel=self._expert_parallel(),
            block_size=lambda k: self._block_size(num_tokens, k),
        )

    def call(self, x, padding_mask=None, training=False, causal=None):
        out = self._routed(x, padding_mask, training, causal)
        if self.shared_expert is None:
            return out
        return out + self._shared(x)

    def _shared(self, x):
        """The gated shared expert: `shared_expert(x) * sigmoid(x @ gate)`,
        the sigmoid computed in float32."""
        logit = ops.matmul(x, ops.cast(self.shared_expert_gate, self.compute_dtype))
        gate = ops.cast(ops.sigmoid(ops.cast(logit, "float32")), self.compute_dtype)
        return self.shared_expert(x) * gate

    def _routed(self, x, padding_mask, training, causal):
        """The routed experts' combined output, `[B, T, d]` in the compute
        dtype."""
        shape = ops.shape(x)
        d = shape[-1]
        S = self._group_size(x)
        groups = ops.reshape(x, (-1, S, d))  # [G, S, d]
        mask = None
        if padding_mask is not None:
            mask = ops.reshape(ops.cast(padding_mask, "float32"), (-1, S))
        routing = self.router(groups, token_mask=mask, training=training, causal=causal)
        num_groups = ops.shape(groups)[0]
        num_tokens = num_groups * S if isinstance(num_groups, int) else None
        path = self.expert_path(routing, S, num_tokens)
        block_size = None
        if path == "blocks":
            block_size = self._block_size(num_tokens, ops.shape(routing.token_expert)[-1], training)
        out = routed_output(
            path, groups, routing, self.experts, block_size=block_size, training=training,
            constrain=self._constrain,
        )
        return ops.reshape(ops.cast(out, self.compute_dtype), shape)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        if self.router_name is None:  # a router of its own: its serialised self
            router = {"router": keras.saving.serialize_keras_object(self.router)}
        else:  # a router by name: its options (for expert choice, the top-k ones unset)
            router = {"router": self.router_name}
            for name in ROUTER_OPTION_NAMES:
                router[name] = getattr(self.router, name, MOE_DEFAULTS[name])
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                **router,
                "activation": self.activation,
                "group_size": self.group_size,
                "dispatch": self.dispatch,
                "dropless_impl": self.dropless_impl,
                "dropless_block_size": self.dropless_block_size,
                "shared_expert_intermediate_dim": self.shared_expert_intermediate_dim,
                "kernel_initializer": keras.initializers.serialize(
                    self.experts.kernel_initializer
                ),
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        # Configs written by 0.1 say `expert_hidden_dim` and
        # `shared_expert_hidden_dim` (layers/renamed_arguments.py; a
        # serialised router translates itself), and until the router options
        # were arguments every config held `router_kwargs` (None beside a
        # serialised router, or a dict for a router given by name).
        config = with_current_names(config, "MoEFeedForward", cls.__name__)
        nested = config.pop("router_kwargs", None)
        if nested is not None:
            config = _with_flat_router_options(config, nested, cls.__name__)
        return super().from_config(config)


def _with_flat_router_options(config, nested, where):
    """Layer config `config` with 0.1's nested router arguments `nested`
    (`router_kwargs`, `k` included) as the layer's router options, or, when
    they hold a router's own `seed` or `kernel_initializer`, as the router
    they build."""
    if not isinstance(nested, dict):
        raise TypeError(f"{where}: `router_kwargs` must be a dict. Received: {nested!r}")
    nested = with_current_names(nested, "TopKRouter", f"{where}.router_kwargs")
    router = config.get("router", MOE_DEFAULTS["router"])
    if nested and not isinstance(router, str):
        raise ValueError(
            f"{where}: `router_kwargs` only applies to a router given by name. "
            f"Received: router_kwargs={nested!r}"
        )
    twice = sorted(set(nested) & set(config))
    if twice:
        raise ValueError(
            f"{where}: the config gives {twice} both as arguments and in `router_kwargs`; "
            f"keep the arguments only. Received: router_kwargs={nested!r}"
        )
    if set(nested) <= set(ROUTER_OPTION_NAMES):
        return {**config, **nested}
    check_choice("router", router, tuple(ROUTERS))
    router = ROUTERS[router](
        config.get("num_experts"), name="router", dtype=config.get("dtype"), **nested
    )
    return {**config, "router": router}

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
from keras_brainformer.layers.routers import ROUTERS
from keras_brainformer.layers.routers import Router
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.layers.validation import check_positive_int

DISPATCH_MODES = ("index", "one_hot")
# The layer's argument defaults, one table: its signature and `MoESpec`'s
# fields (models/brainformer/block_spec.py) take them from here (the
# router's are `routers.ROUTER_DEFAULTS` and the router classes' tables).
MOE_DEFAULTS = {
    "router": "top_k",
    "activation": "gelu",
    "group_size": None,
    "dispatch": "index",
    "dropless_impl": "auto",
    "dropless_block_size": None,
    "shared_expert_intermediate_dim": None,
}


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
        router: `"top_k"`, `"expert_choice"`, or a `Router` instance.
        router_kwargs: dict of arguments for a router given by name (for
            example `{"top_k": 1, "capacity_factor": 1.0}`).
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
    ...                      router="top_k", router_kwargs={"top_k": 2})
    >>> tuple(moe(np.random.rand(2, 8, 16).astype("float32")).shape)
    (2, 8, 16)
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        router=MOE_DEFAULTS["router"],
        router_kwargs=None,
        activation=MOE_DEFAULTS["activation"],
        group_size=MOE_DEFAULTS["group_size"],
        dispatch=MOE_DEFAULTS["dispatch"],
        kernel_initializer="glorot_uniform",
        dropless_impl=MOE_DEFAULTS["dropless_impl"],
        dropless_block_size=MOE_DEFAULTS["dropless_block_size"],
        shared_expert_intermediate_dim=MOE_DEFAULTS["shared_expert_intermediate_dim"],
        **kwargs,
    ):
        refuse_old_names(kwargs, "MoEFeedForward")
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
            router = keras.saving.deserialize_keras_object(router)
        if isinstance(router, str):
            check_choice("router", router, tuple(ROUTERS))
            if router_kwargs is not None and not isinstance(router_kwargs, dict):
                raise TypeError(
                    f"`router_kwargs` must be a dict. Received: {router_kwargs!r}"
                )
            if router_kwargs and {"num_experts", "name", "dtype"} & set(router_kwargs):
                raise ValueError(
                    "`router_kwargs` must not set num_experts, name or dtype (the "
                    f"MoE layer sets them). Received: {sorted(router_kwargs)}"
                )
            router = ROUTERS[router](
                num_experts=num_experts,
                name="router",
                dtype=self.dtype_policy,
                **(router_kwargs or {}),
            )
        elif not isinstance(router, Router):
            raise TypeError(
                f"`router` must be one of {tuple(ROUTERS)} or a Router instance. "
                f"Received: router={router!r}"
            )
        elif router_kwargs:
            raise ValueError(
                "`router_kwargs` only applies to a router given by name. "
                f"Received: router_kwargs={router_kwargs!r}"
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
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "router": keras.saving.serialize_keras_object(self.router),
                "router_kwargs": None,
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
        # Configs written by 0.1 say `expert_hidden_dim`,
        # `shared_expert_hidden_dim` and `router_kwargs={"k": ...}`
        # (layers/renamed_arguments.py; a serialised router translates itself).
        config = with_current_names(config, "MoEFeedForward", cls.__name__)
        if isinstance(config.get("router_kwargs"), dict):
            config["router_kwargs"] = with_current_names(
                config["router_kwargs"], "TopKRouter", f"{cls.__name__}.router_kwargs"
            )
        return super().from_config(config)

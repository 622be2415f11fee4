"""The Brainformer backbone: embeddings, a stack of Brainformer blocks, final norm."""

import keras
from keras_hub.models import Backbone

import keras_brainformer.utils.lora_weights as lora_weights
from keras_brainformer.layers.adaptable_kernels import AdaptableKernels
from keras_brainformer.layers.causal_self_attention import check_rope_scaling_factor
from keras_brainformer.layers.causal_self_attention import resolve_head_dim
from keras_brainformer.layers.normalization import NORMS
from keras_brainformer.layers.normalization import make_norm
from keras_brainformer.layers.renamed_arguments import refuse_old_names
from keras_brainformer.layers.renamed_arguments import with_current_names
from keras_brainformer.layers.reversible_embedding import ReversibleEmbedding
from keras_brainformer.layers.routers import INFERENCE_ROUTING
from keras_brainformer.layers.validation import check_choice
from keras_brainformer.layers.validation import check_non_negative_float
from keras_brainformer.layers.validation import check_optional_positive_int
from keras_brainformer.layers.validation import check_positive_int
from keras_brainformer.layers.validation import check_rate
from keras_brainformer.models.brainformer.block_spec import resolve_block_specs
from keras_brainformer.models.brainformer.brainformer_block import BrainformerBlock
from keras_brainformer.models.brainformer.brainformer_layout_map import get_layout_map
from keras_brainformer.upstream_private import sublayers
from keras_brainformer.utils.preset_loading import load_zoo_preset
from keras_brainformer.utils.task_data_checks import check_token_ids


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerBackbone(Backbone):
    """A decoder-only stack of Brainformer blocks.

    Token embedding → `num_layers` Brainformer blocks (each an ordered list of
    attention / dense FFN / MoE sublayers, pre-norm residual) → final norm.
    Outputs the final hidden states `[B, T, hidden_dim]`; the token embedding
    is reversible (`backbone.token_embedding(h, reverse=True)` gives logits
    with the tied output matrix).

    Args:
        vocabulary_size: int, number of tokens.
        hidden_dim: int, the model width `d`.
        blocks: a `BlockSpec` (repeated `num_layers` times), or a list of
            block specs (one per block), or their dict forms.
        num_layers: int, times a single spec is stacked; must be None or the
            list's length when `blocks` is a list.
        max_sequence_length: int, the longest sequence the model is meant for
            (used to size generation caches; positions are rotary).
        norm: `"rms"` or `"layer"`.
        layer_norm_epsilon: float.
        dropout: residual dropout (0 in the paper).
        rope_max_wavelength: int, RoPE base wavelength.
        rope_scaling_factor: float >= 1, linear RoPE scaling (position
            interpolation, keras-hub's `rope_scaling_factor`); 1 is off.
        tie_embeddings: bool, share input and output embeddings.
        dtype: dtype policy of the model (for example `"mixed_bfloat16"`);
            routers always compute in float32.

    Example:
    ```python
    import numpy as np
    from keras_brainformer.models import AttentionSpec, BlockSpec, MoESpec
    from keras_brainformer.models import BrainformerBackbone

    spec = BlockSpec([
        AttentionSpec(num_heads=2),
        MoESpec(num_experts=4, intermediate_dim=64, router="expert_choice",
                capacity_factor=1.0),
    ])
    backbone = BrainformerBackbone(
        vocabulary_size=256, hidden_dim=32, blocks=spec, num_layers=2
    )
    hidden = backbone({
        "token_ids": np.ones((2, 16), "int32"),
        "padding_mask": np.ones((2, 16), "int32"),
    })  # [2, 16, 32]
    ```
    """

    @classmethod
    def from_preset(cls, preset, *args, **kwargs):
        """keras-hub's `from_preset`; weightless zoo presets build a random init."""
        return load_zoo_preset(cls, super().from_preset, preset, *args, **kwargs)

    def __init__(
        self,
        vocabulary_size,
        hidden_dim,
        blocks,
        num_layers=None,
        max_sequence_length=2048,
        norm="rms",
        layer_norm_epsilon=1e-6,
        dropout=0.0,
        rope_max_wavelength=10000,
        rope_scaling_factor=1.0,
        tie_embeddings=True,
        dtype=None,
        **kwargs,
    ):
        # === Validation (before any weight exists) ===
        refuse_old_names(kwargs, "BrainformerBackbone")
        vocabulary_size = check_positive_int("vocabulary_size", vocabulary_size)
        hidden_dim = check_positive_int("hidden_dim", hidden_dim)
        num_layers = check_optional_positive_int("num_layers", num_layers)
        specs = resolve_block_specs(blocks, num_layers)
        max_sequence_length = check_positive_int(
            "max_sequence_length", max_sequence_length
        )
        check_choice("norm", norm, NORMS)
        layer_norm_epsilon = check_non_negative_float("layer_norm_epsilon", layer_norm_epsilon)
        dropout = check_rate("dropout", dropout)
        rope_max_wavelength = check_positive_int(
            "rope_max_wavelength", rope_max_wavelength
        )
        rope_scaling_factor = check_rope_scaling_factor(rope_scaling_factor)
        if not isinstance(tie_embeddings, bool):
            raise TypeError(
                f"`tie_embeddings` must be a bool. Received: tie_embeddings={tie_embeddings!r}"
            )
        for spec in specs:
            for i, sub in enumerate(spec.sublayers):
                if sub.kind == "attention":
                    try:
                        resolve_head_dim(hidden_dim, sub.num_heads, sub.head_dim)
                    except ValueError as e:
                        raise ValueError(f"sublayers[{i}] (attention): {e}") from None

        # === Layers ===
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=tie_embeddings,
            embeddings_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=dtype,
            name="token_embedding",
        )
        self.transformer_blocks = [
            BrainformerBlock(
                spec,
                norm=norm,
                layer_norm_epsilon=layer_norm_epsilon,
                dropout=dropout,
                rope_max_wavelength=rope_max_wavelength,
                rope_scaling_factor=rope_scaling_factor,
                dtype=dtype,
                name=f"block_{i}",
            )
            for i, spec in enumerate(specs)
        ]
        self.final_norm = make_norm(norm, layer_norm_epsilon, "final_norm", dtype=dtype)

        # === Functional Model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        x = self.token_embedding(token_ids)
        for block in self.transformer_blocks:
            x = block(x, padding_mask=padding_mask)
        outputs = self.final_norm(x)
        super().__init__(
            inputs={"token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )
        if not tie_embeddings:
            # ReversibleEmbedding draws both matrices from one unseeded
            # initializer object, i.e. the same numbers: redraw the output one.
            reverse = self.token_embedding.reverse_embeddings
            reverse.assign(
                keras.initializers.RandomNormal(stddev=0.02)(reverse.shape, reverse.dtype)
            )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.hidden_dim = hidden_dim
        self.block_specs = specs
        self.num_layers = len(specs)
        self.max_sequence_length = max_sequence_length
        self.norm = norm
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.rope_max_wavelength = rope_max_wavelength
        self.rope_scaling_factor = rope_scaling_factor
        self.tie_embeddings = tie_embeddings

    def check_inputs(self, inputs):
        """Checks `{"token_ids", "padding_mask"}` (or bare token ids) at the
        boundary: integer dtype and rank 2 on any tensor; ids in
        `[0, vocabulary_size)`, a non-empty batch and at most
        `max_sequence_length` positions on concrete inputs (traced calls
        skip those). Raises a `TypeError`/`ValueError` naming what is wrong."""
        if isinstance(inputs, dict):
            if "token_ids" not in inputs:
                raise ValueError(
                    "Inputs must be a dict with keys 'token_ids' and "
                    f"'padding_mask'. Received keys: {sorted(inputs)}."
                )
            check_token_ids(
                inputs["token_ids"],
                self.vocabulary_size,
                self.max_sequence_length,
                padding_mask=inputs.get("padding_mask"),
            )
        else:
            check_token_ids(inputs, self.vocabulary_size, self.max_sequence_length)

    def call(self, inputs, *args, **kwargs):
        self.check_inputs(inputs)
        return super().call(inputs, *args, **kwargs)

    @property
    def moe_layers(self):
        """Every `MoEFeedForward` sublayer, in order."""
        return [moe for block in self.transformer_blocks for moe in block.moe_layers]

    @property
    def attention_layers(self):
        """Every attention sublayer, in order (one decoding cache each)."""
        return [a for block in self.transformer_blocks for a in block.attention_layers]

    @property
    def inference_routing(self):
        """`"causal"`, `"as_trained"` (or `"mixed"`): how MoE sublayers route
        at inference; None without MoE sublayers."""
        modes = {moe.inference_routing for moe in self.moe_layers}
        if not modes:
            return None
        return modes.pop() if len(modes) == 1 else "mixed"

    def set_inference_routing(self, mode):
        """Sets how every MoE sublayer routes at inference.

        Args:
            mode: `"causal"` (default; dropless token choice on the same router
                probabilities, exactly causal, what generation uses) or
                `"as_trained"` (the training-time scheme, which for expert
                choice or capacity dropping lets a token's output depend on
                later tokens).

        Compiled predict/evaluate functions do not see the change; use
        `BrainformerCausalLM.set_inference_routing`, which resets them.
        """
        check_choice("inference_routing", mode, INFERENCE_ROUTING)
        for moe in self.moe_layers:
            moe.inference_routing = mode

    def default_lora_layer_names(self):
        """Names of every attention, dense FFN and expert-bank layer: what
        `enable_lora(rank)` adapts by default (all their projection kernels,
        every expert included; routers, norms and embeddings stay frozen)."""
        return sorted(
            {
                layer.name
                for layer in sublayers(self)
                if isinstance(layer, AdaptableKernels)
            }
        )

    def save_lora_weights(self, filepath):
        """Saves only the LoRA adapters to `filepath` (`*.lora.h5`)."""
        lora_weights.save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath):
        """Loads adapters saved by `save_lora_weights`, enabling LoRA with the
        file's rank first if needed. Nothing is assigned unless every layer,
        name and shape in the file matches."""
        rank = lora_weights.read_lora_rank(filepath)
        enabled = lora_weights.lora_layers(self)
        if not enabled:
            self.enable_lora(rank)
        elif {layer.lora_rank for layer in enabled.values()} != {rank}:
            ranks = sorted({layer.lora_rank for layer in enabled.values()})
            raise ValueError(
                f"The LoRA rank of file {filepath} is {rank}, but this model "
                f"was enabled with rank {ranks}. Both must match."
            )
        lora_weights.load_lora_weights(self, filepath)

    def routing_statistics(self):
        """Routing statistics of the latest call, per MoE layer (by path)."""
        return {moe.path: moe.router.routing_statistics() for moe in self.moe_layers}

    @staticmethod
    def get_layout_map(
        device_mesh,
        batch_dim_name="batch",
        model_dim_name="model",
        expert_dim_name="expert",
        fsdp=False,
    ):
        """A `keras.distribution.LayoutMap` covering every weight.

        Embeddings, attention and dense FFNs are split on `model_dim_name`
        (heads / hidden units / vocabulary), expert banks `[E, d, h]` on
        `expert_dim_name` × `model_dim_name`, routers and norms replicated,
        and the dispatched `[E, G, C, d]` MoE tensors constrained to the
        expert axis; axes the mesh lacks are ignored. See
        `keras_brainformer.models.brainformer.brainformer_layout_map` for the table, and
        `keras_brainformer.distribution.make_distribution` for a one-liner.

        Args:
            device_mesh: a `keras.distribution.DeviceMesh`.
            batch_dim_name: the axis the batch is split along.
            model_dim_name: the tensor-parallel axis.
            expert_dim_name: the expert axis (may be the batch axis: GShard).
            fsdp: also split weights along the batch axis.

        Example:
        ```python
        import keras
        mesh = keras.distribution.DeviceMesh(
            (2, 4), ("batch", "expert"), keras.distribution.list_devices())
        distribution = keras.distribution.ModelParallel(
            layout_map=BrainformerBackbone.get_layout_map(mesh),
            batch_dim_name="batch")
        with distribution.scope():
            lm = BrainformerCausalLM.from_preset("glam_tiny")
        ```
        """
        return get_layout_map(
            device_mesh,
            batch_dim_name=batch_dim_name,
            model_dim_name=model_dim_name,
            expert_dim_name=expert_dim_name,
            fsdp=fsdp,
        )

    def get_config(self):
        config = super().get_config()
        # Store one spec + num_layers when the stack repeats a single spec.
        if all(spec == self.block_specs[0] for spec in self.block_specs):
            blocks, num_layers = self.block_specs[0].to_dict(), self.num_layers
        else:
            blocks, num_layers = [s.to_dict() for s in self.block_specs], None
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "hidden_dim": self.hidden_dim,
                "blocks": blocks,
                "num_layers": num_layers,
                "max_sequence_length": self.max_sequence_length,
                "norm": self.norm,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "dropout": self.dropout,
                "rope_max_wavelength": self.rope_max_wavelength,
                "rope_scaling_factor": self.rope_scaling_factor,
                "tie_embeddings": self.tie_embeddings,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        """Also reads configs written by 0.1 (its argument names, see
        `layers/renamed_arguments.py`)."""
        return super().from_config(with_current_names(config, "BrainformerBackbone", cls.__name__))

"""Brainformer causal language model task: next-token logits over the vocabulary."""

import keras
from keras import ops
from keras_hub.models import CausalLM

from keras_brainformer.models.brainformer.brainformer_backbone import BrainformerBackbone

ROUTING_METRICS = ("dropped_fraction", "load_cv", "router_entropy")


@keras.saving.register_keras_serializable(package="keras_brainformer")
class BrainformerCausalLM(CausalLM):
    """A `BrainformerBackbone` with a tied output projection to token logits.

    Training logs carry, besides loss and accuracy, the routing statistics
    averaged over all MoE layers: `moe_dropped_fraction` (share of
    token-choices that found no expert slot), `moe_load_cv` (coefficient of
    variation of the per-expert load; 0 is perfect balance) and
    `moe_router_entropy` (nats). Per-layer values:
    `backbone.routing_statistics()`. Auxiliary router losses (load balance,
    z-loss) are added to the training loss automatically.

    Args:
        backbone: a `BrainformerBackbone`.
        preprocessor: a `keras_hub.models.CausalLMPreprocessor` or None (feed
            `{"token_ids", "padding_mask"}`, labels and sample weights
            yourself).

    Example:
    ```python
    import numpy as np
    from keras_brainformer.layers import dense_transformer_layer
    from keras_brainformer.models import BrainformerBackbone, BrainformerCausalLM

    backbone = BrainformerBackbone(
        vocabulary_size=256, hidden_dim=32,
        blocks=dense_transformer_layer(num_heads=2, hidden_dim=64),
        num_blocks=2)
    lm = BrainformerCausalLM(backbone)
    lm.compile(optimizer="adam")
    tokens = np.random.randint(0, 256, (8, 17)).astype("int32")
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((8, 16), "int32")}
    lm.fit(x, tokens[:, 1:], batch_size=4, epochs=1)
    ```
    """

    backbone_cls = BrainformerBackbone

    def __init__(self, backbone, preprocessor=None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional Model ===
        inputs = backbone.input
        hidden_states = backbone(inputs)
        outputs = backbone.token_embedding(hidden_states, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Routing statistics shown in fit logs ===
        self.routing_trackers = {
            name: keras.metrics.Mean(name=f"moe_{name}")
            for name in ROUTING_METRICS
        } if backbone.moe_layers else {}

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        loss = super().compute_loss(
            x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=training
        )
        # The routers wrote their statistics into non-trainable variables
        # during the forward pass; read them here, where metric updates are
        # tracked on every backend.
        routers = [moe.router for moe in self.backbone.moe_layers]
        for name, tracker in self.routing_trackers.items():
            values = ops.stack([getattr(r, name).value for r in routers])
            tracker.update_state(ops.mean(values))
        return loss

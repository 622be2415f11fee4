"""The token embedding: Keras' `ReversibleEmbedding` (keras-hub's is a bare
subclass of it), quantizable and trainable through its int8 output projection.

The class keeps the name `ReversibleEmbedding` on purpose: Keras weight files key a
model's layers by their class name (`layers/reversible_embedding/...`), so
the shipped trained presets and saved models load unchanged."""

import keras
from keras import ops

from keras_brainformer.layers.adaptable_kernels import int8_matmul


@keras.saving.register_keras_serializable(package="keras_brainformer")
class ReversibleEmbedding(keras.layers.ReversibleEmbedding):
    """Keras' `ReversibleEmbedding` (the input embedding, optionally
    tied to the output projection) that `Model.quantize("int8")` reaches.

    Two differences, both about int8, none in float:
    * Keras' `Embedding.quantize` refuses subclasses unless called with
      `type_check=False`, so `model.quantize("int8")` would leave a plain
      `ReversibleEmbedding` in float with a warning; this one quantizes.
    * Keras' int8 output projection (`reverse=True`) rounds its inputs with
      no gradient, so nothing before it could train on an int8 model; here
      the gradient goes through the de-quantized matrix (straight-through),
      which is what LoRA on an int8 model needs.

    Example:
    >>> import numpy as np
    >>> emb = ReversibleEmbedding(input_dim=10, output_dim=4)
    >>> tuple(emb(np.array([[1, 2, 3]])).shape)
    (1, 3, 4)
    >>> emb.quantize("int8")
    >>> emb.quantization_mode
    'int8'
    """

    def quantize(self, mode=None, type_check=True, config=None):
        super().quantize(mode, type_check=False, config=config)

    def _int8_call(self, inputs, reverse=False):
        if not reverse or not self.inputs_quantizer:
            return super()._int8_call(inputs, reverse=reverse)
        if self.tie_weights:
            kernel = ops.transpose(self._embeddings)
            scale = ops.transpose(self.embeddings_scale)
        else:
            kernel = self.reverse_embeddings
            scale = self.reverse_embeddings_scale
        logits = int8_matmul(inputs, kernel, scale, self.compute_dtype)
        if self.logit_soft_cap is not None:
            cap = self.logit_soft_cap
            logits = ops.multiply(ops.tanh(ops.divide(logits, cap)), cap)
        return logits

"""`quantize` for the tasks: Keras' `Model.quantize` visits every leaf layer,
including the preprocessor's tokenizer and packer, and refuses a layer that
was never called ("isn't yet built") — so `lm.quantize("int8")` straight after
`from_preset` failed on the unused tokenizer. Preprocessing layers hold no
weights; marking them built lets `quantize` pass over them (with Keras' usual
"no quantize method" warning) and reach the backbone. Only layers whose
`build` is Keras' no-op are marked: a preprocessor's own `build` creates its
packer and must still run."""

import keras

from keras_brainformer.upstream_private import sublayers


def quantize_task(task, quantize, mode=None, config=None, filters=None, **kwargs):
    """Runs `quantize` (the task's `keras.Model.quantize`) after marking the
    preprocessor's weightless layers that have nothing to build as built."""
    preprocessor = getattr(task, "preprocessor", None)
    if preprocessor is not None:
        for layer in sublayers(preprocessor):
            if not layer.weights and type(layer).build is keras.layers.Layer.build:
                layer.built = True
    return quantize(mode, config=config, filters=filters, **kwargs)

"""Training utilities for Brainformer language models (`keras-brainformer train`).

`keras_brainformer.training.corpus` turns text (the embedded Python corpus or
the user's files) into packed next-token windows and deterministic,
resumable `tf.data` pipelines.
"""

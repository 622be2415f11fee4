"""The search's training proxy: how every candidate is trained, by default.

Candidates are built from block specs, not loaded from a preset with a
tokenizer of its own, so the tokenizer is the shipped 8K SentencePiece
vocabulary or bytes; a trial evaluates twice (at the constraint's check and
at the end), so 4 validation batches each. Imports nothing heavy: the
command line's parser reads it.
"""

from keras_brainformer.training.config import TrainingConfig

SEARCH_TOKENIZERS = ("sentencepiece", "byte")
SEARCH_TRAINING = TrainingConfig(tokenizer="sentencepiece", validation_batches=4)

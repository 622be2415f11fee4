from keras_brainformer import layers  # noqa: F401
from keras_brainformer import models  # noqa: F401

__version__ = "0.1.0"

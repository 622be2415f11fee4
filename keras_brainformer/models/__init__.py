"""Model families in keras-hub's layout."""

from keras_brainformer.models.brainformer import BrainformerBackbone
from keras_brainformer.models.brainformer import BrainformerByteTokenizer
from keras_brainformer.models.brainformer import BrainformerCausalLM
from keras_brainformer.models.brainformer import BrainformerCausalLMPreprocessor
from keras_brainformer.models.brainformer import BrainformerTokenizer
from keras_brainformer.models.brainformer import count_parameters

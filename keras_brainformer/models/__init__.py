"""Model families in keras-hub's layout."""

from keras_brainformer.models.brainformer import BrainformerBackbone
from keras_brainformer.models.brainformer import BrainformerCausalLM
from keras_brainformer.models.brainformer import count_parameters

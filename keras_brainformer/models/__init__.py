"""Model families in keras-hub's layout, and the Brainformer block with its spec."""

from keras_brainformer.models.brainformer import AttentionSpec
from keras_brainformer.models.brainformer import BlockSpec
from keras_brainformer.models.brainformer import BrainformerBackbone
from keras_brainformer.models.brainformer import BrainformerBlock
from keras_brainformer.models.brainformer import BrainformerByteTokenizer
from keras_brainformer.models.brainformer import BrainformerCausalLM
from keras_brainformer.models.brainformer import BrainformerCausalLMPreprocessor
from keras_brainformer.models.brainformer import BrainformerTextClassifier
from keras_brainformer.models.brainformer import BrainformerTextClassifierPreprocessor
from keras_brainformer.models.brainformer import BrainformerTokenizer
from keras_brainformer.models.brainformer import FeedForwardSpec
from keras_brainformer.models.brainformer import MoESpec
from keras_brainformer.models.brainformer import dense_transformer_layer
from keras_brainformer.models.brainformer import glam_layer_pair

"""Generic layers: routers, MoE and dense FFNs, attention (plain Keras;
the Brainformer block and its spec live in `keras_brainformer.models`)."""

from keras_brainformer.layers.activations import ACTIVATIONS
from keras_brainformer.layers.activations import get_activation
from keras_brainformer.layers.causal_self_attention import CausalSelfAttention
from keras_brainformer.layers.experts import ExpertBank
from keras_brainformer.layers.feed_forward import FeedForward
from keras_brainformer.layers.moe_feed_forward import MoEFeedForward
from keras_brainformer.layers.routers import ExpertChoiceRouter
from keras_brainformer.layers.routers import Router
from keras_brainformer.layers.routers import RoutingInstructions
from keras_brainformer.layers.routers import SlotRoutingInstructions
from keras_brainformer.layers.routers import TopKRouter
from keras_brainformer.layers.routers import compute_capacity
from keras_brainformer.layers.routers import load_balance_loss
from keras_brainformer.layers.routers import router_z_loss

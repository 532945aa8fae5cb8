"""Building blocks shared by the model graphs, one concept per module. Device work goes through the
hooks, via `LayerContext`."""
from .checkpoint import CheckpointModule, LoadTarget, prefixed
from .context import LayerContext
from .decoder import DecoderLayer, DecoderOnlyLM
from .embedding import Embedding
from .linear import Linear
from .mlp import GatedMLP
from .moe import RoutedExperts
from .norm import RMSNorm
from .rotary import RotaryEmbedding, rope_inv_freq, yarn_softmax_scale

__all__ = [
    "CheckpointModule", "DecoderLayer", "DecoderOnlyLM", "Embedding", "GatedMLP", "LayerContext", "Linear",
    "LoadTarget", "RMSNorm", "RotaryEmbedding", "RoutedExperts", "prefixed", "rope_inv_freq", "yarn_softmax_scale",
]

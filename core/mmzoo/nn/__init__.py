"""Family-agnostic layers with Megatron-core names, shared by every model plugin."""

from mmzoo.nn.decoder import DecoderConfig, TextDecoder
from mmzoo.nn.layers import GatedMLP, RMSNorm, SelfAttention, TransformerLayer
from mmzoo.nn.rotary import RotaryEmbedding

__all__ = [
    "DecoderConfig",
    "GatedMLP",
    "RMSNorm",
    "RotaryEmbedding",
    "SelfAttention",
    "TextDecoder",
    "TransformerLayer",
]

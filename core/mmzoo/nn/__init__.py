"""Family-agnostic building blocks with Megatron-core names, shared by every model plugin.

A family composes its towers from these: norms (:func:`build_norm`), :class:`MLP` (gated or
plain), :class:`SelfAttention` (rotary optional, qk-norm, QKV layouts), :class:`TransformerLayer`
(norm kind, layer scale) and :class:`LayerStack` (the ``layers`` FSDP shards, with recompute).
"""

from mmzoo.nn.decoder import DecoderConfig, TextDecoder
from mmzoo.nn.layers import QKVLayout, SelfAttention, TransformerLayer
from mmzoo.nn.mlp import ACTIVATIONS, MLP, activation_name
from mmzoo.nn.norm import LayerNorm, NormKind, RMSNorm, build_norm
from mmzoo.nn.recompute import LayerStack, set_recompute
from mmzoo.nn.rotary import RotaryEmbedding, text_position_ids

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "DecoderConfig",
    "LayerNorm",
    "LayerStack",
    "NormKind",
    "QKVLayout",
    "RMSNorm",
    "RotaryEmbedding",
    "SelfAttention",
    "TextDecoder",
    "TransformerLayer",
    "activation_name",
    "build_norm",
    "set_recompute",
    "text_position_ids",
]

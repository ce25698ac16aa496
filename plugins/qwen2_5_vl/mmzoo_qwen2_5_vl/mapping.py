"""HF <-> mm weight names for Qwen2.5-VL, as a table; the reverse direction is derived."""

from __future__ import annotations

from mmzoo.convert.mapping import GATE_UP, QKV, Rule, WeightMapping
from mmzoo_qwen2_5_vl.config import Qwen2_5_VLConfig

# transformers >= 4.52 names modules model.visual.* / model.language_model.*; checkpoints on
# disk mostly use visual.* / model.*. The table is written in the latter.
HF_ALIASES = {"model.visual.": "visual.", "model.language_model.": "model."}

V = "visual.blocks.{i}."
VM = "vision_encoder.blocks.layers.{i}."
T = "model.layers.{i}."
TM = "text_decoder.decoder.layers.{i}."


def weight_mapping(config: Qwen2_5_VLConfig) -> WeightMapping:
    """The mapping for one config (layer counts, head counts, tied embeddings)."""
    v, t = config.vision, config.text
    vit_qkv = QKV(v.num_heads, v.num_heads, v.head_dim, fused_source=True)
    llm_qkv = QKV(t.num_heads, t.num_kv_heads, t.head_dim)
    table = [
        Rule("vision_encoder.patch_embed.proj.weight", ("visual.patch_embed.proj.weight",)),
        Rule(VM + "input_layernorm.weight", (V + "norm1.weight",), layers="vision"),
        Rule(VM + "self_attention.linear_qkv.weight", (V + "attn.qkv.weight",), vit_qkv, layers="vision"),
        Rule(VM + "self_attention.linear_qkv.bias", (V + "attn.qkv.bias",), vit_qkv, layers="vision"),
        Rule(VM + "self_attention.linear_proj.weight", (V + "attn.proj.weight",), layers="vision"),
        Rule(VM + "self_attention.linear_proj.bias", (V + "attn.proj.bias",), layers="vision"),
        Rule(VM + "pre_mlp_layernorm.weight", (V + "norm2.weight",), layers="vision"),
        Rule(
            VM + "mlp.linear_fc1.weight",
            (V + "mlp.gate_proj.weight", V + "mlp.up_proj.weight"),
            GATE_UP,
            "vision",
        ),
        Rule(
            VM + "mlp.linear_fc1.bias", (V + "mlp.gate_proj.bias", V + "mlp.up_proj.bias"), GATE_UP, "vision"
        ),
        Rule(VM + "mlp.linear_fc2.weight", (V + "mlp.down_proj.weight",), layers="vision"),
        Rule(VM + "mlp.linear_fc2.bias", (V + "mlp.down_proj.bias",), layers="vision"),
        Rule("projector.layernorm.weight", ("visual.merger.ln_q.weight",)),
        Rule("projector.linear_fc1.weight", ("visual.merger.mlp.0.weight",)),
        Rule("projector.linear_fc1.bias", ("visual.merger.mlp.0.bias",)),
        Rule("projector.linear_fc2.weight", ("visual.merger.mlp.2.weight",)),
        Rule("projector.linear_fc2.bias", ("visual.merger.mlp.2.bias",)),
        Rule("text_decoder.embedding.word_embeddings.weight", ("model.embed_tokens.weight",)),
        Rule(TM + "input_layernorm.weight", (T + "input_layernorm.weight",), layers="text"),
        Rule(
            TM + "self_attention.linear_qkv.weight",
            (T + "self_attn.q_proj.weight", T + "self_attn.k_proj.weight", T + "self_attn.v_proj.weight"),
            llm_qkv,
            "text",
        ),
        Rule(
            TM + "self_attention.linear_qkv.bias",
            (T + "self_attn.q_proj.bias", T + "self_attn.k_proj.bias", T + "self_attn.v_proj.bias"),
            llm_qkv,
            "text",
        ),
        Rule(TM + "self_attention.linear_proj.weight", (T + "self_attn.o_proj.weight",), layers="text"),
        Rule(TM + "pre_mlp_layernorm.weight", (T + "post_attention_layernorm.weight",), layers="text"),
        Rule(
            TM + "mlp.linear_fc1.weight",
            (T + "mlp.gate_proj.weight", T + "mlp.up_proj.weight"),
            GATE_UP,
            "text",
        ),
        Rule(TM + "mlp.linear_fc2.weight", (T + "mlp.down_proj.weight",), layers="text"),
        Rule("text_decoder.decoder.final_layernorm.weight", ("model.norm.weight",)),
        # Tied embeddings: some checkpoints still carry lm_head.weight; it equals the embedding.
        Rule(None, ("lm_head.weight",), optional=True)
        if t.tie_word_embeddings
        else Rule("text_decoder.output_layer.weight", ("lm_head.weight",)),
    ]
    return WeightMapping.expand(table, {"vision": v.depth, "text": t.num_layers}, HF_ALIASES)

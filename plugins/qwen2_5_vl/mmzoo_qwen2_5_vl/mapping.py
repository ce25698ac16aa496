"""HF <-> mm weight names for Qwen2.5-VL, as a table; the reverse direction is derived.

The mm names are MindSpeed-MM's (``image_encoder.encoder.*``, ``image_encoder.projector.*``,
``text_decoder.*``). Each rule also says how Megatron-core splits the tensor over
tensor-parallel ranks (``tp``) and, outside the layers, on which pipeline stage it lives
(``place``).
"""

from __future__ import annotations

from mmzoo.convert import qwen2_llm
from mmzoo.convert.mapping import COLUMN, GATE_UP, GLU, QKV, ROW, Rule, WeightMapping
from mmzoo_qwen2_5_vl.config import Qwen2_5_VLConfig

# transformers >= 4.52 names modules model.visual.* / model.language_model.*; checkpoints on
# disk mostly use visual.* / model.*. The table is written in the latter (the LLM's rows come
# from mmzoo.convert.qwen2_llm under the prefix model.).
HF_ALIASES = {"model.visual.": "visual.", "model.language_model.": "model."}

# mmzoo's checkpoint format 1 named the vision tower and the projector differently.
LEGACY_MM_PREFIXES = {
    "vision_encoder.": "image_encoder.encoder.",
    "projector.layernorm.": "image_encoder.projector.layernorm.",
    "projector.linear_fc": "image_encoder.projector.encoder.linear_fc",
}

V = "visual.blocks.{i}."
VM = "image_encoder.encoder.blocks.layers.{i}."
P = "image_encoder.projector."
PM = P + "encoder."  # the merger's MLP


def _vision(mm: str, hf: tuple[str, ...], **kw) -> Rule:
    return Rule(VM + mm, tuple(V + h for h in hf), layers="vision", **kw)


def weight_mapping(config: Qwen2_5_VLConfig) -> WeightMapping:
    """The mapping for one config (layer counts, head counts, tied embeddings)."""
    vision, text = config.vision, config.text
    vit_qkv = QKV(vision.num_heads, vision.num_heads, vision.head_dim, fused_source=True)
    gate_up = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
    table = [
        Rule(
            "image_encoder.encoder.patch_embed.proj.weight",
            ("visual.patch_embed.proj.weight",),
            place="vision:first",
        ),
        _vision("input_layernorm.weight", ("norm1.weight",)),
        _vision("self_attention.linear_qkv.weight", ("attn.qkv.weight",), op=vit_qkv, tp=COLUMN),
        _vision("self_attention.linear_qkv.bias", ("attn.qkv.bias",), op=vit_qkv, tp=COLUMN),
        _vision("self_attention.linear_proj.weight", ("attn.proj.weight",), tp=ROW),
        _vision("self_attention.linear_proj.bias", ("attn.proj.bias",)),
        _vision("pre_mlp_layernorm.weight", ("norm2.weight",)),
        _vision("mlp.linear_fc1.weight", gate_up, op=GATE_UP, tp=GLU),
        _vision("mlp.linear_fc1.bias", ("mlp.gate_proj.bias", "mlp.up_proj.bias"), op=GATE_UP, tp=GLU),
        _vision("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), tp=ROW),
        _vision("mlp.linear_fc2.bias", ("mlp.down_proj.bias",)),
        # The PatchMerger runs right after the last vision layer; its MLP is plain GELU.
        Rule(P + "layernorm.weight", ("visual.merger.ln_q.weight",), place="vision:last"),
        Rule(PM + "linear_fc1.weight", ("visual.merger.mlp.0.weight",), tp=COLUMN, place="vision:last"),
        Rule(PM + "linear_fc1.bias", ("visual.merger.mlp.0.bias",), tp=COLUMN, place="vision:last"),
        Rule(PM + "linear_fc2.weight", ("visual.merger.mlp.2.weight",), tp=ROW, place="vision:last"),
        Rule(PM + "linear_fc2.bias", ("visual.merger.mlp.2.bias",), place="vision:last"),
        *qwen2_llm.weight_rules(text, prefix="model.", lm_head="lm_head.weight"),
    ]
    return WeightMapping.expand(
        table,
        {"vision": vision.depth, "text": text.num_layers},
        HF_ALIASES,
        qwen2_llm.tied_copies(text),
        LEGACY_MM_PREFIXES,
    )

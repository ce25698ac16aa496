"""HF <-> mm weight names for InternVL3, as tables; the reverse direction is derived.

Two HF layouts, chosen by ``config.hf_layout``:

* ``"hf"``: transformers' ``InternVLForConditionalGeneration``. On disk (what transformers 5
  writes) ``vision_tower.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
  ``language_model.lm_head.weight``; in memory ``model.vision_tower.*`` ... ``lm_head.weight``
  (read through :data:`HF_ALIASES`). q, k and v are separate tensors.
* ``"opengvlab"``: the original ``InternVLChatModel``: ``vision_model.*`` with a fused
  ``attn.qkv``, the projector as ``mlp1.{0,1,3}``, ``language_model.model.*`` and
  ``language_model.lm_head.weight``.

The mm names are MindSpeed-MM's for InternVL: the ViT's ``linear_qkv`` is the plain ``[q; k; v]``
(not grouped per head); the LLM is Megatron's (``linear_qkv`` grouped per KV head, ``linear_fc1``
= ``[gate; up]``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from mmzoo.convert import qwen2_llm
from mmzoo.convert.mapping import COLUMN, IDENTITY, ROW, Concat, Heads, Op, Rule, WeightMapping
from mmzoo_internvl3.config import InternVL3Config, VisionConfig


@dataclass(frozen=True)
class StackedQKV(Concat):
    """transformers' separate ViT q, k, v stacked into ``[Q; K; V]``: one tensor in every mm
    layout (the canonical one too), as OpenGVLab's fused ``attn.qkv`` gives it."""

    count: int = 3

    @property
    def part_names(self) -> tuple[str, ...]:
        return ()


HF_ALIASES = {
    "model.vision_tower.": "vision_tower.",
    "model.multi_modal_projector.": "multi_modal_projector.",
    "model.language_model.": "language_model.model.",
    "lm_head.": "language_model.lm_head.",
}

VM = "image_encoder.encoder."
LAYER = VM + "encoder.layers.{i}."
PROJECTOR = "image_encoder.projector."
LLM = "language_model.model."
LM_HEAD = "language_model.lm_head.weight"


@dataclass(frozen=True)
class _VisionNames:
    """Where one HF layout keeps each InternViT and projector tensor."""

    cls: str
    position: str
    patch: str
    layer: str
    norm1: str
    norm2: str
    qkv: tuple[str, ...]
    q_norm: str
    k_norm: str
    proj: str
    ls: tuple[str, str]
    projector: tuple[str, str, str]


_NAMES = {
    "hf": _VisionNames(
        cls="vision_tower.embeddings.cls_token",
        position="vision_tower.embeddings.position_embeddings",
        patch="vision_tower.embeddings.patch_embeddings.projection",
        layer="vision_tower.encoder.layer.{i}.",
        norm1="layernorm_before",
        norm2="layernorm_after",
        qkv=("attention.q_proj", "attention.k_proj", "attention.v_proj"),
        q_norm="attention.q_norm",
        k_norm="attention.k_norm",
        proj="attention.projection_layer",
        ls=("lambda_1", "lambda_2"),
        projector=(
            "multi_modal_projector.layer_norm",
            "multi_modal_projector.linear_1",
            "multi_modal_projector.linear_2",
        ),
    ),
    "opengvlab": _VisionNames(
        cls="vision_model.embeddings.class_embedding",
        position="vision_model.embeddings.position_embedding",
        patch="vision_model.embeddings.patch_embedding",
        layer="vision_model.encoder.layers.{i}.",
        norm1="norm1",
        norm2="norm2",
        qkv=("attn.qkv",),
        q_norm="attn.q_norm",
        k_norm="attn.k_norm",
        proj="attn.proj",
        ls=("ls1", "ls2"),
        projector=("mlp1.0", "mlp1.1", "mlp1.3"),
    ),
}


def _layer_rule(names: _VisionNames, mm: str, hf: tuple[str, ...], **kw) -> Rule:
    return Rule(LAYER + mm, tuple(names.layer + h for h in hf), layers="vision", **kw)


def _params(bias: bool) -> tuple[str, ...]:
    return ("weight", "bias") if bias else ("weight",)


def vision_rules(vision: VisionConfig, names: _VisionNames) -> list[Rule]:
    """InternViT: embeddings (first vision stage), then per layer; norms and layer scales whole on
    every tensor-parallel rank."""
    table = [
        Rule(VM + "embeddings.class_embedding", (names.cls,), place="vision:first"),
        Rule(VM + "embeddings.position_embedding", (names.position,), place="vision:first"),
        *(
            Rule(VM + f"embeddings.patch_embedding.{p}", (f"{names.patch}.{p}",), place="vision:first")
            for p in ("weight", "bias")
        ),
    ]
    norm_bias = vision.norm == "layer_norm"
    qkv_op: Op = IDENTITY if len(names.qkv) == 1 else StackedQKV()
    # Split by heads, unevenly when tp does not divide them (the 6B's 25): [q_r; k_r; v_r] and
    # the matching input columns of the output projection.
    qkv_tp, proj_tp = Heads(vision.num_heads, blocks=3), Heads(vision.num_heads, dim=1)
    for p in _params(norm_bias):
        table.append(_layer_rule(names, f"input_layernorm.{p}", (f"{names.norm1}.{p}",)))
        table.append(_layer_rule(names, f"pre_mlp_layernorm.{p}", (f"{names.norm2}.{p}",)))
    for p in _params(vision.qkv_bias):
        qkv = tuple(f"{n}.{p}" for n in names.qkv)
        table.append(_layer_rule(names, f"self_attention.linear_qkv.{p}", qkv, op=qkv_op, tp=qkv_tp))
    if vision.qk_norm:
        table.append(_layer_rule(names, "self_attention.q_layernorm.weight", (f"{names.q_norm}.weight",)))
        table.append(_layer_rule(names, "self_attention.k_layernorm.weight", (f"{names.k_norm}.weight",)))
    table += [
        _layer_rule(names, "self_attention.linear_proj.weight", (f"{names.proj}.weight",), tp=proj_tp),
        _layer_rule(names, "self_attention.linear_proj.bias", (f"{names.proj}.bias",)),
        _layer_rule(names, "mlp.linear_fc1.weight", ("mlp.fc1.weight",), tp=COLUMN),
        _layer_rule(names, "mlp.linear_fc1.bias", ("mlp.fc1.bias",), tp=COLUMN),
        _layer_rule(names, "mlp.linear_fc2.weight", ("mlp.fc2.weight",), tp=ROW),
        _layer_rule(names, "mlp.linear_fc2.bias", ("mlp.fc2.bias",)),
        _layer_rule(names, "ls1", (names.ls[0],)),
        _layer_rule(names, "ls2", (names.ls[1],)),
    ]
    return table


def projector_rules(names: _VisionNames) -> list[Rule]:
    """LayerNorm(4C) -> Linear -> GELU -> Linear, whole on every rank, after the last ViT layer."""
    mm = ("norm", "linear_fc1", "linear_fc2")
    return [
        Rule(f"{PROJECTOR}{m}.{p}", (f"{h}.{p}",), place="vision:last")
        for m, h in zip(mm, names.projector, strict=True)
        for p in ("weight", "bias")
    ]


def weight_mapping(config: InternVL3Config) -> WeightMapping:
    """The mapping for one config, in its ``hf_layout`` (layer counts, norms, biases, tying)."""
    names = _NAMES[config.hf_layout]
    # The LLM's embedding goes with its first layer (the first stage may hold only ViT layers).
    llm = [
        replace(rule, place="text:first") if rule.mm == qwen2_llm.EMBEDDING else rule
        for rule in qwen2_llm.weight_rules(config.text, prefix=LLM, lm_head=LM_HEAD)
    ]
    table = vision_rules(config.vision, names) + projector_rules(names) + llm
    aliases = HF_ALIASES if config.hf_layout == "hf" else {}
    counts = {"vision": config.vision.num_layers, "text": config.text.num_layers}
    return WeightMapping.expand(table, counts, aliases, qwen2_llm.tied_copies(config.text))

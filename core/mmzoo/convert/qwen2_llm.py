"""A Qwen2 / Qwen2.5 language model inside a VL checkpoint: its weight rules and its config.

Families whose LLM is Qwen2-style (Qwen2.5-VL, InternVL3) share these. The mm side is always
``text_decoder.*`` (Megatron ``GPTModel`` names, QKV grouped per KV head, ``linear_fc1`` =
``[gate; up]``); the HF side sits under a family-specific ``prefix``: ``model.`` (Qwen2.5-VL on
disk; transformers 5 names it ``model.language_model.``, read through the family's alias),
``language_model.model.`` (InternVL3 as OpenGVLab publishes it) or ``model.language_model.``
(InternVL3 ``-hf``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mmzoo.convert.mapping import COLUMN, GATE_UP, GLU, QKV, ROW, Rule, TiedCopy
from mmzoo.nn import DecoderConfig

EMBEDDING = "text_decoder.embedding.word_embeddings.weight"
OUTPUT = "text_decoder.output_layer.weight"
FINAL_NORM = "text_decoder.decoder.final_layernorm.weight"
LAYER = "text_decoder.decoder.layers.{i}."

# Rope types read as plain rotary: ``dynamic`` (NTK) scaling equals it up to
# ``max_position_embeddings`` tokens, past which mmzoo does not rescale.
ROPE_TYPES = ("default", "mrope", "dynamic")


def qwen2_5_decoder(
    layers: int,
    hidden: int,
    ffn: int,
    heads: int,
    kv_heads: int,
    *,
    vocab: int,
    tied: bool,
    mrope_section: tuple[int, ...] | None = None,
) -> DecoderConfig:
    """A Qwen2.5 LLM of these sizes: rope theta 1e6, RMSNorm epsilon 1e-6, biases on q, k and v."""
    return DecoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        ffn_hidden_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        tie_word_embeddings=tied,
        mrope_section=mrope_section,
    )


def weight_rules(
    config: DecoderConfig, *, prefix: str = "model.", lm_head: str = "lm_head.weight", layers: str = "text"
) -> list[Rule]:
    """The mapping rows of the decoder, for a family's table.

    Args:
        config: the decoder's sizes (head counts for the QKV layout; tied embeddings).
        prefix: HF prefix of ``embed_tokens``, ``layers.{i}`` and ``norm``.
        lm_head: HF name of the output projection (dropped if present when tied).
        layers: the layer-count key of :meth:`mmzoo.convert.mapping.WeightMapping.expand`.

    Returns:
        Rules for the embedding (first stage), every layer, the final norm and the output layer
        (last stage); pair them with :func:`tied_copies`.
    """
    qkv = QKV(config.num_heads, config.num_kv_heads, config.head_dim)
    q_k_v = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    hf_layer = prefix + "layers.{i}."

    def layer(mm: str, hf: tuple[str, ...], **kw: Any) -> Rule:
        return Rule(LAYER + mm, tuple(hf_layer + h for h in hf), layers=layers, **kw)

    qkv_rules = [
        layer(f"self_attention.linear_qkv.{p}", tuple(f"{n}.{p}" for n in q_k_v), op=qkv, tp=COLUMN)
        for p in ("weight", "bias")[: 2 if config.qkv_bias else 1]
    ]
    return [
        Rule(EMBEDDING, (prefix + "embed_tokens.weight",), tp=COLUMN, place="first"),
        layer("input_layernorm.weight", ("input_layernorm.weight",)),
        *qkv_rules,
        layer("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), tp=ROW),
        layer("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",)),
        layer("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), op=GATE_UP, tp=GLU),
        layer("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), tp=ROW),
        Rule(FINAL_NORM, (prefix + "norm.weight",), place="last"),
        # Tied embeddings: some checkpoints still carry lm_head.weight; it equals the embedding.
        Rule(None, (lm_head,), optional=True)
        if config.tie_word_embeddings
        else Rule(OUTPUT, (lm_head,), tp=COLUMN, place="last"),
    ]


def tied_copies(config: DecoderConfig) -> tuple[TiedCopy, ...]:
    """With tied embeddings, the copy of the embedding a last pipeline stage other than the
    first holds as ``output_layer`` (Megatron's shared embedding)."""
    return (TiedCopy(OUTPUT, EMBEDDING, tp=COLUMN, place="last"),) if config.tie_word_embeddings else ()


def _get(d: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if d.get(key) is not None:
            return d[key]
    return default


def _check_readable(text: Mapping[str, Any], where: str) -> None:
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{where}.hidden_act '{act}' is not supported (Qwen2 uses silu)")
    if text.get("use_sliding_window"):
        raise ValueError(f"{where}.use_sliding_window is true; mmzoo's Qwen2 attention has no sliding window")
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"{where} rope type '{kind}' is not supported (supported: {', '.join(ROPE_TYPES)})")
    heads, head_dim = text["num_attention_heads"], text.get("head_dim")
    if head_dim is not None and head_dim * heads != text["hidden_size"]:
        raise ValueError(
            f"{where}.head_dim {head_dim} x {heads} heads is not hidden_size {text['hidden_size']}"
        )


def decoder_config_from_hf(
    text: Mapping[str, Any], *, tie_word_embeddings: bool | None = None, where: str = "text_config"
) -> DecoderConfig:
    """A :class:`DecoderConfig` from an HF Qwen2 text config dict (``Qwen2Config`` fields).

    Reads the rope theta from ``rope_parameters`` (transformers 5), ``rope_scaling`` or the
    top-level ``rope_theta``, and ``mrope_section`` when the rope parameters have one.

    Args:
        text: the text config dict (``text_config``, ``llm_config``, or a whole Qwen2 config).
        tie_word_embeddings: overrides the dict's own flag (families where the top level decides).
        where: how errors name the dict.

    Raises:
        ValueError: a setting mmzoo's decoder cannot reproduce (activation, sliding window,
            rope scaling, head_dim).
    """
    _check_readable(text, where)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    heads = text["num_attention_heads"]
    mrope = rope.get("mrope_section")
    tied = text.get("tie_word_embeddings", False) if tie_word_embeddings is None else tie_word_embeddings
    return DecoderConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        ffn_hidden_size=text["intermediate_size"],
        num_layers=text["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=_get(text, "num_key_value_heads", default=heads),
        rope_theta=_get(rope, "rope_theta", default=_get(text, "rope_theta", default=1e6)),
        rms_norm_eps=_get(text, "rms_norm_eps", default=1e-6),
        qkv_bias=True,
        tie_word_embeddings=bool(tied),
        mrope_section=None if mrope is None else tuple(mrope),
    )


def decoder_config_to_hf(
    config: DecoderConfig, *, model_type: str = "qwen2", max_position_embeddings: int = 32768
) -> dict[str, Any]:
    """The HF text config dict (transformers 5 form) of ``config``; the inverse of
    :func:`decoder_config_from_hf`.

    Args:
        config: the decoder.
        model_type: ``qwen2`` for a plain LLM, ``qwen2_5_vl_text`` inside Qwen2.5-VL.
        max_position_embeddings: written as is (plain rotary does not use it).

    Raises:
        ValueError: ``qkv_bias=False`` (transformers' Qwen2 always has q/k/v biases).
    """
    if not config.qkv_bias:
        raise ValueError(
            "text qkv_bias=False cannot be exported: transformers' Qwen2 always has q/k/v biases"
        )
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.mrope_section is not None:
        rope["mrope_section"] = list(config.mrope_section)
    return {
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": max_position_embeddings,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_word_embeddings,
        # Real ids only when the vocabulary holds them (tests shrink it).
        "bos_token_id": _in_vocab(151643, config.vocab_size),
        "eos_token_id": _in_vocab(151645, config.vocab_size),
    }


def _in_vocab(token_id: int, vocab_size: int) -> int | None:
    return token_id if token_id < vocab_size else None

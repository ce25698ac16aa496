"""InternVL3 configs from and to HF ``config.json``, in both key layouts.

* ``"hf"``: transformers' ``InternVLForConditionalGeneration`` (``vision_config`` +
  ``text_config``). In transformers 5 the top-level ``tie_word_embeddings`` (default True)
  decides tying, so it is always written; checkpoints converted with 4.52 lack it.
* ``"opengvlab"``: the original ``InternVLChatModel`` (``vision_config`` + ``llm_config``,
  remote code), as published under ``OpenGVLab/InternVL3-*``.
"""

from __future__ import annotations

from typing import Any

from mmzoo.convert.qwen2_llm import decoder_config_from_hf, decoder_config_to_hf
from mmzoo.errors import MmzooError
from mmzoo.nn import DecoderConfig
from mmzoo_internvl3.config import InternVL3Config, VisionConfig

HF_ARCHITECTURE = "InternVLForConditionalGeneration"
OPENGVLAB_ARCHITECTURE = "InternVLChatModel"
_REMOTE_CODE = {
    "AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
    "AutoModel": "modeling_internvl_chat.InternVLChatModel",
    "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel",
}


def config_from_hf(hf: dict[str, Any]) -> InternVL3Config:
    """Read an InternVL3 ``config.json`` dict of either layout (``llm_config`` means OpenGVLab's).

    Raises:
        MmzooError: a field names something mmzoo's InternVL3 does not compute (an InternLM3
            LLM, pixel shuffle v1, a mean-pooled ViT, ...).
    """
    if "llm_config" in hf:
        return _from_opengvlab(hf)
    if "text_config" in hf:
        return _from_transformers(hf)
    raise MmzooError("config.json has neither text_config nor llm_config; is this an InternVL3 checkpoint?")


def config_to_hf(config: InternVL3Config) -> dict[str, Any]:
    """The ``config.json`` dict for ``config`` in its ``hf_layout``; ``config_from_hf`` inverts it.

    ``dtype`` is left to the writer (:func:`mmzoo.checkpoint.hf_export.save_hf`).
    """
    return _to_opengvlab(config) if config.hf_layout == "opengvlab" else _to_transformers(config)


def _expect(section: dict[str, Any], where: str, key: str, allowed: tuple[Any, ...], default: Any) -> None:
    value = section.get(key, default)
    if value not in allowed:
        raise MmzooError(
            f"config.json {where}{key} = {value!r} is not supported by mmzoo's InternVL3 (expected "
            f"{' or '.join(repr(a) for a in allowed)})"
        )


def _square(value: int | list[int]) -> int:
    if isinstance(value, int):
        return value
    if len(set(value)) != 1:
        raise MmzooError(f"config.json vision_config size {value} is not square; InternViT tiles are square")
    return value[0]


def _text(llm: dict[str, Any], where: str, tied: bool) -> tuple[DecoderConfig, int, float | None]:
    """The decoder, ``max_position_embeddings`` and the dynamic rope factor of a Qwen2 section."""
    _expect(llm, where, "model_type", ("qwen2",), "qwen2")
    rope = llm.get("rope_parameters") or llm.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    _expect({"rope_type": kind}, where, "rope_type", ("default", "dynamic"), "default")
    text = decoder_config_from_hf(llm, tie_word_embeddings=tied, where=where.rstrip("."))
    factor = float(rope["factor"]) if kind == "dynamic" else None
    return text, llm.get("max_position_embeddings", 32768), factor


def _vision(vision: dict[str, Any], image_size: int, bias_key: str, qk_key: str) -> VisionConfig:
    _expect(vision, "vision_config.", "hidden_act", ("gelu",), "gelu")
    return VisionConfig(
        num_layers=vision["num_hidden_layers"],
        hidden_size=vision["hidden_size"],
        ffn_hidden_size=vision["intermediate_size"],
        num_heads=vision["num_attention_heads"],
        norm=vision.get("norm_type", "layer_norm"),
        qkv_bias=bool(vision.get(bias_key, False)),
        qk_norm=bool(vision.get(qk_key, False)),
        eps=vision.get("layer_norm_eps", 1e-6),
        image_size=image_size,
        patch_size=_square(vision.get("patch_size", 14)),
        in_channels=vision.get("num_channels", 3),
    )


def _from_transformers(hf: dict[str, Any]) -> InternVL3Config:
    vision = hf.get("vision_config") or {}
    text = hf["text_config"]
    _expect(hf, "", "vision_feature_select_strategy", ("default",), "default")
    _expect(hf, "", "projector_hidden_act", ("gelu",), "gelu")
    _expect(vision, "vision_config.", "use_mean_pooling", (True,), True)
    _expect(vision, "vision_config.", "use_absolute_position_embeddings", (True,), True)
    # Checkpoints converted with transformers 4.52 have no top-level flag; there the text
    # config's (Qwen2 default False) decided.
    tied = bool(hf.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))
    decoder, max_positions, factor = _text(text, "text_config.", tied)
    _expect(hf, "", "vision_feature_layer", (-1,), -1)
    return InternVL3Config(
        vision=_vision(vision, _square(vision.get("image_size", 448)), "attention_bias", "use_qk_norm"),
        text=decoder,
        downsample_ratio=hf.get("downsample_ratio", 0.5),
        image_token_id=hf.get("image_token_id", 151667),
        max_position_embeddings=max_positions,
        dynamic_rope_factor=factor,
        hf_layout="hf",
    )


def _from_opengvlab(hf: dict[str, Any]) -> InternVL3Config:
    llm, vision = hf["llm_config"], hf.get("vision_config") or {}
    architectures = llm.get("architectures") or ["Qwen2ForCausalLM"]
    if architectures != ["Qwen2ForCausalLM"]:
        raise MmzooError(
            f"config.json llm_config.architectures = {architectures}: mmzoo's InternVL3 reads Qwen2.5 "
            "LLMs only (InternVL3-9B's InternLM3 is not supported)"
        )
    _expect(hf, "", "ps_version", ("v2",), "v1")
    _expect(hf, "", "select_layer", (-1,), -1)
    decoder, max_positions, factor = _text(llm, "llm_config.", bool(llm.get("tie_word_embeddings", False)))
    dynamic = hf.get("dynamic_image_size", True)
    image_size = hf.get("force_image_size") or _square(vision.get("image_size", 448))
    return InternVL3Config(
        vision=_vision(vision, image_size, "qkv_bias", "qk_normalization"),
        text=decoder,
        downsample_ratio=hf.get("downsample_ratio", 0.5),
        min_dynamic_patch=hf.get("min_dynamic_patch", 1) if dynamic else 1,
        max_dynamic_patch=hf.get("max_dynamic_patch", 12) if dynamic else 1,
        use_thumbnail=hf.get("use_thumbnail", True),
        max_position_embeddings=max_positions,
        dynamic_rope_factor=factor,
        hf_layout="opengvlab",
    )


def _text_to_hf(config: InternVL3Config, eos: int) -> dict[str, Any]:
    if config.text.mrope_section is not None:
        raise MmzooError("InternVL3's Qwen2 text decoder has 1-D rope; this config has M-RoPE sections")
    text = decoder_config_to_hf(config.text, max_position_embeddings=config.max_position_embeddings)
    del text["rope_parameters"]  # each layout writes its own
    text["eos_token_id"] = eos if eos < config.text.vocab_size else None
    return {"architectures": ["Qwen2ForCausalLM"], **text, "use_sliding_window": False}


def _rope(config: InternVL3Config) -> dict[str, Any]:
    if config.dynamic_rope_factor is None:
        return {"rope_type": "default", "rope_theta": config.text.rope_theta}
    return {
        "rope_type": "dynamic",
        "factor": config.dynamic_rope_factor,
        "rope_theta": config.text.rope_theta,
    }


def _to_transformers(config: InternVL3Config) -> dict[str, Any]:
    vision = config.vision
    if vision.qk_norm and vision.eps != 1e-6:
        raise MmzooError(
            f"vision eps {vision.eps} with qk-norm cannot be exported: transformers fixes it at 1e-6"
        )
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "internvl",
        "downsample_ratio": config.downsample_ratio,
        "image_seq_length": config.tokens_per_tile,
        "image_token_id": config.image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": config.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "text_config": {**_text_to_hf(config, eos=151645), "rope_parameters": _rope(config)},
        "vision_config": {
            "model_type": "internvl_vision",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads,
            "intermediate_size": vision.ffn_hidden_size,
            "attention_bias": vision.qkv_bias,
            "use_qk_norm": vision.qk_norm,
            "norm_type": vision.norm,
            "layer_norm_eps": vision.eps,
            "image_size": [vision.image_size, vision.image_size],
            "patch_size": [vision.patch_size, vision.patch_size],
            "num_channels": vision.in_channels,
            "hidden_act": "gelu",
            "use_mean_pooling": True,
            "use_absolute_position_embeddings": True,
        },
    }


def _to_opengvlab(config: InternVL3Config) -> dict[str, Any]:
    vision = config.vision
    rope = _rope(config)
    llm = {**_text_to_hf(config, eos=151643), "rope_theta": rope.pop("rope_theta")}
    llm["rope_scaling"] = None if rope["rope_type"] == "default" else {**rope, "type": "dynamic"}
    return {
        "architectures": [OPENGVLAB_ARCHITECTURE],
        "auto_map": _REMOTE_CODE,
        "model_type": "internvl_chat",
        "downsample_ratio": config.downsample_ratio,
        "select_layer": config.select_layer,
        "ps_version": "v2",
        "template": "internvl2_5",
        "force_image_size": vision.image_size,
        "dynamic_image_size": True,
        "min_dynamic_patch": config.min_dynamic_patch,
        "max_dynamic_patch": config.max_dynamic_patch,
        "use_thumbnail": config.use_thumbnail,
        "tie_word_embeddings": config.text.tie_word_embeddings,
        "llm_config": llm,
        "vision_config": {
            "architectures": ["InternVisionModel"],
            "model_type": "intern_vit_6b",
            "hidden_size": vision.hidden_size,
            "num_hidden_layers": vision.num_layers,
            "num_attention_heads": vision.num_heads,
            "intermediate_size": vision.ffn_hidden_size,
            "qkv_bias": vision.qkv_bias,
            "qk_normalization": vision.qk_norm,
            "norm_type": vision.norm,
            "layer_norm_eps": vision.eps,
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "num_channels": vision.in_channels,
            "hidden_act": "gelu",
            "drop_path_rate": 0.0,
        },
    }

"""InternVL3 LoRA adapters to and from transformers + peft: ``save_peft`` writes an adapter that
``PeftModel.from_pretrained`` loads onto transformers' InternVL model, and an adapter made there
with ``get_peft_model`` imports onto mmzoo's fused layers; logits equal, with negative controls.
Both ViT styles: the 300M's (LayerNorm, qkv bias) and the 6B's (RMSNorm, qk-norm, 5 heads)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from internvl3_tiny import VIT_6B_STYLE, VIT_300M_STYLE, original_state_dict, sample, tiny_config
from safetensors.torch import load_file, save_file
from transformers import InternVLConfig, InternVLForConditionalGeneration

import mmzoo
from mmzoo.config import LoraConfig
from mmzoo.convert.mapping import QKV
from mmzoo.lora.attach import attach
from mmzoo.lora.peft_format import import_adapter, save_peft
from mmzoo.testing import assert_parity, parity_pair, spread_adapters_
from mmzoo_internvl3.hf_config import config_to_hf
from mmzoo_internvl3.mapping import StackedQKV

peft = pytest.importorskip("peft")

TARGETS = ("text.attention", "text.mlp", "vision.attention", "vision.mlp", "projector")
# transformers' InternVL linear layers: the LLM's, the ViT's (q/k/v shared names) and the projector's.
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HF_TARGETS += ["projection_layer", "fc1", "fc2", "linear_1", "linear_2"]
TOL = dict(atol=1e-5, rtol=1e-4)
LAYOUT = [5, 3, 4]  # text, a 3-tile image, text


@pytest.fixture(scope="module", params=["300m", "6b"])
def hf_pair(request, tmp_path_factory):
    """``(config, directory)``: a tiny InternVL3 saved by transformers, weights spread."""
    config = tiny_config({"300m": VIT_300M_STYLE, "6b": VIT_6B_STYLE}[request.param])
    hf_config = InternVLConfig(**config_to_hf(config))
    hf_config._attn_implementation = "eager"
    found = parity_pair(InternVLForConditionalGeneration, hf_config, tmp_path_factory.mktemp("hf"))
    return config, found.directory


def ours(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], media={"pixel_values": batch["pixel_values"]}).logits


def theirs(model, batch: dict):
    with torch.no_grad():
        return model(**batch)


def hf_base(directory) -> InternVLForConditionalGeneration:
    return InternVLForConditionalGeneration.from_pretrained(directory, attn_implementation="eager").eval()


def lora_model(directory) -> mmzoo.VLModel:
    model = mmzoo.load_model(directory).eval()
    attach(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
    spread_adapters_(model)
    return model


def exported(model, out) -> set[str]:
    """The tensor names of ``model``'s adapters as ``--save-peft`` writes them to ``out``."""
    save_peft(model, out)
    return set(load_file(out / "adapter_model.safetensors"))


# --- export (--save-peft) --------------------------------------------------------------------------


def test_export_names_are_transformers(hf_pair, tmp_path):
    _, directory = hf_pair
    names = exported(lora_model(directory), tmp_path / "adapter")
    for module in (
        "language_model.layers.0.self_attn.k_proj",
        "language_model.layers.1.mlp.gate_proj",
        "vision_tower.encoder.layer.0.attention.q_proj",
        "vision_tower.encoder.layer.1.attention.projection_layer",
        "vision_tower.encoder.layer.1.mlp.fc1",
        "multi_modal_projector.linear_2",
    ):
        assert f"base_model.model.model.{module}.lora_B.weight" in names, module
    assert len(names) == 2 * (2 * 7 + 2 * 6 + 2)  # A and B: 2 LLM layers, 2 ViT layers, projector
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8


def test_export_matches_transformers_with_peft(hf_pair, tmp_path, monkeypatch):
    config, directory = hf_pair
    model = lora_model(directory)
    batch = sample(config, LAYOUT)
    save_peft(model, tmp_path / "adapter")
    # Control: the ViT's [Q; K; V] rows taken as grouped per head, as the LLM's fused q/k/v are.
    heads = config.vision.num_heads
    grouped = QKV(heads, heads, config.vision.hidden_size // heads)
    with monkeypatch.context() as m:
        m.setattr(StackedQKV, "split", lambda self, t: grouped.split(t))
        save_peft(model, tmp_path / "grouped")

    def peft_logits(adapter) -> torch.Tensor:
        return theirs(peft.PeftModel.from_pretrained(hf_base(directory), str(adapter)).eval(), batch).logits

    broken = {"ViT q/k/v rows regrouped per head": peft_logits(tmp_path / "grouped")}
    assert_parity(ours(model, batch), peft_logits(tmp_path / "adapter"), controls=broken, **TOL)


def test_opengvlab_layout_exports_its_names_and_imports_back(hf_pair, tmp_path):
    """A model read from OpenGVLab's layout exports under InternVLChatModel's module names (fused
    ``attn.qkv``, ``mlp1``), and that adapter imports back onto the same logits."""
    config, directory = hf_pair
    original = tmp_path / "opengvlab"
    original.mkdir()
    state = original_state_dict(hf_base(directory))
    save_file({k: v.contiguous() for k, v in state.items()}, original / "model.safetensors")
    hf = config_to_hf(dataclasses.replace(config, hf_layout="opengvlab"))
    (original / "config.json").write_text(json.dumps(hf))
    model = lora_model(original)
    names = exported(model, tmp_path / "adapter")
    for module in (
        "vision_model.encoder.layers.0.attn.qkv",
        "vision_model.encoder.layers.0.mlp.fc2",
        "mlp1.1",
        "language_model.model.layers.0.self_attn.q_proj",
    ):
        assert f"base_model.model.{module}.lora_A.weight" in names, module
    batch = sample(config, LAYOUT, seed=1)
    model.config = dataclasses.replace(model.config, image_token_id=299)  # the tiny vocabulary's
    back = mmzoo.load_model(original).eval()
    back.config = model.config
    base = ours(back, batch)
    import_adapter(back, tmp_path / "adapter")
    assert_parity(ours(back, batch), ours(model, batch), controls={"no adapters": base}, **TOL)


# --- import (model.load_adapter / --adapter) -------------------------------------------------------


def hf_adapter(directory, out, batch, **patterns) -> torch.Tensor:
    """A PEFT adapter made on transformers' InternVL (separate q/k/v, their own A's), saved; its logits."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=HF_TARGETS, **patterns)
    model = peft.get_peft_model(hf_base(directory), config).eval()
    spread_adapters_(model, seed=5)
    model.save_pretrained(str(out))
    return theirs(model, batch).logits


def test_imported_adapter_matches_transformers_with_peft(hf_pair, tmp_path):
    config, directory = hf_pair
    batch = sample(config, LAYOUT, seed=2)
    # k_proj (LLM and ViT) at another rank and alpha, the same alpha/r: fused as rank 4 + 2 + 4.
    expected = hf_adapter(
        directory, tmp_path / "adapter", batch, rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 4}
    )
    model = mmzoo.load_model(directory).eval()
    imported = import_adapter(model, tmp_path / "adapter")
    assert len(imported.tensors) == 2 * 4 + 2 * 4 + 2  # fused: qkv, proj, fc1, fc2 per layer; projector
    qkv = model.image_encoder.encoder.encoder.layers[1].self_attention.linear_qkv
    assert qkv.lora_A["default"].weight.shape[0] == 10 and qkv.scaling["default"] == 2.0
    got = ours(model, batch)
    with torch.no_grad():  # control: the ViT's A blocks fused in another order than B's columns
        a = qkv.lora_A["default"].weight
        a.copy_(torch.cat([a[4:6], a[:4], a[6:]]))
    assert_parity(got, expected, controls={"ViT A blocks misordered": ours(model, batch)}, **TOL)


def test_imported_vision_parts_with_different_scalings_are_refused(hf_pair, tmp_path):
    config, directory = hf_pair
    hf_adapter(
        directory, tmp_path / "adapter", sample(config, LAYOUT), alpha_pattern={"attention.v_proj": 16}
    )
    with pytest.raises(mmzoo.MmzooError, match=r"attention\.v_proj.* have different alpha/r"):
        import_adapter(mmzoo.load_model(directory), tmp_path / "adapter")


def test_an_adapter_on_the_patch_embedding_is_refused(hf_pair, tmp_path):
    """peft adapts transformers' patch Conv2d; mmzoo adapts linear layers only."""
    config, directory = hf_pair
    model = peft.get_peft_model(hf_base(directory), peft.LoraConfig(r=2, target_modules=["projection"]))
    model.save_pretrained(str(tmp_path / "conv"))
    with pytest.raises(
        mmzoo.MmzooError, match=r"patch_embedding\.weight\); mmzoo adapts nn.Linear layers only"
    ):
        import_adapter(mmzoo.load_model(directory), tmp_path / "conv")

"""LoRA adapters to and from transformers: --save-hf merges them, --save-peft writes a PEFT
adapter that ``PeftModel.from_pretrained`` loads, and a PEFT adapter trained on transformers'
model imports onto mmzoo's fused layers; logits against transformers + peft, with controls."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_hf import make_sample, token_types

import mmzoo
from mmzoo.config import LoraConfig
from mmzoo.convert.mapping import QKV
from mmzoo.lora.attach import attach
from mmzoo.lora.peft_format import import_adapter, save_peft
from mmzoo.testing import assert_parity, spread_adapters_
from mmzoo_qwen2_5_vl.compat import hf_forward

peft = pytest.importorskip("peft")

TARGETS = ("text.attention", "text.mlp", "vision.attention", "vision.mlp", "projector")
TOL = dict(atol=1e-5, rtol=1e-4)
BATCH = dict(images=[(1, 8, 12)])


@pytest.fixture
def lora_model(hf_dir):
    model = mmzoo.load_model(hf_dir).eval()
    attach(model, LoraConfig(r=4, alpha=8, targets=TARGETS))
    spread_adapters_(model)
    return model


def hf_base(hf_dir):
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()


def hf_logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, mm_token_type_ids=token_types(batch["input_ids"])).logits


def ours(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return hf_forward(model, **batch).logits


def peft_logits(hf_dir, adapter, batch) -> torch.Tensor:
    return hf_logits(peft.PeftModel.from_pretrained(hf_base(hf_dir), str(adapter)).eval(), batch)


# --- --save-peft ---------------------------------------------------------------------------------


def test_peft_export_names(lora_model, tmp_path):
    save_peft(lora_model, tmp_path / "adapter")
    names = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    prefix = "base_model.model.model."
    for module in (
        "language_model.layers.0.self_attn.q_proj",
        "language_model.layers.0.self_attn.v_proj",
        "language_model.layers.2.mlp.up_proj",
        "visual.blocks.3.attn.qkv",
        "visual.merger.mlp.2",
    ):
        assert f"{prefix}{module}.lora_A.weight" in names and f"{prefix}{module}.lora_B.weight" in names
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


def test_peft_export_matches_transformers_with_peft(lora_model, hf_dir, tmp_path, monkeypatch):
    batch = make_sample(**BATCH)
    save_peft(lora_model, tmp_path / "adapter")
    expected = ours(lora_model, batch)

    # Control: the fused q/k/v rows split as [Q; K; V] without undoing the per-KV-group layout.
    def naive(self, t):
        return list(t.split([self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2))

    with monkeypatch.context() as m:
        m.setattr(
            QKV, "split", lambda self, t: [torch.cat(naive(self, t))] if self.fused_source else naive(self, t)
        )
        save_peft(lora_model, tmp_path / "naive")
    assert_parity(
        peft_logits(hf_dir, tmp_path / "adapter", batch),
        expected,
        controls={"q/k/v rows not regrouped": peft_logits(hf_dir, tmp_path / "naive", batch)},
        **TOL,
    )


# --- --save-hf -------------------------------------------------------------------------------------


def test_save_hf_merges_the_adapters(lora_model, hf_dir, tmp_path):
    from mmzoo.checkpoint.hf_export import save_hf

    batch = make_sample(**BATCH)
    save_hf(lora_model, tmp_path / "merged")
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    base = load_file(hf_dir / "model.safetensors")
    # By hand: layer 1's q_proj is the base's plus the q rows of B @ A * alpha / r, regrouped.
    layer = lora_model.text_decoder.decoder.layers[1].self_attention.linear_qkv
    update = layer.lora_B["default"].weight @ layer.lora_A["default"].weight * (8 / 4)
    groups, heads, d = 2, 4, 16  # tiny_hf: 2 KV groups of 2 query heads, head_dim 64 / 4
    q = update.view(groups, heads // groups + 2, d, -1)[:, : heads // groups].reshape(heads * d, -1)
    name = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(merged[name], base[name] + q, rtol=0, atol=1e-6)
    unchanged = "model.layers.1.input_layernorm.weight"
    assert torch.equal(merged[unchanged], base[unchanged])
    assert_parity(
        hf_logits(hf_base(tmp_path / "merged"), batch),
        ours(lora_model, batch),
        controls={"base without adapters": hf_logits(hf_base(hf_dir), batch)},
        **TOL,
    )


# --- model.load_adapter / --adapter ----------------------------------------------------------------


def hf_adapter(hf_dir, directory, **patterns) -> torch.Tensor:
    """A PEFT adapter trained elsewhere: separate q/k/v (their own A's), saved; its logits."""
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv", "mlp.0"]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, **patterns)
    model = peft.get_peft_model(hf_base(hf_dir), config).eval()
    spread_adapters_(model, seed=5)
    model.save_pretrained(str(directory))
    return hf_logits(model, make_sample(**BATCH))


def test_imported_adapter_matches_transformers_with_peft(hf_dir, tmp_path):
    # k_proj at another rank and alpha but the same alpha/r: fused exactly as rank 4 + 2 + 4.
    expected = hf_adapter(
        hf_dir, tmp_path / "adapter", rank_pattern={"k_proj": 2}, alpha_pattern={"k_proj": 4}
    )
    model = mmzoo.load_model(hf_dir).eval()
    import_adapter(model, tmp_path / "adapter")
    qkv = model.text_decoder.decoder.layers[0].self_attention.linear_qkv
    assert qkv.lora_A["default"].weight.shape[0] == 10 and qkv.scaling["default"] == 2.0
    batch = make_sample(**BATCH)
    got = ours(model, batch)
    with torch.no_grad():  # control: A's blocks fused in another order than B's columns
        a = qkv.lora_A["default"].weight
        a.copy_(torch.cat([a[4:8], a[:4], a[8:]]))
    assert_parity(got, expected, controls={"A blocks misordered": ours(model, batch)}, **TOL)


def test_imported_parts_with_different_scalings_are_refused(hf_dir, tmp_path):
    hf_adapter(hf_dir, tmp_path / "adapter", alpha_pattern={"v_proj": 16})
    with pytest.raises(mmzoo.MmzooError, match="have different alpha/r"):
        import_adapter(mmzoo.load_model(hf_dir), tmp_path / "adapter")


def test_dora_is_refused(hf_dir, tmp_path):
    model = peft.get_peft_model(
        hf_base(hf_dir), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)
    )
    model.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(mmzoo.MmzooError, match="use_dora is not supported for import"):
        import_adapter(mmzoo.load_model(hf_dir), tmp_path / "dora")

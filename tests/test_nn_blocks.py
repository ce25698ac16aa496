"""mmzoo.nn building blocks against plain-PyTorch restatements (and one transformers layer).

Each block is fed spread weights and fresh random inputs, compared in fp32, and shown failing the
same comparison with one deliberately wrong part (a negative control).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmzoo.build import init_weights
from mmzoo.config import RecomputeConfig
from mmzoo.convert.mapping import QKV
from mmzoo.distributed.fsdp import layer_units
from mmzoo.nn import (
    MLP,
    LayerNorm,
    LayerStack,
    RMSNorm,
    SelfAttention,
    TransformerLayer,
    activation_name,
    build_norm,
    set_recompute,
)
from mmzoo.testing import assert_parity, spread_weights_

TOL = {"atol": 1e-5, "rtol": 1e-4}


def cu(*lengths: int) -> torch.Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0, dtype=torch.int32), (1, 0))


def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


# ----------------------------------------------------------------------------------- norms


def test_norms_are_torch_norms():
    torch.manual_seed(0)
    x = torch.randn(6, 32) * 2 + 1
    layer, rms_norm = spread_weights_(build_norm("layer", 32, 1e-5)), spread_weights_(build_norm("rms", 32))
    assert isinstance(layer, LayerNorm) and isinstance(rms_norm, RMSNorm)
    torch_layer = nn.LayerNorm(32, eps=1e-5)
    torch_layer.load_state_dict(layer.state_dict())  # same names: weight, bias
    assert_parity(layer(x), torch_layer(x), controls={"rms for layer": rms_norm(x)}, **TOL)
    assert_parity(rms_norm(x), rms(x, rms_norm.weight, 1e-6), controls={"layer for rms": layer(x)}, **TOL)
    with pytest.raises(ValueError, match="norm kind must be one of rms, layer, got 'batch'"):
        build_norm("batch", 32)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- MLP

PLAIN = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "silu": F.silu,
    "relu": F.relu,
}


@pytest.mark.parametrize("name", PLAIN)
def test_plain_mlp_applies_its_named_activation(name):
    torch.manual_seed(1)
    mlp = spread_weights_(MLP(16, 40, bias=True, gated=False, activation=name, out_size=24), std=0.5)
    x = torch.randn(9, 16) * 2

    def restated(act):
        return F.linear(
            act(F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias)), *mlp.linear_fc2.parameters()
        )

    others = {other: restated(fn) for other, fn in PLAIN.items() if other != name}
    out = mlp(x)
    assert out.shape == (9, 24)
    assert_parity(out, restated(PLAIN[name]), controls=others, **TOL)


@pytest.mark.parametrize("activation", ["silu", "gelu"], ids=["swiglu", "geglu"])
def test_gated_mlp_is_act_of_gate_times_up(activation):
    torch.manual_seed(2)
    mlp = spread_weights_(MLP(16, 24, bias=True, gated=True, activation=activation), std=0.5)
    assert mlp.linear_fc1.weight.shape == (48, 16)
    x = torch.randn(7, 16)
    gate, up = F.linear(x, mlp.linear_fc1.weight, mlp.linear_fc1.bias).chunk(2, dim=-1)  # [gate; up]
    act = PLAIN[activation]
    restated = mlp.linear_fc2(act(gate) * up)
    assert_parity(mlp(x), restated, controls={"[up; gate]": mlp.linear_fc2(act(up) * gate)}, **TOL)


def test_activation_names_and_transformers_aliases():
    assert activation_name("gelu_pytorch_tanh") == "gelu_tanh" and activation_name("swish") == "silu"
    assert MLP(4, 8, bias=False, gated=False, activation="gelu_new").activation == "gelu_tanh"
    with pytest.raises(ValueError, match="unknown activation 'gleu'; known: gelu, gelu_tanh, quick_gelu"):
        MLP(4, 8, bias=False, gated=False, activation="gleu")


# ------------------------------------------------------------------------------- attention


def spread(layer: nn.Module) -> nn.Module:
    return spread_weights_(layer, std=0.3)


def test_stacked_attention_without_rotary_is_multihead_attention():
    """Layout ``stacked`` is ``nn.MultiheadAttention``'s ``in_proj`` ([Q; K; V]); sequences stay apart."""
    torch.manual_seed(3)
    ours = spread(
        SelfAttention(32, 4, 4, 8, qkv_bias=True, proj_bias=True, causal=False, qkv_layout="stacked")
    )
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(ours.linear_qkv.weight)
        mha.in_proj_bias.copy_(ours.linear_qkv.bias)
        mha.out_proj.load_state_dict(ours.linear_proj.state_dict())
    x = torch.randn(14, 32)
    expected = torch.cat([mha(s[None], s[None], s[None])[0][0] for s in (x[:5], x[5:])])
    out = ours(x, None, None, cu(5, 9))
    controls = {"one sequence": ours(x, None, None, cu(14))}
    ours.qkv_layout = "grouped"
    controls["rows read as grouped"] = ours(x, None, None, cu(5, 9))
    ours.qkv_layout, ours.causal = "stacked", True
    controls["causal"] = ours(x, None, None, cu(5, 9))
    assert_parity(out, expected, controls=controls, **TOL)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_grouped_and_stacked_layouts_agree_on_permuted_rows(kv_heads):
    """The same attention in both layouts (rows moved by the converter's QKV op), with rotary."""
    torch.manual_seed(4)

    def build(layout):
        return SelfAttention(
            32, 4, kv_heads, 8, qkv_bias=True, proj_bias=False, causal=True, qkv_layout=layout
        )

    stacked, grouped, unmoved = spread(build("stacked")), build("grouped"), build("grouped")
    unmoved.load_state_dict(stacked.state_dict())
    op = QKV(4, kv_heads, 8, fused_source=True)
    grouped.load_state_dict({k: op.merge([v]) if "qkv" in k else v for k, v in stacked.state_dict().items()})
    x, angle = torch.randn(11, 32), torch.rand(11, 8) * 6
    cos, sin = angle.cos(), angle.sin()
    assert_parity(
        grouped(x, cos, sin, cu(4, 7)),
        stacked(x, cos, sin, cu(4, 7)),
        controls={
            "no rotary": grouped(x, None, None, cu(4, 7)),
            "rows not moved": unmoved(x, cos, sin, cu(4, 7)),
        },
        **TOL,
    )


def restated_attention(layer: SelfAttention, x: torch.Tensor, norm) -> torch.Tensor:
    """One sequence, stacked layout, qk-norm over the full width, softmax written out."""
    q, k, v = F.linear(x, layer.linear_qkv.weight, layer.linear_qkv.bias).chunk(3, dim=-1)
    q, k = norm(q, layer.q_layernorm), norm(k, layer.k_layernorm)
    heads = layer.num_heads
    q, k, v = (t.view(len(x), heads, -1).transpose(0, 1) for t in (q, k, v))  # (H, T, D)
    probs = torch.softmax(q @ k.transpose(1, 2) * layer.head_dim**-0.5, dim=-1)
    return layer.linear_proj((probs @ v).transpose(0, 1).reshape(len(x), -1))


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_qk_norm_normalises_the_full_width_before_the_heads(kind):
    torch.manual_seed(5)
    layer = spread(
        SelfAttention(
            24, 3, 3, 8, qkv_bias=False, proj_bias=True, causal=False, qkv_layout="stacked", qk_norm=kind
        )
    )
    assert layer.q_layernorm.weight.shape == (24,) and layer.linear_qkv.bias is None
    x = torch.randn(10, 24) * 2 + 0.5

    def full(t, norm):
        return norm(t)

    def per_head(t, norm):  # the common mistake: a norm per head of head_dim values
        if kind == "rms":
            return rms(t.view(len(t), 3, 8), norm.weight.view(3, 8), norm.eps).reshape(len(t), -1)
        heads = F.layer_norm(t.view(len(t), 3, 8), (8,), eps=norm.eps).reshape(len(t), -1)
        return heads * norm.weight + norm.bias

    assert_parity(
        layer(x, None, None, cu(10)),
        restated_attention(layer, x, full),
        controls={"per-head norm": restated_attention(layer, x, per_head)},
        **TOL,
    )


# ------------------------------------------------------------------------------- the layer


def vit_layer(norm="layer", layer_scale=0.1, qk_norm=None, bias=True) -> TransformerLayer:
    return TransformerLayer(
        self_attention=SelfAttention(
            32, 4, 4, 8, qkv_bias=bias, proj_bias=True, causal=False, qkv_layout="stacked", qk_norm=qk_norm
        ),
        mlp=MLP(32, 64, bias=True, gated=False, activation="gelu"),
        hidden_size=32,
        eps=1e-6,
        norm=norm,
        layer_scale=layer_scale,
    )


def test_layer_names_are_megatron_and_mindspeed_mm():
    names = set(vit_layer(qk_norm="rms").state_dict())
    assert names == {
        "ls1",
        "ls2",
        "input_layernorm.weight",
        "input_layernorm.bias",
        "self_attention.linear_qkv.weight",
        "self_attention.linear_qkv.bias",
        "self_attention.q_layernorm.weight",
        "self_attention.k_layernorm.weight",
        "self_attention.linear_proj.weight",
        "self_attention.linear_proj.bias",
        "pre_mlp_layernorm.weight",
        "pre_mlp_layernorm.bias",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc1.bias",
        "mlp.linear_fc2.weight",
        "mlp.linear_fc2.bias",
    }
    plain = set(vit_layer(norm="rms", layer_scale=None, bias=False).state_dict())
    assert "ls1" not in plain and "input_layernorm.bias" not in plain
    assert "self_attention.linear_qkv.bias" not in plain and "self_attention.q_layernorm.weight" not in plain


def test_layer_with_layer_scale_is_the_restated_residual_block():
    torch.manual_seed(6)
    layer = spread(vit_layer())
    x = torch.randn(12, 32)
    attn = layer.self_attention(
        F.layer_norm(x, (32,), *layer.input_layernorm.parameters(), 1e-6), None, None, cu(12)
    )
    h = x + layer.ls1 * attn
    expected = h + layer.ls2 * layer.mlp(F.layer_norm(h, (32,), *layer.pre_mlp_layernorm.parameters(), 1e-6))
    no_scale = x + attn
    no_scale = no_scale + layer.mlp(
        F.layer_norm(no_scale, (32,), *layer.pre_mlp_layernorm.parameters(), 1e-6)
    )
    out = layer(x, None, None, cu(12))
    with torch.no_grad():
        layer.ls1, layer.ls2 = layer.ls2, layer.ls1
    assert_parity(
        out,
        expected,
        controls={"no layer scale": no_scale, "ls1 <-> ls2": layer(x, None, None, cu(12))},
        **TOL,
    )


def internvl_hf_layer(six_b: bool):
    internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")
    from transformers import InternVLVisionConfig

    config = InternVLVisionConfig(
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=64,
        norm_type="rms_norm" if six_b else "layer_norm",
        use_qk_norm=six_b,
        attention_bias=not six_b,
        layer_scale_init_value=0.1,
        hidden_act="gelu",
    )
    config._attn_implementation = "eager"
    return spread_weights_(internvl.InternVLVisionLayer(config).eval(), std=0.3)


def from_hf(hf, six_b: bool) -> dict[str, torch.Tensor]:
    """The mm state of one InternViT layer from transformers' (q/k/v stacked as [Q; K; V])."""
    attn = hf.attention
    state = {
        "ls1": hf.lambda_1,
        "ls2": hf.lambda_2,
        "self_attention.linear_qkv.weight": torch.cat(
            [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]
        ),
        "self_attention.linear_proj.weight": attn.projection_layer.weight,
        "self_attention.linear_proj.bias": attn.projection_layer.bias,
        "mlp.linear_fc1.weight": hf.mlp.fc1.weight,
        "mlp.linear_fc1.bias": hf.mlp.fc1.bias,
        "mlp.linear_fc2.weight": hf.mlp.fc2.weight,
        "mlp.linear_fc2.bias": hf.mlp.fc2.bias,
    }
    for ours, theirs in (("input_layernorm", hf.layernorm_before), ("pre_mlp_layernorm", hf.layernorm_after)):
        state.update({f"{ours}.{k}": v for k, v in theirs.state_dict().items()})
    if six_b:
        state["self_attention.q_layernorm.weight"] = attn.q_norm.weight
        state["self_attention.k_layernorm.weight"] = attn.k_norm.weight
    else:
        state["self_attention.linear_qkv.bias"] = torch.cat(
            [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        )
    return state


@pytest.mark.parametrize("six_b", [False, True], ids=["internvit-300m", "internvit-6b"])
@torch.no_grad()
def test_layer_matches_transformers_internvl_vision_layer(six_b):
    """LayerNorm + biases + layer scale (300M), or RMSNorm + full-width qk-norm without qkv bias (6B)."""
    hf = internvl_hf_layer(six_b)
    ours = vit_layer("rms" if six_b else "layer", 0.1, "rms" if six_b else None, bias=not six_b)
    ours.load_state_dict(from_hf(hf, six_b))
    torch.manual_seed(7)
    pixels = torch.randn(2, 9, 32)  # two images of 9 tokens, packed
    expected = hf(pixels).flatten(0, 1)
    out = ours(pixels.flatten(0, 1), None, None, cu(9, 9))
    controls = {"one sequence over both images": ours(pixels.flatten(0, 1), None, None, cu(18))}
    ours.self_attention.qkv_layout = "grouped"
    controls["qkv read as Megatron's grouped rows"] = ours(pixels.flatten(0, 1), None, None, cu(9, 9))
    assert_parity(out, expected, controls=controls, **TOL)


# ------------------------------------------------------------------------------ the stack


def test_layer_stack_runs_its_layers_with_recompute_and_fsdp_units():
    torch.manual_seed(8)
    stack = spread(LayerStack([vit_layer() for _ in range(3)], final_layernorm=LayerNorm(32)))
    tower = nn.ModuleDict({"encoder": stack})  # a tower holding a stack
    assert layer_units(tower) == list(stack.layers)
    assert {name.split(".")[0] for name, _ in stack.named_parameters()} == {"layers", "final_layernorm"}
    x = torch.randn(10, 32, requires_grad=True)
    expected = x
    for layer in stack.layers:
        expected = layer(expected, None, None, cu(4, 6))
    expected = stack.final_layernorm(expected)
    grads = {}
    for policy in (RecomputeConfig(), RecomputeConfig("full", "uniform", 2), RecomputeConfig("selective")):
        set_recompute(tower, policy)
        assert stack.recompute == policy
        assert all(
            layer.self_attention.recompute_core == (policy.granularity == "selective")
            for layer in stack.layers
        )
        out = stack(x, None, None, cu(4, 6))
        torch.testing.assert_close(out, expected, atol=0, rtol=0)
        grads[policy.granularity] = torch.autograd.grad(out.square().sum(), x)[0]
    torch.testing.assert_close(grads["full"], grads["none"], atol=0, rtol=0)
    torch.testing.assert_close(grads["selective"], grads["none"], atol=0, rtol=0)
    skipped = stack.run(x, lambda i, layer, x: x if i == 1 else layer(x, None, None, cu(4, 6)))
    assert (skipped - expected).abs().max() > 1e-2  # run() applies the step it is given


def test_init_weights_resets_norms_and_layer_scales():
    layer = spread(vit_layer(qk_norm="layer"))
    init_weights(layer)
    assert torch.equal(layer.ls1, torch.full((32,), 0.1)) and torch.equal(layer.ls2, layer.ls1)
    for norm in (layer.input_layernorm, layer.self_attention.q_layernorm):
        assert torch.equal(norm.weight, torch.ones(32)) and torch.equal(norm.bias, torch.zeros(32))

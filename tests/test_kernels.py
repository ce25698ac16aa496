"""Every kernel implementation against the pure-PyTorch reference, dispatch, and the chunked loss.

Inputs are fresh random tensors (never zeros); forward and backward; fp32 and bf16; odd lengths,
GQA ratios, many short sequences and one long one. Implementations that cannot run on this
machine (flash-attn and Triton need CUDA, ``npu`` needs an Ascend NPU) are skipped with the
reason; on a CUDA machine the same tests run on ``cuda`` too (``benchmarks/gpu_check.sh``).
Without a GPU, the Triton kernels still run here in Triton's CPU interpreter when triton is
installed (``test_triton_kernels_in_the_interpreter``).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import mmzoo_kernels as K
from mmzoo.config import load_config
from mmzoo.errors import MmzooError
from mmzoo.nn.rotary import RotaryEmbedding
from mmzoo_kernels import KernelError, builtin, chunked, reference, registry, triton_ops

BACKENDS = {
    "attention": ["sdpa", "flash", "npu"],
    "rotary": ["triton", "npu"],
    "rms_norm": ["triton", "npu"],
    "layer_norm": ["native"],
    "swiglu": ["npu"],
    "gelu": [],
    "cross_entropy": ["chunked"],
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (atol, rtol) per dtype for values of order 1; bf16 has 8 mantissa bits.
TOL = {torch.float32: (2e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)}
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _fresh_choices():
    registry.reset()
    yield
    registry.reset()


def impl_or_skip(op: str, backend: str, device: str) -> registry.KernelImpl:
    impl = registry.implementations(op)[backend]
    reason = registry.why_not(impl, device)
    if reason is not None:
        pytest.skip(f"{op}/{backend} on {device}: {reason}")
    return impl


def cu(lengths: list[int], device: str) -> torch.Tensor:
    return F.pad(torch.tensor(lengths, device=device).cumsum(0, dtype=torch.int32), (1, 0))


def compare(fn, ref, inputs: list[torch.Tensor], dtype: torch.dtype, grad_scale: float = 1.0) -> None:
    """Forward and backward of ``fn`` and ``ref`` on the same inputs, within ``dtype``'s tolerance."""
    atol, rtol = TOL[dtype]
    leaves_a = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    leaves_b = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out_a, out_b = fn(*leaves_a), ref(*leaves_b)
    assert out_a.dtype == out_b.dtype and out_a.shape == out_b.shape
    torch.testing.assert_close(out_a, out_b, atol=atol, rtol=rtol)
    grad = torch.randn_like(out_b)
    out_a.backward(grad)
    out_b.backward(grad)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        if b.grad is not None:
            assert a.grad is not None
            torch.testing.assert_close(a.grad, b.grad, atol=atol * grad_scale, rtol=rtol * grad_scale)


def test_every_registered_backend_is_tested():
    assert set(registry.ops()) == set(BACKENDS)
    for op in registry.ops():
        assert set(registry.implementations(op)) == {"reference", *BACKENDS[op]}, op


# --------------------------------------------------------------------------------- attention

ATTENTION_CASES = {
    "odd": ([1, 7, 13, 2], 4, 4),  # (lengths, q heads, kv heads)
    "gqa2": ([5, 17, 9], 4, 2),
    "gqa7": ([11, 3], 14, 2),  # Qwen2.5-VL-7B's ratio
    "mqa": ([6, 10], 4, 1),
    "many_short": ([3] * 40 + [1, 2], 4, 2),
    "one_long": ([257], 2, 1),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("backend", BACKENDS["attention"])
def test_attention_matches_reference(backend, case, causal, dtype, device):
    impl = impl_or_skip("attention", backend, device)
    lengths, hq, hkv = ATTENTION_CASES[case]
    torch.manual_seed(0)
    total, dim = sum(lengths), 16
    q = torch.randn(total, hq, dim, device=device, dtype=dtype)
    k = torch.randn(total, hkv, dim, device=device, dtype=dtype)
    v = torch.randn(total, hkv, dim, device=device, dtype=dtype)
    cu_seqlens = cu(lengths, device)
    scale = dim**-0.5

    def run(fn):
        return lambda q, k, v: fn(q, k, v, cu_seqlens, causal, scale)

    compare(run(impl.fn), run(reference.attention), [q, k, v], dtype, grad_scale=2.0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS["attention"])
def test_window_attention_over_vision_windows(backend, device):
    """The ViT's window attention is bidirectional varlen attention over its window cu_seqlens."""
    vision = pytest.importorskip("mmzoo_qwen2_5_vl.vision")
    impl = impl_or_skip("attention", backend, device)
    grid = torch.tensor([[1, 10, 14], [2, 6, 4]])  # partial windows at the edges, a 2-frame video
    _, cu_windows = vision.window_index(grid, merge=2, window=4)
    total = int(cu_windows[-1])
    assert total == int(grid.prod(-1).sum()) and len(set(cu_windows.diff().tolist())) > 1
    torch.manual_seed(1)
    q, k, v = (torch.randn(total, 3, 8, device=device) for _ in range(3))
    cu_windows = cu_windows.to(device)
    compare(
        lambda q, k, v: impl.fn(q, k, v, cu_windows, False, 8**-0.5),
        lambda q, k, v: reference.attention(q, k, v, cu_windows, False, 8**-0.5),
        [q, k, v],
        torch.float32,
    )


def test_reference_attention_is_per_sequence_softmax():
    """The reference itself: packed sequences equal each sequence run alone through plain math."""
    torch.manual_seed(2)
    q, k, v = torch.randn(9, 2, 4), torch.randn(9, 1, 4), torch.randn(9, 1, 4)
    out = reference.attention(q, k, v, cu([4, 5], "cpu"), True, 0.5)
    for start, end in ((0, 4), (4, 9)):
        scores = torch.einsum("qhd,khd->hqk", q[start:end], k[start:end].expand(-1, 2, -1)) * 0.5
        scores = scores.masked_fill(torch.ones(end - start, end - start).triu(1).bool(), float("-inf"))
        expected = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[start:end].expand(-1, 2, -1))
        torch.testing.assert_close(out[start:end], expected)


# ------------------------------------------------------------------------------------ rotary


def angles(kind: str, tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin`` ``(T, D)`` of the three rotary variants, from random position ids."""
    if kind == "1d":  # two packed samples, positions restart
        pos = torch.cat([torch.arange(tokens // 2), torch.arange(tokens - tokens // 2)])[None]
        return RotaryEmbedding(head_dim, 1e6)(pos, torch.float32)
    if kind == "mrope":
        pos = torch.randint(0, 50, (3, tokens))
        return RotaryEmbedding(head_dim, 1e6, (head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16))(
            pos, torch.float32
        )
    # 2-D vision: a quarter of the dim rotates with h, a quarter with w, duplicated
    hw = torch.randint(0, 30, (tokens, 2))
    inv_freq = 1.0 / (1e4 ** (torch.arange(0, head_dim // 2, 2).float() / (head_dim // 2)))
    freqs = (hw[..., None].float() * inv_freq).flatten(1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["1d", "mrope", "2d"])
@pytest.mark.parametrize("backend", BACKENDS["rotary"])
def test_rotary_matches_reference(backend, kind, dtype, device):
    impl = impl_or_skip("rotary", backend, device)
    torch.manual_seed(3)
    tokens, heads, dim = 37, 3, 32
    cos, sin = (a.to(device=device, dtype=dtype) for a in angles(kind, tokens, dim))
    x = torch.randn(tokens, heads, dim, device=device, dtype=dtype)
    compare(lambda x: impl.fn(x, cos, sin), lambda x: reference.rotary(x, cos, sin), [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS["rotary"])
def test_rotary_on_a_strided_view(backend, device):
    """``k`` is a view into the fused qkv projection (head stride > head_dim), forward and backward."""
    impl = impl_or_skip("rotary", backend, device)
    torch.manual_seed(4)
    cos, sin = (a.to(device) for a in angles("1d", 21, 16))
    grad = torch.randn(21, 2, 16, device=device)
    results = []
    for fn in (impl.fn, reference.rotary):
        qkv = torch.randn(21, 2, 4, 16, device=device, generator=torch.Generator(device).manual_seed(5))
        qkv.requires_grad_()
        k = qkv[:, :, 2]  # (T, Hkv, D), not contiguous
        out = fn(k, cos, sin)
        out.backward(grad)
        results.append((out, qkv.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the Triton kernels run compiled on this GPU")
def test_triton_kernels_in_the_interpreter():
    """Every Triton test above, run on CPU by Triton's interpreter (``TRITON_INTERPRET=1``)."""
    pytest.importorskip("triton", reason="package triton is not installed")
    if triton_ops.interpreting():  # this process interprets: the Triton tests above ran on cpu here
        assert all(
            registry.why_not(registry.implementations(op)["triton"], "cpu") is None
            for op in ("rotary", "rms_norm")
        )
        return
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-rs", __file__, "-k", "triton and not interpreter"]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "skipped" not in summary, summary


# ---------------------------------------------------------------------------- RMSNorm, SwiGLU


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-fp32weight"],
)
@pytest.mark.parametrize("shape", [(37, 48), (3, 5, 40)], ids=["2d", "3d"])
@pytest.mark.parametrize("backend", BACKENDS["rms_norm"])
def test_rms_norm_matches_reference(backend, shape, dtype, weight_dtype, device):
    impl = impl_or_skip("rms_norm", backend, device)
    torch.manual_seed(5)
    x = torch.randn(shape, device=device, dtype=dtype) * 3
    weight = (torch.rand(shape[-1], device=device) + 0.5).to(weight_dtype)
    compare(
        lambda x, w: impl.fn(x, w, 1e-6), lambda x, w: reference.rms_norm(x, w, 1e-6), [x, weight], dtype, 4
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS["rms_norm"])
def test_rms_norm_with_a_strided_weight(backend, device):
    """A weight that is a view (every other element; one value broadcast) is read as such."""
    impl = impl_or_skip("rms_norm", backend, device)
    torch.manual_seed(6)
    x = torch.randn(5, 8, device=device)
    for w in ((torch.rand(16, device=device) + 0.5)[::2], torch.tensor(2.0, device=device).expand(8)):
        compare(
            lambda x, w=w: impl.fn(x, w, 1e-6), lambda x, w=w: reference.rms_norm(x, w, 1e-6), [x], x.dtype
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS["swiglu"])
def test_swiglu_matches_reference(backend, dtype, device):
    impl = impl_or_skip("swiglu", backend, device)
    torch.manual_seed(6)
    x = torch.randn(37, 2 * 24, device=device, dtype=dtype)
    compare(impl.fn, reference.swiglu, [x], dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,weight_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)],
    ids=["fp32", "bf16", "bf16-fp32weight"],
)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("backend", BACKENDS["layer_norm"])
def test_layer_norm_matches_reference(backend, bias, dtype, weight_dtype, device):
    impl = impl_or_skip("layer_norm", backend, device)
    torch.manual_seed(9)
    x = torch.randn(3, 5, 40, device=device, dtype=dtype) * 3 + 1  # a mean to remove
    weight = (torch.rand(40, device=device) + 0.5).to(weight_dtype)
    inputs = [x, weight] + ([torch.randn(40, device=device).to(weight_dtype)] if bias else [])

    def run(fn):
        return lambda x, w, b=None: fn(x, w, b, 1e-5)

    compare(run(impl.fn), run(reference.layer_norm), inputs, dtype, 4)


def test_reference_layer_norm_is_torch_layer_norm():
    """The reference is ``nn.LayerNorm``: in fp32, and in bf16 within bf16's rounding."""
    torch.manual_seed(10)
    norm = torch.nn.LayerNorm(24, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = torch.randn(7, 24) * 2 + 3
    out = reference.layer_norm(x, norm.weight, norm.bias, 1e-6)
    torch.testing.assert_close(out, norm(x))
    with pytest.raises(AssertionError):  # negative control: RMSNorm is not LayerNorm on this input
        torch.testing.assert_close(reference.rms_norm(x, norm.weight, 1e-6) + norm.bias, norm(x))
    out = reference.layer_norm(x.bfloat16(), norm.weight.bfloat16(), norm.bias.bfloat16(), 1e-6)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, norm.bfloat16()(x.bfloat16()), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_is_the_normal_cdf_or_its_tanh_form(approximate):
    torch.manual_seed(11)
    x = torch.randn(50, 8, dtype=torch.float64) * 3
    exact = 0.5 * x * (1 + torch.erf(x / 2**0.5))
    tanh = 0.5 * x * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (x + 0.044715 * x**3)))
    expected, other = (exact, tanh) if approximate == "none" else (tanh, exact)
    torch.testing.assert_close(K.gelu(x, approximate), expected)
    assert (K.gelu(x, approximate) - other).abs().max() > 1e-5  # the two forms differ: not vacuous
    with pytest.raises(ValueError, match="gelu approximate must be 'none' or 'tanh', got 'exact'"):
        K.gelu(x, "exact")


# ---------------------------------------------------------------------- chunked cross-entropy


def ce_inputs(n: int, vocab: int, hidden: int, device: str, dtype: torch.dtype, ignored: int = 3):
    torch.manual_seed(7)
    h = torch.randn(n, hidden, device=device, dtype=dtype)
    w = torch.randn(vocab, hidden, device=device, dtype=dtype) * 0.3
    t = torch.randint(0, vocab, (n,), device=device)
    t[torch.randperm(n)[:ignored]] = -100
    return h, w, t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk", [1, 7, 1024])
def test_chunked_cross_entropy_matches_reference(chunk, dtype, device):
    h, w, t = ce_inputs(37, 101, 16, device, dtype)
    compare(
        lambda h, w: chunked.cross_entropy(h, w, t, chunk_size=chunk),
        lambda h, w: reference.cross_entropy(h, w, t),
        [h, w],
        dtype,
        grad_scale=2.0,
    )


def test_chunked_cross_entropy_gradcheck():
    """Exact gradients in fp64 (finite differences), with ignored targets and a partial chunk."""
    h, w, t = ce_inputs(9, 13, 5, "cpu", torch.float64, ignored=2)
    h.requires_grad_()
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, w: chunked.cross_entropy(h, w, t, chunk_size=4), (h, w))


def test_chunked_cross_entropy_under_autocast_matches_the_naive_path():
    h, w, t = ce_inputs(29, 67, 16, "cpu", torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    results = []
    for fn in (
        lambda: chunked.cross_entropy(h, w, t, chunk_size=8),
        lambda: reference.cross_entropy(h, w, t),
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn().sum()
        results.append((loss, *torch.autograd.grad(loss, (h, w))))
    for a, b in zip(*results, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=3e-2, rtol=3e-2)


def test_chunked_cross_entropy_rounds_the_weight_gradient_once():
    """bf16 over 64 chunks: the weight gradient is as close to the exact one as the naive path's."""
    h, w, t = ce_inputs(4096, 300, 32, "cpu", torch.bfloat16, ignored=0)
    grads = {}
    for name, fn, dtype in (
        ("chunked", lambda h, w: chunked.cross_entropy(h, w, t, chunk_size=64), torch.bfloat16),
        ("naive", lambda h, w: reference.cross_entropy(h, w, t), torch.bfloat16),
        ("exact", lambda h, w: reference.cross_entropy(h, w, t), torch.float64),  # same bf16 values
    ):
        weight = w.to(dtype).detach().clone().requires_grad_()
        fn(h.to(dtype), weight).sum().backward()
        grads[name] = weight.grad.double()
    error = {
        k: float((grads[k] - grads["exact"]).norm() / grads["exact"].norm()) for k in ("chunked", "naive")
    }
    assert error["chunked"] < 1.5 * error["naive"], error


def saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for backward while ``fn`` runs (storages counted once)."""
    storages: dict[int, int] = {}

    def pack(x: torch.Tensor) -> torch.Tensor:
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        fn()
    return sum(storages.values())


def test_chunked_cross_entropy_never_keeps_the_logits():
    """Analytic memory check: the naive path keeps (N, V) fp32 for backward, chunked only O(N + inputs)."""
    n, vocab, hidden = 2048, 32000, 16
    h, w, t = ce_inputs(n, vocab, hidden, "cpu", torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    logits_bytes = n * vocab * 4
    inputs_bytes = (n * hidden + vocab * hidden) * 4 + n * 8
    naive = saved_bytes(lambda: reference.cross_entropy(h, w, t))
    fused = saved_bytes(lambda: chunked.cross_entropy(h, w, t, chunk_size=256))
    assert naive >= logits_bytes
    assert fused <= inputs_bytes + n * 16  # log-sum-exp, targets and the valid mask per token
    assert naive >= 4 * fused


# -------------------------------------------------------------------------------- pad / unpad


def test_unpad_pad_round_trip_and_varlen_equals_padded_attention():
    torch.manual_seed(8)
    lengths = [5, 1, 8]
    mask = torch.zeros(3, 8, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    x = torch.randn(3, 8, 2, 4, requires_grad=True)  # (B, S, H, D)
    packed, indices, cu_seqlens, max_len = K.unpad(x, mask)
    assert packed.shape == (14, 2, 4) and cu_seqlens.tolist() == [0, 5, 6, 14] and max_len == 8
    back = K.pad(packed, indices, 3, 8)
    torch.testing.assert_close(back, x * mask[..., None, None])
    # varlen attention on the packed tokens == masked SDPA on the padded batch, at real tokens
    out = K.pad(K.attention(packed, packed, packed, cu_seqlens, causal=True), indices, 3, 8)
    allowed = torch.ones(8, 8).tril().bool() & mask.bool()[:, None, None, :]  # (B, 1, S, S)
    xt = x.transpose(1, 2)
    padded = F.scaled_dot_product_attention(xt, xt, xt, attn_mask=allowed).transpose(1, 2)
    real = mask.bool()
    torch.testing.assert_close(out[real], padded[real])
    out.sum().backward()
    assert x.grad is not None and x.grad[~real].abs().sum() == 0 and x.grad[real].abs().sum() > 0


# ---------------------------------------------------------------------------------- dispatch


def test_auto_picks_the_best_usable_backend_on_cpu():
    chosen = K.configure(device="cpu")
    fused = "triton" if triton_ops.unavailable() is None and triton_ops.interpreting() else "reference"
    assert chosen == {
        "attention": "sdpa",
        "rotary": fused,
        "rms_norm": fused,
        "layer_norm": "native",
        "swiglu": "reference",
        "gelu": "reference",
        "cross_entropy": "chunked",
    }


def test_a_requested_backend_is_used(monkeypatch):
    calls = []
    counted = [
        dataclasses.replace(op, reference=lambda *a: calls.append(1) or reference.rms_norm(*a))
        if op.name == "rms_norm"
        else op
        for op in builtin.BUILTIN_OPS
    ]
    monkeypatch.setattr(builtin, "BUILTIN_OPS", tuple(counted))
    registry.reset()  # registration reads the patched ops
    assert K.configure(device="cpu", attention="reference", rms_norm="reference")["attention"] == "reference"
    K.rms_norm(torch.randn(3, 4), torch.rand(4), 1e-6)
    assert calls == [1]
    assert registry.get("attention", "cpu").backend == "reference"
    assert K.configure(device="cpu", attention="auto")["attention"] == "sdpa"


def test_a_backend_for_another_device_is_an_error_saying_so():
    with pytest.raises(
        KernelError, match=r"kernels.attention: backend 'flash' is unavailable on cpu: runs on cuda"
    ):
        K.configure(device="cpu", attention="flash")
    with pytest.raises(
        KernelError, match=r"kernels.rms_norm: backend 'npu' is unavailable on cpu: runs on npu"
    ):
        K.configure(device="cpu", rms_norm="npu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_missing_package_or_device_is_an_error_saying_which():
    with pytest.raises(KernelError) as err:
        K.configure(device="cuda", attention="flash")
    assert "kernels.attention: backend 'flash' is unavailable on cuda: " in str(err.value)
    assert "package flash-attn is not installed" in str(err.value) or "no CUDA device" in str(err.value)
    with pytest.raises(KernelError, match="package torch_npu is not installed|no Ascend NPU device"):
        K.configure(device="npu", swiglu="npu")


def test_a_failed_configure_changes_nothing():
    assert K.configure(device="cpu", attention="reference")["attention"] == "reference"
    with pytest.raises(KernelError, match="backend 'npu' is unavailable"):
        K.configure(device="cpu", attention="sdpa", rms_norm="npu")
    assert registry.get("attention", "cpu").backend == "reference"
    assert registry.get("rms_norm", "cpu").backend == "reference"


class FakeTorchNpu:
    """The documented ``torch_npu`` semantics in plain PyTorch, to check what the npu wrappers pass.

    Only the adapter (layouts, sequence ends, mask, argument names) is checked here; the NPU
    kernels themselves are unverified on hardware.
    """

    @staticmethod
    def npu_fusion_attention(q, k, v, head_num, input_layout, *, atten_mask, scale, sparse_mode, **seq):
        assert input_layout == "TND" and head_num == q.shape[1]
        assert seq["actual_seq_qlen"] == seq["actual_seq_kvlen"] and seq["actual_seq_qlen"][-1] == q.shape[0]
        ends = seq["actual_seq_qlen"]
        assert all(isinstance(e, int) for e in ends) and ends == sorted(set(ends))  # no empty sequence
        causal = sparse_mode == 3
        if causal:  # the compressed mask: 2048 x 2048, True above the diagonal
            assert torch.equal(atten_mask, torch.ones(2048, 2048, dtype=torch.bool).triu(1))
        else:
            assert sparse_mode == 0 and atten_mask is None
        cu_seqlens = torch.tensor([0, *ends])
        return (reference.attention(q, k, v, cu_seqlens, causal, scale), None, None, None)

    @staticmethod
    def npu_rotary_mul(x, r1, r2):
        assert x.dim() == 4 and r1.shape == r2.shape == (1, x.shape[1], 1, x.shape[3])
        return x * r1 + reference._rotate_half(x) * r2

    @staticmethod
    def npu_rms_norm(x, gamma, epsilon):
        rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + epsilon)
        return (x.float() * rstd * gamma.float()).to(x.dtype), rstd

    @staticmethod
    def npu_swiglu(x, dim):
        gate, up = x.chunk(2, dim=dim)
        return F.silu(gate) * up


def test_npu_wrappers_pass_the_documented_arguments(monkeypatch):
    from mmzoo_kernels import npu

    monkeypatch.setitem(sys.modules, "torch_npu", FakeTorchNpu)
    torch.manual_seed(8)
    q, k, v = torch.randn(20, 4, 8), torch.randn(20, 2, 8), torch.randn(20, 2, 8)
    cu_seqlens = cu([5, 0, 11, 4], "cpu")  # an empty sequence in the middle
    for causal in (True, False):
        torch.testing.assert_close(
            npu.attention(q, k, v, cu_seqlens, causal, 0.3),
            reference.attention(q, k, v, cu_seqlens, causal, 0.3),
        )
    x, (cos, sin) = torch.randn(20, 3, 16), angles("mrope", 20, 16)
    torch.testing.assert_close(npu.rotary(x, cos, sin), reference.rotary(x, cos, sin))
    x, weight = torch.randn(6, 16, dtype=torch.bfloat16), torch.rand(16) + 0.5
    out = npu.rms_norm(x, weight, 1e-6)
    assert out.dtype == reference.rms_norm(x, weight, 1e-6).dtype == torch.float32
    torch.testing.assert_close(out, reference.rms_norm(x, weight, 1e-6), atol=3e-2, rtol=3e-2)
    x = torch.randn(6, 32)
    torch.testing.assert_close(npu.swiglu(x), reference.swiglu(x))


def test_unknown_backend_and_op_suggest_the_nearest():
    with pytest.raises(KernelError, match=r"no backend 'flsh' \(did you mean 'flash'\?\); registered: flash"):
        K.configure(device="cpu", attention="flsh")
    with pytest.raises(KernelError, match=r"unknown kernel op 'rmsnorm' \(did you mean 'rms_norm'\?\)"):
        K.configure(rmsnorm="reference")


def test_config_section_feeds_configure():
    cfg = load_config(None, ["--kernels.attention", "reference", "--kernels.cross_entropy=reference"])
    assert cfg.kernels == {"attention": "reference", "cross_entropy": "reference"}
    chosen = K.configure(device="cpu", **cfg.kernels)
    assert chosen["attention"] == "reference" and chosen["cross_entropy"] == "reference"
    assert chosen["layer_norm"] == "native"  # ops not named stay auto
    with pytest.raises(MmzooError, match=r"kernels.attention: expected str, got \['sdpa'\]"):
        load_config(None, ["--kernels.attention", "[sdpa]"])
    cfg = load_config(None, ["--kernels.atention", "sdpa"])  # which ops exist is known once plugins load
    with pytest.raises(
        KernelError, match=r"unknown kernel op 'atention' \(did you mean 'attention'\?\); ops: "
    ):
        K.configure(device="cpu", **cfg.kernels)


def test_an_old_kernels_section_still_loads(tmp_path):
    """Before ops were open, the section named all five; such a file loads and configures as before."""
    path = tmp_path / "old.yaml"
    path.write_text(
        "kernels: {attention: sdpa, rotary: auto, rms_norm: reference, swiglu: auto, cross_entropy: auto}\n"
    )
    cfg = load_config(path, ["--kernels.swiglu", "reference"])
    chosen = K.configure(device="cpu", **cfg.kernels)
    assert (chosen["attention"], chosen["rms_norm"], chosen["swiglu"]) == ("sdpa", "reference", "reference")


def mine_plugin(entries):
    from mmzoo import plugins

    class Plugin:
        @plugins.hookimpl
        def mmzoo_register_kernels(self, register):
            for entry in entries:
                register(entry)

    manager = plugins.get_manager()
    manager.load()
    manager.register(Plugin(), plugins.PluginInfo("mine", "mine-kernels", "0.1", "test", builtin=False))
    registry.reset()


def test_a_third_party_backend_registers_through_the_hook():
    from mmzoo import plugins

    mine = registry.KernelImpl("swiglu", "mine", lambda x: reference.swiglu(x) * 1, devices=("cpu",))
    mine_plugin([mine])
    try:
        assert list(registry.implementations("swiglu")) == ["npu", "reference", "mine"]
        assert K.configure(device="cpu")["swiglu"] == "reference"  # auto never picks an unlisted backend
        assert K.configure(device="cpu", swiglu="mine")["swiglu"] == "mine"
        x = torch.randn(4, 6)
        torch.testing.assert_close(K.swiglu(x), reference.swiglu(x))
    finally:
        plugins.reset()


def test_an_op_from_a_plugin_is_selectable_through_config():
    """A plugin adds an op (name + reference) and a backend for it, preferred by ``auto``."""
    from mmzoo import plugins

    calls = []

    def fast(x, alpha):
        calls.append("fast")
        return reference_scale(x, alpha)

    def reference_scale(x, alpha):
        return x * alpha

    mine_plugin(
        [
            registry.KernelImpl("scale", "fast", fast, devices=("cpu",)),  # before its op: order is free
            registry.KernelOp("scale", reference_scale, auto_order=("fast",)),
        ]
    )
    try:
        assert "scale" in registry.ops() and list(registry.implementations("scale")) == ["fast", "reference"]
        x = torch.randn(3, 4)
        assert K.configure(device="cpu")["scale"] == "fast"
        torch.testing.assert_close(K.call("scale", x, 2.0), x * 2)
        assert calls == ["fast"]
        cfg = load_config(None, ["--kernels.scale", "reference"])
        assert K.configure(device="cpu", **cfg.kernels)["scale"] == "reference"
        torch.testing.assert_close(K.call("scale", x, alpha=3.0), x * 3)
        assert calls == ["fast"]  # the reference ran
        with pytest.raises(KernelError, match=r"kernels.scale: no backend 'fats' \(did you mean 'fast'\?\)"):
            K.configure(device="cpu", scale="fats")
    finally:
        plugins.reset()


@pytest.mark.parametrize(
    "entries,message",
    [
        ([registry.KernelImpl("scael", "x", reference.swiglu)], r"kernel scael/x for unknown op 'scael'"),
        ([registry.KernelOp("gelu", reference.gelu)], r"kernel op 'gelu' is registered by two plugins: "),
        ([registry.KernelImpl("gelu", "reference", reference.gelu)], r"gelu/reference is registered by two"),
        (["gelu"], r"registered 'gelu'; expected a KernelOp or a KernelImpl"),
    ],
    ids=["unknown-op", "op-twice", "reference-twice", "not-an-entry"],
)
def test_bad_registrations_name_the_plugin(entries, message):
    from mmzoo import plugins

    mine_plugin(entries)
    try:
        with pytest.raises(KernelError, match=message) as err:
            registry.ops()
        assert "mine (mine-kernels 0.1)" in str(err.value)
    finally:
        plugins.reset()

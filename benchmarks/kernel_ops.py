"""Kernel benchmark: time and peak memory of every usable implementation against the reference.

For each built-in op (attention, rotary, RMSNorm, LayerNorm, SwiGLU, GELU; cross-entropy below)
every backend usable on the device runs forward + backward on the same random inputs as the
op's pure-PyTorch reference, in the same process (``--ops`` picks some). Times are the median
of ``--repeat`` runs after a warm-up; peak memory is what the op adds on top of its inputs
(CUDA: ``max_memory_allocated``; CPU: the process's peak resident set, ``VmHWM`` after
resetting it through ``/proc/self/clear_refs``, with glibc told to return large blocks at once).
The last section is the loss at 8,192 tokens x 151,936 vocab: the naive path (full logits)
against the chunked one, with their gradients compared.

Run: ``python benchmarks/kernel_ops.py`` (CPU) or ``python benchmarks/kernel_ops.py --device cuda``.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from mmzoo_kernels import chunked, reference, registry

GiB = 1024**3


class Memory:
    """Peak memory an op adds, on CUDA or on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.libc = None
        if device == "cpu":
            try:
                self.libc = ctypes.CDLL("libc.so.6")
                self.libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: big blocks mmap'd, freed at once
            except OSError:
                self.libc = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return
        if self.libc is not None:
            self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM (peak RSS) to the current RSS
        self.base = self._status("VmRSS:")

    def peak(self) -> int:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM:") - self.base


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def fwd_bwd(fn: Callable, inputs: list[torch.Tensor]) -> Callable[[], None]:
    """One forward + backward of ``fn`` (gradient of a random projection of the output)."""
    leaves = [x.detach().requires_grad_(x.is_floating_point()) for x in inputs]
    grad = None

    def run() -> None:
        nonlocal grad
        for x in leaves:
            x.grad = None
        out = fn(*leaves)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)

    return run


def measure(run: Callable[[], None], device: str, repeat: int, memory: Memory) -> tuple[float, int]:
    run()  # warm-up (and lazy initialisation)
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        sync(device)
        times.append(time.perf_counter() - start)
    memory.start()
    run()
    peak = memory.peak()
    return statistics.median(times), peak


def cases(device: str, dtype: torch.dtype) -> dict[str, tuple[str, Callable[[Callable], Callable], list]]:
    """op -> (shape description, adapter from an implementation to ``fn(*inputs)``, inputs)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    big = device != "cpu"
    lengths = [512] * 16 if big else [256] * 8 + [97, 31, 1]
    cu = F.pad(torch.tensor(lengths).cumsum(0, dtype=torch.int32), (1, 0)).to(device)
    total = sum(lengths)
    tokens = 8192 if big else 2048
    angle = torch.rand(tokens, 128, generator=g) * 6.3
    cos, sin = angle.cos().to(device, dtype), angle.sin().to(device, dtype)
    weight = (torch.rand(3584, generator=g) + 0.5).to(device, dtype)
    vit_weight = (torch.rand(1024, generator=g) + 0.5).to(device, dtype)
    vit_bias = rand(1024)
    return {
        "attention": (
            f"T={total} ({len(lengths)} seqs), 28/4 heads x 128, causal",
            lambda fn: lambda q, k, v: fn(q, k, v, cu, True, 128**-0.5),
            [rand(total, 28, 128), rand(total, 4, 128), rand(total, 4, 128)],
        ),
        "rotary": (
            f"T={tokens}, 28 heads x 128",
            lambda fn: lambda x: fn(x, cos, sin),
            [rand(tokens, 28, 128)],
        ),
        "rms_norm": (
            f"T={tokens}, hidden 3584",
            lambda fn: lambda x: fn(x, weight, 1e-6),
            [rand(tokens, 3584)],
        ),
        "layer_norm": (
            f"T={tokens}, hidden 1024 (InternViT-300M), bias",
            lambda fn: lambda x: fn(x, vit_weight, vit_bias, 1e-6),
            [rand(tokens, 1024)],
        ),
        "swiglu": (
            f"T={tokens}, ffn 18944" if big else f"T={tokens}, ffn 4864",
            lambda fn: fn,
            [rand(tokens, 2 * (18944 if big else 4864))],
        ),
        "gelu": (
            f"T={tokens}, ffn 4096 (InternViT-300M), exact",
            lambda fn: lambda x: fn(x, "none"),
            [rand(tokens, 4096)],
        ),
    }


def bench_ops(
    device: str, dtype: torch.dtype, repeat: int, memory: Memory, only: set[str] | None
) -> list[list[str]]:
    rows = []
    for op, (shape, adapt, inputs) in cases(device, dtype).items():
        if only is not None and op not in only:
            continue
        impls = registry.implementations(op)
        ref_time, ref_peak = measure(fwd_bwd(adapt(impls["reference"].fn), inputs), device, repeat, memory)
        rows.append([op, shape, "reference", f"{ref_time * 1e3:.2f}", "1.00x", f"{ref_peak / 2**20:.0f}"])
        for backend, reason in registry.backends(op, device).items():
            if backend == "reference":
                continue
            if reason is not None:
                rows.append([op, shape, backend, "-", f"skipped: {reason}", "-"])
                continue
            impl = impls[backend]
            t, peak = measure(fwd_bwd(adapt(impl.fn), inputs), device, repeat, memory)
            rows.append([op, shape, backend, f"{t * 1e3:.2f}", f"{ref_time / t:.2f}x", f"{peak / 2**20:.0f}"])
    return rows


def bench_loss(
    device: str, dtype: torch.dtype, tokens: int, vocab: int, hidden: int, memory: Memory
) -> list[list[str]]:
    """The loss of ``tokens`` targets over ``vocab``: naive (full logits) vs chunked, fwd + bwd."""
    g = torch.Generator(device="cpu").manual_seed(1)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) * hidden**-0.5).to(device, dtype)
    t = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    results = {}
    rows = []
    for name, fn in (("chunked", chunked.cross_entropy), ("reference", reference.cross_entropy)):
        hl, wl = h.clone().requires_grad_(), w.clone().requires_grad_()
        memory.start()
        start = time.perf_counter()
        loss = fn(hl, wl, t).sum() / tokens
        loss.backward()
        sync(device)
        seconds = time.perf_counter() - start
        peak = memory.peak()
        results[name] = (loss.detach(), hl.grad, wl.grad)
        rows.append([name, seconds, peak])
        del hl, wl, loss
    (lc, hc, wc), (lr, hr, wr) = results["chunked"], results["reference"]
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    same = (
        torch.allclose(lc, lr, atol=atol, rtol=atol)
        and torch.allclose(hc, hr, atol=atol, rtol=atol * 10)
        and torch.allclose(wc, wr, atol=atol, rtol=atol * 10)
    )
    naive_peak = rows[1][2]
    return [
        [
            name,
            f"{seconds:.2f}",
            f"{peak / GiB:.2f}",
            f"{naive_peak / max(peak, 1):.1f}x",
            "yes" if same else "NO",
        ]
        for name, seconds, peak in rows
    ]


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="cpu: fp32, cuda: bf16")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ce-tokens", type=int, default=8192)
    parser.add_argument("--ce-vocab", type=int, default=151936)
    parser.add_argument("--ce-hidden", type=int, default=None, help="cpu: 64, cuda: 3584 (Qwen2.5-VL-7B)")
    parser.add_argument("--skip-ops", action="store_true")
    parser.add_argument("--ops", default=None, help="comma-separated ops to time (default: all)")
    parser.add_argument("--skip-loss", action="store_true")
    args = parser.parse_args()
    device = args.device
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[
        args.dtype or ("bf16" if device == "cuda" else "fp32")
    ]
    hidden = args.ce_hidden or (3584 if device == "cuda" else 64)
    memory = Memory(device)
    hardware = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or 'cpu'}"
    print(
        f"# kernels benchmark, {datetime.date.today()}, {device} ({hardware}), {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), {str(dtype).removeprefix('torch.')}"
    )
    if not args.skip_ops:
        print("\nforward + backward per call; peak = memory the call adds on top of its inputs\n")
        header = ["op", "shape", "backend", "ms", "vs reference", "peak MiB"]
        only = set(args.ops.split(",")) if args.ops else None
        print(table(header, bench_ops(device, dtype, args.repeat, memory, only)))
    if not args.skip_loss:
        print(
            f"\nloss of {args.ce_tokens} target tokens x {args.ce_vocab} vocab, hidden {hidden}, "
            f"forward + backward, chunk {chunked.CHUNK_TOKENS} tokens\n"
        )
        header = ["cross_entropy", "seconds", "peak GiB", "naive / this", "loss and grads allclose"]
        print(table(header, bench_loss(device, dtype, args.ce_tokens, args.ce_vocab, hidden, memory)))


if __name__ == "__main__":
    main()

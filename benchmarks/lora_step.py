"""LoRA against full fine-tuning: peak memory and tokens/s of a training step, same model and data.

Builds one Qwen2.5-VL of the sizes given by the flags (real 151,936-token vocabulary, the demo's
small vision tower) twice from the same seed: once fully trainable, once with LoRA adapters
(``--targets``, rank ``--rank``) and the base frozen (bf16 on CUDA with ``--bf16``, as
``mmzoo train`` stores it). Each path runs in its own subprocess (so one's freed memory does not
hide the other's peak) over the same fixed-seed packed micro-batches (benchmarks/train_step.py's
samples): forward with labels (target-only logits, as the trainer), backward, AdamW step. Warm-up
steps are not timed; each row keeps its fastest of ``--repeat`` timed passes. Peak memory is the
CUDA allocator's peak, or on the CPU the process's peak resident set (``VmHWM``, reset before
the model is built) above its size before. Prints a markdown table; run with
``python benchmarks/lora_step.py``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_model  # benchmarks/machine.py
from train_step import make_samples, mm_sample, reset_peak, rss_kib  # benchmarks/train_step.py

import mmzoo
from mmzoo.config import LoraConfig, TrainConfig
from mmzoo.data.collate import batch_to, collate_packed
from mmzoo.lora.attach import attach, store_frozen
from mmzoo.train.optim import make_optimizer


def import_peft() -> None:
    """Import peft with this folder off ``sys.path``: its kernels.py would shadow the ``kernels``
    package transformers' peft integration looks for."""
    here = sys.path.pop(0)
    try:
        import peft  # noqa: F401
    finally:
        sys.path.insert(0, here)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512, help="text width (128-dim heads: hidden / 128 heads)")
    p.add_argument("--ffn", type=int, default=1408)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="text.attention,text.mlp")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="samples packed per micro-batch")
    p.add_argument("--min-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=768)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2, help="timed steps per repetition")
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (and a bf16 frozen base on CUDA)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--path", choices=["full", "lora"], help=argparse.SUPPRESS)  # one path (subprocess)
    return p.parse_args()


def build(args: argparse.Namespace, lora: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    heads = args.hidden // 128
    text = dict(hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_layers=args.layers, num_heads=heads)
    text |= dict(num_kv_heads=args.kv_heads, vocab_size=151936, tie_word_embeddings=True)
    text |= dict(mrope_section=(16, 24, 24))  # the released models' split of 128-dim heads
    model = mmzoo.build_model("qwen2_5_vl", "tiny", text=text, vision=dict(out_hidden_size=args.hidden))
    if lora:
        attach(model, LoraConfig(r=args.rank, alpha=2 * args.rank, targets=tuple(args.targets.split(","))))
    model = model.to(args.device)
    if lora and args.bf16 and args.device != "cpu":
        store_frozen(model, torch.bfloat16)
    return model.train()


def run_path(args: argparse.Namespace) -> dict:
    """One path in this process: its fastest pass, tokens/s, peak memory and trainable count."""
    import_peft()
    device = torch.device(args.device)
    samples = make_samples(args.samples, args.min_len, args.max_len, seed=0)
    cuda = device.type == "cuda"
    before = rss_kib("VmRSS")
    tracked = cuda or reset_peak()
    model = build(args, args.path == "lora")
    config = model.config
    batches = [
        batch_to(collate_packed([mm_sample(config, s) for s in samples[i : i + args.batch]]), device)
        for i in range(0, len(samples), args.batch)
    ]
    tokens = sum(len(s["input_ids"]) for s in samples)
    optimizer = make_optimizer(model, TrainConfig(lr=1e-5), device)
    dtype = torch.bfloat16 if args.bf16 else torch.float32

    def step(batch: dict) -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=args.bf16):
            loss = model(**batch, return_logits=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for i in range(args.warmup):
        step(batches[i % len(batches)])
    best = float("inf")
    for _ in range(args.repeat):
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        for i in range(args.steps):
            step(batches[i % len(batches)])
        if cuda:
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - started) / args.steps)
    per_step = tokens / len(batches)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        peak = ((rss_kib("VmHWM") or 0) - (before or 0)) / 2**20 if tracked else float("nan")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "seconds": best,
        "tokens_per_s": per_step / best,
        "peak_gib": peak,
        "total": total,
        "trainable": trainable,
    }


def main() -> None:
    args = parse()
    if args.path:
        print(json.dumps(run_path(args)))
        return
    rows = {}
    for path in ("full", "lora"):
        out = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--path", path],
            check=True,
            capture_output=True,
            text=True,
        )
        rows[path] = json.loads(out.stdout.strip().splitlines()[-1])
    machine = (
        torch.cuda.get_device_name()
        if args.device == "cuda"
        else f"{cpu_model()} ({torch.get_num_threads()} threads)"
    )
    print(
        f"date {datetime.date.today()}, {machine}, torch {torch.__version__}, "
        f"Python {platform.python_version()}"
    )
    print(f"command: python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}\n")
    print("| path | parameters | trainable | s/step | tokens/s | peak memory (GiB) | vs full |")
    print("|---|---|---|---|---|---|---|")
    full = rows["full"]
    for path, row in rows.items():
        label = "full fine-tuning" if path == "full" else f"LoRA r={args.rank} on {args.targets}"
        print(
            f"| {label} | {row['total'] / 1e6:.1f}M | {row['trainable'] / 1e6:.2f}M "
            f"({100 * row['trainable'] / row['total']:.2f}%) | {row['seconds']:.3f} | "
            f"{row['tokens_per_s']:,.0f} | "
            f"{row['peak_gib']:.2f} | {row['tokens_per_s'] / full['tokens_per_s']:.2f}x speed, "
            f"{row['peak_gib'] / full['peak_gib']:.2f}x memory |"
        )


if __name__ == "__main__":
    main()

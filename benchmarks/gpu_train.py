"""Tokens/s and MFU of a Qwen2.5-VL image SFT step with packing: mmzoo against transformers.

One packed row of ``--tokens`` tokens (samples of mixed length, three in four with one
``--image-side`` square image, answer spans trained, prompts -100) is the step's input for both
models, with the same weights (transformers' model built from a config, converted in memory by
mmzoo's weight mapping) and the same positions:

* transformers' ``Qwen2_5_VLForConditionalGeneration``: ``input_ids (1, T)``, ``position_ids (4, 1, T)``
  (the per-sample text row, then mmzoo's M-RoPE rows) and no attention mask, which transformers
  reads as a packed row (flash-attn varlen with ``flash_attention_2``, a block-diagonal mask
  with SDPA); its loss takes the full ``(T, V)`` logits;
* mmzoo: the same row as ``collate_packed`` gives it to the trainer (``cu_seqlens``), kernels
  chosen as ``mmzoo train`` chooses them (flash-attn varlen when installed), logits only where a
  target is.

A step is forward + backward + fused AdamW, fp32 weights under bf16 autocast (``--precision``),
as both trainers run on one device. The paths run one after the other (the parked model waits
in CPU memory), each with ``--warmup`` steps at lr 0, so both first losses are on the same
weights and are compared, then ``--steps`` timed steps.

MFU = model FLOPs per step / (seconds per step x peak dense bf16 FLOP/s of the device). Model
FLOPs count what the step must compute, 3x the forward's (backward = 2x forward): 2 FLOPs per
multiply-add of every linear layer per token (vision patches and merged tokens included), the
attention scores and weighted sums of every sample (causal: half of ``4 s^2 d`` per layer; the
vision tower's per window or frame), and the output layer only at the tokens that have a target.
Work a path does beyond that (transformers' logits at every position) counts as waste, not as
model FLOPs. Peaks come from :data:`PEAK_TFLOPS` by device name, or ``--peak-tflops``.

``--tiny --device cpu`` runs the same script on a small shape on the CPU (a rehearsal; MFU needs
``--peak-tflops`` there). ``benchmarks/gpu_train.sh`` wraps it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import transformers
from machine import cpu_model  # benchmarks/machine.py
from train_step import IMAGE, PAD, PATCH_DIM, V_END, V_START, hf_config, mm_sample, reset_peak, rss_kib

import mmzoo_kernels
from mmzoo.checkpoint.weights import Weights, load_weights
from mmzoo.data.collate import collate_packed
from mmzoo.loss import IGNORE_INDEX, shift_labels
from mmzoo.registry import get_model

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's data sheets, matched in
# order against torch.cuda.get_device_name(); the first match wins.
PEAK_TFLOPS = [
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 NVL", 835.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM5 (names such as "NVIDIA H100 80GB HBM3")
    ("A100", 312.0),  # SXM4 and PCIe alike
]

HF_LABEL = "transformers Qwen2_5_VLForConditionalGeneration"

# Model shapes: "3b" is Qwen/Qwen2.5-VL-3B-Instruct's config.json; "tiny" is for CPU rehearsals.
SHAPES = {
    "3b": dict(
        vocab=151936, hidden=2048, layers=36, heads=16, kv_heads=2, ffn=11008, untie=False,
        vision_depth=32, vision_hidden=1280, vision_heads=16, vision_ffn=3420, fullatt=[7, 15, 23, 31],
    ),
    "tiny": dict(
        vocab=151936, hidden=128, layers=2, heads=2, kv_heads=1, ffn=344, untie=False,
        vision_depth=2, vision_hidden=64, vision_heads=2, vision_ffn=128, fullatt=[1],
    ),
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--device", default="cuda", help="cuda (default) or cpu")
    add("--tiny", action="store_true", help="a small shape (CPU rehearsal) instead of the 3B one")
    add("--tokens", type=int, help="tokens in the packed row (default 8192; 1024 with --tiny)")
    add("--image-side", type=int, help="image side in px, a multiple of 28 (default 448; 224 with --tiny)")
    add("--steps", type=int, default=5, help="timed steps per path (default 5)")
    add("--warmup", type=int, default=2, help="warm-up steps per path at lr 0 (default 2)")
    add("--precision", choices=["bf16", "fp32"], default="bf16", help="autocast dtype (default bf16)")
    add("--peak-tflops", type=float, help="the device's peak dense bf16 TFLOP/s (default: from its name)")
    add("--attention", choices=["auto", "flash", "sdpa"], default="auto", help="both paths (default auto)")
    add("--seed", type=int, default=0, help="seed of weights and samples (default 0)")
    args = parser.parse_args()
    args.tokens = args.tokens or (1024 if args.tiny else 8192)
    args.image_side = args.image_side or (224 if args.tiny else 448)
    if args.image_side % 28:
        parser.error(f"--image-side {args.image_side} is not a multiple of 28 (2 x 2 patches of 14 px)")
    return args


def packed_samples(total: int, side: int, seed: int, tiny: bool) -> list[dict]:
    """Samples filling ``total`` tokens: text, one ``side``-px image in three of four, a trained answer."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    grid = side // 14  # patches per side; (grid / 2)^2 merged tokens
    low, high = (96, 384) if tiny else (512, 2048)
    samples: list[dict] = []
    used = 0
    while total - used >= low:
        length = min(rng.randint(low, high), total - used)
        media: list[int] = []
        sample: dict = {}
        if len(samples) % 4 != 3 and length > grid * grid // 4 + 48:
            media = [V_START] + [IMAGE] * (grid * grid // 4) + [V_END]
            sample = {
                "pixel_values": torch.randn(grid * grid, PATCH_DIM, generator=g),
                "image_grid_thw": torch.tensor([[1, grid, grid]]),
            }
        text = length - len(media)
        answer = rng.randint(text // 4, text // 2)
        head = rng.randint(4, 16)  # the chat preamble before the image
        words = torch.randint(0, PAD, (text,), generator=g).tolist()
        ids = torch.tensor(words[:head] + media + words[head:])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-answer:] = ids[-answer:]
        samples.append(sample | {"input_ids": ids, "labels": labels})
        used += length
    return samples


def build_models(args: argparse.Namespace, device: torch.device) -> tuple[Any, Any]:
    """transformers' model (random, fp32, on ``device``) and mmzoo's with the same weights (on the CPU)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    shape = SimpleNamespace(**SHAPES["tiny" if args.tiny else "3b"])
    config = hf_config(shape)
    config._attn_implementation = hf_attention(args, device)
    torch.manual_seed(args.seed)
    with torch.device(device):
        hf_model = Qwen2_5_VLForConditionalGeneration(config)
    spec = get_model("qwen2_5_vl")
    mm_config = spec.config_from_hf(config.to_dict())
    mapping = spec.weight_mapping(mm_config)
    state = hf_model.state_dict()
    canonical = {mapping.canonical_hf_name(k): k for k in state}
    missing, unexpected = mapping.check_hf_names(set(canonical))
    if missing or unexpected:
        raise SystemExit(f"gpu_train: names differ: missing {missing[:4]}, unexpected {unexpected[:4]}")

    def items():
        return mapping.to_mm(lambda name: state[canonical[name]], set(canonical))

    weights = Weights(spec, mm_config, Path(f"<transformers model on {device}>"), torch.float32, items)
    mm_model = load_weights(weights, device)  # built on the meta device, allocated, then filled
    return hf_model.train(), mm_model.to("cpu").train()


def hf_attention(args: argparse.Namespace, device: torch.device) -> str:
    """transformers' attention implementation: flash-attn 2 on CUDA when installed, else SDPA."""
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    if args.attention == "flash" and not flash:
        raise SystemExit("gpu_train: --attention flash needs CUDA and the flash_attn package")
    return "flash_attention_2" if flash and args.attention != "sdpa" else "sdpa"


def batches(samples: list[dict], mm_config: Any) -> tuple[dict, dict]:
    """The packed row as mmzoo's trainer gets it, and as transformers gets it (same tokens and positions)."""
    mm = collate_packed([mm_sample(mm_config, s) for s in samples])
    text_row = torch.cat([torch.arange(len(s["input_ids"])) for s in samples])[None, None]  # (1, 1, T)
    media = media_of(mm)
    hf = {
        "input_ids": mm["input_ids"],
        "labels": mm["labels"],
        "position_ids": torch.cat([text_row, mm["position_ids"]]),  # (4, 1, T): text row first
        "pixel_values": media["pixel_values"],
        "image_grid_thw": media["image_grid_thw"],
    }
    return mm, hf


def media_of(batch: dict) -> dict:
    """The collated media tensors: under ``media``, or beside the ids in a flat batch."""
    return batch.get("media", batch)


def to_device(batch: dict, device: torch.device) -> dict:
    """``batch`` with every tensor, nested ones too, on ``device``."""
    return {k: to_device(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


# --- model FLOPs ---------------------------------------------------------------------------------


def text_flops(text: Any, lengths: list[int], targets: int) -> tuple[float, float]:
    """Forward FLOPs of the decoder layers over the packed samples, and of the output layer at the targets."""
    h, kv = text.hidden_size, text.num_kv_heads * text.head_dim
    linear = 2 * h * h + 2 * h * kv + 3 * h * text.ffn_hidden_size  # q, o; k, v; gate, up, down
    attention = sum(2 * s * s * h for s in lengths)  # causal: half of QK^T and AV, 4 s^2 h
    layers = text.num_layers * (2 * linear * sum(lengths) + attention)
    return layers, 2 * h * text.vocab_size * targets


def window_sizes(merged_h: int, merged_w: int, window: int) -> list[int]:
    """Patches per attention window of a frame of ``merged_h x merged_w`` merged tokens (4 patches each)."""
    rows = [min(window, merged_h - i) for i in range(0, merged_h, window)]
    cols = [min(window, merged_w - j) for j in range(0, merged_w, window)]
    return [4 * r * c for r in rows for c in cols]


def vision_flops(vision: Any, grids: list[list[int]], out_hidden: int) -> float:
    """Forward FLOPs of the vision tower and projector over images of grids ``(t, h, w)`` patches."""
    hv, depth, full = vision.hidden_size, vision.depth, len(vision.fullatt_block_indexes)
    window = vision.window_size // (vision.patch_size * vision.spatial_merge_size)
    per_patch = 2 * vision.patch_dim * hv + 2 * depth * (4 * hv * hv + 3 * hv * vision.ffn_hidden_size)
    merger = 2 * (16 * hv * hv + 4 * hv * out_hidden)  # per merged token: 4hv -> 4hv -> out
    total = 0.0
    for t, h, w in grids:
        patches = t * h * w
        frame = h * w
        windows = window_sizes(h // 2, w // 2, window)
        attention = t * 4 * hv * (full * frame * frame + (depth - full) * sum(n * n for n in windows))
        total += per_patch * patches + merger * patches / 4 + attention
    return total


def step_flops(config: Any, samples: list[dict], batch: dict) -> dict[str, float]:
    """Model FLOPs of one training step (3x the forward), by part."""
    lengths = [len(s["input_ids"]) for s in samples]
    targets = int((shift_labels(batch["labels"][0], batch["cu_seqlens"]) != IGNORE_INDEX).sum())
    layers, head = text_flops(config.text, lengths, targets)
    media = media_of(batch)
    grids = media["image_grid_thw"].tolist() if "image_grid_thw" in media else []
    vision = vision_flops(config.vision, grids, config.text.hidden_size)
    return {"text layers": 3 * layers, "output layer": 3 * head, "vision": 3 * vision}


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    """The peak dense bf16 TFLOP/s used for MFU, and where it came from."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    if device.type != "cuda":
        return None, "none for the CPU (give --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops, f"table: {key}"
    return None, f"'{name}' is not in the table (give --peak-tflops)"


# --- the timed steps -----------------------------------------------------------------------------


@dataclass
class Result:
    label: str
    attention: str
    seconds: float  # per timed step (nan when the path failed)
    first_loss: float
    peak_gib: float | None
    error: str | None = None  # e.g. out of memory


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    """Peak memory since the last reset: allocated on CUDA, the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kib = rss_kib("VmHWM")
    return kib / 2**20 if kib is not None else None


def run_path(
    args: argparse.Namespace, label: str, attention: str, model: Any, batch: dict, loss_of: Any
) -> Result:
    """:func:`timed_steps`; out of memory gives a row that says so. The model goes back to the CPU after."""
    device = torch.device(args.device)
    try:
        seconds, first, peak = timed_steps(args, device, model, batch, loss_of)
        return Result(label, attention, seconds, first, peak)
    except torch.OutOfMemoryError:
        peak = peak_gib(device)
        return Result(label, attention, float("nan"), float("nan"), peak, "out of memory (lower --tokens)")
    finally:
        model.zero_grad(set_to_none=True)
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()


def timed_steps(
    args: argparse.Namespace, device: torch.device, model: Any, batch: dict, loss_of: Any
) -> tuple[float, float, float | None]:
    """Warm-up steps at lr 0, then ``--steps`` timed ones: (seconds per timed step, first loss, peak GiB)."""
    model.to(device)
    batch = to_device(batch, device)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0, **fast)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    times, first = [], float("nan")
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            for group in optimizer.param_groups:
                group["lr"] = 1e-6
            torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else reset_peak()
        sync(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=args.precision == "bf16"):
            loss = loss_of(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(time.perf_counter() - started)
        if i == 0:
            first = loss.item()
    return sum(times[args.warmup :]) / args.steps, first, peak_gib(device)


def hf_loss(model: Any, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def mm_loss(model: Any, batch: dict) -> torch.Tensor:
    return model(**batch, loss_reduction=None, return_logits=False).loss


# --- report --------------------------------------------------------------------------------------


def print_header(args: argparse.Namespace, device: torch.device, samples: list[dict], flops: dict) -> None:
    print(f"Date: {datetime.date.today().isoformat()}")
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"CPU ({cpu_model()}), {torch.get_num_threads()} threads"
    flash = importlib.util.find_spec("flash_attn")
    print(
        f"Machine: {where}; Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, flash_attn {'installed' if flash else 'not installed'}"
    )
    shape = "tiny (CPU rehearsal shape)" if args.tiny else "3B (Qwen2.5-VL-3B-Instruct's config)"
    images = sum("pixel_values" in s for s in samples)
    lengths = [len(s["input_ids"]) for s in samples]
    print(
        f"Model: {shape}, random weights, fp32 weights + {args.precision} autocast, fused AdamW "
        f"(foreach on CPU); one packed row of {sum(lengths)} tokens: {len(samples)} samples "
        f"({min(lengths)}-{max(lengths)} tokens), {images} with a {args.image_side}x{args.image_side} image"
    )
    parts = ", ".join(f"{name} {value / 1e12:.3g}" for name, value in flops.items())
    print(f"Model TFLOP per step (3x forward): {sum(flops.values()) / 1e12:.3g} ({parts})")


def print_table(results: list[Result], tokens: int, flops: float, peak: float | None, source: str) -> None:
    print()
    print(f"Peak for MFU: {f'{peak:g} TFLOP/s' if peak else 'n/a'} ({source})")
    print()
    print(
        "| path | attention | s/step | tokens/s | model TFLOP/s | MFU | peak memory GiB | vs transformers |"
    )
    print("|---|---|---|---|---|---|---|---|")
    base = results[0].seconds  # nan when transformers' path failed: "nanx" is then what the ratio is
    for r in results:
        memory = f"{r.peak_gib:.1f}" if r.peak_gib is not None else "n/a"
        if r.error:
            print(f"| {r.label} | {r.attention} | {r.error} | | | | {memory} | |")
            continue
        achieved = flops / r.seconds / 1e12
        mfu = f"{100 * achieved / peak:.1f}%" if peak else "n/a"
        print(
            f"| {r.label} | {r.attention} | {r.seconds:.3f} | {tokens / r.seconds:,.0f} | {achieved:.3g} | "
            f"{mfu} | {memory} | {base / r.seconds:.2f}x |"
        )
    losses = ", ".join(f"{r.label.split()[0]} {r.first_loss:.5f}" for r in results)
    gap = abs(results[1].first_loss - results[0].first_loss)
    print(f"\nFirst-step losses (same weights and row): {losses}; |difference| {gap:.1e}")


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"gpu_train: torch {torch.__version__} sees no CUDA device (--device cpu --tiny: rehearsal)"
        )
    wall = time.perf_counter()
    hf_model, mm_model = build_models(args, device)
    samples = packed_samples(args.tokens, args.image_side, args.seed, args.tiny)
    mm_batch, hf_batch = batches(samples, mm_model.config)
    flops = step_flops(mm_model.config, samples, mm_batch)
    kernels = mmzoo_kernels.configure(device=device.type, attention=args.attention)
    print_header(args, device, samples, flops)
    hf_attn = hf_model.config._attn_implementation
    results = [
        run_path(args, HF_LABEL, hf_attn, hf_model, hf_batch, hf_loss),
        run_path(args, "mmzoo VLModel", kernels["attention"], mm_model, mm_batch, mm_loss),
    ]
    peak, source = peak_tflops(args, device)
    print_table(results, mm_batch["input_ids"].numel(), sum(flops.values()), peak, source)
    print(f"mmzoo kernels: {', '.join(f'{op}={backend}' for op, backend in kernels.items())}")
    print(f"Wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()

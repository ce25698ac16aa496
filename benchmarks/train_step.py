"""Training step throughput: mmzoo's Qwen2.5-VL against transformers' on the same weights and samples.

Builds a small but realistic ``Qwen2_5_VLForConditionalGeneration`` from a config (real
151,936-token vocabulary: the logits and loss cost matters), saves it and loads it with
``mmzoo.load_model``, so both models start from identical weights. A fixed-seed set of
mixed-length samples (one image of random size each, a few text-only ones; prompt tokens
labelled -100, answer spans trained) is cut into micro-batches of ``--batch`` samples, then
each path runs training steps (forward with labels, backward, AdamW step) over them:

* transformers: right-padded rows with ``attention_mask``, ``mm_token_type_ids`` and labels -100
  on pads (its default SDPA attention, full ``(B, S, V)`` logits, the loss in the model);
* mmzoo packed: one packed row per micro-batch with ``cu_seqlens`` and per-sample M-RoPE
  ``position_ids`` (``collate_packed``, as the trainer does), ``return_logits=False`` (logits of
  answer tokens only);
* mmzoo padded: the same right-padded rows as transformers (``collate_padded``), to separate
  packing from the rest;
* mmzoo packed, full-logits loss: ``return_logits=True`` and cross-entropy on all ``T x V``
  logits (transformers' recipe), to show what target-only logits save.

Warm-up steps run with lr 0, so every path's first loss is on the initial weights: they are
compared (they must agree to 1e-4). Repetitions of the timed steps are interleaved and each row
keeps its fastest repetition. Throughput counts real (non-pad) tokens. Prints a markdown table;
run with ``python benchmarks/train_step.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from machine import cpu_model  # benchmarks/machine.py

import mmzoo
from mmzoo.data.collate import Sample, collate_packed, collate_padded
from mmzoo.loss import IGNORE_INDEX, shift_labels
from mmzoo_qwen2_5_vl.rope_index import rope_index

# Qwen2.5-VL's special ids (the real tokenizer's); text ids are drawn below them.
PAD, V_START, V_END, IMAGE = 151643, 151652, 151653, 151655
PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch


def hf_config(args: argparse.Namespace):
    """The transformers config of the benchmark model (sizes from the flags)."""
    from transformers import Qwen2_5_VLConfig

    half = args.hidden // args.heads // 2  # M-RoPE sections split half the head dim 1:1.5:1.5, as the 7b
    section = [half // 4, 3 * half // 8, half - half // 4 - 3 * half // 8]
    return Qwen2_5_VLConfig(
        vision_config=dict(
            depth=args.vision_depth,
            hidden_size=args.vision_hidden,
            intermediate_size=args.vision_ffn,
            num_heads=args.vision_heads,
            out_hidden_size=args.hidden,
            fullatt_block_indexes=args.fullatt,
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            tokens_per_second=2,
            hidden_act="silu",
        ),
        text_config=dict(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.ffn,
            num_hidden_layers=args.layers,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
        ),
        image_token_id=IMAGE,
        video_token_id=IMAGE + 1,
        vision_start_token_id=V_START,
        vision_end_token_id=V_END,
        tie_word_embeddings=not args.untie,
    )


def make_samples(n: int, min_len: int, max_len: int, seed: int) -> list[dict]:
    """``n`` samples: ids, labels (answer only) and, for all but every fourth, one random image."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    samples = []
    for i in range(n):
        length = rng.randint(min_len, max_len)
        answer = rng.randint(16, min(160, length // 3))
        sample: dict = {}
        if i % 4 == 3:  # text-only
            media: list[int] = []
        else:
            h, w = 2 * rng.randint(4, 12), 2 * rng.randint(4, 12)  # (1, 8..24, 8..24) patches
            media = [V_START] + [IMAGE] * (h * w // 4) + [V_END]
            sample["pixel_values"] = torch.randn(h * w, PATCH_DIM, generator=g)
            sample["image_grid_thw"] = torch.tensor([[1, h, w]])
        prompt = max(length - len(media) - answer, 8)
        head = rng.randint(1, min(prompt - 1, 20))  # a system/user preamble before the image
        text = torch.randint(0, PAD, (prompt + answer,), generator=g).tolist()
        ids = torch.tensor(text[:head] + media + text[head:])
        labels = torch.full_like(ids, IGNORE_INDEX)
        labels[-answer:] = ids[-answer:]
        samples.append(sample | {"input_ids": ids, "labels": labels})
    return samples


def hf_batch(samples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-padded rows for transformers, with its token types and the images concatenated."""
    width = max(len(s["input_ids"]) for s in samples)
    ids = torch.full((len(samples), width), PAD, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[row, :n], labels[row, :n], mask[row, :n] = s["input_ids"], s["labels"], 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    batch["mm_token_type_ids"] = (ids == IMAGE).int()
    images = [s for s in samples if "pixel_values" in s]
    if images:
        batch["pixel_values"] = torch.cat([s["pixel_values"] for s in images])
        batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in images])
    return batch


def mm_sample(config, s: dict) -> Sample:
    """The mmzoo :class:`Sample` of ``s``, with its own M-RoPE positions (as the preprocessor does)."""
    positions, _ = rope_index(config, s["input_ids"][None], image_grid_thw=s.get("image_grid_thw"))
    media = {k: s[k] for k in ("pixel_values", "image_grid_thw") if k in s}
    return Sample(input_ids=s["input_ids"], labels=s["labels"], position_ids=positions[:, 0], media=media)


def full_logits_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Token-mean cross-entropy on all ``T x V`` logits (fp32, as transformers computes its loss)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, return_logits=True).logits[0]  # (T, V)
    target = shift_labels(batch["labels"][0], batch["cu_seqlens"])
    return F.cross_entropy(logits.float(), target, ignore_index=IGNORE_INDEX)


def rss_kib(field: str) -> int | None:
    """``VmRSS``/``VmHWM`` of this process in KiB (Linux), else None."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return None


def reset_peak() -> bool:
    """Reset this process's peak RSS (``VmHWM``; Linux >= 4.0), so each path gets its own peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@dataclass
class TrainPath:
    """One benchmarked path: its model and optimizer, its batches, how it computes the loss, its timings."""

    label: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    best: float = float("inf")  # seconds of the fastest repetition
    adamw: float = 0.0  # of which in the AdamW step
    peak_kib: int | None = None
    first_loss: float | None = None

    def step(self, i: int, lr: float) -> tuple[float, float]:
        """One training step on micro-batch ``i``; (loss, seconds in the AdamW step)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = self.loss(self.batches[i % len(self.batches)])
        loss.backward()
        started = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item(), time.perf_counter() - started

    def timed(self, steps: int, lr: float) -> None:
        """``steps`` steps over the micro-batches in order; keeps the fastest run and the peak RSS."""
        tracked = reset_peak()
        before = rss_kib("VmRSS")
        started = time.perf_counter()
        adamw = sum(self.step(i, lr)[1] for i in range(steps))
        seconds = time.perf_counter() - started
        if seconds < self.best:
            self.best, self.adamw = seconds, adamw
        peak = rss_kib("VmHWM")
        if tracked and before is not None and peak is not None:
            self.peak_kib = max(self.peak_kib or 0, peak - before)


@dataclass
class Workload:
    """The samples, cut into micro-batches, and each path's collated form of them."""

    samples: list[dict]
    groups: list[list[dict]]  # ``--batch`` samples each
    hf_batches: list[dict[str, torch.Tensor]]
    packed: list[dict[str, torch.Tensor]]
    padded: list[dict[str, torch.Tensor]]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--samples", type=int, default=16, help="samples (default 16)")
    add("--batch", type=int, default=4, help="samples per micro-batch (default 4)")
    add("--steps", type=int, default=4, help="timed steps per repetition (default 4)")
    add("--warmup", type=int, default=1, help="warm-up steps per path, lr 0 (default 1)")
    add("--repeat", type=int, default=2, help="interleaved repetitions, fastest kept (default 2)")
    add("--min-len", type=int, default=100, help="shortest sample in tokens (default 100)")
    add("--max-len", type=int, default=700, help="longest sample in tokens (default 700)")
    add("--seed", type=int, default=0, help="seed of weights and samples (default 0)")
    add("--threads", type=int, default=2, help="torch threads (default 2)")
    add("--lr", type=float, default=1e-6, help="AdamW lr of the timed steps (default 1e-6)")
    add("--no-full-logits", action="store_true", help="skip the mmzoo full-logits row")
    add("--vocab", type=int, default=151936, help="vocabulary (default 151936, Qwen2.5's)")
    add("--hidden", type=int, default=512, help="text hidden size (default 512)")
    add("--layers", type=int, default=4, help="text layers (default 4)")
    add("--heads", type=int, default=8, help="text attention heads (default 8)")
    add("--kv-heads", type=int, default=2, help="text KV heads (default 2)")
    add("--ffn", type=int, default=1376, help="text FFN size (default 1376)")
    add("--untie", action="store_true", help="separate output layer (default tied, as Qwen2.5 <= 3B)")
    add("--vision-depth", type=int, default=4, help="vision blocks (default 4)")
    add("--vision-hidden", type=int, default=256, help="vision hidden size (default 256)")
    add("--vision-heads", type=int, default=4, help="vision heads (default 4)")
    add("--vision-ffn", type=int, default=512, help="vision FFN size (default 512)")
    add("--fullatt", type=int, nargs="+", default=[1, 3], help="full-attention blocks (default 1 3)")
    return parser.parse_args()


def build_models(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' model from the flags, and mmzoo's loaded from its saved copy (same weights)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(args.seed)
    hf_model = Qwen2_5_VLForConditionalGeneration(hf_config(args)).train()
    root = Path(tempfile.mkdtemp(prefix="mmzoo-bench-"))
    try:
        hf_model.save_pretrained(root)
        mm_model = mmzoo.load_model(root).train()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return hf_model, mm_model


def make_workload(args: argparse.Namespace, mm_config) -> Workload:
    samples = make_samples(args.samples, args.min_len, args.max_len, args.seed)
    groups = [samples[i : i + args.batch] for i in range(0, len(samples), args.batch)]
    mm_groups = [[mm_sample(mm_config, s) for s in group] for group in groups]
    return Workload(
        samples=samples,
        groups=groups,
        hf_batches=[hf_batch(group) for group in groups],
        packed=[collate_packed(group) for group in mm_groups],
        padded=[collate_padded(group, PAD) for group in mm_groups],
    )


def make_paths(args: argparse.Namespace, hf_model, mm_model, work: Workload) -> list[TrainPath]:
    """The benchmarked paths, transformers' first (the baseline)."""

    def hf_loss(batch):
        return hf_model(**batch).loss

    def mm_loss(batch):
        return mm_model(**batch, loss_reduction=None, return_logits=False).loss

    # One optimizer for the mmzoo rows: they time the same model; AdamW's state is the same size.
    hf_opt = torch.optim.AdamW(hf_model.parameters(), lr=0.0)
    mm_opt = torch.optim.AdamW(mm_model.parameters(), lr=0.0)
    attn = hf_model.config._attn_implementation
    hf_label = f"transformers Qwen2_5_VLForConditionalGeneration, padded ({attn})"
    paths = [
        TrainPath(hf_label, hf_model, hf_opt, work.hf_batches, hf_loss),
        TrainPath("mmzoo packed (cu_seqlens), target-only logits", mm_model, mm_opt, work.packed, mm_loss),
        TrainPath("mmzoo padded (no packing), target-only logits", mm_model, mm_opt, work.padded, mm_loss),
    ]
    if not args.no_full_logits:
        full_label = "mmzoo packed, full-logits loss (return_logits=True)"
        paths.append(
            TrainPath(full_label, mm_model, mm_opt, work.packed, lambda b: full_logits_loss(mm_model, b))
        )
    return paths


def run(args: argparse.Namespace, paths: list[TrainPath]) -> None:
    """Warm-up steps at lr 0, then the timed repetitions, interleaved across the paths."""
    # Warm-up at lr 0: weights stay as loaded, so every path's first loss is on the same weights.
    for path in paths:
        for i in range(args.warmup):
            loss, _ = path.step(i, 0.0)
            if i == 0:
                path.first_loss = loss
    for _ in range(args.repeat):
        for path in paths:
            path.timed(args.steps, args.lr)


def print_setup(args: argparse.Namespace, work: Workload, mm_model) -> int:
    """The date, machine, model and samples lines; returns the real tokens of the timed steps."""
    timed = [i % len(work.groups) for i in range(args.steps)]
    real = sum(len(s["input_ids"]) for i in timed for s in work.groups[i])
    slots = sum(b["input_ids"].numel() for i, b in enumerate(work.hf_batches) if i in timed)
    targets = sum(
        int((shift_labels(work.packed[i]["labels"][0], work.packed[i]["cu_seqlens"]) >= 0).sum())
        for i in timed
    )
    samples = work.samples
    text_only = sum("pixel_values" not in s for s in samples)
    lengths = [len(s["input_ids"]) for s in samples]
    print(f"Date: {datetime.date.today().isoformat()}")
    print(
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, torch threads "
        f"{torch.get_num_threads()}; fp32; fastest of {args.repeat} interleaved repetitions"
    )
    n_params = sum(p.numel() for p in mm_model.parameters())
    print(
        f"Model: text {args.layers} layers x {args.hidden} (heads {args.heads}/{args.kv_heads}, "
        f"ffn {args.ffn}), "
        f"vocab {args.vocab}, {'untied' if args.untie else 'tied'}; vision {args.vision_depth} blocks x "
        f"{args.vision_hidden} (heads {args.vision_heads}, ffn {args.vision_ffn}, full attention "
        f"{args.fullatt}); {n_params / 1e6:.1f}M parameters"
    )
    print(
        f"Samples: {len(samples)} (seed {args.seed}; {len(samples) - text_only} with one image, "
        f"{text_only} text-only; {min(lengths)}-{max(lengths)} tokens), micro-batches of {args.batch}; "
        f"each step = forward + backward + AdamW on one micro-batch; {args.warmup} warm-up step(s), then "
        f"{args.steps} timed steps = {real} real tokens ({targets} trained targets; transformers' padded "
        f"rows hold {slots} token slots, {slots / real:.2f}x)"
    )
    return real


def print_table(args: argparse.Namespace, paths: list[TrainPath], real: int) -> None:
    """One row per path, throughput relative to transformers' (the first)."""
    print()
    print(
        "| path | s/step | of which AdamW | tokens/s | peak RSS delta (GiB) | relative to transformers "
        "| forward+backward only, relative |"
    )
    print("|---|---|---|---|---|---|---|")
    model_only = paths[0].best - paths[0].adamw
    for path in paths:
        rate = real / path.best
        peak = f"{path.peak_kib / 2**20:.2f}" if path.peak_kib is not None else "n/a"
        ratio = rate / (real / paths[0].best)
        fwd_bwd = model_only / (path.best - path.adamw)
        print(
            f"| {path.label} | {path.best / args.steps:.2f} | {path.adamw / args.steps:.2f} | {rate:.0f} "
            f"| {peak} | {ratio:.2f}x | {fwd_bwd:.2f}x |"
        )


def print_losses(paths: list[TrainPath]) -> None:
    """Every path's first loss, on the same weights and samples, against transformers'."""
    print()
    short = ("transformers", "mmzoo packed", "mmzoo padded", "mmzoo full logits")
    losses = ", ".join(f"{name} {p.first_loss:.6f}" for name, p in zip(short, paths, strict=False))
    base = paths[0].first_loss
    diffs = [abs(p.first_loss - base) for p in paths[1:]]
    ok = "yes" if max(diffs) < 1e-4 else "NO"
    print(f"First-step losses (micro-batch 0, same initial weights): {losses}")
    print(f"Agree to 1e-4: {ok} (max |difference| from transformers {max(diffs):.1e})")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    wall = time.perf_counter()
    hf_model, mm_model = build_models(args)
    work = make_workload(args, mm_model.config)
    paths = make_paths(args, hf_model, mm_model, work)
    run(args, paths)
    real = print_setup(args, work, mm_model)
    print_table(args, paths, real)
    print_losses(paths)
    print(f"Wall time: {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()

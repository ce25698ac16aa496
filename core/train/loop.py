"""The training loop behind ``mmzoo train``."""

from __future__ import annotations

import math
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import mmzoo
import mmzoo_kernels
from mmzoo.config import Config
from mmzoo.data.dataset import VLDataset, build_dataset
from mmzoo.errors import MmzooError
from mmzoo.loss import LossReduction, batch_target_counts
from mmzoo.model import VLModel
from mmzoo.nn.recompute import set_recompute
from mmzoo.registry import ModelSpec
from mmzoo.train.checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from mmzoo.train.metrics import MetricsLog
from mmzoo.train.optim import freeze, make_optimizer, make_scheduler, trainable_summary

DEMO_DATA = Path(mmzoo.__file__).parent / "demo" / "demo.jsonl"
OOM_HELP = (
    "out of memory; lower data.seq_length or train.micro_batch_size, turn on activation recompute "
    "(model.recompute_text.granularity=full), lower data.media.max_pixels, or freeze the vision tower"
)


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    checkpoint: Path | None
    steps: int
    tokens: int
    seconds: float
    losses: list[float]
    interrupted: bool = False
    hf_dir: Path | None = None


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA, then an Ascend NPU, then the CPU; a named device must exist."""
    npu = getattr(torch, "npu", None)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("npu") if npu is not None and npu.is_available() else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MmzooError("train.device=cuda but torch sees no CUDA device (is this a CPU build of torch?)")
    if name == "npu" and (npu is None or not npu.is_available()):
        raise MmzooError("train.device=npu but no Ascend NPU is available (is torch_npu installed?)")
    return torch.device(name)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(cfg: Config, spec: ModelSpec) -> tuple[VLModel, Any]:
    """The model (loaded or randomly initialised) and its tokenizer."""
    from mmzoo.data.tokenizer import load_tokenizer

    m = cfg.model
    if m.load:
        model = mmzoo.load_model(m.load)
        if model.name != spec.name:
            raise MmzooError(f"model.load holds a '{model.name}' model but model.name is '{spec.name}'")
    else:
        model = mmzoo.build_model(spec.name, m.variant, **m.overrides)
    tokenizer_dir = m.tokenizer or (
        m.load if m.load and (Path(m.load) / "tokenizer_config.json").is_file() else None
    )
    if tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    elif spec.default_tokenizer is not None:
        tokenizer = spec.default_tokenizer()
    else:
        raise MmzooError(
            f"model '{spec.name}' has no built-in tokenizer; set model.tokenizer to a checkpoint directory"
        )
    return model, tokenizer


def _micro_batches(
    dataset: VLDataset, cfg: Config, epoch: int, position: int
) -> Iterator[tuple[int, int, dict]]:
    """(epoch, position after this batch, batch) forever, starting at ``position`` of ``epoch``."""
    while True:
        plan = dataset.batches(cfg.train.micro_batch_size, cfg.train.seed, epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=plan[position:],
            collate_fn=dataset.collate,
            num_workers=cfg.data.num_workers,
        )
        for batch in loader:
            position += 1
            yield epoch, position, batch
        epoch, position = epoch + 1, 0


def _forward_backward(
    model: VLModel,
    micro_batches: list[dict[str, torch.Tensor]],
    reduction: LossReduction,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> tuple[torch.Tensor, int]:
    """Accumulate gradients over one optimizer step's micro-batches: (summed loss, real tokens)."""
    step_loss = torch.zeros((), device=device)
    tokens = 0
    for batch in micro_batches:
        mask = batch.get("attention_mask")
        tokens += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            loss = model(**batch, loss_reduction=reduction, return_logits=False).loss
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    return step_loss, tokens


def train(cfg: Config, *, resume: bool = False, out: Callable[[str], None] = print) -> TrainResult:
    """Run training as configured; returns what was written. Errors are :class:`MmzooError`."""
    t = cfg.train
    seed_everything(t.seed)
    device = resolve_device(t.device)
    if t.precision == "fp16" and device.type != "cuda":
        raise MmzooError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 here")
    spec = mmzoo.get_model(cfg.model.name)
    if cfg.data.data == "demo":
        cfg = replace(cfg, data=replace(cfg.data, data=str(DEMO_DATA)))
    model, tokenizer = build(cfg, spec)
    dataset = build_dataset(spec, model.config, tokenizer, cfg.data)

    freeze(model, cfg.model.freeze, spec.freeze_groups)
    set_recompute(model.image_encoder.encoder, cfg.model.recompute_vision)
    set_recompute(model.text_decoder, cfg.model.recompute_text)
    model.to(device).train()
    optimizer = make_optimizer(model, t, device)
    per_epoch = math.ceil(len(dataset.batches(t.micro_batch_size, t.seed, 0)) / t.grad_accum)
    total = t.steps if t.steps > 0 else t.epochs * per_epoch
    scheduler = make_scheduler(optimizer, t, total)
    output = Path(t.output_dir).absolute()

    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "samples": 0}
    if resume:
        checkpoint = latest_checkpoint(output)
        if checkpoint is None:
            raise MmzooError(f"--resume: no checkpoint in {output} (no latest_checkpointed_iteration.txt)")
        state = load_training_checkpoint(
            checkpoint, model, optimizer, scheduler, load_optimizer=t.load_optimizer, load_rng=t.load_rng
        )
        out(f"resumed from {checkpoint} at step {state['step']}")

    out(f"model {spec.name} ({cfg.model.load or cfg.model.variant}) on {device}, {len(dataset)} samples")
    out("\n".join(trainable_summary(model, spec.freeze_groups)))
    kernels = mmzoo_kernels.configure(device=device.type, **vars(cfg.kernels))
    out("kernels: " + ", ".join(f"{op}={backend}" for op, backend in kernels.items()))
    out(f"training {total - state['step']} steps ({per_epoch} per epoch), output in {output}")

    metrics = MetricsLog(output, t.tensorboard, start_step=state["step"])
    scaler = torch.amp.GradScaler("cuda") if t.precision == "fp16" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = _micro_batches(dataset, cfg, state["epoch"], state["position"])
    losses: list[float] = []
    last_saved: Path | None = latest_checkpoint(output) if resume else None
    started = time.monotonic()
    run_tokens = 0
    # The bar redraws in place on a terminal; logs get the per-step lines (with ETA) only.
    bar = tqdm(
        total=total,
        initial=state["step"],
        desc="train",
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        disable=not sys.stderr.isatty(),
    )
    first_step = state["step"]

    def save() -> Path:
        return save_training_checkpoint(
            output,
            state["step"],
            model,
            optimizer,
            scheduler,
            dict(state),
            variant=cfg.model.variant,
            save_optimizer=t.save_optimizer,
            save_rng=t.save_rng,
            keep_last=t.keep_last,
        )

    interrupted = False
    try:
        while state["step"] < total:
            step_start = time.monotonic()
            group = [next(batches) for _ in range(t.grad_accum)]
            counts = [batch_target_counts(b) for _, _, b in group]
            reduction = LossReduction(
                t.loss_reduction, len(group), sum(c[0] for c in counts), sum(c[1] for c in counts)
            )
            # Samples with targets: the collator's dummy media sample (no labels) is not one.
            samples = sum(c[1] for c in counts)
            step_loss, tokens = _forward_backward(
                model, [b for _, _, b in group], reduction, device, autocast_dtype, scaler
            )
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, t.clip_grad if t.clip_grad > 0 else float("inf")
            )
            value, norm = step_loss.item(), grad_norm.item()
            step = state["step"] + 1
            # ``state`` moves to this step only once its update is done: a Ctrl-C before that
            # saves the previous step, whose weights, optimizer and data position agree.
            finished = {"step": step, "epoch": group[-1][0], "position": group[-1][1]}
            if not (math.isfinite(value) and math.isfinite(norm)) and scaler is None:
                if t.on_nonfinite == "stop":
                    where = (
                        f"the last good checkpoint is {last_saved}"
                        if last_saved
                        else "no checkpoint was saved yet"
                    )
                    raise MmzooError(
                        f"non-finite loss ({value}) or gradient norm ({norm}) at step {step}; "
                        f"{where}. "
                        "Lower train.lr, check the data, or set train.on_nonfinite=skip"
                    )
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
                state.update(finished)
                bar.update(1)
                tqdm.write(f"step {state['step']}/{total}: non-finite loss {value}, update skipped")
                continue
            lr = scheduler.get_last_lr()[0]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.update(finished)

            seconds = time.monotonic() - step_start
            state["tokens"] += tokens
            state["samples"] += samples
            run_tokens += tokens
            losses.append(value)
            row = {
                "step": state["step"],
                "loss": value,
                "lr": lr,
                "grad_norm": norm,
                "tokens": tokens,
                "tokens_per_s": tokens / seconds,
                "samples_per_s": samples / seconds,
                "seconds": seconds,
                "epoch": state["epoch"],
            }
            metrics.log(row)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}")
            if state["step"] % t.log_every == 0 or state["step"] == total:
                done = state["step"] - first_step
                eta = (time.monotonic() - started) / done * (total - state["step"])
                tqdm.write(
                    f"step {state['step']:>5}/{total}  loss {value:.4f}  lr {lr:.2e}  grad_norm {norm:.3f}  "
                    f"{tokens / seconds:,.0f} tok/s  eta {_clock(eta)}",
                    file=sys.stdout,
                )
            if t.save_every and state["step"] % t.save_every == 0 and state["step"] < total:
                last_saved = save()
        last_saved = save()
    except KeyboardInterrupt:
        interrupted = True
        bar.close()
        out(f"interrupted at step {state['step']}: saving a checkpoint")
        if state["step"] and (last_saved is None or not last_saved.name.endswith(f"{state['step']:07d}")):
            last_saved = save()
    except torch.OutOfMemoryError as exc:
        raise MmzooError(OOM_HELP) from exc
    finally:
        bar.close()
        metrics.close()

    elapsed = time.monotonic() - started
    hf_dir = None
    if t.save_hf and not interrupted:
        from mmzoo.convert.hf_export import save_hf

        template = (
            cfg.model.load if cfg.model.load and (Path(cfg.model.load) / "config.json").is_file() else None
        )
        hf_dir = save_hf(model, t.save_hf, tokenizer=tokenizer, template_dir=template, overwrite=True)
    out(
        f"done: {len(losses)} steps, {run_tokens:,} tokens in {elapsed:.1f}s "
        f"({run_tokens / max(elapsed, 1e-9):,.0f} tok/s)"
        + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else "")
    )
    out(f"checkpoint: {last_saved}")
    out(f"metrics:    {metrics.path}")
    if metrics.tensorboard_dir:
        out(f"tensorboard: {metrics.tensorboard_dir}")
    if hf_dir:
        out(f"hf export:  {hf_dir}")
    return TrainResult(output, last_saved, len(losses), run_tokens, elapsed, losses, interrupted, hf_dir)

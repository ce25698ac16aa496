"""The training loop behind ``mmzoo train``."""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import mmzoo_kernels
from mmzoo.api import load_model
from mmzoo.build import build_model
from mmzoo.checkpoint.mm import TRACKER, iteration_name
from mmzoo.config import Config, TrainConfig
from mmzoo.data.dataset import VLDataset, build_dataset
from mmzoo.errors import MmzooError
from mmzoo.loss import LossReduction, batch_target_counts
from mmzoo.model import VLModel
from mmzoo.nn.recompute import set_recompute
from mmzoo.registry import ModelSpec, get_model
from mmzoo.train.checkpoint import (
    latest_checkpoint,
    load_training_checkpoint,
    remove_checkpoints,
    save_training_checkpoint,
)
from mmzoo.train.metrics import METRICS, TENSORBOARD, MetricsLog
from mmzoo.train.optim import freeze, make_optimizer, make_scheduler, trainable_summary

DEMO_DATA = Path(__file__).parents[1] / "demo" / "demo.jsonl"
OOM_HELP = (
    "out of memory; lower data.seq_length or train.micro_batch_size, turn on activation recompute "
    "(model.recompute_text.granularity=full), lower data.media.max_pixels, or freeze the vision tower"
)
# fp16 autocast and loss scaling also run on the CPU, slowly; bf16 is the CPU choice.
FP16_DEVICES = ("cuda",)


@dataclass
class MicroBatch:
    """One collated micro-batch and where it leaves the data order."""

    epoch: int
    position: int  # micro-batches of ``epoch`` done after this one
    batch: dict[str, torch.Tensor]
    tokens: int  # the samples' tokens (the dummy image and padding are not counted)


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
        model = load_model(m.load)
        if model.name != spec.name:
            raise MmzooError(f"model.load holds a '{model.name}' model but model.name is '{spec.name}'")
    else:
        model = build_model(spec.name, m.variant, **m.overrides)
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


def _check_lr(lr: float) -> None:
    """``train.lr`` must be a usable AdamW peak learning rate: finite and in [0, 1]."""
    if not (math.isfinite(lr) and 0 <= lr <= 1):
        raise MmzooError(
            f"train.lr: {lr:g} is not a usable learning rate; AdamW moves each weight by about lr "
            "per step, so give a finite value in [0, 1], e.g. 1e-5 for fine-tuning"
        )


def _check_save_hf(hf: Path, output: Path) -> None:
    """``train.save_hf`` is replaced at the end of the run: it must be new or an HF checkpoint."""
    existing = next(p for p in (hf, *hf.parents) if p.exists())
    if not existing.is_dir():
        raise MmzooError(f"train.save_hf: {existing} is a file; give a directory path")
    if existing == hf and any(hf.iterdir()) and not (hf / "config.json").is_file():
        raise MmzooError(
            f"train.save_hf: {hf} is a directory but not a Hugging Face checkpoint, and the export "
            "replaces it; give a new directory"
        )
    if hf == output or hf in output.parents:
        raise MmzooError(f"train.save_hf: {hf} holds train.output_dir {output}; give a directory outside it")


def _prepare_output(t: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Check the paths the run writes before any work; returns the output directory (created).

    An output directory that holds an earlier run needs ``resume`` or ``overwrite``.
    """
    if resume and overwrite:
        raise MmzooError("give either --resume (continue the run) or --overwrite (start over), not both")
    output = Path(t.output_dir).absolute()
    if output.exists() and not output.is_dir():
        raise MmzooError(f"train.output_dir: {output} is a file; give a directory path")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MmzooError(f"train.output_dir: cannot create {output} ({exc.strerror})") from exc
    if not os.access(output, os.W_OK):
        raise MmzooError(f"train.output_dir: {output} is not writable")
    if t.save_hf:
        _check_save_hf(Path(t.save_hf).absolute(), output)
    checkpoint = latest_checkpoint(output)
    if resume and checkpoint is None:
        raise MmzooError(f"--resume: no checkpoint in {output} (no {TRACKER})")
    if not (resume or overwrite) and checkpoint is not None:
        raise MmzooError(
            f"train.output_dir {output} already holds a run (checkpoint {checkpoint.name}); "
            "pass --resume to continue it or --overwrite to delete it and start over"
        )
    if not (resume or overwrite) and (output / METRICS).is_file():
        raise MmzooError(
            f"train.output_dir {output} already holds the {METRICS} of a run that saved no checkpoint; "
            "pass --overwrite to delete it and start over"
        )
    return output


def _start_over(output: Path) -> None:
    """Delete an earlier run's checkpoints, metrics and TensorBoard events (``--overwrite``)."""
    remove_checkpoints(output)
    (output / METRICS).unlink(missing_ok=True)
    shutil.rmtree(output / TENSORBOARD, ignore_errors=True)


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then deliver it.

    An optimizer step and its bookkeeping (scheduler, step counter, metrics row) then happen
    together or not at all, so an interrupted run never saves step N's weights as step N-1.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield  # only the main thread receives signals; None: a handler Python cannot restore
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)  # to the handler that was there: KeyboardInterrupt


def _check_resumed_length(state: dict[str, Any], total: int) -> None:
    """A resumed run of another length splices two learning-rate schedules: warn (or fail if done)."""
    if state["step"] > total:
        raise MmzooError(
            f"--resume: the checkpoint is at step {state['step']}, past this run's {total} steps; "
            "raise train.steps (or train.epochs)"
        )
    saved = state.get("total_steps")
    if saved is not None and saved != total:
        print(
            f"mmzoo: warning: the resumed run was {saved} steps long and this one is {total}: the learning "
            f"rate followed the {saved}-step schedule up to step {state['step']} and follows the "
            f"{total}-step one from there",
            file=sys.stderr,
        )


def _steps(dataset: VLDataset, cfg: Config, epoch: int, position: int) -> Iterator[list[MicroBatch]]:
    """The micro-batches of each optimizer step, forever, starting at ``position`` of ``epoch``.

    A step takes ``grad_accum`` micro-batches, fewer at the end of an epoch: steps never span
    two epochs, so ``train.epochs`` epochs are exactly the steps :func:`steps_per_epoch` counts.
    """
    t = cfg.train
    while True:
        plan = dataset.batches(t.micro_batch_size, t.seed, epoch)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=plan[position:],
            collate_fn=dataset.collate,
            num_workers=cfg.data.num_workers,
        )
        group: list[MicroBatch] = []
        for indices, batch in zip(plan[position:], loader, strict=True):
            position += 1
            # Tokens of the samples themselves: not the collator's dummy image, not padding.
            group.append(MicroBatch(epoch, position, batch, sum(dataset.lengths[i] for i in indices)))
            if len(group) == t.grad_accum or position == len(plan):
                yield group
                group = []
        epoch, position = epoch + 1, 0


def steps_per_epoch(dataset: VLDataset, t: TrainConfig) -> list[int]:
    """Optimizer steps of each epoch the run covers: ``t.epochs`` epochs, or as many as ``t.steps``
    reaches into. Packing after the shuffle changes the rows per epoch, so each is counted."""
    if t.steps <= 0 and t.epochs < 1:
        raise MmzooError(f"train.epochs={t.epochs} with train.steps={t.steps}: set one of them to at least 1")
    counts: list[int] = []
    while (sum(counts) < t.steps) if t.steps > 0 else (len(counts) < t.epochs):
        micro_batches = len(dataset.batches(t.micro_batch_size, t.seed, len(counts)))
        counts.append(math.ceil(micro_batches / t.grad_accum))
    return counts


def _forward_backward(
    model: VLModel,
    micro_batches: list[dict[str, torch.Tensor]],
    reduction: LossReduction,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> torch.Tensor:
    """Accumulate gradients over one optimizer step's micro-batches; returns the summed loss."""
    step_loss = torch.zeros((), device=device)
    for batch in micro_batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(
            device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            loss = model(**batch, loss_reduction=reduction, return_logits=False).loss
        (scaler.scale(loss) if scaler else loss).backward()
        step_loss += loss.detach()
    return step_loss


def train(
    cfg: Config, *, resume: bool = False, overwrite: bool = False, out: Callable[[str], None] = print
) -> TrainResult:
    """Run training as configured; returns what was written. Errors are :class:`MmzooError`.

    Args:
        cfg: the configuration.
        resume: continue the run in ``train.output_dir`` from its latest checkpoint.
        overwrite: delete the run ``train.output_dir`` holds (checkpoints, metrics) and start over;
            without it (or ``resume``) a directory holding a run is an error.
        out: receives the progress lines.
    """
    t = cfg.train
    _check_lr(t.lr)
    output = _prepare_output(t, resume=resume, overwrite=overwrite)
    seed_everything(t.seed)
    device = resolve_device(t.device)
    if t.precision == "fp16" and device.type not in FP16_DEVICES:
        raise MmzooError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 here")
    spec = get_model(cfg.model.name)
    if cfg.data.data == "demo":
        cfg = replace(cfg, data=replace(cfg.data, data=str(DEMO_DATA)))
    model, tokenizer = build(cfg, spec)
    # A loaded model is the variant its config equals, if any; model.variant names only random inits.
    variant = spec.variant_of(model.config) if cfg.model.load else cfg.model.variant
    dataset = build_dataset(spec, model.config, tokenizer, cfg.data)

    freeze(model, cfg.model.freeze, spec.freeze_groups)
    set_recompute(model.image_encoder.encoder, cfg.model.recompute_vision)
    set_recompute(model.text_decoder, cfg.model.recompute_text)
    model.to(device).train()
    optimizer = make_optimizer(model, t, device)
    per_epoch = steps_per_epoch(dataset, t)
    total = t.steps if t.steps > 0 else sum(per_epoch)
    scheduler = make_scheduler(optimizer, t, total)

    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "samples": 0}
    if resume:
        checkpoint = latest_checkpoint(output)
        assert checkpoint is not None  # _prepare_output checked it
        state = load_training_checkpoint(
            checkpoint, model, optimizer, scheduler, load_optimizer=t.load_optimizer, load_rng=t.load_rng
        )
        out(f"resumed from {checkpoint} at step {state['step']}")
        _check_resumed_length(state, total)
    elif overwrite:
        _start_over(output)
    state["total_steps"] = total

    origin = f"{variant or 'no registered variant'}" + (f", from {cfg.model.load}" if cfg.model.load else "")
    out(f"model {spec.name} ({origin}) on {device}, {len(dataset)} samples")
    out("\n".join(trainable_summary(model, spec.freeze_groups)))
    kernels = mmzoo_kernels.configure(device=device.type, **vars(cfg.kernels))
    out("kernels: " + ", ".join(f"{op}={backend}" for op, backend in kernels.items()))
    fewest, most = min(per_epoch), max(per_epoch)
    each = f"{fewest}" if fewest == most else f"{fewest}-{most}"
    out(f"training {total - state['step']} steps ({each} per epoch), output in {output}")

    metrics = MetricsLog(output, t.tensorboard, start_step=state["step"])
    scaler = torch.amp.GradScaler(device.type) if t.precision == "fp16" else None
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.precision)
    params = [p for p in model.parameters() if p.requires_grad]
    steps = _steps(dataset, cfg, state["epoch"], state["position"])
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
        if last_saved is not None and last_saved.name == iteration_name(state["step"]):
            return last_saved  # e.g. resuming a finished run: nothing new to save
        return save_training_checkpoint(
            output,
            state["step"],
            model,
            optimizer,
            scheduler,
            dict(state),
            variant=variant,
            save_optimizer=t.save_optimizer,
            save_rng=t.save_rng,
            keep_last=t.keep_last,
            media=cfg.data.media,
        )

    interrupted = False
    try:
        while state["step"] < total:
            step_start = time.monotonic()
            group = next(steps)
            counts = [batch_target_counts(m.batch) for m in group]
            reduction = LossReduction(
                t.loss_reduction, len(group), sum(c[0] for c in counts), sum(c[1] for c in counts)
            )
            # Samples with targets: the collator's dummy media sample (no labels) is not one.
            samples = sum(c[1] for c in counts)
            step_loss = _forward_backward(
                model, [m.batch for m in group], reduction, device, autocast_dtype, scaler
            )
            tokens = sum(m.tokens for m in group)
            if scaler:
                scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(
                params, t.clip_grad if t.clip_grad > 0 else float("inf")
            )
            value, norm = step_loss.item(), grad_norm.item()
            step = state["step"] + 1
            # ``state`` moves to this step only once its update is done: a Ctrl-C before that
            # saves the previous step, whose weights, optimizer and data position agree.
            finished = {"step": step, "epoch": group[-1].epoch, "position": group[-1].position}
            # With fp16 loss scaling an infinite gradient norm is an overflow the scaler handles
            # (it skips the update and lowers the scale); a non-finite loss is not.
            if not math.isfinite(value) or (scaler is None and not math.isfinite(norm)):
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
                with _interrupts_held():
                    if scaler:
                        scaler.update()  # clears the unscale_ record (and lowers the scale)
                    optimizer.zero_grad(set_to_none=True)
                    scheduler.step()
                    state.update(finished)
                bar.update(1)
                tqdm.write(f"step {state['step']}/{total}: non-finite loss {value}, update skipped")
                continue
            lr = scheduler.get_last_lr()[0]
            with _interrupts_held():
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
        if state["step"]:
            last_saved = save()
    except torch.OutOfMemoryError as exc:
        raise MmzooError(OOM_HELP) from exc
    finally:
        bar.close()
        metrics.close()

    elapsed = time.monotonic() - started
    hf_dir = None
    if t.save_hf and not interrupted:
        from mmzoo.checkpoint.hf_export import save_hf

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

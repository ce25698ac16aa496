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
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import mmzoo_kernels
from mmzoo.api import load_model, open_weights
from mmzoo.build import build_model, use_text_backend
from mmzoo.checkpoint.dcp import DCP_META
from mmzoo.checkpoint.hub import resolve_model_dir
from mmzoo.checkpoint.mm import TRACKER, iteration_name
from mmzoo.checkpoint.weights import Weights, fill_parameters
from mmzoo.config import Config, TrainConfig, with_derived_defaults
from mmzoo.data.collate import batch_to
from mmzoo.data.dataset import VLDataset, build_dataset
from mmzoo.distributed.checkpoint import load_dcp_checkpoint, save_dcp_checkpoint
from mmzoo.distributed.env import (
    StopRequests,
    World,
    all_sum,
    checked,
    close_process_group,
    first_failure,
    init_process_group,
    node_first,
    world_from_env,
)
from mmzoo.distributed.fsdp import mixed_precision, shard_model
from mmzoo.distributed.grad_norm import clip_grad_norm_
from mmzoo.distributed.megatron_parallel import use_text_backend_split
from mmzoo.distributed.mesh import FSDP_DIM, MeshShape, TrainMesh, check_text_decoder, mesh_shape
from mmzoo.distributed.parallelize import parallelize
from mmzoo.distributed.pipeline import (
    PipelineModel,
    PipelineSchedule,
    check_schedule,
    clip_grad_norm,
    plan_stages,
    split_model,
    vision_depth,
)
from mmzoo.errors import MmzooError
from mmzoo.lora.attach import store_frozen
from mmzoo.lora.checkpoint import adapt, frozen_dtype, is_lora_checkpoint
from mmzoo.lora.meta import adapt_on_meta, base_tensors, fill_adapters
from mmzoo.loss import LossReduction, batch_target_counts
from mmzoo.model import VLModel
from mmzoo.nn.init import materialize
from mmzoo.nn.recompute import set_recompute
from mmzoo.registry import ModelSpec, get_model
from mmzoo.train.checkpoint import (
    SaveOptions,
    TrainingCheckpoint,
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
    """One collated micro-batch of this rank."""

    batch: dict[str, Any]
    tokens: int  # the samples' tokens (the dummy image and padding are not counted)


@dataclass
class StepData:
    """This rank's micro-batches of one optimizer step, and where the step leaves the data order.

    A step is a block of up to ``grad_accum * ranks`` micro-batches of the epoch's plan; rank r
    takes every ranks-th one from the r-th, and a rank short of micro-batches at the end of an
    epoch gets loss-free ones (the dummy image alone), so every rank runs the same forwards.
    """

    micro_batches: list[MicroBatch]
    count: int  # the step's micro-batches with samples, over all ranks
    epoch: int
    position: int  # micro-batches of ``epoch`` done after this step, over all ranks


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


# --- set-up: settings, paths, model, data, optimizer, resume -------------------------------------


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build(cfg: Config, spec: ModelSpec) -> tuple[VLModel, Any]:
    """The model (loaded or randomly initialised, on the CPU) and its tokenizer."""
    return _base_model(cfg, spec), load_tokenizer_for(cfg, spec)


def _base_model(cfg: Config, spec: ModelSpec) -> VLModel:
    """The model ``model.load`` holds, or a random init of ``model.variant``, on the CPU."""
    model_cfg = cfg.model
    if model_cfg.load:
        model = load_model(model_cfg.load)
        _check_family(model.name, spec)
    else:
        model = build_model(spec.name, model_cfg.variant, **model_cfg.overrides)
    return use_text_backend(model, model_cfg.text_backend)


def _check_family(name: str, spec: ModelSpec) -> None:
    if name != spec.name:
        raise MmzooError(f"model.load holds a '{name}' model but model.name is '{spec.name}'")


def load_tokenizer_for(cfg: Config, spec: ModelSpec) -> Any:
    """``model.tokenizer``, else the tokenizer files beside ``model.load``, else the family's."""
    from mmzoo.data.tokenizer import load_tokenizer

    load = cfg.model.load
    tokenizer_dir = cfg.model.tokenizer or (
        load if load and (Path(load) / "tokenizer_config.json").is_file() else None
    )
    if tokenizer_dir:
        return load_tokenizer(tokenizer_dir)
    if spec.default_tokenizer is not None:
        return spec.default_tokenizer()
    raise MmzooError(
        f"model '{spec.name}' has no built-in tokenizer; set model.tokenizer to a checkpoint directory"
    )


def _sharded_model(
    cfg: Config, spec: ModelSpec, world: World, mesh: TrainMesh, device: torch.device
) -> tuple[VLModel, PipelineModel | None]:
    """The model split over the mesh (pipeline stages, :func:`parallelize`) and sharded with FSDP2
    over its ``dp_shard x cp`` ranks, frozen and recompute set before sharding; with ``pp`` > 1
    this rank's part and its stages.

    From a checkpoint it is built on the meta device, sharded, and each rank copies only its
    shards from the checkpoint, one full tensor at a time. A random init is built whole on every
    rank (the same seed gives the same weights) and then sharded: that is for small variants.
    """
    model_cfg, train_cfg = cfg.model, cfg.train
    policy, parallel = mixed_precision(train_cfg.precision, device), cfg.parallel
    options = {"offload": parallel.offload, "reshard_after_forward": parallel.reshard_after_forward}
    if model_cfg.load:
        with checked(world):
            weights = open_weights(model_cfg.load)
            _check_family(weights.spec.name, spec)
        model = weights.empty_model()
    else:
        model = build_model(spec.name, model_cfg.variant, **model_cfg.overrides).to(device)
    with checked(world):
        check_text_decoder(mesh.shape, model.text_decoder.config)
        tp_mesh = mesh["tp"] if mesh.shape.tp > 1 else None
        model = use_text_backend_split(model, model_cfg.text_backend, tp_mesh)
        layers = vision_depth(model), model.text_decoder.config.num_layers
        plan = plan_stages(parallel, *layers) if mesh.shape.pp > 1 else None
    _freeze_and_recompute(model, cfg, spec)
    pipeline = None if plan is None else split_model(model, plan, mesh.coordinate("pp"))
    if pipeline is not None:
        model = pipeline.model  # the rest of the model is dropped here
    stacks = [] if pipeline is None else [stage.text_decoder.decoder for stage in pipeline.stages]
    parallelize(model, mesh, parallel, stacks)
    # FSDP roots: the model, or each stage (the schedule defers their gradient reduction).
    roots = [model] if pipeline is None else list(pipeline.stages)
    for root in roots:
        shard_model(root, mesh[FSDP_DIM], mp_policy=policy, **options)
    if model_cfg.load:
        for root in roots:
            materialize(root, device)
        with checked(world):
            fill_parameters(model, weights, part=pipeline is not None)
    for root in roots:
        root.train()
    return model.train(), pipeline


def _sharded_lora_model(
    cfg: Config, spec: ModelSpec, world: World, mesh: TrainMesh, device: torch.device
) -> tuple[VLModel, dict[str, Any] | None]:
    """LoRA on many ranks, sharded with FSDP2 over the data-parallel ranks; returns the model and
    the adapters' record.

    From a checkpoint (``model.load``) it is built on the meta device with its adapters, sharded
    and materialized; each rank then copies its shards of the base from the checkpoint and of the
    adapters from the values one process would start from (:mod:`mmzoo.lora.meta`). A random init
    (or a LoRA run's checkpoint as the base) is built whole on every rank, then sharded. With bf16
    on an accelerator the frozen base is stored in bf16 before sharding.
    """
    model_cfg = cfg.model
    with checked(world):
        weights = _base_weights(model_cfg.load, spec)
        if weights is not None:
            model = use_text_backend(weights.empty_model(), model_cfg.text_backend)
            lora, values = adapt_on_meta(model, model_cfg, cfg.train.seed)
        else:
            model = _base_model(cfg, spec)
            lora = adapt(model, model_cfg, cfg.train.seed)
    _freeze_and_recompute(model, cfg, spec)
    model = model if weights is not None else model.to(device)
    _store_frozen_base(model, cfg.train.precision, device)
    policy, parallel = mixed_precision(cfg.train.precision, device), cfg.parallel
    options = {"offload": parallel.offload, "reshard_after_forward": parallel.reshard_after_forward}
    shard_model(model, mesh[FSDP_DIM], mp_policy=policy, **options)
    if weights is not None:
        materialize(model, device)
        with checked(world):
            fill_parameters(model, weights, params=base_tensors(model))
        fill_adapters(model, values)
    return model.train(), lora


def _base_weights(load: str | None, spec: ModelSpec) -> Weights | None:
    """The weights ``model.load`` names, to fill a meta-device model; ``None`` for a random init or
    a LoRA run's checkpoint (built whole)."""
    if not load or is_lora_checkpoint(load):
        return None
    weights = open_weights(load)
    _check_family(weights.spec.name, spec)
    return weights


def _store_frozen_base(model: VLModel, precision: str, device: torch.device) -> None:
    """bf16 on an accelerator: the frozen parameters in bf16 (the adapters and ``modules_to_save``
    keep float32 and their AdamW state). FSDP2 needs one dtype among a unit's trainable parameters
    only; its policy gathers every parameter in bf16 for compute."""
    dtype = frozen_dtype(precision, device)
    if dtype is not None:
        store_frozen(model, dtype)


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


def _prepare_output(train_cfg: TrainConfig, *, resume: bool, overwrite: bool, check: bool = True) -> Path:
    """Check the paths the run writes before any work; returns the output directory (created).

    An output directory that holds an earlier run needs ``resume`` or ``overwrite``. Without
    ``check`` (ranks other than 0) only the path is returned.
    """
    assert train_cfg.output_dir is not None, "with_derived_defaults fills it"
    output = Path(train_cfg.output_dir).absolute()
    if not check:
        return output
    if resume and overwrite:
        raise MmzooError("give either --resume (continue the run) or --overwrite (start over), not both")
    if output.exists() and not output.is_dir():
        raise MmzooError(f"train.output_dir: {output} is a file; give a directory path")
    try:
        output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MmzooError(f"train.output_dir: cannot create {output} ({exc.strerror})") from exc
    if not os.access(output, os.W_OK):
        raise MmzooError(f"train.output_dir: {output} is not writable")
    if train_cfg.save_hf:
        _check_save_hf(Path(train_cfg.save_hf).absolute(), output)
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


def _check_resumed_length(state: dict[str, Any], total: int, warn: bool) -> None:
    """A resumed run of another length splices two learning-rate schedules: warn (rank 0 only,
    ``warn``) or fail if the checkpoint is past the end."""
    if state["step"] > total:
        raise MmzooError(
            f"--resume: the checkpoint is at step {state['step']}, past this run's {total} steps; "
            "raise train.steps (or train.epochs)"
        )
    saved = state.get("total_steps")
    if warn and saved is not None and saved != total:
        print(
            f"mmzoo: warning: the resumed run was {saved} steps long and this one is {total}: the learning "
            f"rate followed the {saved}-step schedule up to step {state['step']} and follows the "
            f"{total}-step one from there",
            file=sys.stderr,
        )


@dataclass
class _Run:
    """What set-up builds: the run's configuration, model, data, optimizer and trainer state."""

    cfg: Config  # with ``data.data: demo`` resolved to the bundled file
    world: World
    mesh: TrainMesh
    output: Path
    device: torch.device
    spec: ModelSpec
    model: VLModel
    tokenizer: Any
    variant: str | None  # the registry variant the weights started from
    dataset: VLDataset
    optimizer: torch.optim.Optimizer
    scheduler: Any
    per_epoch: list[int]  # optimizer steps of each epoch
    total: int  # optimizer steps of the whole run
    save_options: SaveOptions
    kernels: dict[str, str]  # op -> backend in use on the training device
    state: dict[str, Any] = field(default_factory=dict)  # step, epoch, position, tokens, samples
    pipeline: PipelineModel | None = None  # this rank's pipeline stages (parallel.pp > 1)
    lora: dict[str, Any] | None = None  # the adapters' record (model.lora), saved with checkpoints


def _training_device(train_cfg: TrainConfig) -> torch.device:
    device = resolve_device(train_cfg.device)
    if train_cfg.precision == "fp16" and device.type not in FP16_DEVICES:
        raise MmzooError("train.precision=fp16 needs a CUDA device; use bf16 or fp32 here")
    return device


def _configure_kernels(cfg: Config, device: torch.device) -> dict[str, str]:
    """The ``kernels`` section applied on ``device``, before any work: op -> backend."""
    try:
        return mmzoo_kernels.configure(device=device.type, **cfg.kernels)
    except mmzoo_kernels.KernelError as exc:
        raise MmzooError(str(exc)) from exc


def _freeze_and_recompute(model: VLModel, cfg: Config, spec: ModelSpec) -> None:
    freeze(model, cfg.model.freeze, spec.freeze_groups)
    set_recompute(model.image_encoder.encoder, cfg.model.recompute_vision)
    set_recompute(model.text_decoder, cfg.model.recompute_text)


def _model_and_tokenizer(
    cfg: Config, spec: ModelSpec, world: World, mesh: TrainMesh, device: torch.device
) -> tuple[VLModel, Any, PipelineModel | None, dict[str, Any] | None]:
    """The model on ``device`` in train mode (split and sharded on many ranks), its tokenizer,
    this rank's pipeline stages when there are several, and the LoRA adapters' record."""
    if world.distributed and (cfg.model.lora.enabled or cfg.model.load_adapter):
        model, lora = _sharded_lora_model(cfg, spec, world, mesh, device)
        return model, load_tokenizer_for(cfg, spec), None, lora
    if world.distributed:
        model, pipeline = _sharded_model(cfg, spec, world, mesh, device)
        return model, load_tokenizer_for(cfg, spec), pipeline, None
    model, tokenizer = build(cfg, spec)
    lora = adapt(model, cfg.model, cfg.train.seed)
    _freeze_and_recompute(model, cfg, spec)
    model = model.to(device)
    if lora:
        _store_frozen_base(model, cfg.train.precision, device)
    return model.train(), tokenizer, None, lora


def _check_parallel(cfg: Config, world: World) -> MeshShape:
    """The ``parallel`` section against the ranks ``torchrun`` started; returns the mesh's shape."""
    shape = mesh_shape(cfg.parallel, world.size)
    if world.distributed and cfg.train.precision == "fp16":
        raise MmzooError("train.precision=fp16 is not supported on many ranks; use bf16")
    if shape.pp > 1:
        check_schedule(cfg.parallel, cfg.train.grad_accum, cfg.data.packing)
    return shape


def _check_text_backend(cfg: Config, shape: MeshShape, device: torch.device) -> None:
    """``model.text_backend: megatron`` splits over data, tensor and pipeline parallel ranks (no
    context or sequence parallel: megatron-core's local layers need TransformerEngine), runs
    without activation recompute, and with autocast on CUDA only (its linears' backward follows
    CUDA autocast alone)."""
    if cfg.model.text_backend == "native":
        return
    if shape.cp > 1:
        raise MmzooError(
            f"parallel.cp={shape.cp} is not supported with model.text_backend=megatron (megatron-core's "
            "context parallel needs TransformerEngine); use model.text_backend=native"
        )
    if shape.tp > 1 and cfg.parallel.sequence_parallel:
        raise MmzooError(
            "parallel.sequence_parallel is not supported with model.text_backend=megatron (megatron-core's "
            "local layers need TransformerEngine for it); set parallel.sequence_parallel false"
        )
    if cfg.train.precision != "fp32" and device.type != "cuda":
        raise MmzooError(
            f"train.precision={cfg.train.precision} with model.text_backend=megatron needs CUDA "
            f"(megatron-core's linears follow CUDA autocast only); use fp32 on {device.type}"
        )
    if cfg.model.recompute_text.granularity != "none":
        raise MmzooError(
            "model.recompute_text is not supported with model.text_backend=megatron; "
            "set model.recompute_text.granularity to none"
        )


def _check_lora(cfg: Config) -> None:
    """LoRA runs in one process or over data-parallel (FSDP) ranks; ``train.save_peft`` needs
    adapters to export."""
    model_cfg = cfg.model
    lora = model_cfg.lora.enabled or model_cfg.load_adapter is not None
    if cfg.train.save_peft and not lora:
        raise MmzooError("train.save_peft: no adapters to export; set model.lora (or model.load_adapter)")
    parallel = cfg.parallel
    if lora and max(parallel.tp, parallel.cp, parallel.pp) > 1:
        raise MmzooError(
            f"model.lora runs on data-parallel ranks only (parallel.dp_shard), not with tp={parallel.tp}, "
            f"cp={parallel.cp}, pp={parallel.pp}; set parallel.tp, cp and pp to 1"
        )


def with_demo_media(cfg: Config, spec: ModelSpec) -> Config:
    """With ``data.demo_media``: ``data.media`` laid over the family's ``demo_media`` (its own keys win)."""
    if not cfg.data.demo_media:
        return cfg
    media = {**spec.demo_media, **cfg.data.media}
    return replace(cfg, data=replace(cfg.data, media=media, demo_media=False))


def with_hub_models(cfg: Config) -> Config:
    """``model.load`` and ``model.tokenizer`` given as Hub ids replaced by their snapshot directories."""

    def resolved(value: str | None) -> str | None:
        return str(resolve_model_dir(value)) if value else value

    model = cfg.model
    return replace(cfg, model=replace(model, load=resolved(model.load), tokenizer=resolved(model.tokenizer)))


def _set_up(
    cfg: Config,
    world: World,
    stops: StopRequests,
    *,
    resume: bool,
    overwrite: bool,
    out: Callable[[str], None],
) -> _Run:
    """Check the settings and paths, then build the model, data, optimizer and schedule, and resume.

    Stop requests are noted from the moment the ranks have joined the process group.
    """
    cfg = with_derived_defaults(cfg)  # a Config built in code rather than by load_config
    train_cfg = cfg.train
    _check_lr(train_cfg.lr)
    _check_lora(cfg)
    shape = _check_parallel(cfg, world)
    save_options = SaveOptions(train_cfg.save_optimizer, train_cfg.save_rng, train_cfg.keep_last)
    device = world.device(_training_device(train_cfg))
    _check_text_backend(cfg, shape, device)
    init_process_group(world, device, cfg.parallel.timeout_s)
    mesh = TrainMesh.build(shape, device) if world.distributed else TrainMesh(shape)
    stops.listen()
    with checked(world):
        output = _prepare_output(train_cfg, resume=resume, overwrite=overwrite, check=world.main)
    seed_everything(train_cfg.seed)
    kernels = _configure_kernels(cfg, device)
    spec = get_model(cfg.model.name)
    cfg = node_first(world, partial(with_hub_models, cfg))  # downloads once per node
    cfg = with_demo_media(cfg, spec)
    if cfg.data.data == "demo":
        cfg = replace(cfg, data=replace(cfg.data, data=str(DEMO_DATA)))
    model, tokenizer, pipeline, lora = _model_and_tokenizer(cfg, spec, world, mesh, device)
    # A loaded model is the variant its config equals, if any; model.variant names only random inits.
    variant = spec.variant_of(model.config) if cfg.model.load else cfg.model.variant
    log = None if world.main else _silent  # rank 0 reports the preprocessing and skipped records

    def prepare() -> VLDataset:
        return build_dataset(spec, model.config, tokenizer, cfg.data, log)

    # With a cache, local rank 0 fills it first and the others read it; without one, all prepare at once.
    if cfg.data.cache_dir is not None:
        dataset = node_first(world, prepare)
    else:
        with checked(world):
            dataset = prepare()
    optimizer = make_optimizer(model, train_cfg, device)
    per_epoch = steps_per_epoch(dataset, train_cfg, mesh.dp_size)
    total = train_cfg.steps if train_cfg.steps > 0 else sum(per_epoch)
    scheduler = make_scheduler(optimizer, train_cfg, total)
    run = _Run(
        cfg=cfg,
        world=world,
        mesh=mesh,
        output=output,
        device=device,
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        variant=variant,
        dataset=dataset,
        optimizer=optimizer,
        scheduler=scheduler,
        per_epoch=per_epoch,
        total=total,
        save_options=save_options,
        kernels=kernels,
        pipeline=pipeline,
        lora=lora,
    )
    run.state = _resume_or_start_over(run, resume=resume, overwrite=overwrite, out=out)
    return run


def _resume_or_start_over(
    run: _Run, *, resume: bool, overwrite: bool, out: Callable[[str], None]
) -> dict[str, Any]:
    """The trainer state to start from: the latest checkpoint's (``resume``) or a fresh one."""
    state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "tokens": 0, "samples": 0}
    if resume:
        checkpoint = latest_checkpoint(run.output)
        assert checkpoint is not None  # _prepare_output checked it
        with checked(run.world):
            state = _load_checkpoint(run, checkpoint)
        out(f"resumed from {checkpoint} at step {state['step']}")
        _check_resumed_length(state, run.total, warn=run.world.main)
    elif overwrite and run.world.main:
        _start_over(run.output)
    state["total_steps"] = run.total
    return state


def _load_checkpoint(run: _Run, checkpoint: Path) -> dict[str, Any]:
    """Restore a training checkpoint: DCP (saved on many ranks) on any number of ranks, the
    single-process format in one process."""
    train_cfg = run.cfg.train
    options = {"load_optimizer": train_cfg.load_optimizer, "load_rng": train_cfg.load_rng}
    if (checkpoint / DCP_META).is_file():
        contents = TrainingCheckpoint(run.model, run.optimizer, run.scheduler, lora=run.lora)
        return load_dcp_checkpoint(run.world, checkpoint, contents, **options)
    if run.world.distributed:
        raise MmzooError(
            f"{checkpoint} was saved by one process; it resumes in one process. To go on with "
            f"{run.world.size} ranks, start a new run from its weights (model.load={checkpoint})"
        )
    return load_training_checkpoint(checkpoint, run.model, run.optimizer, run.scheduler, **options)


def _announce(run: _Run, out: Callable[[str], None]) -> None:
    """The lines that open a run: model, trainable parameters, kernels, steps and output directory."""
    load = run.cfg.model.load
    origin = f"{run.variant or 'no registered variant'}" + (f", from {load}" if load else "")
    out(f"model {run.spec.name} ({origin}) on {run.device}, {len(run.dataset)} samples")
    if run.pipeline is not None:
        plan = run.pipeline.plan
        layers = ", ".join(f"{start}-{end - 1}" if end > start else "-" for start, end in plan.llm)
        out(
            f"pipeline: {plan.stages} stages on {plan.pp} ranks ({run.cfg.parallel.pp_schedule}), LLM "
            f"layers {layers}; the parameters below are rank 0's"
        )
    out("\n".join(trainable_summary(run.model, run.spec.freeze_groups)))
    out("kernels: " + ", ".join(f"{op}={backend}" for op, backend in run.kernels.items()))
    fewest, most = min(run.per_epoch), max(run.per_epoch)
    each = f"{fewest}" if fewest == most else f"{fewest}-{most}"
    out(f"training {run.total - run.state['step']} steps ({each} per epoch), output in {run.output}")


# --- the data order: micro-batches grouped into optimizer steps ----------------------------------


def _steps(dataset: VLDataset, cfg: Config, mesh: TrainMesh, epoch: int, position: int) -> Iterator[StepData]:
    """This rank's part of each optimizer step, forever, from micro-batch ``position`` of ``epoch``.

    A step takes ``grad_accum * dp`` micro-batches (``dp``: the data-parallel replicas, whose
    ranks all read their replica's micro-batches), fewer at the end of an epoch: steps never
    span two epochs, so ``train.epochs`` epochs are exactly the steps :func:`steps_per_epoch`
    counts. The order is global, so a run resumes on another number of ranks where it stopped.
    """
    train_cfg = cfg.train
    per_step = train_cfg.grad_accum * mesh.dp_size
    while True:
        plan = dataset.batches(train_cfg.micro_batch_size, train_cfg.seed, epoch)
        blocks = [plan[start : start + per_step] for start in range(position, len(plan), per_step)]
        mine = [_share(block, mesh.dp_rank, mesh.dp_size) for block in blocks]
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=[indices for share in mine for indices in share],
            collate_fn=dataset.collate,
            num_workers=cfg.data.num_workers,
            # Its own generator: an iterator drawn from the global one would shift the random
            # stream (LoRA dropout) of a resumed run, which starts its loader after restoring it.
            generator=torch.Generator().manual_seed(train_cfg.seed + epoch),
        )
        batches = iter(loader)
        for block, share in zip(blocks, mine, strict=True):
            position += len(block)
            # Tokens of the samples themselves: not the collator's dummy image, not padding.
            micro = [MicroBatch(next(batches), sum(dataset.lengths[i] for i in indices)) for indices in share]
            yield StepData(micro, len(block), epoch, position)
        epoch, position = epoch + 1, 0


def _share(block: list[list[int]], replica: int, replicas: int) -> list[list[int]]:
    """Data-parallel replica ``replica``'s micro-batches of ``block``, padded with empty (loss-free) ones."""
    share = block[replica::replicas]
    return share + [[]] * (math.ceil(len(block) / replicas) - len(share))


def steps_per_epoch(dataset: VLDataset, train_cfg: TrainConfig, replicas: int = 1) -> list[int]:
    """Optimizer steps of each epoch the run covers: ``train.epochs`` epochs, or as many as
    ``train.steps`` reaches into. Packing after the shuffle changes the rows per epoch, so each is counted."""
    steps, epochs = train_cfg.steps, train_cfg.epochs
    if steps <= 0 and epochs < 1:
        raise MmzooError(f"train.epochs={epochs} with train.steps={steps}: set one of them to at least 1")
    counts: list[int] = []
    while (sum(counts) < steps) if steps > 0 else (len(counts) < epochs):
        micro_batches = len(dataset.batches(train_cfg.micro_batch_size, train_cfg.seed, len(counts)))
        counts.append(math.ceil(micro_batches / (train_cfg.grad_accum * replicas)))
    return counts


# --- one optimizer step: gradient accumulation, clipping, the update -----------------------------


@dataclass
class _Accumulated:
    """One step's gradients, accumulated over its micro-batches and clipped, before the update."""

    loss: float  # summed over the micro-batches
    grad_norm: float  # before clipping
    tokens: int  # the samples' tokens
    samples: int  # samples with targets (the collator's dummy media sample has none)


class _Updater:
    """Takes optimizer steps: accumulates gradients, clips them, then applies or drops the update.

    With ``train.precision=fp16`` a loss scaler scales the backward pass and skips updates whose
    gradients overflowed.
    """

    def __init__(self, run: _Run) -> None:
        train_cfg = run.cfg.train
        self.model, self.optimizer, self.scheduler = run.model, run.optimizer, run.scheduler
        self.device, self.world, self.mesh = run.device, run.world, run.mesh
        self.reduction = train_cfg.loss_reduction
        self.clip = train_cfg.clip_grad if train_cfg.clip_grad > 0 else float("inf")
        self.scaler = torch.amp.GradScaler(run.device.type) if train_cfg.precision == "fp16" else None
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train_cfg.precision)
        self.params = [p for p in run.model.parameters() if p.requires_grad]

    def accumulate(self, step: StepData) -> _Accumulated:
        """Forward and backward over the step's micro-batches, then unscale and clip the gradients.

        Losses are scaled by the step's counts over all ranks, so the gradients the ranks sum are
        those of one process running the whole step; the loss and counts returned are global.
        """
        reduction = self._reduction(step)
        loss = torch.zeros((), device=self.device)
        for micro_batch in step.micro_batches:
            loss += self._forward_backward(micro_batch.batch, reduction)
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        grad_norm = clip_grad_norm_(self.params, self.clip)
        return self._accumulated(step, loss, grad_norm, reduction)

    def _reduction(self, step: StepData) -> LossReduction:
        """The step's loss reduction with its global counts."""
        counts = [batch_target_counts(micro_batch.batch) for micro_batch in step.micro_batches]
        # The ranks of a replica share its micro-batches: only its first rank counts them.
        mine = [sum(column) if self.mesh.data_leader else 0 for column in zip(*counts, strict=True)]
        targets, samples = (int(n) for n in all_sum(self.world, *mine))
        return LossReduction(self.reduction, step.count, targets, samples)

    def _accumulated(
        self, step: StepData, loss: torch.Tensor, grad_norm: torch.Tensor, reduction: LossReduction
    ) -> _Accumulated:
        """The step's global loss (this rank's share of ``loss`` summed) and token count."""
        leader = self.mesh.data_leader
        tokens = sum(micro_batch.tokens for micro_batch in step.micro_batches) if leader else 0
        total_loss, total_tokens = all_sum(self.world, loss.item() * self.mesh.loss_share, tokens)
        return _Accumulated(total_loss, grad_norm.item(), int(total_tokens), reduction.total_samples)

    def _forward_backward(self, batch: dict[str, Any], reduction: LossReduction) -> torch.Tensor:
        """Add one micro-batch's gradients; returns its loss (detached)."""
        batch = batch_to(batch, self.device)
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = self.model(**batch, loss_reduction=reduction, return_logits=False).loss
        (self.scaler.scale(loss) if self.scaler else loss).backward()
        return loss.detach()

    def finite(self, step: _Accumulated) -> bool:
        """Whether the update may go ahead.

        With fp16 loss scaling an infinite gradient norm is an overflow the scaler handles (it
        skips the update and lowers the scale); a non-finite loss is not.
        """
        return math.isfinite(step.loss) and (self.scaler is not None or math.isfinite(step.grad_norm))

    def finish(self, *, apply: bool) -> None:
        """Apply the gradients (or drop them), advance the learning-rate schedule, clear the gradients."""
        if apply:
            if self.scaler:
                self.scaler.step(self.optimizer)
            else:
                self.optimizer.step()
        if self.scaler:
            self.scaler.update()  # after a drop: clears the unscale_ record (and lowers the scale)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class _PipelineUpdater(_Updater):
    """Takes optimizer steps through the pipeline schedule (``parallel.pp`` > 1).

    The step's micro-batches (``train.grad_accum`` per data-parallel replica, loss-free ones
    filling a short step) are the pipeline's; the gradient norm is taken over every stage.
    """

    def __init__(self, run: _Run) -> None:
        super().__init__(run)
        assert run.pipeline is not None
        cfg = run.cfg
        feed, dummy = run.pipeline.feed, run.dataset.dummy
        feed.context_parallel = cp = run.model.context_parallel  # set by parallelize (cp > 1)
        length = cfg.train.micro_batch_size * cfg.data.seq_length + len(dummy)
        feed.length = length if cp is None else cp.bucket(length)  # cp's slices need no padding
        feed.rows, feed.hidden_size = dummy.position_ids.shape[0], run.model.text_decoder.config.hidden_size
        policy = mixed_precision(cfg.train.precision, run.device)
        feed.hidden_dtype = policy.param_dtype if policy and policy.param_dtype else torch.float32
        feed.autocast_dtype, feed.device_type = self.autocast_dtype, run.device.type
        self.micro_batches = cfg.train.grad_accum
        self.schedule = PipelineSchedule(run.pipeline, run.mesh, self.micro_batches, run.device)
        self.counted = self.schedule.norm_params()
        self.filler = run.dataset.collate([])  # the dummy image alone: no loss

    def accumulate(self, step: StepData) -> _Accumulated:
        """The step's forward and backward under the schedule, then the clipped gradients."""
        reduction = self._reduction(step)
        batches = [batch_to(m.batch, self.device) for m in step.micro_batches]
        batches += [batch_to(self.filler, self.device)] * (self.micro_batches - len(batches))
        loss = self.schedule.step(batches, reduction)
        grad_norm = clip_grad_norm(self.params, self.counted, self.clip, self.mesh)
        return self._accumulated(step, loss, grad_norm, reduction)


# --- metrics and progress ------------------------------------------------------------------------


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"


class _Progress:
    """Bookkeeping of the run: metrics rows, the progress bar and lines, the closing summary.

    On many ranks only rank 0 writes metrics and prints; the numbers it gets are global.
    """

    def __init__(self, run: _Run) -> None:
        train_cfg = run.cfg.train
        self.total, self.log_every = run.total, train_cfg.log_every
        self.first_step = run.state["step"]
        self.main, self.device = run.world.main, run.device
        self.metrics = (
            MetricsLog(run.output, train_cfg.tensorboard, start_step=self.first_step) if self.main else None
        )
        self.losses: list[float] = []
        self.tokens = 0  # this run's (a resumed run counts from 0; the trainer state from the start)
        self.started = time.monotonic()
        # The bar redraws in place on a terminal; logs get the per-step lines (with ETA) only.
        self.bar = tqdm(
            total=run.total,
            initial=self.first_step,
            desc="train",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=True,
            disable=not (self.main and sys.stderr.isatty()),
        )

    def record(self, state: dict[str, Any], step: _Accumulated, lr: float, seconds: float) -> dict[str, Any]:
        """Count an applied step (``state`` is at it already) and write its metrics row; returns the row."""
        state["tokens"] += step.tokens
        state["samples"] += step.samples
        self.tokens += step.tokens
        self.losses.append(step.loss)
        row = {
            "step": state["step"],
            "loss": step.loss,
            "lr": lr,
            "grad_norm": step.grad_norm,
            "tokens": step.tokens,
            "tokens_per_s": step.tokens / seconds,
            "samples_per_s": step.samples / seconds,
            "seconds": seconds,
            "epoch": state["epoch"],
        }
        if self.device.type == "cuda":
            row["memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.metrics is not None:
            self.metrics.log(row)
        return row

    def show(self, row: dict[str, Any]) -> None:
        """Advance the bar; every ``train.log_every`` steps (and at the last) print the row with an ETA."""
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{row['loss']:.4f}")
        step = row["step"]
        if self.main and (step % self.log_every == 0 or step == self.total):
            eta = (time.monotonic() - self.started) / (step - self.first_step) * (self.total - step)
            tqdm.write(
                f"step {step:>5}/{self.total}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  "
                f"grad_norm {row['grad_norm']:.3f}  {row['tokens_per_s']:,.0f} tok/s  eta {_clock(eta)}",
                file=sys.stdout,
            )

    def skipped(self, step: int, loss: float) -> None:
        self.bar.update(1)
        if self.main:
            tqdm.write(f"step {step}/{self.total}: non-finite loss {loss}, update skipped")

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()

    def summary(self, seconds: float, checkpoint: Path | None, hf_dir: Path | None) -> list[str]:
        """The closing lines: steps, tokens and throughput, then where everything was written."""
        losses, tokens = self.losses, self.tokens
        lines = [
            f"done: {len(losses)} steps, {tokens:,} tokens in {seconds:.1f}s "
            f"({tokens / max(seconds, 1e-9):,.0f} tok/s)"
            + (f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else ""),
            f"checkpoint: {checkpoint}",
        ]
        if self.metrics is not None:
            lines.append(f"metrics:    {self.metrics.path}")
            if self.metrics.tensorboard_dir:
                lines.append(f"tensorboard: {self.metrics.tensorboard_dir}")
        if hf_dir:
            lines.append(f"hf export:  {hf_dir}")
        return lines


# --- checkpoints ---------------------------------------------------------------------------------


class _Checkpoints:
    """The run's saves: every ``train.save_every`` steps, at the end, and on Ctrl-C."""

    def __init__(self, run: _Run, *, resume: bool) -> None:
        self.run = run
        self.every = run.cfg.train.save_every
        self.last: Path | None = latest_checkpoint(run.output) if resume else None

    def save(self) -> None:
        """Save the step ``run.state`` is at, unless the newest checkpoint already holds it."""
        run = self.run
        if self.last is not None and self.last.name == iteration_name(run.state["step"]):
            return  # e.g. resuming a finished run: nothing new to save
        contents = TrainingCheckpoint(
            run.model,
            run.optimizer,
            run.scheduler,
            dict(run.state),
            variant=run.variant,
            media=run.cfg.data.media,
            lora=run.lora,
        )
        step, options = run.state["step"], run.save_options
        if run.world.distributed:
            self.last = save_dcp_checkpoint(run.world, run.output, step, contents, options)
        else:
            self.last = save_training_checkpoint(run.output, step, contents, options)

    def save_if_due(self) -> None:
        """Save on the ``train.save_every`` cadence; the last step is saved when the loop ends."""
        step = self.run.state["step"]
        if self.every and step % self.every == 0 and step < self.run.total:
            self.save()


def _export_hf(run: _Run, hf_dir: str, checkpoint: Path | None) -> Path | None:
    """``train.save_hf``: the trained model as a Hugging Face checkpoint, its config from ``model.load``'s.

    On many ranks rank 0 writes it from the run's last checkpoint, one tensor at a time (no rank
    ever holds the whole model); the others wait for it.
    """
    from mmzoo.checkpoint.dcp import DCPSource
    from mmzoo.checkpoint.hf_export import export_hf, save_hf

    load = run.cfg.model.load
    template = load if load and (Path(load) / "config.json").is_file() else None
    options = {"tokenizer": run.tokenizer, "template_dir": template, "overwrite": True}
    if not run.world.distributed:
        return save_hf(run.model, hf_dir, **options)
    assert checkpoint is not None  # the loop saved the last step
    written = None
    with checked(run.world):
        if run.world.main and run.lora is not None:  # the base and the adapters the checkpoint holds
            written = save_hf(load_model(checkpoint), hf_dir, **options)
        elif run.world.main:
            model = run.model
            written = export_hf(DCPSource(checkpoint), run.spec, model.config, hf_dir, **options)
    return written


def _export_peft(run: _Run, peft_dir: str, checkpoint: Path | None) -> None:
    """``train.save_peft``: the trained adapters as a PEFT adapter directory. On many ranks rank 0
    writes it from the run's last checkpoint (the model's adapters are sharded)."""
    from mmzoo.lora.peft_format import save_peft

    with checked(run.world):
        if run.world.main:
            model = load_model(checkpoint) if run.world.distributed and checkpoint else run.model
            save_peft(model, peft_dir, base=run.cfg.model.load, overwrite=True)


# --- the loop ------------------------------------------------------------------------------------


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


def _nonfinite(step: _Accumulated, number: int, last_saved: Path | None) -> MmzooError:
    """The error that stops a run at a non-finite step (``train.on_nonfinite=stop``)."""
    where = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved yet"
    return MmzooError(
        f"non-finite loss ({step.loss}) or gradient norm ({step.grad_norm}) at step {number}; {where}. "
        "Lower train.lr, check the data, or set train.on_nonfinite=skip"
    )


def _take_steps(
    run: _Run, updater: _Updater, progress: _Progress, checkpoints: _Checkpoints, stops: StopRequests
) -> None:
    """Optimizer steps until the run's last; ``run.state`` moves to a step once its update is done.

    A Ctrl-C before that saves the previous step, whose weights, optimizer and data position
    agree; the update and its bookkeeping run with Ctrl-C held back (:func:`_interrupts_held`).
    On many ranks a Ctrl-C on any of them stops all of them before the same step (``stops``).
    """
    state = run.state
    batches = _steps(run.dataset, run.cfg, run.mesh, state["epoch"], state["position"])
    while state["step"] < run.total:
        stops.check()
        started = time.monotonic()
        data = next(batches)
        step = updater.accumulate(data)
        finished = {"step": state["step"] + 1, "epoch": data.epoch, "position": data.position}
        if not updater.finite(step):
            if run.cfg.train.on_nonfinite == "stop":
                raise _nonfinite(step, finished["step"], checkpoints.last)
            with _interrupts_held():
                updater.finish(apply=False)
                state.update(finished)
            progress.skipped(state["step"], step.loss)
            continue
        lr = run.scheduler.get_last_lr()[0]
        with _interrupts_held():
            updater.finish(apply=True)
            state.update(finished)
            row = progress.record(state, step, lr, seconds=time.monotonic() - started)
        progress.show(row)
        checkpoints.save_if_due()


def train(
    cfg: Config, *, resume: bool = False, overwrite: bool = False, out: Callable[[str], None] = print
) -> TrainResult:
    """Run training as configured; returns what was written. Errors are :class:`MmzooError`.

    Phases: set-up (:func:`_set_up`), optimizer steps (:func:`_take_steps`, each one
    :class:`_Updater` step with :class:`_Progress` bookkeeping and :class:`_Checkpoints` saves),
    the final save (or the Ctrl-C one), then the Hugging Face export and the summary.

    Args:
        cfg: the configuration.
        resume: continue the run in ``train.output_dir`` from its latest checkpoint.
        overwrite: delete the run ``train.output_dir`` holds (checkpoints, metrics) and start over;
            without it (or ``resume``) a directory holding a run is an error.
        out: receives the progress lines.
    """
    world = world_from_env()
    say = out if world.main else _silent
    stops = StopRequests(world)
    try:
        return _train(cfg, world, stops, resume=resume, overwrite=overwrite, out=say)
    except Exception as exc:
        reported = first_failure(world, exc)
        if reported is exc:
            raise
        raise reported from exc
    finally:
        close_process_group()
        stops.close()  # last: the SIGTERM torchrun sends once a rank failed is only noted till here


def _silent(line: str) -> None:
    """Where the progress lines of ranks other than 0 go."""


def _train(
    cfg: Config,
    world: World,
    stops: StopRequests,
    *,
    resume: bool,
    overwrite: bool,
    out: Callable[[str], None],
) -> TrainResult:
    run = _set_up(cfg, world, stops, resume=resume, overwrite=overwrite, out=out)
    _announce(run, out)
    updater = _PipelineUpdater(run) if run.pipeline is not None else _Updater(run)
    progress = _Progress(run)
    checkpoints = _Checkpoints(run, resume=resume)
    interrupted = False
    try:
        _take_steps(run, updater, progress, checkpoints, stops)
        checkpoints.save()
    except KeyboardInterrupt:
        interrupted = True
        progress.bar.close()
        out(f"interrupted at step {run.state['step']}: saving a checkpoint")
        if run.state["step"]:
            checkpoints.save()
    except torch.OutOfMemoryError as exc:
        raise MmzooError(OOM_HELP) from exc
    finally:
        progress.close()
    seconds = time.monotonic() - progress.started
    export = run.cfg.train.save_hf
    hf_dir = _export_hf(run, export, checkpoints.last) if export and not interrupted else None
    peft_dir = run.cfg.train.save_peft
    if peft_dir and not interrupted:
        _export_peft(run, peft_dir, checkpoints.last)
    for line in progress.summary(seconds, checkpoints.last, hf_dir):
        out(line)
    if peft_dir and not interrupted:
        out(f"peft adapter: {Path(peft_dir).absolute()}")
    losses = progress.losses
    return TrainResult(
        run.output, checkpoints.last, len(losses), progress.tokens, seconds, losses, interrupted, hf_dir
    )

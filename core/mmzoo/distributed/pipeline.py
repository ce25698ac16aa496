"""Pipeline parallel training: the model cut into stages that ``torch.distributed.pipelining`` runs.

Stages follow MindSpeed-MM's ``vit_pp_layers`` / ``llm_pp_layers`` (as mm checkpoints place them,
:class:`mmzoo.convert.parallel.ParallelLayout`): the first stage carries the vision encoder, the
projector and the embedding, the last the final norm and the output layer (or, with tied
embeddings, its own copy of the embedding, kept equal by summing the two gradients), and the LLM
layers are spread as ``llm_pp_layers`` says (evenly when empty). With the ``interleaved`` schedule
each rank runs several of them (``llm_pp_layers`` lists ``pp * virtual`` counts; stage ``s`` runs
on rank ``s % pp``). Every stage keeps the model's parameter names (``text_decoder.decoder.
layers.5.*`` on whichever stage holds layer 5), so DCP checkpoints move between meshes and
checkpoints fill a stage by name.

Shapes between stages are static (the schedule fixes them on its first step): each micro-batch's
packed row is padded to one bucket length with a loss-free padding sequence. A stage sends the
next one the hidden states ``(L, H)``, the position ids ``(rows, L)``, ``cu_seqlens`` padded to
``L + 2`` entries (repeating the end) and the labels ``(L,)``; the last stage computes the
family's loss on whole sequences (per-token weights from :func:`mmzoo.loss.loss_targets`), so
its loss is the micro-batch loss of one process. Media (any size) never go through the
schedule: the first stage reads its micro-batches from :class:`StageFeed` by index.

With context parallel (``parallel.cp`` > 1) every cp rank of the first stage embeds the whole
micro-batch, computes targets and weights on the whole sequences, pads to the bucket (a multiple
of cp, and of cp x tp under sequence parallel) and keeps its slice
(:meth:`~mmzoo.distributed.context_parallel.ContextParallel.shard`). Stages then carry the
slice's hidden states ``(L/cp, H)`` and position ids ``(rows, L/cp)``, the global ``cu_seqlens``
(``L + 2`` entries: the attention all-to-all attends over whole sequences), and the slice's
targets and weights ``(L/cp,)`` instead of labels; the last stage's loss is
:func:`mmzoo.loss.weighted_cross_entropy` over its slice, so the cp ranks' losses add up to the
micro-batch's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleInterleaved1F1B
from torch.distributed.pipelining.stage import _PipelineStageBase
from torch.distributed.tensor import DTensor

from mmzoo.config import ParallelConfig
from mmzoo.convert.parallel import ParallelLayout
from mmzoo.distributed.context_parallel import ContextParallel
from mmzoo.distributed.fsdp import layer_units
from mmzoo.distributed.grad_norm import grad_norm, scale_to_norm_
from mmzoo.distributed.mesh import TrainMesh
from mmzoo.errors import MmzooError
from mmzoo.loss import IGNORE_INDEX, LossReduction, loss_targets, weighted_cross_entropy
from mmzoo.model import VLModel
from mmzoo.nn.recompute import LayerStack, stage_stack

# --- the stages -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StagePlan:
    """The pipeline's stages: ``llm[s]`` = ``[start, end)`` of the LLM layers on stage ``s``; the
    vision encoder is on stage 0. ``pp`` ranks run ``len(llm) / pp`` stages each."""

    pp: int
    llm: tuple[tuple[int, int], ...]

    @property
    def stages(self) -> int:
        return len(self.llm)

    @property
    def virtual(self) -> int:
        """Stages per rank (1 for 1F1B)."""
        return self.stages // self.pp

    def local(self, pp_rank: int) -> list[int]:
        """The stages rank ``pp_rank`` runs, in order (the interleaved schedule's loop placement)."""
        return [pp_rank + k * self.pp for k in range(self.virtual)]


def _even(layers: int, stages: int) -> tuple[int, ...]:
    # Later stages take the remainder: the first one also runs the vision encoder.
    return tuple(layers // stages + (s >= stages - layers % stages) for s in range(stages))


def plan_stages(parallel: ParallelConfig, vision_layers: int, llm_layers: int) -> StagePlan:
    """The stages ``parallel`` asks for on a model with these layer counts.

    Raises:
        MmzooError: in one line, a split that cannot run: counts that do not sum to the layers,
            another number of stages than the schedule runs, vision layers after the first stage,
            a middle stage with no layers.
    """
    pp, interleaved = parallel.pp, parallel.pp_schedule == "interleaved"
    counts = parallel.llm_pp_layers or _even(llm_layers, pp * (2 if interleaved else 1))
    shown = list(counts)
    if interleaved and (len(counts) % pp or len(counts) < 2 * pp):
        raise MmzooError(
            f"parallel.llm_pp_layers {shown}: the interleaved schedule runs several stages per rank; "
            f"give a multiple of parallel.pp={pp} counts, at least {2 * pp}"
        )
    if not interleaved and len(counts) != pp:
        raise MmzooError(
            f"parallel.llm_pp_layers {shown} lists {len(counts)} stages but parallel.pp={pp}; give one "
            "count per stage (or pp_schedule=interleaved for several stages per rank)"
        )
    vit = parallel.vit_pp_layers or (vision_layers, *[0] * (len(counts) - 1))
    try:
        ParallelLayout(1, tuple(vit), tuple(counts)).check({"vision": vision_layers, "text": llm_layers})
    except MmzooError as exc:
        raise MmzooError(f"parallel: {exc}") from None
    if any(vit[1:]):
        raise MmzooError(
            f"parallel.vit_pp_layers {list(vit)}: training runs the whole vision encoder on the first "
            f"stage; give [{vision_layers}{', 0' * (len(vit) - 1)}]"
        )
    empty = [s for s in range(1, len(counts) - 1) if not counts[s]]
    if empty:
        raise MmzooError(
            f"parallel.llm_pp_layers {shown}: stage {empty[0]} would hold nothing (only the first and "
            "last stages carry more than LLM layers); give every middle stage at least one layer"
        )
    ranges = ParallelLayout(1, tuple(vit), tuple(counts)).ranges("text")
    return StagePlan(pp, tuple(ranges))


def check_schedule(parallel: ParallelConfig, micro_batches: int, packing: bool) -> None:
    """The step's micro-batches and the data layout against the schedule, before any work."""
    if not packing:
        raise MmzooError("parallel.pp > 1 needs data.packing=true (fixed-length packed rows between stages)")
    pp = parallel.pp
    if parallel.pp_schedule == "1f1b" and micro_batches < pp:
        raise MmzooError(
            f"train.grad_accum={micro_batches}: the 1F1B schedule needs at least parallel.pp={pp} "
            "micro-batches per step; raise train.grad_accum"
        )
    rounds = max(1, micro_batches // pp)
    if parallel.pp_schedule == "interleaved" and micro_batches % rounds:
        raise MmzooError(
            f"train.grad_accum={micro_batches}: the interleaved schedule runs the micro-batches in "
            f"rounds of about parallel.pp={pp} and needs a multiple of the {rounds} rounds; "
            f"give a multiple of {pp}"
        )


@dataclass
class StageFeed:
    """What a rank's stages read besides activations: the step's micro-batches (the first stage's
    inputs, media included) and its loss reduction; the shapes and dtypes between stages; autocast.

    Attributes:
        length: the bucket: tokens of every row between stages (all cp slices together).
        rows: position-id rows (3 for M-RoPE).
        hidden_size, hidden_dtype: the hidden states sent between stages.
        context_parallel: the rank's cp group (``parallel.cp`` > 1): stages carry its slice.
    """

    length: int = 0
    rows: int = 1
    hidden_size: int = 0
    hidden_dtype: torch.dtype = torch.float32
    autocast_dtype: torch.dtype | None = None
    device_type: str = "cpu"
    batches: list[dict[str, Any]] = field(default_factory=list)
    reduction: LossReduction | None = None
    context_parallel: ContextParallel | None = None

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = self.autocast_dtype
        return torch.autocast(self.device_type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def carried(self) -> tuple[torch.Tensor, ...]:
        """Meta tensors shaped as what a stage sends the next: the pipeline's static shapes (with
        cp: this rank's slice, the global ``cu_seqlens``, targets and weights for labels)."""
        cp = self.context_parallel
        length = self.length // (1 if cp is None else cp.size)
        with torch.device("meta"):
            carried = (
                torch.empty(length, self.hidden_size, dtype=self.hidden_dtype, requires_grad=True),
                torch.empty(self.rows, length, dtype=torch.long),
                torch.empty(self.length + 2, dtype=torch.int32),
                torch.empty(length, dtype=torch.long),
            )
            return carried if cp is None else (*carried, torch.empty(length))


def to_bucket(
    hidden: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    labels: torch.Tensor,
    length: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed row padded to ``length`` tokens: the padding is a sequence of its own, with no
    targets; ``cu_seqlens`` gets ``length + 2`` entries (the end repeated)."""
    tokens = hidden.shape[0]
    _check_fits(tokens, length)
    pad = length - tokens
    return (
        F.pad(hidden, (0, 0, 0, pad)),  # (L, H)
        F.pad(position_ids, (0, pad)),  # (rows, L)
        _ends(cu_seqlens, length),
        F.pad(labels, (0, pad), value=IGNORE_INDEX),  # (L,)
    )


def _check_fits(tokens: int, length: int) -> None:
    if tokens > length:
        raise MmzooError(f"a packed row of {tokens} tokens is longer than the pipeline bucket ({length})")


def _ends(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """``cu_seqlens`` of a row padded to ``length`` tokens, as ``length + 2`` entries (the end repeated)."""
    return F.pad(cu_seqlens.to(torch.int32), (0, length + 2 - cu_seqlens.numel()), value=length)


class StageModule(nn.Module):
    """One pipeline stage: its parts of a :class:`VLModel`, under the model's names.

    The first stage takes a micro-batch index and reads the micro-batch from the feed; the others
    take the previous stage's tensors. The last stage returns the micro-batch's loss (with cp:
    its slice's part), the others ``(hidden, position_ids, cu_seqlens, labels)`` (with cp:
    ``(hidden, position_ids, cu_seqlens, target, weight)`` of the slice).
    """

    def __init__(self, part: VLModel, stage: int, stages: int, feed: StageFeed) -> None:
        super().__init__()
        self.first, self.last = stage == 0, stage == stages - 1
        if self.first:
            self.image_encoder = part.image_encoder
        self.text_decoder = part.text_decoder
        self.embed_inputs = part.embed_inputs  # a bound method: not registered as a module
        self.loss_fn = part.loss_fn
        self.feed = feed

    def forward(self, *inputs: torch.Tensor) -> Any:
        feed = self.feed
        with feed.autocast():
            hidden, position_ids, cu_seqlens, *targets = self._read(inputs[0]) if self.first else inputs
            packed = cu_seqlens.unique_consecutive()
            hidden = self.text_decoder(hidden, position_ids, packed)
            if self.last:
                return self._loss(hidden, packed, *targets)
        rest = (position_ids, cu_seqlens, *targets)
        return hidden.to(feed.hidden_dtype), *(t.clone() for t in rest)

    def _loss(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor, *targets: torch.Tensor) -> torch.Tensor:
        output_weight = self.text_decoder.output_weight
        if self.feed.context_parallel is None:
            (labels,) = targets
            return self.loss_fn(hidden, output_weight, labels, cu_seqlens, self.feed.reduction)
        target, weight = targets
        return weighted_cross_entropy(hidden, output_weight, target, weight)

    def _read(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feed = self.feed
        batch, cp = feed.batches[int(index)], feed.context_parallel
        embeds = self.embed_inputs(batch["input_ids"], batch["media"])[0]  # (T, H)
        position_ids, labels = batch["position_ids"][:, 0], batch["labels"][0]
        cu_seqlens = batch["cu_seqlens"]
        if cp is None:
            return to_bucket(embeds, position_ids, cu_seqlens, labels, feed.length)
        target, weight = loss_targets(labels, cu_seqlens, feed.reduction)  # on the whole sequences
        _check_fits(embeds.shape[0], feed.length)
        part = cp.shard(embeds, position_ids, cu_seqlens, target, weight, length=feed.length)
        return part.embeds, part.position_ids, _ends(part.cu_seqlens, feed.length), part.target, part.weight


def _clone(module: nn.Module, **children: nn.Module | None) -> Any:
    """A shallow copy of ``module`` (the same submodules and parameters) with ``children`` replaced."""
    copy = module.__class__.__new__(module.__class__)
    # Own dicts (submodules, parameters, hooks): changing the copy leaves the module as it was.
    copy.__dict__ = {k: v.copy() if isinstance(v, dict) else v for k, v in module.__dict__.items()}
    copy._modules.update(children)
    return copy


def model_part(model: VLModel, layers: Sequence[int], *, first: bool, last: bool) -> VLModel:
    """The part of ``model`` a rank's stages hold, as a :class:`VLModel` with the model's names:
    LLM ``layers``, the vision encoder and embedding when ``first``, the final norm and output
    layer (the tied embedding) when ``last``. The modules are the model's own, not copies."""
    decoder = model.text_decoder
    tied = decoder.output_layer is None
    stack: LayerStack = decoder.decoder
    text = _clone(
        decoder,
        decoder=stage_stack(stack, layers, final=last),
        embedding=decoder.embedding if first or (last and tied) else None,
        output_layer=decoder.output_layer if last else None,
    )
    return _clone(model, text_decoder=text, image_encoder=model.image_encoder if first else None)


@dataclass
class PipelineModel:
    """A rank's share of the pipeline.

    Attributes:
        model: everything the rank holds, under the model's names (checkpoints, the optimizer,
            loading); never called.
        stages: the rank's stage modules (FSDP roots), in schedule order.
        indices: their stage indices.
        plan: the pipeline's stages.
        feed: what the first stage reads.
        tied: names held by both the first and the last stage (a tied embedding).
    """

    model: VLModel
    stages: list[StageModule]
    indices: list[int]
    plan: StagePlan
    feed: StageFeed
    tied: list[str]


def split_model(model: VLModel, plan: StagePlan, pp_rank: int) -> PipelineModel:
    """Rank ``pp_rank``'s stages of ``model`` (frozen and recompute already set)."""
    feed, indices = StageFeed(), plan.local(pp_rank)
    last = plan.stages - 1
    stages = []
    for s in indices:
        part = model_part(model, range(*plan.llm[s]), first=s == 0, last=s == last)
        stages.append(StageModule(part, s, plan.stages, feed))
    layers = [i for s in indices for i in range(*plan.llm[s])]
    whole = model_part(model, layers, first=0 in indices, last=last in indices)
    decoder = model.text_decoder
    tied = (
        []
        if decoder.output_layer is not None
        else [f"text_decoder.embedding.{name}" for name, _ in decoder.embedding.named_parameters()]
    )
    return PipelineModel(whole, stages, indices, plan, feed, tied)


def vision_depth(model: VLModel) -> int:
    """The vision encoder's layers (the entries of its ``layers`` stacks)."""
    return len(layer_units(model.image_encoder))


# --- running a step ---------------------------------------------------------------------------------


def _loss_is_output(output: torch.Tensor, target: Any) -> torch.Tensor:
    return output  # the last stage computes its micro-batch loss itself


def _tied_group(mesh: TrainMesh) -> dist.ProcessGroup | None:
    """This rank's group of the first and the last stage at the same data/context/tensor coordinate
    (every rank creates every group, in the same order)."""
    assert mesh.mesh is not None
    ranks = mesh.mesh.mesh
    mine = None
    for a, b in zip(ranks[0].flatten().tolist(), ranks[-1].flatten().tolist(), strict=True):
        group = dist.new_group([a, b])
        if dist.get_rank() in (a, b):
            mine = group
    return mine


def _examples(pipeline: PipelineModel, index: int) -> tuple[tuple[torch.Tensor, ...], Any]:
    """Stage ``index``'s inputs and outputs as meta tensors: static shapes, so the schedule runs no
    forward on made-up values to infer them (the first stage's input: a micro-batch index)."""
    carried = pipeline.feed.carried()
    with torch.device("meta"):
        inputs = (torch.empty(1, dtype=torch.long),) if index == 0 else carried
        outputs = torch.empty((), requires_grad=True) if index == pipeline.plan.stages - 1 else carried
    return inputs, outputs


class PipelineSchedule:
    """Runs a step's micro-batches through the stages with 1F1B or interleaved 1F1B.

    Gradients are sums over micro-batches (the losses are already scaled by the step's counts);
    FSDP reduces them once, after the last backward. A tied embedding's two copies then get the
    sum of both gradients.
    """

    def __init__(self, pipeline: PipelineModel, mesh: TrainMesh, micro_batches: int, device: torch.device):
        self.pipeline, self.micro_batches = pipeline, micro_batches
        plan, group = pipeline.plan, mesh["pp"].get_group()
        stages: list[_PipelineStageBase] = [
            PipelineStage(module, index, plan.stages, device, *_examples(pipeline, index), group=group)
            for module, index in zip(pipeline.stages, pipeline.indices, strict=True)
        ]
        options: dict[str, Any] = {"loss_fn": _loss_is_output, "scale_grads": False}
        self.schedule: Schedule1F1B | ScheduleInterleaved1F1B = (
            Schedule1F1B(stages[0], micro_batches, **options)
            if plan.virtual == 1
            else ScheduleInterleaved1F1B(stages, micro_batches, **options)
        )
        self.tied_group = _tied_group(mesh) if pipeline.tied else None

    def step(self, batches: list[dict[str, Any]], reduction: LossReduction) -> torch.Tensor:
        """Forward and backward of ``batches`` (``micro_batches`` of them, on the device); returns
        the summed loss on the last stage's ranks, 0 elsewhere."""
        feed = self.pipeline.feed
        feed.batches, feed.reduction = batches, reduction
        losses: list[torch.Tensor] = []
        first = 0 in self.pipeline.indices
        inputs = (torch.arange(self.micro_batches),) if first else ()
        try:
            # The target is unused (the last stage returns its loss), but the schedule indexes it.
            target = torch.zeros(self.micro_batches)
            self.schedule.step(*inputs, target=target, losses=losses, return_outputs=False)
        finally:
            feed.batches = []
        self._sum_tied()
        return torch.stack(losses).sum().detach() if losses else torch.zeros(())

    def _sum_tied(self) -> None:
        if self.tied_group is None:
            return
        params = dict(self.pipeline.model.named_parameters())
        for name in self.pipeline.tied:
            grad = params[name].grad if name in params else None
            if grad is not None:
                local = grad.to_local() if isinstance(grad, DTensor) else grad
                dist.all_reduce(local, group=self.tied_group)

    def norm_params(self) -> list[torch.Tensor]:
        """The trainable parameters whose gradients count in the norm: a tied copy once (the first
        stage's)."""
        skip = set() if 0 in self.pipeline.indices else set(self.pipeline.tied)
        model = self.pipeline.model
        return [p for name, p in model.named_parameters() if p.requires_grad and name not in skip]


def clip_grad_norm(
    params: Sequence[torch.Tensor], counted: Sequence[torch.Tensor], max_norm: float, mesh: TrainMesh
) -> torch.Tensor:
    """Clip ``params``' gradients by the norm over every stage (``counted`` on this rank, summed
    over the pipeline ranks); returns that norm."""
    square = grad_norm(counted).double().pow(2)
    dist.all_reduce(square, group=mesh["pp"].get_group())
    total = square.sqrt().float()
    scale_to_norm_(params, max_norm, total)
    return total

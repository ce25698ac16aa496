"""Dataclass configs (model / data / train), loaded from YAML with dotted command-line overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmzoo.errors import MmzooError, nearest


@dataclass(frozen=True)
class RecomputeConfig:
    """Activation recompute for one tower (Megatron's terms).

    Attributes:
        granularity: ``none``; ``full`` (recompute whole layers in backward); ``selective``
            (recompute only the attention core of every layer).
        method: for ``full``: ``uniform`` (checkpoint every chunk of ``num_layers`` layers) or
            ``block`` (checkpoint only the first ``num_layers`` layers).
        num_layers: chunk size (uniform) or number of checkpointed layers (block).
    """

    granularity: Literal["none", "full", "selective"] = "none"
    method: Literal["uniform", "block"] = "uniform"
    num_layers: int = 1


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (LoRA, attached with ``peft``) on the model's linear layers.

    Attributes:
        r: adapter rank; 0 or null: no adapters (full fine-tuning).
        alpha: scaling numerator: an adapter adds ``B @ A * alpha / r`` to its layer's weight.
        dropout: dropout on the adapters' input.
        targets: the linear layers to adapt: groups ``text.attention``, ``text.mlp``,
            ``vision.attention``, ``vision.mlp``, ``projector``, or module names, each matching a
            module whose full name equals it, ends with ``.`` + it, or matches it in full as a
            regular expression.
        modules_to_save: modules trained in full beside the adapters (names matched as ``targets``).
    """

    r: int | None = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("text.attention", "text.mlp")
    modules_to_save: tuple[str, ...] = ()

    @property
    def enabled(self) -> bool:
        return bool(self.r)


# The family `mmzoo train` trains when no model is named (`model.name`): the embedded demo's.
DEFAULT_MODEL = "qwen2_5_vl"


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train and how.

    Attributes:
        name: registry name (``mmzoo list-models``); default ``qwen2_5_vl``, the embedded demo's.
        variant: size for random init (ignored when ``load`` is set: checkpoints then record the
            variant whose config the loaded model's equals, or null).
        load: a Hugging Face checkpoint directory (or Hub id ``org/name[@revision]``) or an mm
            checkpoint to start from.
        overrides: config fields to change for random init (nested dicts).
        tokenizer: tokenizer directory or Hub id (default: ``load`` when set, else the family's own).
        freeze: groups to freeze (``vision``, ``projector``, ``language``).
        recompute_vision, recompute_text: activation recompute per tower.
        lora: low-rank adapters: ``{r, alpha, dropout, targets, modules_to_save}`` (``r`` 0 or null:
            off; ``targets``: ``text.attention``, ``text.mlp``, ``vision.attention``, ``vision.mlp``,
            ``projector`` or module names, matched as a dotted suffix or a full regular expression);
            base weights frozen; needs ``pip install mmzoo[lora]``.
        load_adapter: a PEFT adapter directory (``adapter_config.json``) for ``load``'s Hugging
            Face model, fused into the model's layers as LoRA adapters (its settings replace ``lora``).
        text_backend: the LLM's implementation: ``native`` (mmzoo's layers) or ``megatron``
            (megatron-core's GPT layers and tensor parallel, same weights and names; with
            ``parallel.dp_shard``, ``tp`` and ``pp``; needs ``pip install mmzoo[megatron]``).
    """

    name: str = DEFAULT_MODEL
    variant: str = "tiny"
    load: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    tokenizer: str | None = None
    freeze: tuple[str, ...] = ()
    recompute_vision: RecomputeConfig = RecomputeConfig()
    recompute_text: RecomputeConfig = RecomputeConfig()
    lora: LoraConfig = LoraConfig()
    load_adapter: str | None = None
    text_backend: Literal["native", "megatron"] = "native"


@dataclass(frozen=True)
class DataConfig:
    """Where the training records are and how they become batches.

    Attributes:
        data: JSON/JSONL or parquet files, or ``datasets`` save_to_disk directories,
            comma-separated; ``demo`` is the bundled demo set.
        format: how to read ``data``: ``auto`` (by path: a directory is ``arrow``, ``*.parquet``
            is ``parquet``, anything else ``json``), or that reader for every entry.
        dataset_dir: base of relative media paths (default: each data file's directory).
        max_samples: keep at most this many records per data file.
        seq_length: tokens per packed row (or the longest padded row).
        packing: pack samples into rows with ``cu_seqlens`` (else pad each micro-batch).
        train_on_prompt: train on prompt tokens too (media tokens never).
        mask_history: train only the last assistant turn.
        strict: fail at the first bad record instead of skipping it.
        cache_dir: keep preprocessed samples here (None: no cache).
        num_workers: data-loader worker processes (0: the training process).
        media: options for the family's media processor (min_pixels, max_pixels, fps, ...).
        demo_media: lay ``media`` over the family's own options for the bundled demo (small
            images for a CPU; ``media`` keys win); on in the embedded default (no --config).
    """

    data: str = "demo"
    format: Literal["auto", "json", "parquet", "arrow"] = "auto"
    dataset_dir: str | None = None
    max_samples: int | None = None
    seq_length: int = 2048
    packing: bool = True
    train_on_prompt: bool = False
    mask_history: bool = False
    strict: bool = False
    cache_dir: str | None = None
    num_workers: int = 0
    media: dict[str, Any] = field(default_factory=dict)
    demo_media: bool = False


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, checkpoints and logging.

    Attributes:
        output_dir: checkpoints, metrics.jsonl and TensorBoard events go here (default:
            ``outputs/{model.name}-{model.variant}-demo``).
        steps: optimizer steps (0: ``epochs`` passes over the data).
        epochs: passes over the data when ``steps`` is 0 (a step never spans two epochs).
        micro_batch_size: samples per micro-batch; with ``data.packing`` on, packed rows of
            ``data.seq_length`` tokens per micro-batch (one sequence of at most their product).
        grad_accum: micro-batches per optimizer step (an epoch's last step may have fewer).
        lr: peak learning rate (after warmup).
        min_lr: final learning rate (the schedule decays to it).
        schedule: ``cosine``, ``linear`` or ``constant`` after warmup.
        warmup: warmup steps, or a fraction of all steps when below 1.
        weight_decay, betas, eps: AdamW.
        clip_grad: max gradient norm (0: no clipping).
        seed: seeds Python, NumPy and torch, and the data order.
        precision: ``fp32``, ``bf16`` (autocast) or ``fp16`` (autocast + loss scaling, CUDA).
        loss_reduction: ``default``, ``per_sample`` or ``per_token`` (see the README).
        device: ``auto``, ``cpu``, ``cuda`` or ``npu``.
        log_every: steps between progress lines.
        save_every: steps between checkpoints (0: only at the end).
        keep_last: keep only this many newest checkpoints (None: all).
        save_optimizer, save_rng: include optimizer / RNG state in checkpoints.
        load_optimizer, load_rng: restore optimizer / RNG state when resuming.
        on_nonfinite: ``stop`` at a NaN/inf loss, or ``skip`` that step's update.
        save_hf: also export the final model as a Hugging Face checkpoint here (LoRA adapters
            merged into the weights).
        save_peft: with LoRA, also export the final adapters as a PEFT adapter directory here
            (transformers' module names; load it with ``PeftModel.from_pretrained``).
        tensorboard: write TensorBoard events when ``tensorboard`` is installed.
    """

    output_dir: str | None = None
    steps: int = 0
    epochs: int = 1
    micro_batch_size: int = 1
    grad_accum: int = 1
    lr: float = 1e-5
    min_lr: float = 0.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 1.0
    seed: int = 42
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    loss_reduction: Literal["default", "per_sample", "per_token"] = "default"
    device: Literal["auto", "cpu", "cuda", "npu"] = "auto"
    log_every: int = 1
    save_every: int = 0
    keep_last: int | None = None
    save_optimizer: bool = True
    save_rng: bool = True
    load_optimizer: bool = True
    load_rng: bool = True
    on_nonfinite: Literal["stop", "skip"] = "stop"
    save_hf: str | None = None
    save_peft: str | None = None
    tensorboard: bool = True


@dataclass(frozen=True)
class ParallelConfig:
    """Training on many ranks (``torchrun``): one device mesh of pipeline (``pp``), data-parallel
    (``dp_shard``, FSDP2), context-parallel (``cp``) and tensor-parallel (``tp``) ranks, whose
    product is the number of ranks. One process ignores this section.

    Attributes:
        dp_shard: data-parallel (FSDP) ranks; 0: the ranks left over by ``tp * cp * pp``.
        tp: tensor-parallel ranks (the LLM's heads, MLP and vocabulary split over them).
        cp: context-parallel ranks (Ulysses: each holds 1/cp of every sequence).
        pp: pipeline stages.
        sequence_parallel: with ``tp`` > 1, keep activations between the tensor-parallel regions
            split along the sequence.
        pp_schedule: ``1f1b`` or ``interleaved`` (several stages per rank).
        vit_pp_layers: vision layers on each pipeline stage (MindSpeed-MM's ``vit_pp_layers``);
            empty: all on the first stage.
        llm_pp_layers: LLM layers on each pipeline stage; empty: spread evenly.
        offload: keep parameters, gradients and optimizer state in CPU memory between uses (for
            few devices; slower).
        reshard_after_forward: free each layer's gathered parameters after its forward (less
            memory; gathers them again for backward).
        timeout_s: seconds a collective may wait for the other ranks before the run fails.
    """

    dp_shard: int = 0
    tp: int = 1
    cp: int = 1
    pp: int = 1
    sequence_parallel: bool = True
    pp_schedule: Literal["1f1b", "interleaved"] = "1f1b"
    vit_pp_layers: tuple[int, ...] = ()
    llm_pp_layers: tuple[int, ...] = ()
    offload: bool = False
    reshard_after_forward: bool = True
    timeout_s: int = 1800


# The ``kernels`` section is a mapping, not a dataclass: plugins can register ops of their own.
KERNELS_DOC = (
    "op -> backend (`mmzoo_kernels`): `auto` (the default for an op not named: the best backend "
    "usable on the training device) or a backend name, for any registered op, e.g. "
    "{attention: flash, layer_norm: reference}; applied and printed at start, an unknown op or "
    "backend, or one that cannot run here, is an error that says why"
)


@dataclass(frozen=True)
class Config:
    """Everything ``mmzoo train`` needs. The defaults are the embedded CPU demo.

    ``kernels`` maps op names to backends (see :data:`KERNELS_DOC`).
    """

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    kernels: dict[str, str] = field(default_factory=dict)
    parallel: ParallelConfig = ParallelConfig()


# The embedded default: a tiny model on the bundled demo data, about a minute on a laptop CPU.
DEMO_OVERRIDES: dict[str, Any] = {
    "data": {"seq_length": 1024, "demo_media": True},
    # Enough to learn the demo answers by heart, so `mmzoo infer` on the result gives them back.
    "train": {"steps": 120, "lr": 1e-2, "min_lr": 2e-3, "warmup": 0.1, "weight_decay": 0.0, "save_every": 60},
}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against a field's type hint (converting int -> float, list -> tuple)."""
    if hint is Any:
        return value
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except MmzooError as exc:
                errors.append(str(exc))
        raise MmzooError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            choices = [str(a) for a in args]
            raise MmzooError(
                f"{key}: {value!r} is not one of {', '.join(choices)}{nearest(str(value), choices)}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise MmzooError(f"{key}: expected a list, got {value!r}")
        inner = args[0] if args and (len(args) == 2 and args[1] is Ellipsis) else None
        if inner is None and len(value) != len(args):  # a fixed-length tuple such as betas
            raise MmzooError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        items = [_coerce(v, inner or args[i], f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise MmzooError(f"{key}: expected a mapping, got {value!r}")
        if len(args) != 2:
            return dict(value)
        return {_coerce(k, args[0], key): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise MmzooError(
                f"{key}: expected a mapping of {', '.join(f.name for f in dataclasses.fields(hint))}"
            )
        return merge(typing.cast(Any, hint)(), value, f"{key}.")
    if hint is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML reads 2e-5 (no dot) as a string
            return float(value)
        except ValueError:
            raise MmzooError(f"{key}: expected a number, got {value!r}") from None
    if hint is bool and not isinstance(value, bool):
        raise MmzooError(f"{key}: expected true or false, got {value!r}")
    if isinstance(hint, type) and (
        not isinstance(value, hint) or (isinstance(value, bool) and hint is not bool)  # True is an int
    ):
        raise MmzooError(f"{key}: expected {hint.__name__}, got {value!r}")
    return value


def merge(config: Any, values: dict[str, Any], where: str = "") -> Any:
    """A copy of dataclass ``config`` with ``values`` merged in (nested dicts merge recursively).

    Unknown keys are errors that name the nearest known key.
    """
    if not isinstance(values, dict):
        raise MmzooError(f"{where.rstrip('.') or 'config'}: expected a mapping, got {values!r}")
    hints = _hints(type(config))
    changes: dict[str, Any] = {}
    for key, value in values.items():
        if key not in hints:
            full = [f"{where}{k}" for k in hints]
            raise MmzooError(f"unknown config key '{where}{key}'{nearest(where + key, full)}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = merge(current, value, f"{where}{key}.")
        elif isinstance(current, dict) and isinstance(value, dict) and key != "overrides":
            changes[key] = _coerce({**current, **value}, hints[key], f"{where}{key}")
        else:
            changes[key] = _coerce(value, hints[key], f"{where}{key}")
    return dataclasses.replace(config, **changes)


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """``["--train.lr", "2e-5", "--data.packing=false"]`` -> nested dict (values parsed as YAML)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise MmzooError(f"unexpected argument '{arg}'; overrides look like --section.key VALUE")
        key, eq, raw = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args):
                raise MmzooError(f"override --{key} needs a value")
            raw = args[i + 1]
            i += 1
        i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise MmzooError(f"override --{key} conflicts with another override")
        node[parts[-1]] = value
    return out


def with_derived_defaults(config: Config) -> Config:
    """``config`` with the defaults that depend on the chosen model filled in (``train.output_dir``)."""
    if config.train.output_dir is not None:
        return config
    output_dir = f"outputs/{config.model.name}-{config.model.variant}-demo"
    return dataclasses.replace(config, train=dataclasses.replace(config.train, output_dir=output_dir))


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, values: dict[str, Any] | None = None
) -> Config:
    """The config: defaults (the embedded demo when no file is given), the YAML file, the
    ``--section.key`` overrides, then ``values`` (e.g. from command-line flags); the defaults that
    depend on the model last."""
    config = Config()
    if path is None:
        config = merge(config, DEMO_OVERRIDES)
    else:
        file = Path(path)
        if not file.is_file():
            raise MmzooError(f"config file {file} does not exist")
        try:
            from_file = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as exc:
            raise MmzooError(f"{file}: not valid YAML: {str(exc).splitlines()[0]}") from exc
        config = merge(config, from_file)
    if overrides:
        config = merge(config, parse_overrides(overrides))
    if values:
        config = merge(config, values)
    return with_derived_defaults(config)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain dict of a config (tuples as lists), ready for YAML or JSON."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> its description, from the ``Attributes:`` section of ``cls``'s docstring.

    A line ``a, b: text`` describes both ``a`` and ``b``; deeper-indented lines continue it.
    """
    docs: dict[str, str] = {}
    names: list[str] = []
    indent = None
    for line in (cls.__doc__ or "").splitlines():
        text = line.strip()
        if text == "Attributes:":
            indent = -1
        elif indent is not None and text:
            depth = len(line) - len(line.lstrip())
            if indent == -1:
                indent = depth
            if depth == indent:
                head, _, text = text.partition(": ")
                names = [name.strip() for name in head.split(",")]
                docs.update(dict.fromkeys(names, text))
            elif depth > indent:
                docs.update({name: f"{docs[name]} {text}" for name in names})
            else:
                break
    return {name: text.replace("``", "`") for name, text in docs.items()}


def dump(config: Config) -> str:
    """YAML of every key with its value, each followed by its description as a comment."""
    lines = []
    for section in dataclasses.fields(config):
        value = getattr(config, section.name)
        if isinstance(value, dict):  # kernels: op -> backend, one line per op named
            lines.append(f"{section.name}:{'' if value else ' {}'}  # {KERNELS_DOC}")
            lines.extend(f"  {op}: {backend}" for op, backend in value.items())
            continue
        docs = field_docs(type(value))
        lines.append(f"{section.name}:")
        for key, item in to_dict(value).items():
            # One line per key: the flow form of {key: value}, braces dropped.
            line = yaml.safe_dump({key: item}, default_flow_style=True, width=1 << 20).strip()[1:-1]
            lines.append(f"  {line}  # {docs[key]}" if key in docs else f"  {line}")
    return "\n".join(lines) + "\n"

"""The model registry: ``ModelSpec`` entries registered by plugins through ``mmzoo_register_models``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from mmzoo import protocols
from mmzoo.errors import MmzooError, nearest
from mmzoo.nn import TextDecoder
from mmzoo.plugins import PluginInfo, PluginManager, get_manager


@dataclass(frozen=True)
class ModelSpec:
    """Everything mmzoo needs to know about one model family.

    The builders receive the family's config object (one of ``variants`` or one made by
    ``config_from_hf``) and return ready-built modules; :class:`mmzoo.model.VLModel`
    composes them. Parts a family does not provide yet are ``None``. The typed parts follow
    :mod:`mmzoo.protocols` and are checked when the plugin registers.

    Attributes:
        name: registry name, e.g. ``"qwen2_5_vl"``.
        variants: variant name -> config object (a frozen dataclass: :class:`mmzoo.protocols.FamilyConfig`).
        build_vision_encoder: config -> module ``media batch -> (N, C) features``.
        build_projector: config -> module ``(N, C) -> (tokens, hidden)``.
        build_text_decoder: config -> :class:`mmzoo.nn.TextDecoder`.
        position_ids: ``(config, input_ids, attention_mask=None, media=None) -> (rows, B, S)``
            position ids (:class:`mmzoo.protocols.PositionIds`; M-RoPE has 3 rows).
        feature_slots: ``(config, media batch) -> [(token_id, count), ...]``: how the projector's
            output rows split over placeholder ids, in order.
        weight_mapping: config -> :class:`mmzoo.convert.mapping.WeightMapping` (HF <-> mm names).
        config_from_hf: HF ``config.json`` dict -> config object.
        config_to_hf: config object -> HF ``config.json`` dict (the inverse of ``config_from_hf``;
            ``dtype`` is added by the writer); ``None`` when the family cannot export.
        loss: ``(hidden (T, H), output_weight (V, H), labels (T,), cu_seqlens, reduction) -> loss``
            (see :func:`mmzoo.loss.causal_lm_loss`).
        example_batch: config -> ``{"input_ids", "labels", "media"}``, a small input with media
            (for tests and benchmarks).
        hf_architectures: the ``architectures`` entries of HF config.json this family reads.
        freeze_groups: group name -> module-name prefixes in the mm state dict.
        template: the chat template (:class:`mmzoo.protocols.Template`).
        media_processor: ``(config, **options) ->`` :class:`mmzoo.protocols.MediaProcessor`.
        default_tokenizer: ``() -> tokenizer`` used when no checkpoint gives one (demo, tests).
        init_weights: ``(model, config) -> None``, run (under ``no_grad``) after the random init by
            module type (:func:`mmzoo.nn.init.init_weights`) to set what that leaves: parameters
            registered directly on a module (class token, position embeddings, layer scale), or
            a layer that needs another init; ``None`` when the type rules suffice.
        mm_converters: the MindSpeed-MM converter class names this family answers to in
            ``mm-convert <Converter> ...``, e.g. ``("Qwen2_5_VLConverter",)``.
        demo_media: media processor options for the bundled demo (small sizes for a CPU run);
            ``data.media`` is laid over them when ``data.demo_media`` is on (the embedded default).
    """

    name: str
    variants: Mapping[str, Any]
    build_vision_encoder: Callable[[Any], nn.Module]
    build_projector: Callable[[Any], nn.Module]
    build_text_decoder: Callable[[Any], TextDecoder]
    position_ids: Callable[..., Any]
    feature_slots: Callable[[Any, Mapping[str, Any]], list[tuple[int, int]]]
    weight_mapping: Callable[[Any], Any]
    config_from_hf: Callable[[dict], Any]
    loss: Callable[..., Any]
    example_batch: Callable[[Any], dict[str, Any]]
    hf_architectures: tuple[str, ...] = ()
    freeze_groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    template: Any = None
    media_processor: Any = None
    default_tokenizer: Callable[[], Any] | None = None
    config_to_hf: Callable[[Any], dict] | None = None
    description: str = ""
    init_weights: Callable[[nn.Module, Any], None] | None = None
    mm_converters: tuple[str, ...] = ()
    demo_media: Mapping[str, Any] = field(default_factory=dict)

    PARTS = (
        "build_vision_encoder",
        "build_projector",
        "build_text_decoder",
        "weight_mapping",
        "loss",
        "template",
        "media_processor",
        "position_ids",
        "feature_slots",
    )

    def parts(self) -> dict[str, str | None]:
        """Part name -> qualified name of the object providing it (``None`` when absent)."""
        out: dict[str, str | None] = {}
        for attr in self.PARTS:
            obj = getattr(self, attr)
            key = attr.removeprefix("build_")
            if obj is None:
                out[key] = None
            elif isinstance(obj, str):
                out[key] = obj
            elif not callable(obj) and hasattr(obj, "name"):  # e.g. a chat template instance
                out[key] = f"{obj.name} ({type(obj).__module__}.{type(obj).__qualname__})"
            else:
                out[key] = (
                    f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"
                )
        return out

    def variant(self, name: str) -> Any:
        """The config of variant ``name``; an unknown name is an error listing the variants."""
        if name not in self.variants:
            raise MmzooError(
                f"model '{self.name}' has no variant '{name}'{nearest(name, self.variants)}; "
                f"variants: {', '.join(self.variants)}"
            )
        return self.variants[name]

    def variant_of(self, config: Any) -> str | None:
        """The name of the variant whose config equals ``config`` (e.g. one read from an HF
        checkpoint), or ``None`` when it matches none."""
        return next((name for name, known in self.variants.items() if known == config), None)


def check_parts(spec: ModelSpec, plugin: str) -> None:
    """Every typed part of ``spec`` has the members its protocol names, else an error naming
    ``plugin``, the part and what it lacks. The media processor is checked on one built for the
    first variant."""
    if not spec.variants:
        raise MmzooError(f"plugin {plugin} registered model '{spec.name}' with no variants")
    where = f"plugin {plugin}: model '{spec.name}'"
    first = next(iter(spec.variants.values()))
    parts: list[tuple[str, Any, type]] = [
        (f"variant config {type(first).__name__}", first, protocols.FamilyConfig),
        ("position_ids", spec.position_ids, protocols.PositionIds),
        ("template", spec.template, protocols.Template),
        ("media_processor", spec.media_processor, protocols.MediaProcessor),
    ]
    for what, obj, protocol in parts:
        if obj is None:
            continue
        if protocol is protocols.MediaProcessor:
            try:
                obj = obj(first)
            except Exception as exc:
                raise MmzooError(f"{where}: media_processor(config) failed: {exc}") from exc
        missing = protocols.missing_members(obj, protocol)
        if missing:
            raise MmzooError(
                f"{where}: its {what} lacks {', '.join(missing)} "
                f"(see mmzoo.protocols.{protocol.__name__} and docs/plugins.md)"
            )


@dataclass(frozen=True)
class Registered:
    """A registered spec and the plugin that supplied it."""

    spec: ModelSpec
    plugin: PluginInfo


_models: tuple[PluginManager, dict[str, Registered]] | None = None


def reset() -> None:
    """Forget the registered models (they are collected again on next use)."""
    global _models
    _models = None


def _collect() -> dict[str, Registered]:
    """The models the current plugin manager's plugins register (again after a plugin reset)."""
    global _models
    manager = get_manager()
    if _models is not None and _models[0] is manager:
        return _models[1]
    models: dict[str, Registered] = {}
    for plugin, impl in manager.hookimpls("mmzoo_register_models"):

        def register(spec: ModelSpec, _plugin: PluginInfo = plugin) -> None:
            if not isinstance(spec, ModelSpec):
                raise MmzooError(f"plugin {_plugin.label} registered {spec!r}, which is not a ModelSpec")
            if spec.name in models:
                other = models[spec.name].plugin
                raise MmzooError(
                    f"model '{spec.name}' is registered by two plugins: {other.label} and {_plugin.label}; "
                    f"uninstall one or block it with MMZOO_BLOCK_PLUGINS"
                )
            check_parts(spec, _plugin.label)
            models[spec.name] = Registered(spec, _plugin)

        try:
            impl(register=register)
        except MmzooError:
            raise
        except Exception as exc:
            raise MmzooError(f"plugin {plugin.label} failed while registering models: {exc}") from exc
    _models = (manager, models)
    return models


def all_models(pattern: str | None = None) -> list[Registered]:
    """Registered models sorted by name, optionally filtered by a glob/substring ``pattern``."""
    models = sorted(_collect().values(), key=lambda r: r.spec.name)
    if pattern:
        glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
        models = [r for r in models if fnmatch.fnmatch(r.spec.name, glob)]
    return models


def get_model(name: str) -> ModelSpec:
    """The spec registered as ``name``; an unknown name lists what is installed."""
    models = _collect()
    if name not in models:
        installed = ", ".join(sorted(models)) or "none"
        raise MmzooError(
            f"no model named '{name}'{nearest(name, models)}; installed: {installed}. "
            f"Install its plugin (e.g. pip install mmzoo-{name}) and check `mmzoo plugins`"
        )
    return models[name].spec


def model_plugin(name: str) -> PluginInfo:
    """The plugin that registered model ``name`` (its distribution and version)."""
    get_model(name)  # an unknown name is the usual error
    return _collect()[name].plugin


def model_for_architecture(architecture: str) -> ModelSpec:
    """The spec whose ``hf_architectures`` include ``architecture``."""
    for registered in _collect().values():
        if architecture in registered.spec.hf_architectures:
            return registered.spec
    known = sorted(a for r in _collect().values() for a in r.spec.hf_architectures)
    raise MmzooError(
        f"no installed plugin reads the architecture '{architecture}'; readable: {', '.join(known) or 'none'}"
    )


def model_for_converter(converter: str) -> ModelSpec:
    """The spec whose ``mm_converters`` include ``converter`` (a MindSpeed-MM class name).

    Raises:
        MmzooError: no installed family, or two, declare ``converter``; the message lists them.
    """
    claims = [r for r in _collect().values() if converter in r.spec.mm_converters]
    if len(claims) > 1:
        raise MmzooError(
            f"converter '{converter}' is declared by "
            + " and ".join(f"model '{r.spec.name}' of plugin {r.plugin.label}" for r in claims)
            + "; uninstall one or block it with MMZOO_BLOCK_PLUGINS"
        )
    if claims:
        return claims[0].spec
    known = {name: r.spec.name for r in _collect().values() for name in r.spec.mm_converters}
    listed = ", ".join(f"{name} ({model})" for name, model in sorted(known.items())) or "none"
    raise MmzooError(f"unknown converter '{converter}'{nearest(converter, known)}; installed: {listed}")

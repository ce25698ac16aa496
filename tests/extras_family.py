"""A throwaway family for tests: Qwen2.5-VL whose projector carries the extra state any family may
have, registered as a plugin (see ``throwaway_plugin.install``).

``Extras`` holds a non-persistent buffer (``ones``, recomputed by ``reset_parameters``), a
persistent buffer (``marker``, in the checkpoint), layers the random init knows by type (Conv2d,
LayerNorm), one it knows by its ``reset_parameters`` (:class:`Scale`), and a class token only the
family's ``init_weights`` hook sets. The weight mapping carries all of them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from throwaway_plugin import installed_family
from torch import nn

import mmzoo
from mmzoo.convert.mapping import Rule
from mmzoo_qwen2_5_vl.config import config_to_hf
from mmzoo_qwen2_5_vl.plugin import SPEC as QWEN
from mmzoo_qwen2_5_vl.vision import PatchMerger

NAME = "extras_vl"
ARCHITECTURE = "ExtrasVLForTests"
CONVERTER = "ExtrasVLConverter"  # lowercased, not the registry name
# A small vocabulary keeps checkpoints of the tiny variant small (the placeholder ids do not matter
# for loading).
SMALL = {"text": {"vocab_size": 512}}


CLS_VALUE = 0.25  # what the family's init hook gives the class token
SCALE_VALUE = 0.5  # what Scale.reset_parameters gives its parameter


class Scale(nn.Module):
    """A layer scale that initialises itself."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(size))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, SCALE_VALUE)


class Extras(nn.Module):
    """State beside the usual weights."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.register_buffer("ones", torch.ones(1), persistent=False)
        self.register_buffer("marker", torch.arange(4.0))
        self.cls_token = nn.Parameter(torch.zeros(1, hidden))
        self.conv = nn.Conv2d(3, 64, kernel_size=4)  # 3,072 weights: their std is measurable
        self.norm = nn.LayerNorm(hidden)
        self.scale = Scale(hidden)

    def reset_parameters(self) -> None:
        self.ones.fill_(1.0)


def init_weights(model, config) -> None:
    """The family's init hook: what the type rules do not know."""
    model.image_encoder.projector.extras.cls_token.fill_(CLS_VALUE)


class ExtrasMerger(PatchMerger):
    """Qwen's PatchMerger (same names and forward) holding :class:`Extras`."""

    def __init__(self, vision) -> None:
        super().__init__(vision)
        self.extras = Extras(vision.hidden_size)


EXTRA_TENSORS = (
    "marker",
    "cls_token",
    "conv.weight",
    "conv.bias",
    "norm.weight",
    "norm.bias",
    "scale.gamma",
)


def _mapping(config):
    mapping = QWEN.weight_mapping(config)
    extra = [
        Rule(f"image_encoder.projector.extras.{n}", (f"visual.merger.extras.{n}",), place="vision:last")
        for n in EXTRA_TENSORS
    ]
    return dataclasses.replace(mapping, rules=[*mapping.rules, *extra])


SPEC = dataclasses.replace(
    QWEN,
    name=NAME,
    hf_architectures=(ARCHITECTURE,),
    build_projector=lambda config: ExtrasMerger(config.vision),
    weight_mapping=_mapping,
    config_to_hf=lambda config: {**config_to_hf(config), "architectures": [ARCHITECTURE]},
    init_weights=init_weights,
    mm_converters=(CONVERTER,),
)


@mmzoo.hookimpl
def mmzoo_register_models(register):
    register(SPEC)


@pytest.fixture(name="extras")
def extras_fixture(tmp_path, monkeypatch):
    """This family installed as a plugin beside the real ones; gives its spec."""
    yield from installed_family(tmp_path, monkeypatch, "extras_family", NAME)

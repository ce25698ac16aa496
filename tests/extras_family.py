"""A throwaway family for tests: Qwen2.5-VL whose projector carries the extra state any family may
have, registered as a plugin (see ``throwaway_plugin.install``).

``Extras`` holds a non-persistent buffer (``ones``, recomputed by ``reset_parameters``) and a
persistent buffer (``marker``, in the checkpoint); the weight mapping carries ``marker``.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

import mmzoo
from mmzoo.convert.mapping import Rule
from mmzoo_qwen2_5_vl.config import config_to_hf
from mmzoo_qwen2_5_vl.plugin import SPEC as QWEN
from mmzoo_qwen2_5_vl.vision import PatchMerger

NAME = "extras_vl"
ARCHITECTURE = "ExtrasVLForTests"
# A small vocabulary keeps checkpoints of the tiny variant small (the placeholder ids do not matter
# for loading).
SMALL = {"text": {"vocab_size": 512}}
PLUGIN_BODY = "from extras_family import mmzoo_register_models\n"


class Extras(nn.Module):
    """State beside the weights: a buffer recomputed after loading and one the checkpoint holds."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("ones", torch.ones(1), persistent=False)
        self.register_buffer("marker", torch.arange(4.0))

    def reset_parameters(self) -> None:
        self.ones.fill_(1.0)


class ExtrasMerger(PatchMerger):
    """Qwen's PatchMerger (same names and forward) holding :class:`Extras`."""

    def __init__(self, vision) -> None:
        super().__init__(vision)
        self.extras = Extras()


def _mapping(config):
    mapping = QWEN.weight_mapping(config)
    extra = [
        Rule("image_encoder.projector.extras.marker", ("visual.merger.extras.marker",), place="vision:last")
    ]
    return dataclasses.replace(mapping, rules=[*mapping.rules, *extra])


SPEC = dataclasses.replace(
    QWEN,
    name=NAME,
    hf_architectures=(ARCHITECTURE,),
    build_projector=lambda config: ExtrasMerger(config.vision),
    weight_mapping=_mapping,
    config_to_hf=lambda config: {**config_to_hf(config), "architectures": [ARCHITECTURE]},
)


@mmzoo.hookimpl
def mmzoo_register_models(register):
    register(SPEC)

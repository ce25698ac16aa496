"""Parity-test helpers for model families: weights that make a wrong part visible, and a check
that the tolerance used can tell a wrong part at all (a negative control).

At transformers' default init (std 0.02, norms at 1, biases at 0) many mistakes move a tiny
model's logits by less than a typical tolerance: swapping the vision activation gelu for
quick_gelu moves them by about 8e-5. A parity test therefore spreads the weights first and
shows that a deliberately broken model fails the same comparison. The kit every family's
parity tests use::

    pair = parity_pair(Qwen2_5_VLForConditionalGeneration, hf_config, tmp_path)
    # pair.reference: transformers' model with spread weights; pair.ours: mmzoo.load_model of
    # the checkpoint it saved
    assert_parity(ours_logits, reference_logits,
                  controls={"quick_gelu": broken_logits}, atol=1e-5, rtol=1e-4)
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@torch.no_grad()
def spread_weights_(module: nn.Module, std: float = 0.08, seed: int = 0) -> nn.Module:
    """Redraw ``module``'s floating-point parameters so that every part moves the output.

    A parameter initialised to a constant (norm scales at 1, biases at 0) becomes that constant
    plus ``N(0, std)`` noise; any other parameter is redrawn from ``N(0, std)``. Buffers are left
    alone. Deterministic for a given ``seed`` and parameter order.

    Returns:
        ``module``, changed in place.
    """
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        if not param.is_floating_point():
            continue
        noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
        flat = param.detach().flatten()
        base = flat[0].item() if flat.numel() and bool((flat == flat[0]).all()) else 0.0
        param.copy_(noise.add_(base).to(param.dtype))
    return module


@torch.no_grad()
def spread_adapters_(model: nn.Module, seed: int = 3) -> None:
    """Redraw ``model``'s LoRA adapters (``lora_A``, ``lora_B``) from ``N(0, 0.1)``: adapters as
    after training (``lora_B`` starts at zero, which would hide any mistake)."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_" in name:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.1)


def deviation(actual: torch.Tensor, expected: torch.Tensor, *, atol: float, rtol: float) -> float:
    """The worst ``|actual - expected| / (atol + rtol * |expected|)``: at most 1 means close."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float(((actual - expected).abs() / (atol + rtol * expected.abs())).max())


def assert_parity(
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    controls: Mapping[str, torch.Tensor],
    atol: float,
    rtol: float,
    margin: float = 10.0,
) -> None:
    """Assert ``actual`` matches ``expected`` and that every negative control does not.

    Args:
        actual: the output under test.
        expected: the reference output.
        controls: outputs of deliberately broken models, by a name saying what is broken. Each
            must miss ``expected`` by more than ``margin`` times the tolerance, so that the
            comparison could have caught that mistake with room to spare.
        atol, rtol: the tolerance, as in :func:`torch.testing.assert_close`.
        margin: how far past the tolerance a control must land.

    Raises:
        AssertionError: ``actual`` is not close, or a control is (the test cannot fail).
    """
    if not controls:
        raise AssertionError("assert_parity needs at least one negative control")
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    for name, broken in controls.items():
        seen = deviation(broken, expected, atol=atol, rtol=rtol)
        if seen <= margin:
            raise AssertionError(
                f"negative control {name!r} lands within {seen:.3g}x the tolerance (needs > {margin}x): "
                "the comparison cannot tell that part is wrong; spread the weights (spread_weights_) "
                "or tighten the tolerance"
            )


@dataclass
class ParityPair:
    """A reference model and mmzoo's model of the same weights.

    Attributes:
        reference: the reference (transformers) model, in eval mode, weights spread.
        ours: :func:`mmzoo.load_model` of the checkpoint the reference saved, in eval mode.
        directory: that checkpoint.
    """

    reference: nn.Module
    ours: nn.Module
    directory: Path


def parity_pair(
    model_class: Any, config: Any, directory: str | Path, *, std: float = 0.08, seed: int = 0
) -> ParityPair:
    """Build ``model_class(config)`` (e.g. a transformers ``...ForConditionalGeneration``), spread
    its weights (:func:`spread_weights_`), ``save_pretrained`` it to ``directory`` and load it
    back with mmzoo: the two sides of a parity test, equal by construction if mmzoo is right."""
    from mmzoo.api import load_model  # the checkpoint layer: imported when a test asks for it

    torch.manual_seed(seed)
    reference = spread_weights_(model_class(config).eval(), std=std, seed=seed)
    directory = Path(directory)
    reference.save_pretrained(directory)  # type: ignore[operator]  # a transformers model
    return ParityPair(reference, load_model(directory).eval(), directory)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now, for a test's ``MASTER_PORT``.

    Fixed or hashed ports collide with other runs on a shared machine (a gloo group then dies).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]

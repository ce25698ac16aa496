"""Initialisation: random init by module type and the family's hook; buffers after meta-device
loading (every loading path)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from extras_family import CLS_VALUE, NAME, SCALE_VALUE, SMALL
from torch import nn

import mmzoo
from mmzoo.checkpoint.conversion import hf_to_mm
from mmzoo.checkpoint.hf_export import save_hf
from mmzoo.config import load_config
from mmzoo.convert.parallel import depths
from mmzoo.distributed.env import World
from mmzoo.distributed.mesh import MeshShape, TrainMesh
from mmzoo.nn import RMSNorm
from mmzoo.nn.init import materialize
from mmzoo.testing import free_port
from mmzoo.train.loop import _sharded_model


@pytest.fixture
def poisoned(monkeypatch):
    """``to_empty`` leaves NaN (integers: -7) in every tensor instead of whatever memory held, so
    a tensor loading forgets is always wrong, never right by chance."""
    original = nn.Module.to_empty

    def to_empty(self, *, device, recurse=True):
        out = original(self, device=device, recurse=recurse)
        with torch.no_grad():
            for tensor in [*self.parameters(), *self.buffers()]:
                tensor.fill_(float("nan") if tensor.is_floating_point() else -7)
        return out

    monkeypatch.setattr(nn.Module, "to_empty", to_empty)


def _checkpoints(name, tmp_path, **overrides):
    """A model built normally with a persistent buffer away from its constructor value, and that
    model saved as an HF directory and as an mm checkpoint split over two pipeline stages."""
    torch.manual_seed(0)
    model = mmzoo.build_model(name, **overrides)
    marker = getattr(model.image_encoder.projector, "extras", None)
    if marker is not None:
        marker.marker.copy_(torch.tensor([5.0, 6.0, 7.0, 8.0]))
    hf = save_hf(model, tmp_path / "hf")
    stacks = depths(mmzoo.get_model(name).weight_mapping(model.config))
    depth, layers = stacks["vision"], stacks["text"]
    mm = hf_to_mm(
        hf, tmp_path / "mm", vit_pp_layers=[depth, 0], llm_pp_layers=[1, layers - 1], report=lambda line: None
    )
    return model, {"hf": hf, "mm": mm}


def _assert_same_state(loaded: nn.Module, built: nn.Module) -> None:
    buffers = dict(built.named_buffers())
    assert dict(loaded.named_buffers()).keys() == buffers.keys()
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffer, buffers[name]), name
    built_state = built.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, built_state[name]), name


@pytest.mark.parametrize("kind", ["hf", "mm"])
def test_buffers_survive_load_model(extras, poisoned, tmp_path, kind):
    """The non-persistent buffer is recomputed, the persistent one comes from the checkpoint."""
    model, paths = _checkpoints(NAME, tmp_path, **SMALL)
    loaded = mmzoo.load_model(paths[kind])
    extras_ = loaded.image_encoder.projector.extras
    assert extras_.ones.tolist() == [1.0]
    assert extras_.marker.tolist() == [5.0, 6.0, 7.0, 8.0]
    _assert_same_state(loaded, model)


@pytest.mark.parametrize("kind", ["hf", "mm"])
def test_every_registered_family_loads_the_buffers_it_builds(poisoned, tmp_path, kind):
    """Qwen2.5-VL (whose rotary angles are computed per call, from no buffer) and any other
    registered family: after loading, every buffer and weight equals the model built normally."""
    for registered in mmzoo.all_models():
        name = registered.spec.name
        model, paths = _checkpoints(name, tmp_path / name, text={"vocab_size": 512})
        _assert_same_state(mmzoo.load_model(paths[kind]), model)


def test_the_sharded_path_recomputes_and_loads_buffers(extras, poisoned, tmp_path):
    """Loading for FSDP (meta device, sharded, then filled) on a 1-rank gloo group."""
    _, paths = _checkpoints(NAME, tmp_path, **SMALL)
    cfg = load_config(None, ["--model.name", NAME, "--model.load", str(paths["hf"])])
    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = TrainMesh.build(MeshShape(), torch.device("cpu"))
        model, _ = _sharded_model(cfg, extras, World(), mesh, torch.device("cpu"))
        extras_ = model.image_encoder.projector.extras
        assert extras_.ones.tolist() == [1.0]
        assert extras_.marker.tolist() == [5.0, 6.0, 7.0, 8.0]
    finally:
        dist.destroy_process_group()


class _Cache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.arange(3.0), persistent=False)


def test_a_non_persistent_buffer_needs_reset_parameters():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(2, 2), _Cache())
    with pytest.raises(
        mmzoo.MmzooError, match=r"_Cache '1' has non-persistent buffers table but no reset_parameters"
    ):
        materialize(model, "cpu")


def _weights(model: nn.Module, kind: type) -> torch.Tensor:
    return torch.cat([m.weight.flatten() for m in model.modules() if type(m) is kind])


def _biases(model: nn.Module, kinds: tuple[type, ...]) -> torch.Tensor:
    return torch.cat(
        [m.bias.flatten() for m in model.modules() if isinstance(m, kinds) and m.bias is not None]
    )


def test_random_init_by_module_type_then_the_family_hook(extras):
    torch.manual_seed(0)
    model = mmzoo.build_model(NAME, **SMALL)
    for kind in (nn.Linear, nn.Embedding, nn.Conv2d, nn.Conv3d):
        # torch's own inits (kaiming uniform, normal(0, 1)) are 4x to 50x wider at these sizes
        assert _weights(model, kind).std().item() == pytest.approx(0.02, rel=0.05), kind
    assert not _biases(model, (nn.Linear, nn.Conv2d, nn.LayerNorm)).any()
    for kind in (nn.LayerNorm, RMSNorm):
        assert torch.equal(_weights(model, kind), torch.ones_like(_weights(model, kind))), kind
    extras_ = model.image_encoder.projector.extras
    assert (extras_.scale.gamma == SCALE_VALUE).all()  # its reset_parameters ran
    assert (extras_.cls_token == CLS_VALUE).all()  # the family's init_weights hook ran, after

"""An mm checkpoint split for tensor parallel loads on a mesh with the same ``tp``, each rank
reading tensors from its own shard only (4 spawned processes: dp_shard 2 x tp 2, gloo)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import mmzoo
from mmzoo.testing import free_port


def _load_rank(rank: int, port: int, work: str) -> None:
    import torch.distributed as dist

    from mmzoo.api import open_weights
    from mmzoo.checkpoint.sources import MMSource
    from mmzoo.checkpoint.weights import fill_parameters
    from mmzoo.config import ParallelConfig
    from mmzoo.distributed.fsdp import shard_model
    from mmzoo.distributed.mesh import FSDP_DIM, MeshShape, TrainMesh
    from mmzoo.distributed.parallelize import parallelize
    from mmzoo.nn.init import materialize
    from mmzoo.nn.tp_layout import held_row_orders

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=4)
    root = Path(work)
    expected = mmzoo.load_model(root / "hf").state_dict()
    weights = open_weights(root / "mm")
    model = weights.empty_model()
    mesh = TrainMesh.build(MeshShape(dp_shard=2, tp=2), torch.device("cpu"))
    parallelize(model, mesh, ParallelConfig(tp=2))
    shard_model(model, mesh[FSDP_DIM])
    materialize(model, torch.device("cpu"))
    shards: dict[str, set[str]] = {"text": set(), "all": set()}
    read = MMSource._read

    def recorded(self, shard, stored):
        shards["all"].add(shard.name)
        if stored.startswith("text_decoder."):
            shards["text"].add(shard.name)
        return read(self, shard, stored)

    MMSource._read = recorded  # type: ignore[method-assign]
    fill_parameters(model, weights)
    orders = held_row_orders(model)
    worst = 0.0
    for name, param in model.state_dict().items():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        want = expected[name].index_select(0, orders[name]) if name in orders else expected[name]
        worst = max(worst, float((full - want).abs().max()))
    (root / f"rank_{rank}.json").write_text(
        json.dumps({"shards": {k: sorted(v) for k, v in shards.items()}, "worst": worst})
    )
    dist.destroy_process_group()


@pytest.mark.slow
def test_each_rank_reads_its_own_tensor_parallel_shard(tmp_path):
    import torch.multiprocessing as mp

    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.cli import main
    from mmzoo.testing import spread_weights_

    torch.manual_seed(5)
    save_hf(spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny"), std=0.05), tmp_path / "hf")
    convert = ["convert", "hf-to-mm", "--hf-dir", str(tmp_path / "hf"), "--mm-dir", str(tmp_path / "mm")]
    assert main([*convert, "--tp", "2"]) == 0
    mp.spawn(_load_rank, args=(free_port(), str(tmp_path)), nprocs=4)
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(4)]
    # tp is the innermost mesh dimension: ranks 0 and 2 are tensor-parallel rank 0, 1 and 3 rank 1.
    # The LLM (tensor parallel) comes from the rank's own shard; the vision encoder, split by the
    # checkpoint but only sharded by FSDP here, from the shards that hold each rank's FSDP rows.
    assert [r["shards"]["text"] for r in ranks] == [["mp_rank_00"], ["mp_rank_01"]] * 2
    assert all(r["shards"]["all"] for r in ranks)
    assert [r["worst"] for r in ranks] == [0.0] * 4

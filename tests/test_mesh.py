"""The device mesh a run asks for: its shape, and the layouts refused before any work."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmzoo.config import ParallelConfig
from mmzoo.distributed.mesh import MeshShape, TrainMesh, check_text_decoder, mesh_shape
from mmzoo.errors import MmzooError
from mmzoo.nn.decoder import DecoderConfig

# Qwen2.5-VL 7B's LLM (FACTS): 28 layers, 28 heads, 4 KV heads.
LLM_7B = DecoderConfig(
    vocab_size=152064, hidden_size=3584, ffn_hidden_size=18944, num_layers=28, num_heads=28, num_kv_heads=4
)


@pytest.mark.parametrize(
    ("settings", "ranks", "expected"),
    [
        ({}, 1, MeshShape()),
        ({}, 8, MeshShape(dp_shard=8)),
        ({"tp": 2}, 8, MeshShape(dp_shard=4, tp=2)),
        ({"tp": 2, "pp": 2}, 16, MeshShape(pp=2, dp_shard=4, tp=2)),
        ({"tp": 2, "cp": 2}, 16, MeshShape(dp_shard=4, cp=2, tp=2)),
        ({"pp": 2, "cp": 2}, 8, MeshShape(pp=2, dp_shard=2, cp=2)),
        ({"dp_shard": 2, "cp": 2}, 4, MeshShape(dp_shard=2, cp=2)),
    ],
)
def test_dp_shard_zero_takes_the_ranks_left_over(settings, ranks, expected):
    assert mesh_shape(ParallelConfig(**settings), ranks) == expected


@pytest.mark.parametrize(
    ("settings", "ranks", "message"),
    [
        (
            {"tp": 2},
            1,
            "parallel: pp=1 x dp_shard=1 x cp=1 x tp=2 needs 2 ranks, the run has 1; start 2 ranks",
        ),
        ({"tp": 4}, 6, "needs 4 ranks, the run has 6; make dp_shard x cp x tp x pp equal 6"),
        ({"dp_shard": 3, "tp": 2}, 4, "needs 6 ranks, the run has 4"),
        ({"cp": 0}, 2, "parallel.cp=0: give a size of at least 1"),
        ({"dp_shard": -1}, 2, "parallel.dp_shard=-1"),
    ],
)
def test_sizes_that_do_not_make_the_world_are_one_line_errors(settings, ranks, message):
    with pytest.raises(MmzooError) as info:
        mesh_shape(ParallelConfig(**settings), ranks)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (MeshShape(tp=7), "4 KV heads are not divisible by parallel.tp=7"),
        (MeshShape(tp=3), "28 attention heads are not divisible by parallel.tp=3"),
        (
            MeshShape(tp=2, cp=8),
            "28 attention heads are not divisible by parallel.tp x parallel.cp=16 (context parallel splits "
            "each tensor-parallel rank's heads cp ways)",
        ),
        (MeshShape(pp=32), "parallel.pp=32 stages but the LLM has only 28 layers"),
    ],
)
def test_layouts_the_llm_cannot_take_are_one_line_errors(shape, message):
    with pytest.raises(MmzooError) as info:
        check_text_decoder(shape, LLM_7B)
    assert str(info.value) == f"parallel: {message}"


def test_7b_takes_the_meshes_the_readme_recommends():
    for shape in (MeshShape(dp_shard=8), MeshShape(dp_shard=4, tp=2), MeshShape(dp_shard=2, cp=4)):
        check_text_decoder(shape, LLM_7B)


def test_one_process_has_no_mesh_and_counts_its_own_data():
    mesh = TrainMesh(MeshShape())
    assert (mesh.dp_rank, mesh.dp_size, mesh.data_leader, mesh.last_stage, mesh.loss_share) == (
        0,
        1,
        True,
        True,
        1,
    )


def test_train_on_one_process_with_a_model_parallel_mesh_stops_at_once(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mmzoo", "train", "--parallel.tp", "2", "--train.output_dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        "mmzoo: error: parallel: pp=1 x dp_shard=1 x cp=1 x tp=2 needs 2 ranks, the run has 1; "
        "start 2 ranks (torchrun --nproc-per-node 2)"
    ]
    assert not any(tmp_path.iterdir())

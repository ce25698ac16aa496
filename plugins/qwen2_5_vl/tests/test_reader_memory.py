"""Reading an HF checkpoint keeps no file mapped beyond the tensors in use.

A memory-mapped safetensors file holds every page read through it in the process's memory until
it is unmapped: a reader that kept its files open would, on a rank that keeps only its shards of
the model, end up holding the whole checkpoint as well (benchmarks/load_dist.py).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mmzoo
from mmzoo.api import open_weights
from mmzoo.checkpoint.hf_export import save_hf

MAPS = Path("/proc/self/maps")


def mapped(directory: Path) -> set[str]:
    """The files under ``directory`` this process has memory-mapped now."""
    return {line.split()[-1] for line in MAPS.read_text().splitlines() if str(directory) in line}


@pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps (Linux)")
def test_the_hf_reader_unmaps_each_file_once_its_tensor_is_read(hf_untied, tmp_path):
    # One file per weight or two: a reader holding its files open maps them all by the end.
    hf = save_hf(mmzoo.load_model(hf_untied), tmp_path / "hf", max_shard_bytes=1)
    files = len(list(hf.glob("*.safetensors")))
    assert files > 40
    most = 0
    for _, tensor in open_weights(hf).items():
        most = max(most, len(mapped(hf)))  # the tensor just read (a view of its file) and the one before
        del tensor
    assert 1 <= most <= 2
    assert mapped(hf) == set()

"""Tensor-parallel slices of mm checkpoints: uneven row splits and splits by attention heads."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mmzoo.convert.mapping import COLUMN, GLU, ROW, Heads
from mmzoo.convert.parallel import merge_tp, part_kind, split_tp, tp_problem


def test_column_splits_unevenly_as_mindspeed_mm():
    """The first rows % tp ranks hold one row more; a divisible split is unchanged."""
    vocab = torch.empty(151674, 2, device="meta")
    assert [s.shape[0] for s in split_tp(vocab, COLUMN, 4)] == [37919, 37919, 37918, 37918]
    assert [s.shape[0] for s in split_tp(vocab, COLUMN, 3)] == [50558] * 3
    rows = torch.arange(20.0).view(10, 2)
    slices = split_tp(rows, COLUMN, 4)
    assert [s[:, 0].tolist() for s in slices] == [[0, 2, 4], [6, 8, 10], [12, 14], [16, 18]]
    assert torch.equal(merge_tp(slices, COLUMN), rows)
    even = torch.arange(24.0).view(12, 2)
    assert all(torch.equal(a, b) for a, b in zip(split_tp(even, COLUMN, 4), even.chunk(4), strict=True))
    assert tp_problem("w", (10, 2), COLUMN, 4) is None
    assert tp_problem("w", (3, 2), COLUMN, 4) == "w: dim 0 (3) is smaller than tp 4"
    assert tp_problem("w", (2, 10), ROW, 4) == "w: dim 1 (10) is not divisible by tp 4"


def _qkv(heads: int, head_dim: int, width: int = 3) -> torch.Tensor:
    """A stacked [Q; K; V] whose entries name their block, head and row: block*100 + head*10 + row."""
    block = torch.arange(3).view(3, 1, 1) * 100
    head = torch.arange(heads).view(1, heads, 1) * 10
    row = torch.arange(head_dim).view(1, 1, head_dim)
    return (block + head + row).reshape(-1, 1).expand(-1, width).float()


def test_heads_split_gives_each_rank_its_q_k_and_v():
    """Five heads at tp 2: rank 0 holds heads 0-2 of q, k and v in that order, rank 1 heads 3-4."""
    qkv, kind = _qkv(5, 2), Heads(5, blocks=3)
    first, second = split_tp(qkv, kind, 2)
    assert first[:, 0].tolist() == [
        b * 100 + h * 10 + r for b in range(3) for h in range(3) for r in range(2)
    ]
    assert second[:, 0].tolist() == [b * 100 + h * 10 + r for b in range(3) for h in (3, 4) for r in range(2)]
    for tp in (2, 3, 5):
        slices = split_tp(qkv, kind, tp)
        assert [len(s) for s in slices] == [n * 3 * 2 for n in kind.heads(tp)]
        assert torch.equal(merge_tp(slices, kind), qkv)
    bias = qkv[:, 0].contiguous()
    assert torch.equal(merge_tp(split_tp(bias, kind, 2), kind), bias)
    columns = qkv[:10].T.contiguous()  # (3, 10): five heads of two input columns
    sliced = split_tp(columns, Heads(5, dim=1), 2)
    assert [s.shape for s in sliced] == [(3, 6), (3, 4)]
    assert torch.equal(merge_tp(sliced, Heads(5, dim=1)), columns)


def test_heads_split_of_even_heads_is_the_plain_split_of_each_block():
    qkv = _qkv(4, 3)
    q, k, v = qkv.chunk(3)
    expected = [torch.cat(parts) for parts in zip(q.chunk(2), k.chunk(2), v.chunk(2), strict=True)]
    assert all(torch.equal(a, b) for a, b in zip(split_tp(qkv, Heads(4, 3), 2), expected, strict=True))
    proj = torch.randn(5, 12)
    assert all(
        torch.equal(a, b) for a, b in zip(split_tp(proj, Heads(4, dim=1), 2), proj.chunk(2, 1), strict=True)
    )


def _attention(x: torch.Tensor, qkv: torch.Tensor, proj: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Bidirectional attention of ``x`` (T, C) through a stacked qkv and an output projection."""
    q, k, v = (part.view(x.shape[0], -1, head_dim).transpose(0, 1) for part in (x @ qkv.T).chunk(3, dim=-1))
    heads = F.scaled_dot_product_attention(q, k, v)  # (H, T, d)
    return heads.transpose(0, 1).reshape(x.shape[0], -1) @ proj.T


@pytest.mark.parametrize("heads, tp", [(5, 2), (5, 3), (6, 4)])
def test_heads_slices_compute_what_each_rank_computes(heads, tp):
    """Each rank attends with its heads and projects with its columns; the sum over ranks (the
    row-parallel all-reduce) is the full attention."""
    torch.manual_seed(0)
    head_dim, width = 4, 12
    x, qkv = torch.randn(7, width), torch.randn(3 * heads * head_dim, width)
    proj = torch.randn(width, heads * head_dim)
    full = _attention(x, qkv, proj, head_dim)
    pieces = zip(split_tp(qkv, Heads(heads, 3), tp), split_tp(proj, Heads(heads, dim=1), tp), strict=True)
    torch.testing.assert_close(sum(_attention(x, q, p, head_dim) for q, p in pieces), full)


def test_a_plain_row_split_of_a_stacked_qkv_is_wrong():
    """The negative control: equal row blocks of [Q; K; V] hand a rank q and k heads as its q, k, v."""
    torch.manual_seed(0)
    x, qkv, proj = torch.randn(7, 12), torch.randn(3 * 6 * 4, 12), torch.randn(12, 6 * 4)
    full = _attention(x, qkv, proj, 4)
    wrong = sum(_attention(x, q, p, 4) for q, p in zip(qkv.chunk(2), proj.chunk(2, dim=1), strict=True))
    assert (wrong - full).abs().max() > 0.1


def test_heads_problems_and_canonical_parts():
    kind = Heads(25, blocks=3)
    assert tp_problem("qkv", (3 * 3200, 3200), kind, 8) is None
    assert kind.heads(8) == [4, 3, 3, 3, 3, 3, 3, 3]
    assert tp_problem("qkv", (3 * 3200 + 1, 3200), kind, 8) == "qkv: dim 0 (9601) is not 3 x 25 heads"
    assert tp_problem("qkv", (12, 2), Heads(2, 3), 4) == "qkv: 2 heads cannot give each of tp 4 ranks one"
    assert (
        tp_problem("proj", (3200,), Heads(25, dim=1), 2)
        == "proj: shape (3200,) has no dim 1 to split by heads"
    )
    assert part_kind(kind) == Heads(25) and part_kind(GLU) == COLUMN and part_kind(ROW) == ROW

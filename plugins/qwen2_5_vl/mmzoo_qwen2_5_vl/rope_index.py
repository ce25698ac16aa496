"""M-RoPE position ids: 3 rows (t, h, w) per token; text advances all three together.

This is the rule Qwen2.5-VL was trained with (its authors' code as first released): after an
image or a video, text continues at the largest position used so far plus one, over all three
rows. transformers 5.3 and later continue after a video at ``start + max(h, w)`` instead, which
differs whenever a video's time row runs past its height and width rows (most videos longer than
a few seconds); mmzoo follows the trained rule (docs/architecture.md, "Rope index").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from mmzoo.errors import MmzooError
from mmzoo_qwen2_5_vl.config import Qwen2_5_VLConfig


def time_index(grid_t: int, second_per_grid_t: float | torch.Tensor, tokens_per_second: int) -> torch.Tensor:
    """Time row of a video's grid steps: ``floor(i * second_per_grid_t * tokens_per_second)``.

    Computed in float32, left to right, then truncated: the precision and order of the trained
    code, whose ``second_per_grid_ts`` is a float32 tensor. The precision matters at the
    truncation: at 0.7 s per grid, index 5 gives 7, while float32's 0.699999988 multiplied in
    float64 gives 6.99999988 and so 6.
    """
    seconds = torch.as_tensor(second_per_grid_t, dtype=torch.float32)
    return (torch.arange(grid_t) * seconds * tokens_per_second).long()


def _vision_block(grid: list[int], merge: int, start: int, times: torch.Tensor) -> torch.Tensor:
    """Positions ``(3, t*h*w/merge**2)`` of one image or video whose first position is ``start``."""
    h, w = grid[1] // merge, grid[2] // merge
    grid_t, grid_h, grid_w = torch.meshgrid(times, torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1) + start


def rope_index(
    config: Qwen2_5_VLConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    second_per_grid_ts: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids ``(3, B, S)`` and rope deltas ``(B, 1)`` for a padded batch.

    Text tokens take the running position on all three rows. Each image/video run of
    ``t*h*w/4`` placeholder tokens takes ``h``/``w`` = merged-grid indices and ``t`` =
    :func:`time_index` (images: 0; a video without ``second_per_grid_ts``: 1 s per grid), all
    offset by the running position; the next text continues at the largest position of the
    run, over all three rows, plus one. Padded positions (``attention_mask == 0``) are 0.
    ``rope_deltas = max + 1 - length`` is what generation adds to positions past the prompt.
    """
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    # Iterators over the whole batch: each row takes its media in order.
    grids = {
        config.image_token_id: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
        config.video_token_id: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
    }
    seconds = iter(second_per_grid_ts.cpu() if second_per_grid_ts is not None else [])
    ids_cpu = input_ids.cpu()
    keep_all = (
        attention_mask.bool().cpu()
        if attention_mask is not None
        else torch.ones(batch, seq, dtype=torch.bool)
    )
    for row in range(batch):
        keep = keep_all[row]
        ids = ids_cpu[row][keep].tolist()
        if ids:
            row_positions = _row_positions(config, ids, grids, seconds, row)  # (3, len(ids))
            positions[:, row, keep] = row_positions
            deltas[row, 0] = int(row_positions.max()) + 1 - len(ids)
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def _row_positions(
    config: Qwen2_5_VLConfig,
    ids: list[int],
    grids: dict[int, Iterator[list[int]]],
    seconds: Iterator[Any],
    row: int,
) -> torch.Tensor:
    """Positions ``(3, len(ids))`` of one row's real tokens; its media's grids (per placeholder
    id) and videos' seconds per grid step are taken from the batch's iterators."""
    merge = config.vision.spatial_merge_size
    pieces: list[torch.Tensor] = []
    pos, i = 0, 0
    while i < len(ids):
        token = ids[i]
        if token not in grids:
            end = i
            while end < len(ids) and ids[end] not in grids:
                end += 1
            pieces.append(torch.arange(pos, pos + end - i).expand(3, -1))
            pos, i = pos + end - i, end
            continue
        kind = "image" if token == config.image_token_id else "video"
        grid = next(grids[token], None)
        if grid is None:
            raise MmzooError(f"row {row} has more {kind} placeholder runs than {kind}_grid_thw entries")
        count = grid[0] * grid[1] * grid[2] // merge**2
        if ids[i : i + count] != [token] * count:
            raise MmzooError(
                f"row {row}: a run of {kind} tokens at position {i} is shorter than the "
                f"{count} tokens its grid {grid} needs"
            )
        if kind == "video":
            times = time_index(grid[0], next(seconds, 1.0), config.vision.tokens_per_second)
        else:
            times = torch.zeros(grid[0], dtype=torch.long)
        block = _vision_block(grid, merge, pos, times)
        pieces.append(block)
        pos, i = int(block.max()) + 1, i + count
    return torch.cat(pieces, dim=1)


def position_ids(
    config: Qwen2_5_VLConfig,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    media: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The ``ModelSpec.position_ids`` hook: :func:`rope_index` of the media batch's grids, without
    the deltas."""
    media = media or {}
    return rope_index(
        config,
        input_ids,
        attention_mask,
        media.get("image_grid_thw"),
        media.get("video_grid_thw"),
        media.get("second_per_grid_ts"),
    )[0]

"""M-RoPE position ids: 3 rows (t, h, w) per token; text advances all three together."""

from __future__ import annotations

import torch

from mmzoo.errors import MmzooError
from mmzoo_qwen2_5_vl.config import Qwen2_5_VLConfig


def _vision_block(grid: list[int], merge: int, start: int, time_step: torch.Tensor | int) -> torch.Tensor:
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge
    tpos = (torch.arange(t) * time_step).long() + start
    hpos = torch.arange(h) + start
    wpos = torch.arange(w) + start
    grid_t, grid_h, grid_w = torch.meshgrid(tpos, hpos, wpos, indexing="ij")
    return torch.stack([grid_t, grid_h, grid_w]).reshape(3, -1)


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
    ``t*h*w/4`` placeholder tokens takes ``t = index * tokens_per_second * second_per_grid_t``
    (images: 0), ``h``/``w`` = merged-grid indices, all offset by the position before it; the
    next text continues at that offset plus ``max(h, w)`` merged rows/columns. Padded positions
    (``attention_mask == 0``) are 0. ``rope_deltas = max + 1 - length`` is what generation adds
    to positions past the prompt.
    """
    merge = config.vision.spatial_merge_size
    tokens_per_second = config.vision.tokens_per_second
    batch, seq = input_ids.shape
    positions = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = torch.zeros(batch, 1, dtype=torch.long)
    grids = {
        config.image_token_id: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
        config.video_token_id: iter(video_grid_thw.tolist() if video_grid_thw is not None else []),
    }
    video_seconds = iter(second_per_grid_ts.cpu() if second_per_grid_ts is not None else [])
    ids_cpu = input_ids.cpu()
    keep_all = (
        attention_mask.bool().cpu()
        if attention_mask is not None
        else torch.ones(batch, seq, dtype=torch.bool)
    )
    for row in range(batch):
        keep = keep_all[row]
        ids = ids_cpu[row][keep].tolist()
        pieces: list[torch.Tensor] = []
        pos, i = 0, 0
        while i < len(ids):
            token = ids[i]
            if token in grids:
                kind = "image" if token == config.image_token_id else "video"
                grid = next(grids[token], None)
                if grid is None:
                    raise MmzooError(
                        f"row {row} has more {kind} placeholder runs than {kind}_grid_thw entries"
                    )
                count = grid[0] * grid[1] * grid[2] // merge**2
                if ids[i : i + count] != [token] * count:
                    raise MmzooError(
                        f"row {row}: a run of {kind} tokens at position {i} is shorter than the "
                        f"{count} tokens its grid {grid} needs"
                    )
                if token == config.video_token_id:
                    seconds = next(video_seconds, None)
                    step = tokens_per_second * (seconds if seconds is not None else 1)
                else:
                    step = 1
                pieces.append(_vision_block(grid, merge, pos, step))
                pos += max(grid[1], grid[2]) // merge
                i += count
            else:
                end = i
                while end < len(ids) and ids[end] not in grids:
                    end += 1
                pieces.append(torch.arange(pos, pos + end - i).expand(3, -1))
                pos += end - i
                i = end
        if pieces:
            row_pos = torch.cat(pieces, dim=1)
            positions[:, row, keep] = row_pos
            deltas[row, 0] = row_pos.max() + 1 - len(ids)
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def position_ids(config: Qwen2_5_VLConfig, input_ids: torch.Tensor, **media) -> torch.Tensor:
    """The ``ModelSpec.position_ids`` hook: :func:`rope_index` without the deltas."""
    return rope_index(config, input_ids, **media)[0]

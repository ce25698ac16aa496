"""The M-RoPE rule Qwen2.5-VL was trained with, restated from its definition for the tests.

Written token by token in plain Python (NumPy float32 for the time row), independently of
mmzoo's implementation:

- text takes the next position on all three rows;
- an image or video of merged grid (t, h, w) takes, at step (a, b, c) of its grid,
  ``(start + time(a), start + b, start + c)``, where ``time(a) = floor(a * second_per_grid_t *
  tokens_per_second)`` multiplied in float32 (the dtype of the processor's
  ``second_per_grid_ts``) and truncated; images have ``time = 0``;
- ``start``, and the position of the text after a media run, is the largest position used so far,
  over all three rows, plus one.

transformers 5.3 and later are not the reference for this rule: after a video they continue at
``start + max(h, w)``, which differs whenever the time row passes the height and width rows.
"""

from __future__ import annotations

import numpy as np


def trained_positions(
    ids: list[int],
    *,
    image_token: int,
    video_token: int,
    image_grids: list[tuple[int, int, int]] = (),
    video_grids: list[tuple[int, int, int]] = (),
    seconds: list[float] | None = None,
    merge: int = 2,
    tokens_per_second: int = 2,
) -> tuple[list[list[int]], int]:
    """Rows ``[t, h, w]`` of one unpadded sequence and its rope delta (``max + 1 - len``)."""
    rows: list[list[int]] = [[], [], []]
    images, videos = iter(image_grids), iter(video_grids)
    video_seconds = iter(seconds if seconds is not None else [])
    next_pos = 0
    i = 0
    while i < len(ids):
        token = ids[i]
        if token not in (image_token, video_token):
            for row in rows:
                row.append(next_pos)
            next_pos += 1
            i += 1
            continue
        grid_t, grid_h, grid_w = next(images) if token == image_token else next(videos)
        per_grid = None if token == image_token else np.float32(next(video_seconds, 1.0))
        for a in range(grid_t):
            time = 0 if per_grid is None else int(np.float32(a) * per_grid * np.float32(tokens_per_second))
            for b in range(grid_h // merge):
                for c in range(grid_w // merge):
                    rows[0].append(next_pos + time)
                    rows[1].append(next_pos + b)
                    rows[2].append(next_pos + c)
        i += grid_t * (grid_h // merge) * (grid_w // merge)
        next_pos = max(max(row) for row in rows) + 1
    return rows, next_pos - len(ids)

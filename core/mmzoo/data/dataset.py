"""The training dataset: prepared samples from every data file, and how they become batches."""

from __future__ import annotations

import os
import sys
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from mmzoo.config import DataConfig
from mmzoo.data.cache import CacheEntry, cache_key, write_entry
from mmzoo.data.collate import Sample, collate_packed, collate_padded, pack
from mmzoo.data.pipeline import Prepared, Preprocessor
from mmzoo.data.records import SkipReport, iter_records
from mmzoo.data.tokenizer import tokenizer_digest
from mmzoo.errors import MmzooError
from mmzoo.registry import ModelSpec, model_plugin
from mmzoo.version import __version__


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class VLDataset(torch.utils.data.Dataset):
    """Prepared samples (in memory or in cache entries) turned into model-ready samples on access.

    Args:
        preprocessor: the family's preprocessor (also patchifies media on access).
        stores: one sequence of :class:`Prepared` per data file.
        data: the data config (seq_length, packing).
        pad_token_id: pad id for padded batches.
    """

    def __init__(
        self,
        preprocessor: Preprocessor,
        stores: Sequence[Sequence[Prepared]],
        data: DataConfig,
        pad_token_id: int,
    ) -> None:
        self.preprocessor = preprocessor
        self.stores = list(stores)
        self.data = data
        self.pad_token_id = pad_token_id
        self.offsets = [0]
        self.lengths: list[int] = []
        for store in self.stores:
            self.offsets.append(self.offsets[-1] + len(store))
            self.lengths.extend(store.lengths if isinstance(store, CacheEntry) else [len(p) for p in store])
        self.dummy = preprocessor.to_sample(preprocessor.dummy())

    def __len__(self) -> int:
        return self.offsets[-1]

    def prepared(self, index: int) -> Prepared:
        store = bisect_right(self.offsets, index) - 1
        return self.stores[store][index - self.offsets[store]]

    def __getitem__(self, index: int) -> Sample:
        return self.preprocessor.to_sample(self.prepared(index))

    def batches(
        self, micro_batch_size: int = 1, seed: int = 0, epoch: int = 0, shuffle: bool = True
    ) -> list[list[int]]:
        """Sample indices per micro-batch for one epoch. Deterministic in (seed, epoch).

        Packing on: ``micro_batch_size`` packed rows of at most ``seq_length`` tokens each,
        collated as one sequence (attention stays within each sample). Packing off:
        ``micro_batch_size`` samples, padded.
        """
        if shuffle:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        else:
            order = list(range(len(self)))
        if self.data.packing:
            rows = [
                [order[j] for j in row]
                for row in pack([self.lengths[i] for i in order], self.data.seq_length)
            ]
            return [sum(rows[i : i + micro_batch_size], []) for i in range(0, len(rows), micro_batch_size)]
        return [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]

    def collate(self, samples: Sequence[Sample]) -> dict[str, torch.Tensor]:
        """The batch of ``samples`` (packed or padded); the dummy image joins batches without media."""
        if self.data.packing:
            return collate_packed(samples, self.dummy)
        return collate_padded(samples, self.pad_token_id, self.dummy)


CACHE_FORMAT = 2  # of the entries' index (2: media as a list of family-prepared items)


def _settings(spec: ModelSpec, model_config: Any, tokenizer: Any, data: DataConfig) -> dict[str, Any]:
    """Everything besides the data file that changes what preprocessing produces.

    The plugin's version stands for its code (media processor, position ids, placeholder
    expansion); the template by its content, the tokenizer by a digest of its vocabulary and
    special tokens: an upgraded plugin or an edited tokenizer never reads stale samples.
    """
    plugin = model_plugin(spec.name)
    return {
        "mmzoo": __version__,
        "model": spec.name,
        "plugin": [plugin.distribution, plugin.version],
        "cache_format": CACHE_FORMAT,
        "config": repr(model_config),  # token ids, patch and tile sizes
        "template": repr(spec.template),  # a ChatTemplate's repr lists every field
        "tokenizer": tokenizer_digest(tokenizer),
        "data": {
            k: getattr(data, k)
            for k in ("dataset_dir", "max_samples", "seq_length", "train_on_prompt", "mask_history", "media")
        },
    }


def _prepare_file(
    path: str, preprocessor: Preprocessor, data: DataConfig, report: SkipReport, log: Callable[[str], None]
) -> Iterator[Prepared]:
    # Records are streamed: parquet / arrow rows (embedded media included) are read a slice at a
    # time and dropped once prepared.
    records = iter_records(path, data.dataset_dir, data.max_samples, data.strict, report, data.format)
    started = last = time.monotonic()
    n = 0
    for n, record in enumerate(records, 1):
        before = report.total
        prepared = preprocessor.prepare(record, report)
        if prepared is None and data.strict and report.total > before:
            reason = next(r for r, (source, _) in report.first.items() if source == record.source)
            raise MmzooError(f"{record.source}: bad record ({reason}): {report.first[reason][1]}")
        if prepared is not None:
            yield prepared
        now = time.monotonic()
        if now - last > 2:
            log(f"preprocessing {path}: {n} records ({n / max(now - started, 1e-9):.0f}/s)")
            last = now
    elapsed = time.monotonic() - started
    log(f"preprocessing {path}: {n} records done ({n / max(elapsed, 1e-9):.0f}/s)")


def build_dataset(
    spec: ModelSpec,
    model_config: Any,
    tokenizer: Any,
    data: DataConfig,
    log: Callable[[str], None] | None = None,
) -> VLDataset:
    """Read, check and prepare every data file (from the cache where possible).

    Bad records are skipped and summarised, one line per reason; ``data.strict`` stops at the
    first. A dataset left empty is an error naming the reasons. Progress and skips go to
    ``log`` (default: standard error).
    """
    log = log or _log
    files = [f.strip() for f in data.data.split(",") if f.strip()]
    if not files:
        raise MmzooError("data.data is empty: give data files (JSON/JSONL, parquet), comma-separated")
    preprocessor = Preprocessor(spec, model_config, tokenizer, data)
    settings = _settings(spec, model_config, tokenizer, data)
    report = SkipReport()
    stores: list[Sequence[Prepared]] = []
    for path in files:
        if not Path(path).expanduser().exists():
            raise MmzooError(f"data file {path} does not exist")
        if data.cache_dir is None:
            stores.append(list(_prepare_file(path, preprocessor, data, report, log)))
            continue
        # Relative media paths resolve against this base, so the same data content in another
        # directory names other files: it is part of the key (the path too: it is in each source).
        base = os.path.abspath(
            os.path.expanduser(data.dataset_dir) if data.dataset_dir else Path(path).expanduser().parent
        )
        root = Path(data.cache_dir)
        key = cache_key(path, {**settings, "file": path, "media_base": base})
        entry = CacheEntry.find(root, key)
        if entry is None:
            file_report = SkipReport()
            samples = _prepare_file(path, preprocessor, data, file_report, log)
            write_entry(root, key, samples, {"counts": file_report.counts, "first": file_report.first})
            entry = CacheEntry(root / key)
        else:
            log(f"preprocessing {path}: {len(entry)} samples from cache {entry.path}")
        cached = SkipReport()
        cached.counts = dict(entry.skips["counts"])
        cached.first = {k: tuple(v) for k, v in entry.skips["first"].items()}
        report.merge(cached)
        stores.append(entry)
    for line in report.summary_lines():
        log(line)
    dataset = VLDataset(preprocessor, stores, data, tokenizer.pad_token_id)
    if len(dataset) == 0:
        reasons = ", ".join(f"{n} {r}" for r, n in report.counts.items()) or "no records"
        raise MmzooError(f"no usable training samples in {data.data} (skipped: {reasons})")
    return dataset

"""Checkpoint conversion speed and memory on a random 3B-shaped Qwen2.5-VL HF checkpoint (bf16).

Generates the checkpoint on disk (HF names, 5 GiB shards + index, config.json), then in the
same run times a plain copy of the same safetensors bytes (the baseline, fsynced like the
conversion) and each conversion in a fresh child process, reporting wall time and the
child's peak RSS. The last row reads a DCP training checkpoint of the same weights (written by
one process, one chunk per tensor, no optimizer state)::

    python benchmarks/convert.py --work /tmp/convert_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

import mmzoo
from mmzoo.build import compose
from mmzoo.checkpoint.hf_export import INDEX_NAME
from mmzoo.checkpoint.safetensors_stream import StreamingWriter

SHARD_BYTES = 5 * 2**30


def generate(out: Path, variant: str, seed: int = 0) -> int:
    """Write a random bf16 HF checkpoint of ``variant``'s shapes; returns its weight bytes."""
    spec = mmzoo.get_model("qwen2_5_vl")
    config = spec.variant(variant)
    mapping = spec.weight_mapping(config)
    with torch.device("meta"):
        expected = compose(spec, config).state_dict()
    tensors: list[tuple[str, tuple[int, ...]]] = []
    for rule in mapping.rules:
        if rule.mm is not None:
            parts = rule.op.split(expected[rule.mm])
            tensors.extend((name, tuple(p.shape)) for name, p in zip(rule.hf, parts, strict=True))
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensors:
        size = 2 * int(torch.Size(shape).numel())
        if shards[-1] and used + size > SHARD_BYTES:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=g) * 0.02).to(torch.bfloat16)  # 32 MiB of random values
    out.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        with StreamingWriter(out / file, [(n, torch.bfloat16, s) for n, s in shard]) as writer:
            for name, shape in shard:
                n = int(torch.Size(shape).numel())
                start = int(torch.randint(0, pool.numel(), (), generator=g))
                data = pool.roll(-start)[:n] if n <= pool.numel() else pool.repeat(n // pool.numel() + 1)[:n]
                writer.write(name, data.reshape(shape))
                weight_map[name] = file
        total += writer.total_bytes
    hf_config = dict(spec.config_to_hf(config))  # type: ignore[misc]
    hf_config["dtype"] = "bfloat16"
    (out / "config.json").write_text(json.dumps(hf_config, indent=2))
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def copy_tree(src: Path, dst: Path) -> None:
    """The baseline: copy the safetensors files and fsync them."""
    dst.mkdir()
    for file in sorted(src.glob("*.safetensors")):
        shutil.copyfile(file, dst / file.name)
        with open(dst / file.name, "rb") as f:
            os.fsync(f.fileno())


def run_child(args: list[str]) -> tuple[float, float]:
    """Run ``python benchmarks/convert.py --child ARGS``; returns (seconds, peak RSS GiB)."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], check=True, capture_output=True, text=True
    )
    seconds = time.perf_counter() - started
    return seconds, json.loads(result.stdout.strip().splitlines()[-1])["max_rss_gib"]


def write_dcp(hf: Path, run: Path) -> None:
    """A DCP training checkpoint (``run/iter_0000001``) of the model in ``hf``, as a 1-rank run
    lays it out (one chunk per tensor), without optimizer state."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from mmzoo.checkpoint.dcp import DCP_META, MODEL, dcp_meta
    from mmzoo.checkpoint.mm import write_json, write_tracker

    model = mmzoo.load_model(hf, "auto")
    iteration = run / "iter_0000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({MODEL: model.state_dict()}, checkpoint_id=iteration, no_dist=True)
    write_json(iteration / DCP_META, dcp_meta(model, variant=None, world_size=1))
    write_tracker(run, 1)


def child(argv: list[str]) -> None:
    from mmzoo.checkpoint import conversion as convert

    op, *rest = argv
    if op == "copy":
        copy_tree(Path(rest[0]), Path(rest[1]))
    elif op == "dcp":
        write_dcp(Path(rest[0]), Path(rest[1]))
    elif op == "hf_to_mm":
        tp, llm, vit = int(rest[2]), json.loads(rest[3]), json.loads(rest[4])
        convert.hf_to_mm(rest[0], rest[1], tp=tp, llm_pp_layers=llm, vit_pp_layers=vit, report=lambda s: None)
    elif op == "mm_to_hf":
        convert.mm_to_hf(rest[0], rest[1], report=lambda s: None)
    elif op == "resplit":
        tp, llm, vit = int(rest[2]), json.loads(rest[3]), json.loads(rest[4])
        convert.resplit(rest[0], rest[1], tp=tp, llm_pp_layers=llm, vit_pp_layers=vit, report=lambda s: None)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"max_rss_gib": rss}))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", default="/tmp/mmzoo_convert_bench", help="scratch directory (removed first)"
    )
    parser.add_argument("--variant", default="3b", help="qwen2_5_vl variant whose shapes to use")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    total = generate(work / "hf", args.variant)
    print(f"generated {total / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    layers = mmzoo.get_model("qwen2_5_vl").variant(args.variant).text.num_layers
    half = [layers // 2, layers - layers // 2]
    rows = []

    def measure(label: str, child_args: list[str], drop: Path | None = None) -> None:
        seconds, rss = run_child(child_args)
        rows.append((label, seconds, rss))
        print(f"{label}: {seconds:.1f} s, peak RSS {rss:.2f} GiB", file=sys.stderr)
        if drop is not None:
            shutil.rmtree(drop)

    measure(
        "copy the safetensors bytes (baseline)", ["copy", str(work / "hf"), str(work / "copy")], work / "copy"
    )
    measure("hf-to-mm tp=1 pp=1", ["hf_to_mm", str(work / "hf"), str(work / "mm"), "1", "null", "null"])
    measure(
        f"hf-to-mm tp=2 pp=2 (llm {half[0]},{half[1]}; vit 32,0)",
        ["hf_to_mm", str(work / "hf"), str(work / "mm2"), "2", json.dumps(half), "[32, 0]"],
        work / "mm2",
    )
    measure(
        "resplit tp=1 pp=1 -> tp=2 pp=2",
        ["resplit", str(work / "mm"), str(work / "re"), "2", json.dumps(half), "[32, 0]"],
        work / "re",
    )
    measure("mm-to-hf (tp=1 pp=1 source)", ["mm_to_hf", str(work / "mm"), str(work / "back")], work / "back")
    shutil.rmtree(work / "mm")
    run_child(["dcp", str(work / "hf"), str(work / "dcp")])
    measure("mm-to-hf (DCP source: a run directory)", ["mm_to_hf", str(work / "dcp"), str(work / "back")])
    shutil.rmtree(work)

    base = rows[0][1]
    print(f"\nQwen2.5-VL {args.variant} shapes, bf16, {total / 2**30:.2f} GiB of weights")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}\n")
    print("| operation | seconds | vs copy | peak RSS (GiB) |")
    print("|---|---|---|---|")
    for label, seconds, rss in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / base:.2f}x | {rss:.2f} |")


if __name__ == "__main__":
    main()

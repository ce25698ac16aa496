"""Peak host memory of loading a model sharded over ranks against one process loading it whole.

Generates the random 3B-shaped Qwen2.5-VL HF checkpoint of ``benchmarks/convert.py`` (bf16, two
shards + index) and its mm checkpoint (tp=1, pp=1), then in the same run measures for each, in
fresh processes:

- 1 process: ``mmzoo.load_model(HF)``, the whole model (the baseline);
- N ranks under ``torchrun`` (gloo, CPU): the model built as ``mmzoo train`` builds it from
  ``model.load``: on the meta device, sharded with FSDP2, each rank copying its shards from the
  checkpoint one full tensor at a time (``mmzoo.checkpoint.weights.fill_parameters``).

Parameters are float32, as training holds them. Peak RSS is each process's ``VmHWM`` from
``/proc/self/status``; "before loading" is its RSS once torch and mmzoo are imported (and, on
ranks, the process group joined)::

    python benchmarks/load_dist.py --work /tmp/load_dist_bench
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from convert import generate  # benchmarks/convert.py, beside this script

import mmzoo
from mmzoo.build import compose
from mmzoo.checkpoint.conversion import hf_to_mm
from mmzoo.testing import free_port

GIB = 2**30


def status_gib(field: str) -> float:
    """A ``kB`` field of ``/proc/self/status`` (``VmHWM``: peak RSS, ``VmRSS``: now) in GiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / GIB
    raise RuntimeError(f"no {field} in /proc/self/status")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def load_full(hf: str) -> dict:
    """The baseline: the whole model in this process."""
    before = status_gib("VmRSS")
    model = mmzoo.load_model(hf)
    size = tensor_bytes(model.state_dict().values())
    return {"before": before, "peak": status_gib("VmHWM"), "model": size, "shard": size}


def load_sharded(hf: str) -> dict:
    """This rank's part of the sharded load, as the training loop does it."""
    from mmzoo.api import open_weights
    from mmzoo.checkpoint.weights import fill_parameters
    from mmzoo.distributed.env import close_process_group, init_process_group, world_from_env
    from mmzoo.distributed.fsdp import data_parallel_mesh, shard_model

    world, device = world_from_env(), torch.device("cpu")
    init_process_group(world, device, timeout_s=1800)
    before = status_gib("VmRSS")
    weights = open_weights(hf)
    model = weights.empty_model()
    size = tensor_bytes(model.state_dict().values())
    shard_model(model, data_parallel_mesh(world, device))
    model.to_empty(device=device)
    fill_parameters(model, weights)
    shard = tensor_bytes(p.to_local() for p in model.parameters())
    peak = status_gib("VmHWM")
    close_process_group()
    return {"before": before, "peak": peak, "model": size, "shard": shard}


def largest_tensor(variant: str) -> int:
    """Bytes of the largest mm tensor as read from the bf16 checkpoint (what a rank holds in full)."""
    spec = mmzoo.get_model("qwen2_5_vl")
    with torch.device("meta"):
        model = compose(spec, spec.variant(variant))
    return max(p.numel() for p in model.parameters()) * 2


def child(argv: list[str]) -> None:
    mode, checkpoint, results = argv
    result = load_full(checkpoint) if mode == "full" else load_sharded(checkpoint)
    rank = int(os.environ.get("RANK", "0"))
    Path(results, f"{mode}_rank_{rank}.json").write_text(json.dumps(result))


def run(ranks: int, checkpoint: Path, results: Path) -> list[dict]:
    """One measurement (1 plain process, or ``ranks`` under torchrun); each process's numbers."""
    mode = "full" if ranks == 1 else "sharded"
    script = [__file__, "--child", mode, str(checkpoint), str(results)]
    launcher = [
        *("-m", "torch.distributed.run", "--nproc-per-node", str(ranks)),
        *("--master-addr", "127.0.0.1", "--master-port", str(free_port())),
    ]
    command = [sys.executable, *(launcher if ranks > 1 else []), *script]
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return [json.loads((results / f"{mode}_rank_{r}.json").read_text()) for r in range(ranks)]


def measure(work: Path, ranks: int, sources: list[str]) -> list[tuple[str, int, list[dict]]]:
    """Every (source, 1 process or ``ranks``) measurement, one after the other."""
    (work / "results").mkdir()
    rows = []
    for source in sources:
        for n in (1, ranks):
            started = time.perf_counter()
            per_rank = run(n, work / source, work / "results")
            print(f"{source}, {n} rank(s): {time.perf_counter() - started:.0f} s", file=sys.stderr)
            rows.append((source, n, per_rank))
    return rows


def print_table(rows: list[tuple[str, int, list[dict]]]) -> None:
    print("| source | ranks | peak RSS per rank (GiB) | model size (GiB) | shard size (GiB) ", end="")
    print("| RSS before loading (GiB) | peak - before - shard (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for source, ranks, per_rank in rows:
        columns = [
            [r["peak"] for r in per_rank],
            [r["shard"] / GIB for r in per_rank],
            [r["before"] for r in per_rank],
            [r["peak"] - r["before"] - r["shard"] / GIB for r in per_rank],
        ]
        peak, shard, before, over = (" / ".join(f"{v:.2f}" for v in c) for c in columns)
        model = per_rank[0]["model"] / GIB
        print(f"| {source} | {ranks} | {peak} | {model:.2f} | {shard} | {before} | {over} |")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work", default="/tmp/mmzoo_load_dist_bench", help="scratch directory (removed first)"
    )
    parser.add_argument("--variant", default="3b", help="qwen2_5_vl variant whose shapes to use")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the sharded load")
    parser.add_argument("--no-mm", action="store_true", help="measure the HF checkpoint only")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    started = time.perf_counter()
    total = generate(work / "hf", args.variant)
    if not args.no_mm:
        hf_to_mm(work / "hf", work / "mm", report=lambda line: None)
    print(f"generated {total / GIB:.2f} GiB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    rows = measure(work, args.ranks, ["hf"] if args.no_mm else ["hf", "mm"])
    shutil.rmtree(work)
    print(f"\nQwen2.5-VL {args.variant} shapes, checkpoint bf16 {total / GIB:.2f} GiB, loaded as float32")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"largest tensor as read: {largest_tensor(args.variant) / GIB:.2f} GiB (bf16)\n")
    print_table(rows)


if __name__ == "__main__":
    main()

"""CPU training throughput and peak memory of ``mmzoo train`` on 1, 2 and 4 ranks (torchrun, gloo).

Every run trains the same small Qwen2.5-VL (random init, real 151,936-token vocabulary, tied
embeddings) on the same generated records (real Qwen2.5 tokenizer; three in four carry one of the
demo photos, resized to about 256 vision tokens; the rest text-only), packed into rows of
``--seq-length`` tokens. The global batch is the same at every world size: ``--rows`` packed rows
per optimizer step, so a rank accumulates ``rows / N`` of them (``train.grad_accum``) and the
global data order, hence every step's samples, is the same. Each world size is one
``torchrun --nproc-per-node N`` launch of this script in worker mode, which calls
``mmzoo.train.loop.train`` (FSDP2 on gloo, fp32) and writes its rank's peak resident set
(``VmHWM``) at the end; tokens/s comes from rank 0's ``metrics.jsonl`` (global tokens, seconds
per step including the collectives), leaving out the first ``--warmup`` steps; with ``--repeat``
the launches are interleaved and each world size keeps its fastest.

Scaling efficiency is ``tokens/s at N / (N x tokens/s at 1)``, each rank running ``--threads``
torch threads. On a machine with fewer cores than ``N x threads`` the ranks share cores
(oversubscribed) and the efficiency says more about the machine than about mmzoo. The
preprocessing cache is built by the first launch and read by the others. Prints a markdown
table; run with ``python benchmarks/train_dist.py``.

``--cp-memory``: activation memory per rank of context parallel (``parallel.cp``) against the
packed sequence length instead. For each cp size one ``torchrun --nproc-per-node CP`` launch runs
the text decoder (``--layers`` x ``--hidden``, a 4,096-token vocabulary) on packed text rows of
every ``--cp-tokens`` length in turn (samples of ``--cp-sample`` tokens, the last quarter of each
answer), one forward and backward each, with ``mmzoo.distributed.parallelize`` splitting the
tokens over the group. The model is replicated (no FSDP): its parameters are the same at every cp
size and the activations are what cp splits. Activation memory is tracked, not sampled: the bytes
of the distinct storages autograd saves for backward (``saved_tensors_hooks``), parameters left
out, the maximum over ranks; the table also gives each rank's peak resident set after the length
(``VmHWM``; lengths ascend, so it is the peak of the largest length so far).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from machine import cpu_model  # benchmarks/machine.py

import mmzoo
from mmzoo.testing import free_port

CP_VOCAB = 4096

DEMO = Path(mmzoo.__file__).parent / "demo"
PHOTOS = ["astronaut.jpg", "camera.jpg", "chelsea.jpg", "coffee.jpg", "hubble.jpg", "rocket.jpg"]
WORDS = (
    "the a small large red blue green light dark cup cat rocket camera photo table sky star "
    "wooden metal bright soft left right above below near far shows holds stands sits looks "
    "with on in of and beside behind under over while its their one two three several"
).split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    add("--rows", type=int, default=4, help="packed rows per optimizer step, global (default 4)")
    add("--seq-length", type=int, default=1024, help="tokens per packed row (default 1024)")
    add("--steps", type=int, default=5, help="optimizer steps per run (default 5)")
    add("--warmup", type=int, default=1, help="first steps left out of tokens/s (default 1)")
    add("--repeat", type=int, default=1, help="interleaved launches per world size, fastest kept (default 1)")
    add("--records", type=int, default=96, help="generated records (default 96)")
    add("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    add("--layers", type=int, default=4, help="text layers (default 4)")
    add("--hidden", type=int, default=256, help="text hidden size (default 256; heads of 64)")
    add("--ffn", type=int, default=1024, help="text FFN size (default 1024)")
    add("--vision-depth", type=int, default=4, help="vision blocks (default 4)")
    add("--vision-hidden", type=int, default=128, help="vision hidden size (default 128)")
    add("--seed", type=int, default=0, help="seed of records, weights and data order (default 0)")
    add("--timeout", type=float, default=600, help="seconds per launch before it is stopped (default 600)")
    add("--work", type=Path, help="working directory (default: a temporary one, removed at the end)")
    add("--worker", type=Path, help=argparse.SUPPRESS)  # set by the launches: write the rank's peak here
    add("--cp-memory", action="store_true", help="context-parallel activation memory per rank instead")
    add("--cp", type=int, nargs="+", default=[1, 2, 4], help="cp sizes of --cp-memory (default 1 2 4)")
    add(
        "--tp",
        type=int,
        nargs="*",
        default=[2],
        help="tp sizes in --cp-memory's table, sequence parallel (default 2)",
    )
    add(
        "--cp-tokens",
        type=int,
        nargs="+",
        default=[4096, 8192, 16384, 32768, 65536],
        help="packed sequence lengths of --cp-memory, ascending (default 4096 ... 65536)",
    )
    add("--cp-sample", type=int, default=2048, help="tokens per packed sample of --cp-memory (default 2048)")
    add("--cp-worker", type=Path, help=argparse.SUPPRESS)  # set by the --cp-memory launches
    add("--worker-dim", default="cp", help=argparse.SUPPRESS)  # the mesh dimension a launch splits
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:cut])
    args.train_args = argv[cut + 1 :]  # worker mode: the ``mmzoo train`` arguments
    return args


def make_records(path: Path, count: int, seed: int) -> None:
    """``count`` chat records of mixed length; three in four ask about a demo photo."""
    rng = random.Random(seed)

    def sentence(low: int, high: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."

    with path.open("w") as f:
        for i in range(count):
            question = sentence(6, 30) + " What does it show?"
            answer = " ".join(sentence(8, 24) for _ in range(rng.randint(1, 8)))
            record: dict = {"messages": [{"role": "user", "content": question}]}
            if i % 4 != 3:
                record["messages"][0]["content"] = "<image>" + question
                record["images"] = [rng.choice(PHOTOS)]
            record["messages"].append({"role": "assistant", "content": answer})
            f.write(json.dumps(record) + "\n")


def train_overrides(args: argparse.Namespace, work: Path, ranks: int) -> list[str]:
    """The ``mmzoo train`` overrides of the run on ``ranks`` ranks."""
    heads = args.hidden // 64
    model = {
        "text": {
            "num_layers": args.layers,
            "hidden_size": args.hidden,
            "ffn_hidden_size": args.ffn,
            "num_heads": heads,
            "num_kv_heads": max(1, heads // 2),
            "mrope_section": [8, 12, 12],  # (t, h, w) over the 32 frequency pairs of a 64-wide head
        },
        "vision": {
            "depth": args.vision_depth,
            "hidden_size": args.vision_hidden,
            "ffn_hidden_size": 2 * args.vision_hidden,
            "num_heads": args.vision_hidden // 32,
            "out_hidden_size": args.hidden,
            "fullatt_block_indexes": [args.vision_depth - 1],
        },
    }
    side = 448 * 448  # the photos, resized to 448 x 448 pixels: 16 x 16 = 256 vision tokens
    return [
        "--model.name", "qwen2_5_vl",
        "--model.overrides", json.dumps(model),
        "--data.data", str(work / "records.jsonl"),
        "--data.dataset_dir", str(DEMO),
        "--data.seq_length", str(args.seq_length),
        "--data.cache_dir", str(work / "cache"),
        "--data.media", json.dumps({"min_pixels": side, "max_pixels": side}),
        "--train.output_dir", str(work / f"run_{ranks}"),
        "--train.steps", str(args.steps),
        "--train.grad_accum", str(args.rows // ranks),
        "--train.micro_batch_size", "1",
        "--train.seed", str(args.seed),
        "--train.lr", "1e-4",
        "--train.warmup", "0",
        "--train.device", "cpu",
        "--train.save_every", "0",
        "--train.save_optimizer", "false",
        "--train.tensorboard", "false",
        "--train.log_every", "1000",
        "--overwrite",
    ]  # fmt: skip


def status_kib(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (this benchmark needs Linux)")


def worker(args: argparse.Namespace) -> None:
    """One rank: ``mmzoo train`` with the given arguments, then this rank's memory into ``args.worker``."""
    from mmzoo.cli import main as mmzoo_main

    torch.set_num_threads(args.threads)
    at_start = status_kib("VmRSS")  # torch and mmzoo imported, nothing built yet
    code = mmzoo_main(["train", *args.train_args])
    if code:
        sys.exit(code)
    rank = int(os.environ.get("RANK", "0"))
    memory = {"rank": rank, "start_kib": at_start, "peak_kib": status_kib("VmHWM")}
    (args.worker / f"rank_{rank}.json").write_text(json.dumps(memory))


@dataclass
class Result:
    """One world size's numbers."""

    ranks: int
    tokens_per_s: float
    seconds_per_step: float
    tokens_per_step: float
    first_loss: float
    last_loss: float
    peak_gib: list[float]  # per rank
    start_gib: float  # largest resident set right after the imports
    wall: float


def launch(args: argparse.Namespace, work: Path, ranks: int) -> Result:
    """``torchrun --nproc-per-node RANKS`` of this script in worker mode; its numbers."""
    out = work / f"memory_{ranks}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(Path(__file__).resolve()), "--threads", str(args.threads), "--worker", str(out),
        "--", *train_overrides(args, work, ranks),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"train_dist: the {ranks}-rank run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in (work / f"run_{ranks}" / "metrics.jsonl").read_text().splitlines()]
    timed = rows[args.warmup :]
    tokens, seconds = sum(r["tokens"] for r in timed), sum(r["seconds"] for r in timed)
    memory = [json.loads((out / f"rank_{rank}.json").read_text()) for rank in range(ranks)]
    return Result(
        ranks=ranks,
        tokens_per_s=tokens / seconds,
        seconds_per_step=seconds / len(timed),
        tokens_per_step=tokens / len(timed),
        first_loss=rows[0]["loss"],
        last_loss=rows[-1]["loss"],
        peak_gib=[m["peak_kib"] / 2**20 for m in memory],
        start_gib=max(m["start_kib"] for m in memory) / 2**20,
        wall=wall,
    )


def print_header(args: argparse.Namespace) -> None:
    print(f"Date: {datetime.date.today().isoformat()}")
    print(
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}; gloo, fp32, {args.threads} torch thread(s) per rank"
    )
    print(
        f"Model: qwen2_5_vl random init, text {args.layers} layers x {args.hidden} (ffn {args.ffn}, "
        f"vocab 151936 tied), vision {args.vision_depth} blocks x {args.vision_hidden}"
    )
    print(
        f"Data: {args.records} records (3 in 4 with a 448x448 photo), packed rows of {args.seq_length} "
        f"tokens, {args.rows} rows per step (global), {args.steps} steps, first {args.warmup} left out; "
        f"fastest of {args.repeat} interleaved launch(es) per world size"
    )


def print_table(results: list[Result]) -> None:
    base = next((r for r in results if r.ranks == 1), None)
    print()
    print(
        "| ranks | tokens/step | s/step | tokens/s | scaling efficiency | peak RSS per rank, GiB "
        "(max / min) | RSS after imports, GiB | loss step 1 -> last | wall s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        efficiency = f"{r.tokens_per_s / (r.ranks * base.tokens_per_s):.2f}" if base else "n/a"
        print(
            f"| {r.ranks} | {r.tokens_per_step:.0f} | {r.seconds_per_step:.2f} | {r.tokens_per_s:.0f} | "
            f"{efficiency} | {max(r.peak_gib):.2f} / {min(r.peak_gib):.2f} | {r.start_gib:.2f} | "
            f"{r.first_loss:.4f} -> {r.last_loss:.4f} | {r.wall:.0f} |"
        )
    cores = os.cpu_count() or 1
    busy = [r.ranks for r in results if r.ranks > cores]
    if busy:
        print(f"\n{', '.join(map(str, busy))} rank(s) on {cores} cores: oversubscribed, ranks share cores.")


# --- context parallel: activation memory per rank against sequence length -----------------------


def cp_model(args: argparse.Namespace) -> torch.nn.Module:
    """The small Qwen2.5-VL of ``--cp-memory`` (the vision tower is not run: text rows only)."""
    heads = args.hidden // 64
    text = {
        "num_layers": args.layers,
        "hidden_size": args.hidden,
        "ffn_hidden_size": args.ffn,
        "num_heads": heads,
        "num_kv_heads": max(1, heads // 2),
        "vocab_size": CP_VOCAB,
        "mrope_section": [8, 12, 12],
    }
    torch.manual_seed(args.seed)
    vision = {"out_hidden_size": args.hidden}
    return mmzoo.build_model("qwen2_5_vl", "tiny", text=text, vision=vision).train()


def cp_batch(tokens: int, sample: int, seed: int) -> dict[str, torch.Tensor]:
    """One packed text row of ``tokens`` tokens in samples of ``sample`` (the last one shorter)."""
    lengths = [min(sample, tokens - start) for start in range(0, tokens, sample)]
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, CP_VOCAB, (1, tokens), generator=generator)
    positions = torch.cat([torch.arange(n) for n in lengths])
    own_length = torch.tensor(lengths).repeat_interleave(torch.tensor(lengths))  # per token
    labels = torch.where(positions >= own_length * 3 // 4, input_ids, -100)
    cu_seqlens = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": positions.expand(3, 1, tokens),
        "cu_seqlens": cu_seqlens,
    }


def saved_activation_bytes(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[int, torch.Tensor]:
    """The forward's loss and the bytes of the distinct non-parameter storages it saved for backward
    (a DTensor's: its local tensor's)."""
    from torch.distributed.tensor import DTensor

    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = {local(p).untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        inner = local(t)
        try:
            key, size = inner.untyped_storage().data_ptr(), inner.untyped_storage().nbytes()
        except RuntimeError:  # a wrapper without storage (a collective's pending result): its own size
            key, size = id(inner), inner.numel() * inner.element_size()
        if key not in params:
            saved[key] = size
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**batch, return_logits=False).loss
    return sum(saved.values()), loss


def cp_worker(args: argparse.Namespace) -> None:
    """One rank of a ``--cp-memory`` launch: every length in turn, its numbers into ``args.cp_worker``."""
    from mmzoo.config import ParallelConfig
    from mmzoo.distributed.mesh import MeshShape, TrainMesh
    from mmzoo.distributed.parallelize import parallelize

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    dim = {args.worker_dim: size}
    mesh = TrainMesh.build(MeshShape(**dim), torch.device("cpu"))
    model = cp_model(args)
    parallelize(model, mesh, ParallelConfig(**dim))
    rows = []
    for tokens in args.cp_tokens:
        batch = cp_batch(tokens, args.cp_sample, args.seed)
        dist.barrier()
        started = time.perf_counter()
        activation, loss = saved_activation_bytes(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)
        dist.barrier()
        seconds = time.perf_counter() - started
        rows.append(
            {"tokens": tokens, "activation": activation, "hwm_kib": status_kib("VmHWM"), "s": seconds}
        )
        del loss
    (args.cp_worker / f"rank_{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def cp_launch(args: argparse.Namespace, work: Path, cp: int, dim: str = "cp") -> list[dict]:
    """One ``--cp-memory`` launch on ``cp`` ranks split along ``dim`` (``cp`` or ``tp``); per
    length, the maxima over its ranks."""
    out = work / f"{dim}_{cp}"
    out.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(cp),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        str(Path(__file__).resolve()), "--cp-worker", str(out), "--worker-dim", dim,
        "--threads", str(args.threads),
        "--layers", str(args.layers), "--hidden", str(args.hidden), "--ffn", str(args.ffn),
        "--seed", str(args.seed), "--cp-sample", str(args.cp_sample),
        "--cp-tokens", *map(str, args.cp_tokens),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    if done.returncode != 0:
        sys.exit(f"train_dist: the {dim}={cp} run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(cp)]
    return [
        {
            "tokens": rows[0]["tokens"],
            "activation": max(row["activation"] for row in rows),
            "hwm_kib": max(row["hwm_kib"] for row in rows),
            "s": max(row["s"] for row in rows),
        }
        for rows in zip(*ranks, strict=True)
    ]


def cp_memory(args: argparse.Namespace) -> None:
    """``--cp-memory``: every cp size in its own launch, then one table by sequence length."""
    print(f"Date: {datetime.date.today().isoformat()}")
    print(
        f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, "
        f"torch {torch.__version__}; gloo, fp32, {args.threads} torch thread(s) per rank"
    )
    print(
        f"Model: qwen2_5_vl text decoder, {args.layers} layers x {args.hidden} (ffn {args.ffn}, heads of 64, "
        f"vocab {CP_VOCAB}), replicated; packed text rows in samples of {args.cp_sample} tokens; "
        "one forward and backward per length"
    )
    work = args.work or Path(tempfile.mkdtemp(prefix="mmzoo-train-dist-cp-"))
    try:
        results = {f"cp={cp}": cp_launch(args, work, cp) for cp in args.cp}
        results |= {f"tp={tp}": cp_launch(args, work, tp, "tp") for tp in args.tp}
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"| tokens | mesh | activations per rank, MiB | vs {next(iter(results))} | "
        "peak RSS per rank, GiB | s |"
    )
    print("|---|---|---|---|---|---|")
    for i, tokens in enumerate(args.cp_tokens):
        base = next(iter(results.values()))[i]["activation"]
        for mesh, rows in results.items():
            row = rows[i]
            print(
                f"| {tokens} | {mesh} | {row['activation'] / 2**20:.1f} | "
                f"{row['activation'] / base:.3f} | {row['hwm_kib'] / 2**20:.2f} | {row['s']:.1f} |"
            )


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        worker(args)
        return
    if args.cp_worker is not None:
        cp_worker(args)
        return
    if args.cp_memory:
        cp_memory(args)
        return
    bad = [n for n in args.ranks if args.rows % n]
    if bad:
        sys.exit(f"train_dist: --rows {args.rows} is not a multiple of --ranks {bad}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mmzoo-train-dist-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        make_records(work / "records.jsonl", args.records, args.seed)
        print_header(args)
        best: dict[int, Result] = {}
        for _ in range(args.repeat):  # interleaved, so that a busy spell of the machine hits every size
            for n in args.ranks:
                result = launch(args, work, n)
                if n not in best or result.tokens_per_s > best[n].tokens_per_s:
                    best[n] = result
        print_table([best[n] for n in args.ranks])
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

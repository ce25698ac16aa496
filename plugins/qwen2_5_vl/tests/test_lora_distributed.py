"""LoRA on 2 ranks (FSDP2, gloo, CPU) against one process, loading the base from an HF directory
on the meta device: losses and adapters equal, the base on each rank bitwise the checkpoint's,
resume from a DCP checkpoint exact, and a frozen base stored in bf16 (the accelerator setting,
forced here on the CPU) trains the float32 adapters.

One torchrun launch of this file runs every 2-rank job (see :func:`test_distributed.run_jobs`);
its ``__main__`` also records, after each job, whether each rank's base equals the checkpoint and
the dtypes of its frozen and trainable parameters.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from launch import SMALL
from test_distributed import cut_at, run_jobs, torchrun_jobs  # noqa: F401  (cut_at: used by run_jobs)

import mmzoo
import mmzoo.train.loop as loop
from mmzoo.config import load_config
from mmzoo.train.loop import train

HERE = Path(__file__).resolve()
LORA = ["--model.lora", "{r: 4, alpha: 8, targets: [text.attention, text.mlp, vision.attention, projector]}"]
RUN = [*LORA, "--train.lr", "1e-2", "--train.loss_reduction", "per_token", "--train.steps", "3"]
ADAPTER = ["--train.lr", "1e-2", "--train.steps", "2"]
IMPORT = ["--model.load_adapter"]
BF16 = [*LORA, "--train.lr", "1e-2", "--train.steps", "2", "--train.precision", "bf16"]


def bf16_base(precision: str, device: torch.device) -> torch.dtype | None:
    """The accelerator decision, taken on the CPU too."""
    return torch.bfloat16 if precision == "bf16" else None


def bf16_policy(precision: str, device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    bf16 = torch.bfloat16
    return MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=torch.float32) if precision == "bf16" else None


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.testing import spread_weights_

    root = tmp_path_factory.mktemp("lora_distributed")
    torch.manual_seed(3)
    save_hf(spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny"), std=0.05), root / "hf")
    return root


def options(work: Path, output: Path, *extra: str) -> list[str]:
    return [*SMALL, "--model.load", str(work / "hf"), "--train.output_dir", str(output), *extra]


@pytest.fixture(scope="module")
def two_ranks(work) -> dict[str, dict]:
    """Every 2-rank job in one launch; rank 0's results by job name, with both ranks' checks."""
    two = work / "two"
    save, peft = ["--train.save_every", "2"], ["--train.save_peft", str(work / "peft")]
    jobs = [
        {"name": "hf", "args": options(work, two / "hf", *RUN, *save, *peft)},
        {"cut": [str(two / "hf"), 2, str(two / "resumed")]},
        {"name": "resumed", "args": options(work, two / "resumed", *RUN, *save), "resume": True},
        {"name": "bf16", "args": options(work, two / "bf16", *BF16)},
        {"name": "adapter", "args": options(work, two / "adapter", *ADAPTER, *IMPORT, peft[1])},
    ]
    ranks = torchrun_jobs(2, jobs, work / "results", timeout=900, script=HERE)
    checks = [json.loads((work / "results" / f"checks_{r}.json").read_text()) for r in range(2)]
    return {name: {**ranks[0][name], "checks": [c[name] for c in checks]} for name in ranks[0]}


def one_process(work: Path, name: str, *extra: str) -> loop.TrainResult:
    """The 1-process run with the 2 ranks' global batch (2 micro-batches a step)."""
    return train(
        load_config(None, options(work, work / "one" / name, *extra, "--train.grad_accum", "2")), out=quiet
    )


@pytest.mark.slow
def test_two_ranks_from_a_checkpoint_equal_one_process(work, two_ranks):
    one = one_process(work, "hf", *RUN)
    assert two_ranks["hf"]["losses"] == pytest.approx(one.losses, rel=1e-5)
    for check in two_ranks["hf"]["checks"]:  # each rank filled its shards of the base from the HF files
        assert check["base_equal"] and check["frozen"] == ["torch.float32"], check
    ours = dict(mmzoo.load_model(one.checkpoint).named_parameters())
    theirs = mmzoo.load_model(work / "two" / "hf")  # the DCP checkpoint's adapters on the base
    trained = {n for n, p in theirs.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    for name, param in theirs.named_parameters():
        tolerance = dict(rtol=1e-3, atol=1e-4) if name in trained else dict(rtol=0, atol=0)  # Adam: lr 1e-2
        torch.testing.assert_close(param, ours[name], **tolerance, msg=lambda m, name=name: f"{name}: {m}")
    assert (work / "peft" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_on_two_ranks_is_exact(work, two_ranks):
    assert two_ranks["resumed"]["losses"] == two_ranks["hf"]["losses"][2:]  # bitwise
    assert all(check["base_equal"] for check in two_ranks["resumed"]["checks"])
    straight, resumed = (mmzoo.load_model(work / "two" / name) for name in ("hf", "resumed"))
    theirs = dict(resumed.named_parameters())
    for name, param in straight.named_parameters():
        assert torch.equal(param, theirs[name]), name


@pytest.mark.slow
def test_bf16_frozen_base_on_two_ranks(work, two_ranks, monkeypatch):
    for check in two_ranks["bf16"]["checks"]:  # the base stored in bf16, the adapters in float32
        assert check["frozen"] == ["torch.bfloat16"] and check["trainable"] == ["torch.float32"], check
        assert check["base_equal"], check  # the checkpoint rounded to bf16, as one process does
    monkeypatch.setattr(loop, "frozen_dtype", bf16_base)
    one = one_process(work, "bf16", *BF16)
    # bf16 compute on both sides; the 2 ranks' sums run in other orders.
    assert two_ranks["bf16"]["losses"] == pytest.approx(one.losses, rel=1e-2)
    assert two_ranks["bf16"]["losses"] != pytest.approx(
        one_process(work, "fp32", *BF16[:-2]).losses, rel=1e-6
    )


@pytest.mark.slow
def test_imported_adapter_on_two_ranks_equals_one_process(work, two_ranks):
    one = one_process(work, "adapter", *ADAPTER, *IMPORT, str(work / "peft"))
    assert two_ranks["adapter"]["losses"] == pytest.approx(one.losses, rel=1e-5)
    assert all(check["base_equal"] for check in two_ranks["adapter"]["checks"])


# --- run by torchrun -----------------------------------------------------------------------------


def _checked(job_train, models: list, results: Path):
    """``train`` that records, after each job, this rank's checks of the model it trained."""
    rank, checks = int(os.environ["RANK"]), {}

    def run(cfg, **kwargs):
        result = job_train(cfg, **kwargs)
        checks[Path(cfg.train.output_dir).name] = _check(models.pop(), cfg.model.load, rank)
        (results / f"checks_{rank}.json").write_text(json.dumps(checks))
        return result

    return run


def _own_part(tensor: torch.Tensor, param: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's part of the checkpoint's ``tensor`` and of ``param`` (an FSDP shard along rows:
    the process group is gone after training, so no gathering)."""
    if not hasattr(param, "to_local"):
        return tensor, param
    chunks = tensor.chunk(param.device_mesh.size(), dim=0)
    return (chunks[rank] if rank < len(chunks) else tensor[:0]), param.to_local()


def _check(model: torch.nn.Module, load: str, rank: int) -> dict:
    """Whether the base equals the checkpoint (in its stored dtype), and the parameters' dtypes."""
    from mmzoo.api import open_weights
    from mmzoo.lora.meta import base_tensors

    base = base_tensors(model)
    parts = (_own_part(t.to(base[name].dtype), base[name], rank) for name, t in open_weights(load).items())
    equal = all(torch.equal(expected, held) for expected, held in parts)
    params = list(model.parameters())
    dtypes = {k: sorted({str(p.dtype) for p in params if p.requires_grad == k}) for k in (False, True)}
    return {"base_equal": equal, "frozen": dtypes[False], "trainable": dtypes[True]}


def _main(jobs_file: Path) -> None:
    import test_distributed

    models: list = []
    build = loop._sharded_lora_model

    def keep(*args, **kwargs):
        built = build(*args, **kwargs)
        models.append(built[0])
        return built

    def whole(cfg, spec):
        raise AssertionError(f"{cfg.model.load}: a LoRA run on many ranks built its whole base")

    loop._sharded_lora_model = keep
    loop._base_model = whole  # every job here loads its base on the meta device
    loop.frozen_dtype = bf16_base
    loop.mixed_precision = bf16_policy
    results = Path(json.loads(jobs_file.read_text())["results"])
    test_distributed.train = _checked(test_distributed.train, models, results)
    run_jobs(jobs_file)


if __name__ == "__main__":
    _main(Path(sys.argv[1]))

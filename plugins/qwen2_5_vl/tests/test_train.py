"""``mmzoo train`` on the tiny Qwen2.5-VL: outputs, resume, loss reductions, freezing, recompute,
config errors, faults and the Hugging Face export.

Runs use a few demo samples at small image sizes so that each step takes a fraction of a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from launch import SMALL  # data.media as SMALL_MEDIA
from torch.optim.optimizer import register_optimizer_step_post_hook

import mmzoo
import mmzoo.data.tokenizer as tokenizer_module
import mmzoo.train.loop as loop
from mmzoo.cli import main
from mmzoo.config import DataConfig, RecomputeConfig, load_config, to_dict
from mmzoo.data.collate import collate_packed, collate_padded
from mmzoo.data.dataset import build_dataset
from mmzoo.loss import LossReduction, batch_target_counts
from mmzoo.model import VLModel
from mmzoo.nn.recompute import set_recompute
from mmzoo.train.loop import DEMO_DATA, train

REPO = Path(__file__).resolve().parents[3]
SMALL_MEDIA = {"min_pixels": 4 * 28 * 28, "max_pixels": 16 * 28 * 28}
METRIC_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "samples_per_s", "seconds"}

# The run the resume tests reproduce: 6 steps (3 epochs of 2 packed rows) at a high lr, saving at
# steps 3 (mid-epoch) and 6.
REFERENCE = ["--train.steps", "6", "--train.lr", "1e-2", "--train.save_every", "3"]


@pytest.fixture(scope="module", autouse=True)
def cached_tokenizer():
    """Load the Qwen tokenizer once for the module (about 2 s per load); every run reads it."""
    load = tokenizer_module.load_tokenizer
    loaded: dict[str, object] = {}

    def cached(path):
        if str(path) not in loaded:
            loaded[str(path)] = load(path)
        return loaded[str(path)]

    with pytest.MonkeyPatch.context() as m:
        m.setattr(tokenizer_module, "load_tokenizer", cached)
        yield


def config(output_dir, *extra: str):
    return load_config(None, [*SMALL, "--train.output_dir", str(output_dir), *extra])


def quiet(_: str) -> None:
    pass


def metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def weights(path) -> dict[str, torch.Tensor]:
    return dict(mmzoo.load_model(path).state_dict())


def initial_weights(seed: int = 42) -> dict[str, torch.Tensor]:
    """The weights ``train`` starts from with ``train.seed`` = ``seed`` (it seeds, then builds)."""
    torch.manual_seed(seed)
    return dict(mmzoo.build_model("qwen2_5_vl", "tiny").state_dict())


class Faults:
    """Wraps ``VLModel.forward``: ``plan[call]`` (1-based) is ``"nan"`` or an exception to raise."""

    def __init__(self, monkeypatch, plan: dict[int, object]) -> None:
        self.calls = 0
        forward = VLModel.forward

        def faulty(model, *args, **kwargs):
            self.calls += 1
            action = plan.get(self.calls)
            if isinstance(action, BaseException) or (
                isinstance(action, type) and issubclass(action, BaseException)
            ):
                raise action
            out = forward(model, *args, **kwargs)
            if action == "nan":
                out.loss = out.loss * float("nan")
            return out

        monkeypatch.setattr(VLModel, "forward", faulty)


# --- 1. the embedded default ------------------------------------------------------------------


def test_default_run_writes_checkpoint_and_metrics(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert main(["train", "--train.steps", "3", "--train.output_dir", str(out_dir)]) == 0
    stdout = capsys.readouterr().out
    assert f"checkpoint: {out_dir / 'iter_0000003'}" in stdout
    assert (out_dir / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert (out_dir / "iter_0000003" / "mp_rank_00" / "model.safetensors").is_file()
    assert sorted(p.name for p in out_dir.glob("iter_*")) == ["iter_0000003"]  # save_every 60 > 3

    rows = metrics(out_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert METRIC_KEYS <= row.keys()
        assert row["tokens"] > 0 and row["seconds"] > 0 and row["grad_norm"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["tokens"] / row["seconds"])
        assert 10 < row["loss"] < 13  # ln(151936) = 11.93 at random init
    # The demo's 1e-2 peak: warmup is 10% of 3 steps (none), then cosine decay.
    assert rows[0]["lr"] == pytest.approx(1e-2)
    assert rows[0]["lr"] > rows[1]["lr"] > rows[2]["lr"] > 0
    # One epoch of the 14 demo samples; the dummy image of a text-only row is not a sample.
    assert sum(round(r["samples_per_s"] * r["seconds"]) for r in rows) == 14
    state = json.loads((out_dir / "iter_0000003" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["samples"] == 14 and state["position"] == 3
    # The run itself: step 1's loss is that of the random init on the first packed row.
    assert rows[0]["loss"] == pytest.approx(11.9656, abs=1e-3)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run (and its output directory) that resumed runs must reproduce."""
    output_dir = tmp_path_factory.mktemp("reference")
    return train(config(output_dir, *REFERENCE), out=quiet), output_dir


def test_loss_goes_down(reference):
    losses = reference[0].losses
    assert len(losses) == 6
    assert losses[-1] < losses[0] - 1.0, losses


# --- 2. resume ---------------------------------------------------------------------------------


def test_resume_is_exact(reference, tmp_path, monkeypatch):
    straight, straight_dir = reference
    # The same run crashes in step 5, after its step-3 checkpoint; the resumed run redoes 4-6.
    cfg = config(tmp_path, *REFERENCE)
    with monkeypatch.context() as m:
        Faults(m, {5: RuntimeError("crash in step 5")})
        with pytest.raises(RuntimeError, match="crash in step 5"):
            train(cfg, out=quiet)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2, 3, 4]
    logged: list[str] = []
    resumed = train(cfg, resume=True, out=logged.append)
    assert f"resumed from {tmp_path / 'iter_0000003'} at step 3" in logged
    assert "training 3 steps (2 per epoch)" in "\n".join(logged)

    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 7))  # step 4 once, from the resumed run
    assert [r["loss"] for r in rows[3:]] == resumed.losses
    assert [r["loss"] for r in rows] == straight.losses  # bitwise, step by step
    assert [r["lr"] for r in rows] == [r["lr"] for r in metrics(straight_dir)]
    a, b = weights(straight.checkpoint), weights(resumed.checkpoint)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_a_second_run_into_a_run_needs_resume_or_overwrite(tmp_path, capsys):
    args = ["train", *SMALL, "--data.max_samples", "2", "--train.output_dir", str(tmp_path), "--train.steps"]
    assert main([*args, "2"]) == 0
    before = (tmp_path / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main([*args, "1"]) == 2
    assert capsys.readouterr().err == (  # one line, before any preprocessing
        f"mmzoo: error: train.output_dir {tmp_path} already holds a run (checkpoint iter_0000002); "
        "pass --resume to continue it or --overwrite to delete it and start over\n"
    )
    assert (tmp_path / "metrics.jsonl").read_text() == before
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert main([*args, "1", "--resume", "--overwrite"]) == 2
    assert "give either --resume (continue the run) or --overwrite" in capsys.readouterr().err

    assert main([*args, "1", "--overwrite"]) == 0  # starts clean
    assert [r["step"] for r in metrics(tmp_path)] == [1]
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000001"]


def test_metrics_without_a_checkpoint_need_overwrite(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 11.9}\n')  # killed before its first save
    assert main(["train", *SMALL, "--train.output_dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"mmzoo: error: train.output_dir {tmp_path} already holds the metrics.jsonl of a run that saved "
        "no checkpoint; pass --overwrite to delete it and start over\n"
    )
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 11.9}\n'


def test_resume_with_another_length_warns(reference, tmp_path, capsys):
    run = shutil.copytree(reference[1], tmp_path / "run")
    tracker = run / "iter_0000006" / "mp_rank_00" / "model.safetensors"
    saved = tracker.stat()
    # The same length: a finished run has nothing to do, and its checkpoint is not rewritten.
    result = train(config(run, *REFERENCE), resume=True, out=quiet)
    assert result.losses == [] and result.checkpoint == run / "iter_0000006"
    assert tracker.stat().st_ino == saved.st_ino and tracker.stat().st_mtime_ns == saved.st_mtime_ns
    assert "warning" not in capsys.readouterr().err

    with pytest.raises(mmzoo.MmzooError, match="checkpoint is at step 6, past this run's 4 steps"):
        train(config(run, *REFERENCE, "--train.steps", "4"), resume=True, out=quiet)
    result = train(config(run, *REFERENCE, "--train.steps", "7"), resume=True, out=quiet)
    assert len(result.losses) == 1 and result.checkpoint == run / "iter_0000007"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "mmzoo: warning: the resumed run was 6 steps long and this one is 7: the learning rate followed "
        "the 6-step schedule up to step 6 and follows the 7-step one from there"
    ]
    state = json.loads((run / "iter_0000007" / "trainer_state.json").read_text())
    assert state["step"] == 7 and state["total_steps"] == 7


def plan_of(cfg, epochs: int) -> tuple[list[list[list[int]]], list[int]]:
    """The micro-batches (sample indices) of each epoch a run of ``cfg`` makes, and sample lengths."""
    spec = mmzoo.get_model("qwen2_5_vl")
    data = dataclasses.replace(cfg.data, data=str(DEMO_DATA) if cfg.data.data == "demo" else cfg.data.data)
    dataset = build_dataset(spec, spec.variant("tiny"), spec.default_tokenizer(), data, log=quiet)
    t = cfg.train
    return [dataset.batches(t.micro_batch_size, t.seed, e) for e in range(epochs)], dataset.lengths


# Six demo samples in rows of 210 tokens make 2, 2, then 3 rows per epoch; in rows of 110 tokens
# 6, 5, 5 (packing follows each epoch's shuffle).
@pytest.mark.parametrize(("seq_length", "grad_accum"), [(210, 1), (110, 2)])
def test_epochs_run_every_epoch_once_and_the_schedule_ends_with_the_run(tmp_path, seq_length, grad_accum):
    cfg = config(
        tmp_path,
        *("--data.max_samples", "6", "--data.seq_length", str(seq_length)),
        *("--train.steps", "0", "--train.epochs", "3", "--train.grad_accum", str(grad_accum)),
        *("--train.schedule", "linear", "--train.warmup", "0", "--train.lr", "1e-3", "--train.min_lr", "0"),
    )
    plans, _ = plan_of(cfg, 3)
    per_epoch = [-(-len(plan) // grad_accum) for plan in plans]  # a step never spans two epochs
    assert len({len(plan) for plan in plans}) > 1  # else the rows do not vary and nothing is tested
    logged: list[str] = []
    result = train(cfg, out=logged.append)
    total = sum(per_epoch)
    each = "2-3" if grad_accum == 1 else "3"  # rows 2, 2, 3; or 6, 5, 5 rows in pairs
    assert f"training {total} steps ({each} per epoch)" in "\n".join(logged)
    rows = metrics(tmp_path)
    assert [r["epoch"] for r in rows] == [e for e, n in enumerate(per_epoch) for _ in range(n)]
    # Linear decay to 0 over the whole run: step k (from 0) trains at lr * (1 - k / total).
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * (1 - k / total) for k in range(total)])
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["samples"] == 3 * 6 and (state["epoch"], state["position"]) == (2, len(plans[2]))


@pytest.mark.parametrize("packing", [True, False])
def test_tokens_metric_counts_the_samples_not_the_dummy_image(tmp_path, packing):
    data = tmp_path / "text.jsonl"
    record = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}
    data.write_text("".join(json.dumps(record) + "\n" for _ in range(4)))
    cfg = config(
        tmp_path / "run",
        *("--data.data", str(data), "--data.packing", str(packing).lower(), "--data.seq_length", "64"),
        *("--train.steps", "2", "--train.micro_batch_size", "1" if packing else "2"),  # 2 samples each
    )
    (plan,), lengths = plan_of(cfg, 1)
    expected = [sum(lengths[i] for i in indices) for indices in plan]
    assert len(expected) == 2 and expected[0] > 0  # text-only: every batch gets the dummy image
    train(cfg, out=quiet)
    assert [r["tokens"] for r in metrics(tmp_path / "run")] == expected


@pytest.mark.parametrize(("overrides", "variant"), [({}, "tiny"), ({"text": {"num_layers": 1}}, None)])
def test_a_loaded_hf_model_records_its_real_variant(tmp_path, overrides, variant):
    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.checkpoint.mm import read_mm_meta

    hf = tmp_path / "hf"
    save_hf(mmzoo.build_model("qwen2_5_vl", "tiny", **overrides), hf)
    # model.variant names random inits only: 7b here must not end up in the checkpoint.
    cfg = config(tmp_path / "run", "--model.load", str(hf), "--model.variant", "7b", "--train.steps", "1")
    logged: list[str] = []
    result = train(cfg, out=logged.append)
    assert read_mm_meta(result.checkpoint)["variant"] == variant
    origin = f"{variant or 'no registered variant'}, from {hf}"
    assert logged[0].startswith(f"model qwen2_5_vl ({origin}) on ") and logged[0].endswith(", 8 samples")
    assert mmzoo.load_model(result.checkpoint).config == mmzoo.load_model(hf).config


# --- 3. loss reductions --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_and_samples():
    spec = mmzoo.get_model("qwen2_5_vl")
    torch.manual_seed(0)
    model = mmzoo.build_model("qwen2_5_vl", "tiny").train()
    tokenizer = spec.default_tokenizer()
    data = DataConfig(data=str(DEMO_DATA), max_samples=4, seq_length=512, packing=False, media=SMALL_MEDIA)
    dataset = build_dataset(spec, model.config, tokenizer, data, log=quiet)
    samples = [dataset[i] for i in range(4)]
    return model, samples, tokenizer.pad_token_id, dataset.dummy


def grads(model, batches, kind: str) -> dict[str, torch.Tensor]:
    """Gradients of one optimizer step over ``batches`` (micro-batches) with reduction ``kind``."""
    counts = [batch_target_counts(b) for b in batches]
    reduction = LossReduction(kind, len(batches), sum(c[0] for c in counts), sum(c[1] for c in counts))
    model.zero_grad(set_to_none=True)
    for batch in batches:
        model(**batch, loss_reduction=reduction, return_logits=False).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, **tolerance):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], msg=lambda m, name=name: f"{name}: {m}", **tolerance)


def max_relative_difference(a, b) -> float:
    return max(float((a[n] - b[n]).norm() / a[n].norm().clamp(min=1e-12)) for n in a)


@pytest.mark.parametrize("kind", ["per_token", "per_sample"])
def test_reduction_is_invariant_to_the_split(tiny_and_samples, kind):
    model, samples, pad, dummy = tiny_and_samples
    answers = [int((s.labels != -100).sum()) for s in samples]
    assert len(set(answers)) == 4, answers  # different answer lengths, else nothing is tested
    padded = grads(model, [collate_padded(samples, pad, dummy)], kind)
    split = grads(model, [collate_padded([s], pad, dummy) for s in samples], kind)
    packed = grads(model, [collate_packed(samples, dummy)], kind)
    assert len(padded) == sum(1 for _ in model.parameters())  # every part got a gradient
    assert_grads_close(padded, split, rtol=1e-4, atol=1e-7)
    assert_grads_close(padded, packed, rtol=1e-4, atol=1e-7)


def test_default_reduction_depends_on_the_split(tiny_and_samples):
    model, samples, pad, dummy = tiny_and_samples
    padded = grads(model, [collate_padded(samples, pad, dummy)], "default")
    split = grads(model, [collate_padded([s], pad, dummy) for s in samples], "default")
    # One micro-batch weighs every token alike; four weigh every sample alike.
    assert max_relative_difference(padded, split) > 0.05
    # ... while one padded micro-batch and one packed row are the same micro-batch.
    assert_grads_close(
        padded, grads(model, [collate_packed(samples, dummy)], "default"), rtol=1e-4, atol=1e-7
    )


# --- 4. freezing -------------------------------------------------------------------------------


def test_freeze_vision_and_projector(tmp_path):
    logged: list[str] = []
    cfg = config(tmp_path, "--train.steps", "2", "--model.freeze", "[vision, projector]")
    result = train(cfg, out=logged.append)
    # The trainable summary: one line per group, "  vision  0.24M  frozen".
    states = {
        line.split()[0]: line.split()[-1]
        for line in "\n".join(logged).splitlines()
        if line.startswith("  ") and line.split()[0] in ("vision", "projector", "language")
    }
    assert states == {"vision": "frozen", "projector": "frozen", "language": "trainable"}

    before, after = initial_weights(), weights(result.checkpoint)
    assert before.keys() == after.keys()
    for name in before:
        frozen = name.startswith("image_encoder.")
        assert torch.equal(before[name], after[name]) == frozen, name


def test_freeze_unknown_group_is_an_error(tmp_path, capsys):
    args = ["train", *SMALL, "--train.output_dir", str(tmp_path), "--model.freeze", "[visoin]"]
    assert main(args) == 2
    assert "model.freeze: unknown group 'visoin' (did you mean 'vision'?)" in capsys.readouterr().err


# --- 5. activation recompute ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "vision_calls", "text_calls"),
    [
        (RecomputeConfig("full", "uniform", 1), 4, 2),  # every layer
        (RecomputeConfig("full", "uniform", 3), 2, 1),  # chunks of 3 layers: 4 -> 2, 2 -> 1
        (RecomputeConfig("full", "block", 1), 1, 1),  # only the first layer
        (RecomputeConfig("selective"), 4, 2),  # every attention core
    ],
    ids=["full-uniform-1", "full-uniform-3", "full-block-1", "selective"],
)
def test_recompute_keeps_gradients(tiny_and_samples, monkeypatch, policy, vision_calls, text_calls):
    import mmzoo.nn.layers as layers
    import mmzoo.nn.recompute as recompute

    model, samples, _, dummy = tiny_and_samples
    batch = collate_packed(samples[:2], dummy)
    none = RecomputeConfig()
    set_recompute(model.image_encoder.encoder, none)
    set_recompute(model.text_decoder, none)
    expected = grads(model, [batch], "per_token")

    calls: list[str] = []
    running = [""]  # the tower whose recompute is on

    def counting(module):
        real = module.checkpoint

        def checkpoint(*args, **kwargs):
            calls.append(running[0])
            return real(*args, **kwargs)

        monkeypatch.setattr(module, "checkpoint", checkpoint)

    counting(recompute)
    counting(layers)
    try:
        for tower, module in (("vision", model.image_encoder.encoder), ("text", model.text_decoder)):
            running[0] = tower
            set_recompute(module, policy)
            tower_grads = grads(model, [batch], "per_token")
            assert_grads_close(tower_grads, expected, rtol=1e-6, atol=1e-8)
            set_recompute(module, none)
    finally:
        set_recompute(model.image_encoder.encoder, none)
        set_recompute(model.text_decoder, none)
    assert calls.count("vision") == vision_calls and calls.count("text") == text_calls, calls


# --- 6. config errors and config files ----------------------------------------------------------


def test_unknown_key_suggests_the_nearest(capsys):
    assert main(["train", "--train.lrr", "1e-4"]) == 2
    err = capsys.readouterr().err
    assert err == "mmzoo: error: unknown config key 'train.lrr' (did you mean 'train.lr'?)\n"


def test_bad_literal_names_the_choices(capsys):
    assert main(["train", "--train.schedule", "cosin"]) == 2
    err = capsys.readouterr().err
    assert "train.schedule: 'cosin' is not one of cosine, linear, constant (did you mean 'cosine'?)" in err
    assert main(["train", "--train.loss_reduction", "token"]) == 2
    assert "default, per_sample, per_token" in capsys.readouterr().err


def test_bad_types_are_errors(capsys):
    assert main(["train", "--train.steps", "many"]) == 2
    assert "train.steps: expected int, got 'many'" in capsys.readouterr().err
    assert main(["train", "--data.packing", "maybe"]) == 2
    assert "data.packing: expected true or false, got 'maybe'" in capsys.readouterr().err
    assert main(["train", "--train.steps", "true"]) == 2  # bool is an int subclass in Python
    assert "train.steps: expected int, got True" in capsys.readouterr().err
    assert main(["train", "--train.betas", "[0.9, 0.99, 0.5]"]) == 2
    assert "train.betas: expected a list of 2 values, got [0.9, 0.99, 0.5]" in capsys.readouterr().err
    assert load_config(None, ["--train.betas", "[0.8, 0.9]"]).train.betas == (0.8, 0.9)


def test_missing_config_file(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    assert main(["train", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"mmzoo: error: config file {missing} does not exist\n"


def keys(tree: dict, prefix: str = "") -> set[str]:
    """Dotted keys of printed YAML (dict-valued options such as data.media, and kernels, are leaves)."""
    out = set()
    for key, value in tree.items():
        if isinstance(value, dict) and key not in ("overrides", "media", "kernels"):
            out |= keys(value, f"{prefix}{key}.")
        else:
            out.add(prefix + key)
    return out


def fields(config, prefix: str = "") -> set[str]:
    """Dotted keys of a config dataclass, from its fields."""
    out = set()
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            out |= fields(value, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


def test_print_config_shows_every_key(capsys):
    kernels = ["--kernels.attention", "sdpa", "--kernels.layer_norm", "reference"]
    assert main(["train", "--print-config", "--train.lr", "2e-5", "--save-hf", "hf_out", *kernels]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    expected = to_dict(load_config(None, ["--train.lr", "2e-5", "--train.save_hf", "hf_out", *kernels]))
    assert printed == expected
    assert printed["kernels"] == {"attention": "sdpa", "layer_norm": "reference"}
    assert {"model", "data", "train"} <= set(printed)
    assert keys(printed) == fields(mmzoo.config.Config())
    assert "recompute_text.num_layers" in " ".join(keys(printed["model"]))
    assert printed["train"]["lr"] == 2e-5 and printed["train"]["steps"] == 120  # the demo's steps


def test_print_config_describes_every_key(capsys):
    assert main(["train", "--print-config"]) == 0
    out = capsys.readouterr().out
    keyed = [line for line in out.splitlines() if line.startswith("  ")]
    config = mmzoo.config.Config()
    sections = [getattr(config, f.name) for f in dataclasses.fields(config)]
    assert len(keyed) == sum(len(dataclasses.fields(v)) for v in sections if dataclasses.is_dataclass(v))
    described = dict(line.strip().split("  # ", 1) for line in keyed)
    assert "kernels: {}  # op -> backend" in out  # a mapping: any registered op, none named by default
    assert all(text.strip() for text in described.values())
    assert described["micro_batch_size: 1"].startswith(
        "samples per micro-batch; with `data.packing` on, packed rows of `data.seq_length` tokens"
    )
    assert described["lr: 0.01"] == "peak learning rate (after warmup)."


def test_config_file_then_overrides(tmp_path, capsys):
    file = tmp_path / "run.yaml"
    file.write_text(
        "model: {freeze: [vision]}\n"
        "data: {seq_length: 640, media: {max_pixels: 12544}}\n"
        "train: {lr: 2e-4, steps: 7, warmup: 2}\n"  # 2e-4 without a dot: YAML reads a string
    )
    assert main(["train", "--config", str(file), "--train.lr", "5e-4", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["lr"] == 5e-4  # the override wins over the file
    assert printed["train"]["steps"] == 7 and printed["train"]["warmup"] == 2.0
    assert printed["data"]["seq_length"] == 640 and printed["data"]["media"] == {"max_pixels": 12544}
    assert printed["model"]["freeze"] == ["vision"]
    assert printed["train"]["epochs"] == 1 and printed["data"]["packing"] is True  # defaults, not the demo's


@pytest.mark.parametrize("path", sorted((REPO / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_example_configs_load(path, capsys):
    assert main(["train", "--config", str(path), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(path))
    assert printed["model"]["name"] == path.name.rsplit("_", 1)[0]  # qwen2_5_vl_7b.yaml, internvl3_8b.yaml
    assert printed["model"]["variant"] in mmzoo.get_model(printed["model"]["name"]).variants


def test_there_are_example_configs():
    assert len(list((REPO / "examples" / "configs").glob("*.yaml"))) >= 4


# --- 7. faults -----------------------------------------------------------------------------------


def test_nonfinite_loss_stops_and_names_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    Faults(monkeypatch, {3: "nan"})
    args = [
        "train",
        *SMALL,
        "--train.output_dir",
        str(tmp_path),
        "--train.steps",
        "5",
        "--train.save_every",
        "2",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan)" in err and "at step 3;" in err
    assert f"the last good checkpoint is {tmp_path / 'iter_0000002'}" in err
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert [r["step"] for r in metrics(tmp_path)] == [1, 2]


def test_nonfinite_loss_skip_continues(tmp_path, monkeypatch):
    Faults(monkeypatch, {2: "nan"})
    result = train(config(tmp_path, "--train.steps", "3", "--train.on_nonfinite", "skip"), out=quiet)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 3]
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert result.checkpoint == tmp_path / "iter_0000003"
    assert all(torch.isfinite(t).all() for t in weights(result.checkpoint).values())


def test_ctrl_c_saves_a_checkpoint(tmp_path, monkeypatch, capsys):
    Faults(monkeypatch, {2: KeyboardInterrupt})  # Ctrl-C in step 2's forward: step 1 is complete
    args = ["train", *SMALL, "--train.output_dir", str(tmp_path), "--train.steps", "6"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "interrupted at step 1: saving a checkpoint" in out
    assert f"checkpoint: {tmp_path / 'iter_0000001'}" in out
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    state = json.loads((tmp_path / "iter_0000001" / "trainer_state.json").read_text())
    assert state["step"] == 1 and state["position"] == 1  # one packed row consumed


def test_ctrl_c_between_the_step_and_its_update(reference, tmp_path, monkeypatch):
    """An interrupt after backward but before the optimizer step must not save that step as done."""
    calls = 0
    get_last_lr = torch.optim.lr_scheduler.LambdaLR.get_last_lr

    def interrupted(self):
        nonlocal calls
        calls += 1
        if calls == 4:  # in step 4, after backward and clipping, before optimizer.step()
            raise KeyboardInterrupt
        return get_last_lr(self)

    with monkeypatch.context() as m:
        m.setattr(torch.optim.lr_scheduler.LambdaLR, "get_last_lr", interrupted)
        cut = train(config(tmp_path, *REFERENCE), out=quiet)
    # Step 4 never updated anything: the newest checkpoint is still step 3's (the save_every one).
    assert cut.interrupted and cut.checkpoint == tmp_path / "iter_0000003"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert not (tmp_path / "iter_0000004").exists()
    assert cut.losses == reference[0].losses[:3]
    name = "iter_0000003/trainer_state.json"
    assert json.loads((tmp_path / name).read_text()) == json.loads((reference[1] / name).read_text())


def test_ctrl_c_right_after_the_optimizer_step(reference, tmp_path):
    """A Ctrl-C just after step 3's optimizer.step(): the step's bookkeeping completes, then the run
    saves step 3 (the weights after 3 steps, under iteration 3) with step 3's metrics row."""
    steps = 0

    def ctrl_c(optimizer, args, kwargs):
        nonlocal steps
        steps += 1
        if steps == 3:
            os.kill(os.getpid(), signal.SIGINT)

    handle = register_optimizer_step_post_hook(ctrl_c)
    try:
        cut = train(config(tmp_path, *REFERENCE), out=quiet)
    finally:
        handle.remove()
    assert cut.interrupted and cut.checkpoint == tmp_path / "iter_0000003"
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003"]
    assert [r["loss"] for r in metrics(tmp_path)] == reference[0].losses[:3]
    expected, got = weights(reference[1] / "iter_0000003"), weights(cut.checkpoint)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    name = "iter_0000003/trainer_state.json"
    assert json.loads((tmp_path / name).read_text()) == json.loads((reference[1] / name).read_text())


def fp16_on_cpu(monkeypatch):
    """fp16 autocast and loss scaling run on the CPU too (slowly, so users are steered to bf16)."""
    monkeypatch.setattr(loop, "FP16_DEVICES", ("cuda", "cpu"))
    return ["--train.precision", "fp16", "--train.device", "cpu", "--data.max_samples", "1"]


def test_fp16_nonfinite_loss_stops(tmp_path, monkeypatch, capsys):
    args = ["train", *SMALL, *fp16_on_cpu(monkeypatch), "--train.output_dir", str(tmp_path)]
    Faults(monkeypatch, {2: "nan"})
    assert main([*args, "--train.steps", "3"]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss (nan) or gradient norm (nan) at step 2; no checkpoint was saved yet" in err
    assert [r["step"] for r in metrics(tmp_path)] == [1]


def test_fp16_nonfinite_loss_skip_continues(tmp_path, monkeypatch):
    extra = [*fp16_on_cpu(monkeypatch), "--train.steps", "3", "--train.on_nonfinite", "skip"]
    Faults(monkeypatch, {2: "nan"})
    result = train(config(tmp_path, *extra), out=quiet)
    assert [r["step"] for r in metrics(tmp_path)] == [1, 3]  # step 3 ran after the skipped one
    assert all(torch.isfinite(torch.tensor(result.losses))) and len(result.losses) == 2
    assert all(torch.isfinite(t).all() for t in weights(result.checkpoint).values())


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("keep")
    base = ["train", *SMALL, "--train.steps", "1"]
    assert main([*base, "--train.output_dir", str(file)]) == 2
    err = capsys.readouterr().err
    assert err == f"mmzoo: error: train.output_dir: {file} is a file; give a directory path\n"
    assert main([*base, "--train.output_dir", str(file / "run")]) == 2
    assert capsys.readouterr().err == (
        f"mmzoo: error: train.output_dir: cannot create {file / 'run'} (Not a directory)\n"
    )
    run = tmp_path / "run"
    assert main([*base, "--train.output_dir", str(run), "--save-hf", str(file)]) == 2
    err = capsys.readouterr().err
    assert err == f"mmzoo: error: train.save_hf: {file} is a file; give a directory path\n"
    # The export replaces its directory: never one that is not a checkpoint, nor the run's own.
    assert main([*base, "--train.output_dir", str(run), "--save-hf", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        f"mmzoo: error: train.save_hf: {tmp_path} is a directory but not a Hugging Face checkpoint, and "
        "the export replaces it; give a new directory\n"
    )
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    inside = tmp_path / "hf" / "run"
    assert main([*base, "--train.output_dir", str(inside), "--save-hf", str(tmp_path / "hf")]) == 2
    assert f"train.save_hf: {tmp_path / 'hf'} holds train.output_dir {inside}" in capsys.readouterr().err
    assert file.read_text() == "keep" and not (tmp_path / "hf" / "run" / "metrics.jsonl").exists()


def test_an_unusable_kernel_is_an_error_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MMZOO_CACHE", str(tmp_path / "cache"))
    args = [
        "train",
        *SMALL,
        "--train.output_dir",
        str(tmp_path / "run"),
        "--data.cache_dir",
        str(tmp_path / "prep"),
    ]
    assert main([*args, "--kernels.attention", "flash"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "mmzoo: error: kernels.attention: backend 'flash' is unavailable on cpu: runs on cuda, not cpu\n"
    )
    assert not (tmp_path / "prep").exists()  # no preprocessing ran


@pytest.mark.parametrize("lr", ["1e38", "inf", "nan", "-1e-4", "1.5"])
def test_unusable_learning_rate(lr, tmp_path, capsys):
    assert main(["train", "--train.lr", lr, "--train.output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"mmzoo: error: train.lr: {float(lr):g} is not a usable learning rate;")
    assert err.count("\n") == 1 and not (tmp_path / "run").exists()  # nothing done


def test_keep_last_below_one_is_an_error_before_any_work(tmp_path, capsys):
    args = ["train", *SMALL, "--train.steps", "1", "--train.keep_last", "0"]
    assert main([*args, "--train.output_dir", str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err == (
        "mmzoo: error: train.keep_last must be at least 1 (or null to keep all), got 0\n"
    )
    assert not (tmp_path / "run").exists()  # checked before training, not at the first save


def test_resume_without_checkpoint_is_an_error(tmp_path, capsys):
    args = ["train", *SMALL, "--train.output_dir", str(tmp_path), "--resume"]
    assert main(args) == 2
    assert f"--resume: no checkpoint in {tmp_path}" in capsys.readouterr().err


# --- 8. Hugging Face export ---------------------------------------------------------------------


def test_save_hf_matches_transformers(tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    hf_dir = tmp_path / "hf"
    out_dir = tmp_path / "run"
    args = [
        "train",
        *SMALL,
        "--train.output_dir",
        str(out_dir),
        "--train.steps",
        "1",
        "--save-hf",
        str(hf_dir),
    ]
    assert main(args) == 0
    assert (hf_dir / "config.json").is_file() and (hf_dir / "model.safetensors").is_file()
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / "tokenizer_config.json").is_file()

    ours = mmzoo.load_model(out_dir).eval()
    fc1 = "image_encoder.projector.encoder.linear_fc1.weight"
    assert not torch.equal(ours.state_dict()[fc1], initial_weights()[fc1])
    spec = mmzoo.get_model("qwen2_5_vl")
    data = DataConfig(data=str(DEMO_DATA), max_samples=2, seq_length=512, packing=False, media=SMALL_MEDIA)
    dataset = build_dataset(spec, ours.config, tokenizer_module.load_tokenizer(hf_dir), data, log=quiet)
    sample = dataset[0]
    batch = {
        "input_ids": sample.input_ids[None],
        "pixel_values": sample.media["pixel_values"],
        "image_grid_thw": sample.media["image_grid_thw"],
    }
    theirs = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir).eval()
    types = (batch["input_ids"] == ours.config.image_token_id).int()
    with torch.no_grad():
        expected = theirs(**batch, mm_token_type_ids=types).logits
        got = ours(sample.input_ids[None], media=sample.media).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# --- 9. TensorBoard -----------------------------------------------------------------------------


def test_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (optional)")
    cfg = load_config(None, [*SMALL, "--train.output_dir", str(tmp_path), "--train.steps", "2"])
    cfg = mmzoo.config.merge(cfg, {"train": {"tensorboard": True}})
    train(cfg, out=quiet)
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)

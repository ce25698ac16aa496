"""LoRA training on the tiny Qwen2.5-VL: only adapters train, checkpoints hold only them, resume
is exact, and a checkpoint loads back for inference."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from launch import SMALL
from safetensors import safe_open

import mmzoo
import mmzoo.train.loop as loop
from mmzoo.checkpoint.mm import save_mm
from mmzoo.cli import main
from mmzoo.config import load_config
from mmzoo.lora.peft_format import import_adapter, save_peft
from mmzoo.model import VLModel
from mmzoo.train.loop import train

LORA = ["--model.lora", "{r: 4, alpha: 8, targets: [text.attention, text.mlp, vision.attention, projector]}"]
RUN = ["--train.steps", "3", "--train.lr", "1e-2", *LORA]


def config(output_dir, *extra: str):
    return load_config(None, [*SMALL, "--train.output_dir", str(output_dir), *extra])


def quiet(_: str) -> None:
    pass


def trained_model(monkeypatch, cfg) -> tuple[loop.TrainResult, VLModel]:
    """Run ``cfg``; returns the result and the model the run trained (in memory)."""
    models: list[VLModel] = []
    build = loop._model_and_tokenizer

    def keep(*args, **kwargs):
        built = build(*args, **kwargs)
        models.append(built[0])
        return built

    monkeypatch.setattr(loop, "_model_and_tokenizer", keep)
    return train(cfg, out=quiet), models[0]


def base_weights(seed: int = 42) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(mmzoo.build_model("qwen2_5_vl", "tiny").state_dict())


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--train.loss_reduction", "per_token", "--data.packing", "false"],
        ["--train.loss_reduction", "per_sample", "--model.recompute_text.granularity", "full"],
        ["--model.recompute_vision.granularity", "selective", "--train.grad_accum", "2"],
    ],
    ids=["default", "per_token-padded", "per_sample-recompute", "selective-accum"],
)
def test_only_adapters_train(tmp_path, monkeypatch, extra):
    result, model = trained_model(monkeypatch, config(tmp_path, *RUN, *extra))
    initial = base_weights()
    trained = dict(model.named_parameters())
    for name, param in trained.items():
        base = name.replace(".base_layer.", ".")
        if ".lora_" in name:
            assert param.requires_grad, name
        else:
            assert not param.requires_grad and torch.equal(param, initial[base]), name
    changed = [n for n, p in trained.items() if ".lora_B." in n and p.abs().sum() > 0]  # B starts at 0
    assert len(changed) == 2 * 4 + 4 * 2 + 2  # text qkv/proj/fc1/fc2 x2, vision qkv/proj x4, projector
    assert result.losses[-1] < result.losses[0]


def test_modules_to_save_train_in_full(tmp_path, monkeypatch):
    cfg = config(tmp_path, *RUN, "--model.lora.modules_to_save", "[word_embeddings]")
    _, model = trained_model(monkeypatch, cfg)
    initial = base_weights()
    name = "text_decoder.embedding.word_embeddings.weight"  # tied: the output layer's too
    embedding = model.get_parameter(name)
    assert embedding.requires_grad and not torch.equal(embedding, initial[name])
    norm = "text_decoder.decoder.final_layernorm.weight"
    assert torch.equal(model.get_parameter(norm), initial[norm])


def test_freeze_composes_with_lora(tmp_path, monkeypatch):
    _, model = trained_model(monkeypatch, config(tmp_path, *RUN, "--model.freeze", "[vision]"))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any(n.startswith("image_encoder.encoder.") for n in trainable)
    assert any(n.startswith("image_encoder.projector.") for n in trainable)


def test_start_up_shows_the_trainable_share(tmp_path, capsys):
    args = ["train", *SMALL, "--train.steps", "1", "--train.output_dir", str(tmp_path), *LORA]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "  lora             0.02M  adapters on 18 layers (in the groups above)" in out
    assert "0.02M trainable, 0.16%)" in out


def test_checkpoint_holds_only_the_trained_weights(tmp_path, monkeypatch):
    result, model = trained_model(
        monkeypatch, config(tmp_path, *RUN, "--model.lora.modules_to_save", "[word_embeddings]")
    )
    shard = result.checkpoint / "mp_rank_00"
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    with safe_open(shard / "model.safetensors", "pt") as f:
        assert set(f.keys()) == trained
    with safe_open(shard / "optimizer.safetensors", "pt") as f:
        assert {k.rpartition("/")[0] for k in f.keys()} == trained
    record = json.loads((result.checkpoint / "lora.json").read_text())
    assert record["base"] == {
        "load": None,
        "name": "qwen2_5_vl",
        "variant": "tiny",
        "seed": 42,
        "overrides": {},
    }
    assert record["lora"]["modules_to_save"] == ["text_decoder.embedding.word_embeddings"]
    # Loading it rebuilds the base (here the seeded random init) and loads the adapters.
    loaded = mmzoo.load_model(tmp_path)
    ids = torch.arange(20).view(1, 20) + 5
    with torch.no_grad():
        expected = model.eval()(ids).logits
        torch.testing.assert_close(loaded.eval()(ids).logits, expected, rtol=0, atol=0)


# Dropout draws from the restored random stream. Two steps an epoch: a crash in step 2 resumes
# mid-epoch, one in step 3 at the end of the first epoch.
RESUMED = [*RUN, "--train.steps", "4", "--train.save_every", "1", "--model.lora.dropout", "0.1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    directory = tmp_path_factory.mktemp("straight")
    return train(config(directory, *RESUMED), out=quiet), directory


def ulp_report(x: torch.Tensor, y: torch.Tensor) -> str:
    """How far apart two float32 tensors are: elements that differ and the most units in the last
    place between them (to tell rounding noise from a wrong value if this ever fails)."""
    apart = (x.view(torch.int32).long() - y.view(torch.int32).long()).abs()
    return f"{int((apart > 0).sum())} of {x.numel()} elements differ, by up to {int(apart.max())} ulp"


@pytest.mark.parametrize("crash", [2, 3])
def test_resume_is_exact(straight, tmp_path, monkeypatch, crash):
    straight_run, straight_dir = straight
    cut_dir = tmp_path / "cut"
    calls = {"n": 0}
    forward = VLModel.forward

    def crashing(model, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == crash:
            raise RuntimeError("crash")
        return forward(model, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(VLModel, "forward", crashing)
        with pytest.raises(RuntimeError, match="crash"):
            train(config(cut_dir, *RESUMED), out=quiet)
    resumed = train(config(cut_dir, *RESUMED), resume=True, out=quiet)
    assert straight_run.losses[crash - 1 :] == resumed.losses  # bitwise
    for name in ("model", "optimizer"):
        a, b = (
            safe_open(d / "iter_0000004/mp_rank_00" / f"{name}.safetensors", "pt")
            for d in (straight_dir, cut_dir)
        )
        assert set(a.keys()) == set(b.keys())
        for key in a.keys():
            x, y = a.get_tensor(key), b.get_tensor(key)
            assert torch.equal(x, y), f"{key}: {ulp_report(x, y)}"


def test_resume_without_lora_is_refused(tmp_path):
    train(config(tmp_path, *RUN, "--train.steps", "1"), out=quiet)
    with pytest.raises(mmzoo.MmzooError, match="saved with LoRA adapters, the model has none"):
        train(config(tmp_path, "--train.steps", "2"), resume=True, out=quiet)


@pytest.mark.parametrize(
    ("lora", "message"),
    [
        ("{r: 4, targets: [text.atention]}", "model.lora.targets: 'text.atention' matches no module"),
        ("{r: 4, targets: [word_embeddings]}", "LoRA adapts nn.Linear layers only"),
        ("{r: 4, targets: [output_layer]}", "is the output layer, which the loss reads by weight"),
    ],
)
def test_bad_targets_are_errors(tmp_path, lora, message):
    untied = ["--model.overrides", "{text: {tie_word_embeddings: false}}"]
    with pytest.raises(mmzoo.MmzooError, match=message):
        train(config(tmp_path, "--train.steps", "1", *untied, "--model.lora", lora), out=quiet)


def test_off_by_default(tmp_path):
    cfg = config(tmp_path)
    assert not cfg.model.lora.enabled
    assert not load_config(None, ["--model.lora.r", "null"]).model.lora.enabled


def test_cli_exports_and_infers(tmp_path, capsys):
    run, hf, adapter = tmp_path / "run", tmp_path / "hf", tmp_path / "adapter"
    args = [
        "train",
        *SMALL,
        *RUN,
        "--train.output_dir",
        str(run),
        "--save-hf",
        str(hf),
        "--save-peft",
        str(adapter),
    ]
    assert main(args) == 0
    assert f"peft adapter: {adapter}" in capsys.readouterr().out
    trained = mmzoo.load_model(run).eval()  # the seeded base and the adapters
    torch.manual_seed(42)
    base = mmzoo.build_model("qwen2_5_vl", "tiny").eval()
    save_mm(base, tmp_path / "base", variant="tiny")
    import_adapter(base, adapter)  # the exported adapter back onto the base
    ids = torch.arange(30).view(1, 30) + 5
    with torch.no_grad():
        expected = trained(ids).logits
        torch.testing.assert_close(mmzoo.load_model(hf).eval()(ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(base(ids).logits, expected, rtol=1e-5, atol=1e-5)
    infer = ["infer", "--prompt", "What is in the picture?", "--max-new-tokens", "4", "--no-stream"]
    assert main([*infer, "--model-dir", str(run)]) == 0
    answer = capsys.readouterr().out
    assert main([*infer, "--model-dir", str(tmp_path / "base"), "--adapter", str(adapter)]) == 0
    assert capsys.readouterr().out == answer


def test_train_from_an_imported_adapter(tmp_path, monkeypatch):
    first = train(config(tmp_path / "first", *RUN, "--train.save_peft", str(tmp_path / "adapter")), out=quiet)
    cfg = config(tmp_path / "second", "--train.steps", "1", "--model.load_adapter", str(tmp_path / "adapter"))
    _, model = trained_model(monkeypatch, cfg)
    assert any(".lora_A." in n for n, p in model.named_parameters() if p.requires_grad)
    record = json.loads((tmp_path / "second" / "iter_0000001" / "lora.json").read_text())
    assert record["adapter"] == str(tmp_path / "adapter") and record["ranks"]
    assert first.losses


def test_save_peft_needs_adapters(tmp_path):
    with pytest.raises(mmzoo.MmzooError, match="train.save_peft: no adapters to export"):
        train(config(tmp_path, "--train.steps", "1", "--train.save_peft", str(tmp_path / "a")), out=quiet)


def test_tensor_parallel_lora_is_refused(tmp_path):
    with pytest.raises(mmzoo.MmzooError, match="model.lora runs on data-parallel ranks only"):
        train(config(tmp_path, *RUN, "--parallel.tp", "2"), out=quiet)


def test_bf16_frozen_base_trains_the_fp32_adapters():
    from tiny_hf import IMAGE, V_END, V_START, make_sample

    from mmzoo.config import LoraConfig
    from mmzoo.lora.attach import attach, store_frozen
    from mmzoo.lora.checkpoint import frozen_dtype
    from mmzoo_qwen2_5_vl.compat import hf_forward

    assert frozen_dtype("bf16", torch.device("cuda")) == torch.bfloat16
    assert (
        frozen_dtype("bf16", torch.device("cpu")) is None
        and frozen_dtype("fp32", torch.device("cuda")) is None
    )
    torch.manual_seed(0)
    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    attach(model, LoraConfig(r=4, targets=("text.attention", "vision.mlp", "projector")))
    store_frozen(model, torch.bfloat16)  # what a bf16 run on an accelerator stores
    batch = make_sample(images=[(1, 8, 12)])
    config, ids = model.config, batch["input_ids"]  # the tiny HF ids -> the variant's
    for tiny, real in ((IMAGE, config.image_token_id), (V_START, config.vision_start_token_id)):
        ids[ids == tiny] = real
    ids[ids == V_END] = config.vision_end_token_id
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = hf_forward(model, **batch).logits
    logits.float().logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        if ".lora_" in name:  # B starts at 0, so only B's gradient is nonzero on the first step
            assert param.dtype == torch.float32 and param.grad is not None, name
            assert ".lora_A." in name or param.grad.abs().sum() > 0, name
        else:
            assert param.dtype == torch.bfloat16 and param.grad is None, name


@pytest.mark.parametrize("imported", [False, True])
def test_meta_device_adapters_equal_the_loaded_ones(tmp_path, imported):
    """Built on the meta device, adapters attached, materialized and filled: the same model as
    loading the checkpoint and attaching in one process from the same seed (or the same import)."""
    from mmzoo.api import open_weights
    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.checkpoint.weights import fill_parameters
    from mmzoo.lora.checkpoint import adapt
    from mmzoo.lora.meta import adapt_on_meta, base_tensors, fill_adapters
    from mmzoo.nn.init import materialize
    from mmzoo.testing import spread_weights_

    torch.manual_seed(3)
    save_hf(spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny"), std=0.05), tmp_path / "hf")
    model_cfg = load_config(None, [*SMALL, *LORA, "--model.load", str(tmp_path / "hf")]).model
    if imported:  # an adapter with nonzero B, exported and named by model.load_adapter
        model = mmzoo.load_model(tmp_path / "hf")
        adapt(model, model_cfg, 0)
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                torch.nn.init.normal_(param.data, std=0.1)
        save_peft(model, tmp_path / "adapter")
        model_cfg = dataclasses.replace(model_cfg, load_adapter=str(tmp_path / "adapter"))
    torch.manual_seed(7)
    expected = mmzoo.load_model(tmp_path / "hf")
    expected_record = adapt(expected, model_cfg, 7)
    expected_rng = torch.get_rng_state()
    weights = open_weights(tmp_path / "hf")
    torch.manual_seed(7)
    model = weights.empty_model()
    record, values = adapt_on_meta(model, model_cfg, 7)
    assert torch.equal(torch.get_rng_state(), expected_rng)  # dropout and data draw the same next
    assert record == expected_record
    materialize(model, "cpu")
    fill_parameters(model, weights, params=base_tensors(model))
    fill_adapters(model, values)
    ours = dict(model.named_parameters())
    assert set(ours) == {n for n, _ in expected.named_parameters()}
    for name, param in expected.named_parameters():
        assert torch.equal(ours[name], param), name
        assert ours[name].requires_grad == param.requires_grad, name
    assert any(".lora_A." in n for n in ours)


@pytest.mark.parametrize(
    ("precision", "device", "frozen"),
    [("bf16", "cuda", torch.bfloat16), ("bf16", "cpu", torch.float32), ("fp32", "cuda", torch.float32)],
)
def test_frozen_base_dtype_on_many_ranks(precision, device, frozen):
    """What both paths store before sharding (no device is touched: the model stays on the CPU)."""
    from mmzoo.config import LoraConfig
    from mmzoo.lora.attach import attach

    model = mmzoo.build_model("qwen2_5_vl", "tiny")
    attach(model, LoraConfig(r=4, targets=("text.attention",), modules_to_save=("final_layernorm",)))
    loop._store_frozen_base(model, precision, torch.device(device))
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(False, frozen), (True, torch.float32)}

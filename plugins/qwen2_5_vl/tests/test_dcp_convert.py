"""``mmzoo convert`` from DCP training checkpoints (the checkpoints of runs on many ranks).

mm-to-hf and resplit read a run directory or an ``iter_*`` directory, one tensor at a time; a
damaged or partial checkpoint is a one-line error before anything is written; reading emits no
warning. The fast tests write the checkpoint in this process (:func:`write_dcp`); the slow one
converts the checkpoint of a 2-rank run and checks that :func:`write_dcp` lays entries out alike.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from tiny_hf import assert_bitwise, tensors

import mmzoo
from mmzoo.checkpoint import conversion as convert
from mmzoo.checkpoint.dcp import DCP_META, MODEL, DCPSource, dcp_meta
from mmzoo.checkpoint.mm import TRACKER, iteration_name, write_json, write_tracker
from mmzoo.cli import main
from mmzoo.commands.mm_convert import main as mm_convert_main
from mmzoo.distributed.checkpoint import _state
from mmzoo.errors import MmzooError
from mmzoo.train.checkpoint import TrainingCheckpoint

QUIET = dict(report=lambda line: None)
STEP = 7
SINGLE_PROCESS = "torch.distributed is disabled, unavailable or uninitialized"
SPLIT = dict(tp=2, vit_pp_layers=[4, 0], llm_pp_layers=[1, 2])  # the tiny HF model: 4 + 3 layers


def write_dcp(model: torch.nn.Module, run: Path, step: int = STEP) -> Path:
    """A DCP training checkpoint of ``model`` as the distributed saver writes it (its state dict
    of model and optimizer, ``dcp_meta.json``, the tracker last), from this process alone: every
    tensor in one chunk, as a 1-rank run would save it. Returns the iteration directory."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    for param in model.parameters():  # one step at lr 0: optimizer state, unchanged weights
        param.grad = torch.randn_like(param)
    optimizer.step()
    iteration = run / iteration_name(step)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
        dcp.save(_state(TrainingCheckpoint(model, optimizer), True), checkpoint_id=iteration, no_dist=True)
    write_json(iteration / DCP_META, dcp_meta(model, variant=None, world_size=1))
    write_tracker(run, step)
    return iteration


@pytest.fixture(params=["untied", "tied"])
def run(request, tmp_path) -> tuple[Path, Path]:
    """(the HF checkpoint, a run directory holding a DCP checkpoint of the model loaded from it)."""
    hf = request.getfixturevalue(f"hf_{request.param}")
    write_dcp(mmzoo.load_model(hf), tmp_path / "run")
    return hf, tmp_path / "run"


def no_leftovers(out: Path) -> bool:
    return not out.exists() and not list(out.parent.glob(f".{out.name}.tmp-*"))


@pytest.mark.parametrize("which", ["run directory", "iteration directory"])
def test_mm_to_hf_reads_a_dcp_checkpoint(run, which, tmp_path):
    hf, root = run
    source = root if which == "run directory" else root / iteration_name(STEP)
    out = convert.mm_to_hf(source, tmp_path / "hf", **QUIET)
    assert_bitwise(tensors(out), tensors(hf))
    config = json.loads((out / "config.json").read_text())  # from the family's config_to_hf
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert config["dtype"] == "float32"
    with_template = convert.mm_to_hf(source, tmp_path / "hf2", template=hf, **QUIET)
    assert (with_template / "config.json").read_text() == (hf / "config.json").read_text()
    assert_bitwise(tensors(with_template), tensors(hf))


def test_resplit_of_a_dcp_checkpoint_round_trips(run, tmp_path):
    """tp=2 x pp=2 from the DCP checkpoint equals hf-to-mm straight to that split, bit for bit,
    and converts back to the original tensors; the iteration keeps its number."""
    hf, root = run
    split = convert.resplit(root, tmp_path / "split", **SPLIT, **QUIET)
    direct = convert.hf_to_mm(hf, tmp_path / "direct", **SPLIT, **QUIET)
    assert (split / TRACKER).read_text() == str(STEP)
    shards = sorted(p.name for p in (split / iteration_name(STEP)).glob("mp_rank_*"))
    assert shards == ["mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"]
    for shard in shards:
        assert_bitwise(tensors(split / iteration_name(STEP) / shard), tensors(direct / "release" / shard))
    assert_bitwise(tensors(convert.mm_to_hf(split, tmp_path / "back", **QUIET)), tensors(hf))
    whole = convert.resplit(split, tmp_path / "whole", **QUIET)
    assert_bitwise(tensors(convert.mm_to_hf(whole, tmp_path / "back2", **QUIET)), tensors(hf))


def test_the_clis_read_a_dcp_run(hf_untied, tmp_path):
    write_dcp(mmzoo.load_model(hf_untied), tmp_path / "run")
    to_hf = ["convert", "mm-to-hf", "--mm-dir", str(tmp_path / "run"), "--hf-dir", str(tmp_path / "hf")]
    assert main(to_hf) == 0
    assert_bitwise(tensors(tmp_path / "hf"), tensors(hf_untied))
    resplit = ["convert", "resplit", "--src", str(tmp_path / "run"), "--dst", str(tmp_path / "mm")]
    assert main([*resplit, "--tp", "2", "--format", "megatron"]) == 0
    shard = tmp_path / "mm" / iteration_name(STEP) / "mp_rank_01"
    assert sorted(p.name for p in shard.iterdir()) == ["mm_meta.json", "model_optim_rng.pt"]
    # mm-convert, MindSpeed-MM's form, reads it too (its layout is the fused one).
    canonical = "--cfg.common_model_config.enable_canonical_hf_struct"
    to_hf = ["Qwen2_5_VLConverter", "mm_to_hf", "--cfg.mm_dir", str(tmp_path / "run")]
    assert mm_convert_main([*to_hf, "--cfg.save_hf_dir", str(tmp_path / "hf2"), canonical, "false"]) == 0
    assert_bitwise(tensors(tmp_path / "hf2"), tensors(hf_untied))
    assert mm_convert_main([*to_hf, "--cfg.save_hf_dir", str(tmp_path / "hf3"), canonical, "true"]) == 2


# --- damaged and partial checkpoints ---------------------------------------------------------------


def _cut(file: Path) -> None:
    """``file`` cut to a tenth (the model's entries come before the optimizer's two per weight)."""
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 10])


def _edit_meta(iteration: Path, edit) -> None:
    meta = json.loads((iteration / DCP_META).read_text())
    edit(meta)
    (iteration / DCP_META).write_text(json.dumps(meta))


def _without_one_weight(iteration: Path) -> None:
    """The checkpoint saved again with one weight left out."""
    model = mmzoo.load_model(iteration)
    for path in iteration.iterdir():
        if path.name != DCP_META:
            path.unlink()
    state = dict(model.state_dict())
    del state["text_decoder.decoder.final_layernorm.weight"]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SINGLE_PROCESS)
        dcp.save({MODEL: state}, checkpoint_id=iteration, no_dist=True)


def _corrupt_an_entry(iteration: Path) -> None:
    """Zeros over the end of the final norm's entry, where its zip directory is (DCP keeps no
    checksum of the values themselves: only damage to an entry's framing can be told)."""
    storage = dcp.FileSystemReader(iteration).read_metadata().storage_data
    index = next(i for i in storage if i.fqn == f"{MODEL}.text_decoder.decoder.final_layernorm.weight")
    end = storage[index].offset + storage[index].length
    data = iteration / storage[index].relative_path
    raw = bytearray(data.read_bytes())
    raw[end - 64 : end] = bytes(64)
    data.write_bytes(bytes(raw))


DATA = "__0_0.distcp"
DAMAGE = {  # how a checkpoint is harmed, and the error it then gives
    "no .metadata": (
        lambda it: (it / ".metadata").unlink(),
        r"\.metadata: missing; the checkpoint is incomplete",
    ),
    "cut .metadata": (
        lambda it: _cut(it / ".metadata"),
        r"\.metadata: cannot read it \(UnpicklingError",
    ),
    "no data file": (
        lambda it: (it / DATA).unlink(),
        r"__0_0\.distcp: missing; \.metadata lists weights in it",
    ),
    "cut data file": (
        lambda it: _cut(it / DATA),
        r"__0_0\.distcp: \d+ bytes, but \.metadata needs \d+; the file is truncated",
    ),
    "no dcp_meta.json": (
        lambda it: (it / DCP_META).unlink(),
        r"dcp_meta\.json: missing; every save writes it",
    ),
    "dcp_meta.json lacks a key": (
        lambda it: _edit_meta(it, lambda m: m.pop("config")),
        r"dcp_meta\.json: missing config; the checkpoint is damaged",
    ),
    "another config": (
        lambda it: _edit_meta(it, lambda m: m["config"]["text"].update(vocab_size=999)),
        r"shape mismatch for text_decoder\.embedding\.word_embeddings\.weight: checkpoint gives "
        r"\(1000, 64\), the model expects \(999, 64\); does dcp_meta\.json's config describe",
    ),
    "a weight left out": (
        _without_one_weight,
        r"1 weights missing: text_decoder\.decoder\.final_layernorm\.weight; does dcp_meta\.json",
    ),
    "a corrupt entry": (
        _corrupt_an_entry,
        r"cannot read text_decoder\.decoder\.final_layernorm\.weight \(RuntimeError: .*\); "
        "the checkpoint is damaged",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_dcp_checkpoint_is_a_one_line_error(damage, hf_untied, tmp_path):
    iteration = write_dcp(mmzoo.load_model(hf_untied), tmp_path / "run")
    harm, message = DAMAGE[damage]
    harm(iteration)
    for conversion in (convert.mm_to_hf, convert.resplit):
        out = tmp_path / "out"
        with pytest.raises(MmzooError, match=message) as caught:
            conversion(tmp_path / "run", out, **QUIET)
        assert "\n" not in str(caught.value)
        assert no_leftovers(out)
    with pytest.raises(MmzooError, match=message):  # mmzoo.load_model reads it alike
        mmzoo.load_model(tmp_path / "run")


# --- warnings --------------------------------------------------------------------------------------


def test_reading_a_dcp_checkpoint_warns_nothing(hf_untied, tmp_path):
    iteration = write_dcp(mmzoo.load_model(hf_untied), tmp_path / "run")
    source = DCPSource(iteration)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = source.get(source.names[0])
        convert.mm_to_hf(tmp_path / "run", tmp_path / "hf", **QUIET)
    assert tensor.abs().sum() > 0
    # The control: torch's own single-process load does warn.
    with pytest.warns(UserWarning, match=SINGLE_PROCESS):
        dcp.load({MODEL: {source.names[0]: torch.empty_like(tensor)}}, checkpoint_id=iteration, no_dist=True)


def test_only_the_single_process_warning_is_silenced(hf_untied, tmp_path, monkeypatch):
    import mmzoo.checkpoint.dcp_reader as reader

    iteration = write_dcp(mmzoo.load_model(hf_untied), tmp_path / "run")
    load = reader.dcp.load

    def warning_load(*args, **kwargs):
        warnings.warn("another warning", UserWarning, stacklevel=2)
        return load(*args, **kwargs)

    monkeypatch.setattr(reader.dcp, "load", warning_load)
    source = DCPSource(iteration)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source.get(source.names[0])
    assert [str(w.message) for w in caught] == ["another warning"]


# --- the checkpoint of a run on 2 ranks ------------------------------------------------------------


def _entries(iteration: Path) -> dict[str, tuple]:
    """DCP's tensor entries of a checkpoint, but the optimizer's parameter groups (which follow
    the run's optimizer options): name -> (dtype, size, number of chunks)."""
    metadata = dcp.FileSystemReader(iteration).read_metadata()
    return {
        key: (entry.properties.dtype, tuple(entry.size), len(entry.chunks))
        for key, entry in metadata.state_dict_metadata.items()
        if hasattr(entry, "chunks") and not key.startswith("optim.param_groups.")
    }


@pytest.mark.slow
def test_convert_reads_the_checkpoint_of_a_two_rank_run(tmp_path):
    """One step of 2 ranks at lr 0 from an HF checkpoint: the run's DCP checkpoint converts back to
    that checkpoint's tensors bit for bit, and resplits to tp=2 x pp=2 and back exactly.
    :func:`write_dcp` writes the same entries (names, dtypes, sizes), in one chunk each where the
    2 ranks wrote two."""
    from launch import SMALL_RUN, torchrun

    from mmzoo.checkpoint.hf_export import save_hf
    from mmzoo.testing import spread_weights_

    torch.manual_seed(3)
    hf = save_hf(spread_weights_(mmzoo.build_model("qwen2_5_vl", "tiny"), std=0.05), tmp_path / "hf")
    run = tmp_path / "run"
    options = ["--model.load", str(hf), "--train.output_dir", str(run), "--train.steps", "1"]
    done = torchrun(2, "train", *SMALL_RUN, *options, "--train.lr", "0", timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    iteration = run / iteration_name(1)
    assert sorted(p.name for p in iteration.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]

    assert_bitwise(tensors(convert.mm_to_hf(run, tmp_path / "back", **QUIET)), tensors(hf))
    split = dict(tp=2, vit_pp_layers=[4, 0], llm_pp_layers=[1, 1])  # the tiny variant: 4 + 2 layers
    resplit = convert.resplit(run, tmp_path / "split", **split, **QUIET)
    direct = convert.hf_to_mm(hf, tmp_path / "direct", **split, **QUIET)
    for shard in sorted(p.name for p in (direct / "release").glob("mp_rank_*")):
        assert_bitwise(tensors(resplit / iteration_name(1) / shard), tensors(direct / "release" / shard))
    assert_bitwise(tensors(convert.mm_to_hf(resplit, tmp_path / "back2", **QUIET)), tensors(hf))

    ranks, alone = _entries(iteration), _entries(write_dcp(mmzoo.load_model(hf), tmp_path / "alone"))
    assert ranks.keys() == alone.keys()
    model = [key for key in ranks if key.startswith(MODEL + ".")]
    assert model and all(ranks[key][:2] == alone[key][:2] for key in ranks)
    assert {ranks[key][2] for key in model} == {2} and {alone[key][2] for key in ranks} == {1}


# --- resuming from a damaged checkpoint ------------------------------------------------------------


@pytest.mark.parametrize("damage", ["cut data file", "a corrupt entry"])
def test_resuming_from_a_damaged_dcp_checkpoint_is_a_one_line_error(damage, hf_untied, tmp_path):
    from mmzoo.distributed.checkpoint import load_dcp_checkpoint
    from mmzoo.distributed.env import World

    model = mmzoo.load_model(hf_untied)
    iteration = write_dcp(model, tmp_path / "run")
    DAMAGE[damage][0](iteration)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)
    with pytest.raises(MmzooError, match=f"{iteration.name}") as caught:
        load_dcp_checkpoint(World(), iteration, TrainingCheckpoint(model, optimizer))
    assert "\n" not in str(caught.value)

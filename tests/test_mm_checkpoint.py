"""The mm checkpoint format: save_mm / load_mm_model round trips, load_model dispatch, errors, and
saves that fail or are killed midway, or run beside other writers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import mmzoo
from mmzoo.checkpoint.mm import (
    TRACKER,
    load_mm_model,
    load_mm_weights,
    read_mm_meta,
    save_mm,
)

# Placeholder ids above the 0..999 range example_batch draws its words from, so they never collide.
TINY = dict(
    text={"vocab_size": 1024, "num_layers": 3},
    image_token_id=1022,
    video_token_id=1023,
    vision_start_token_id=1020,
    vision_end_token_id=1021,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return mmzoo.build_model("qwen2_5_vl", "tiny", **TINY)


def assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def test_release_round_trip_is_bitwise_and_gives_the_same_logits(model, tmp_path):
    out = save_mm(model, tmp_path, variant="tiny")
    assert out == tmp_path / "release"
    assert (tmp_path / TRACKER).read_text() == "release"
    assert sorted(p.name for p in (out / "mp_rank_00").iterdir()) == ["mm_meta.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left

    meta = read_mm_meta(tmp_path)
    assert meta["model"] == "qwen2_5_vl" and meta["variant"] == "tiny"
    assert (meta["tp"], meta["pp"], meta["layout"], meta["format_version"]) == (1, 1, "fused", 2)
    assert meta["vit_pp_layers"] == [4] and meta["llm_pp_layers"] == [3]
    assert meta["config"]["text"]["num_layers"] == 3
    assert set(load_file(out / "mp_rank_00" / "model.safetensors")) == set(model.state_dict())

    loaded = load_mm_model(tmp_path)
    assert loaded.config == model.config  # lists in JSON come back as tuples
    assert isinstance(loaded.config.vision.fullatt_block_indexes, tuple)
    assert_same(model, loaded)
    batch = mmzoo.get_model("qwen2_5_vl").example_batch(model.config)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_iterations_tracker_and_paths(model, tmp_path):
    save_mm(model, tmp_path, 10, variant="tiny")
    assert (tmp_path / TRACKER).read_text() == "10"
    assert (tmp_path / "iter_0000010" / "mp_rank_00" / "mm_meta.json").is_file()
    for path in (tmp_path, tmp_path / "iter_0000010", tmp_path / "iter_0000010" / "mp_rank_00"):
        assert_same(model, load_mm_model(path))
    # Re-saving the same iteration replaces it.
    save_mm(model, tmp_path, 10, variant="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000010", TRACKER]


def test_dtype(tmp_path):
    save_mm(mmzoo.build_model("qwen2_5_vl", "tiny", dtype=torch.bfloat16, **TINY), tmp_path, variant="tiny")
    assert next(load_mm_model(tmp_path).parameters()).dtype == torch.float32
    assert next(load_mm_model(tmp_path, dtype="auto").parameters()).dtype == torch.bfloat16
    assert next(mmzoo.load_model(tmp_path, dtype=torch.float16).parameters()).dtype == torch.float16


def test_load_model_dispatches_to_mm(model, tmp_path):
    save_mm(model, tmp_path, 3, variant="tiny")
    assert_same(model, mmzoo.load_model(tmp_path))
    assert_same(model, mmzoo.load_model(tmp_path / "iter_0000003"))
    assert_same(model, mmzoo.load_model(tmp_path / "iter_0000003" / "mp_rank_00"))
    # Not an mm checkpoint: the Hugging Face reader answers.
    (tmp_path / "empty").mkdir()
    with pytest.raises(mmzoo.MmzooError, match="no config.json"):
        mmzoo.load_model(tmp_path / "empty")


def _edit_meta(root, **changes):
    file = root / "release" / "mp_rank_00" / "mm_meta.json"
    meta = json.loads(file.read_text())
    meta.update(changes)
    file.write_text(json.dumps(meta))


def _weights(root):
    return root / "release" / "mp_rank_00" / "model.safetensors"


def test_errors(model, tmp_path):
    save_mm(model, tmp_path, variant="tiny")
    state = load_file(_weights(tmp_path))

    save_file({k: v for k, v in state.items() if "final_layernorm" not in k}, _weights(tmp_path))
    with pytest.raises(mmzoo.MmzooError, match=r"1 weights missing: text_decoder.decoder.final_layernorm"):
        load_mm_model(tmp_path)

    save_file({**state, "extra.weight": torch.zeros(2)}, _weights(tmp_path))
    with pytest.raises(mmzoo.MmzooError, match=r"1 unexpected weights: extra.weight"):
        load_mm_model(tmp_path)

    name = "text_decoder.decoder.final_layernorm.weight"
    save_file({**state, name: torch.ones(7)}, _weights(tmp_path))
    with pytest.raises(mmzoo.MmzooError, match=rf"shape mismatch for {name}: checkpoint gives \(7,\)"):
        load_mm_model(tmp_path)
    save_file(state, _weights(tmp_path))

    _edit_meta(tmp_path, model="qwen2_5_vI")
    with pytest.raises(mmzoo.MmzooError, match=r"mm_meta.json: no model named 'qwen2_5_vI'"):
        load_mm_model(tmp_path)
    _edit_meta(tmp_path, model="qwen2_5_vl", variant="huge")
    with pytest.raises(mmzoo.MmzooError, match=r"has no variant 'huge'"):
        load_mm_model(tmp_path)
    _edit_meta(tmp_path, variant="tiny", format_version=3)
    with pytest.raises(mmzoo.MmzooError, match=r"format_version 3 is newer"):
        load_mm_model(tmp_path)
    _edit_meta(tmp_path, format_version=2, tp=2)
    with pytest.raises(mmzoo.MmzooError, match=r"mp_rank_01: missing; a tp=2 pp=1 checkpoint needs it"):
        load_mm_model(tmp_path)
    _edit_meta(tmp_path, tp=1)
    load_mm_model(tmp_path)

    (tmp_path / TRACKER).write_text("20")
    with pytest.raises(mmzoo.MmzooError, match=r"names '20' but .*iter_0000020 is missing"):
        load_mm_model(tmp_path)
    (tmp_path / TRACKER).write_text("latest")
    with pytest.raises(mmzoo.MmzooError, match=r"expected an iteration number or 'release'"):
        load_mm_model(tmp_path)
    (tmp_path / TRACKER).unlink()
    (tmp_path / "release").rename(tmp_path / "other")
    with pytest.raises(mmzoo.MmzooError, match=rf"not an mm checkpoint: no {TRACKER}"):
        load_mm_model(tmp_path)
    with pytest.raises(mmzoo.MmzooError, match="no such checkpoint directory"):
        load_mm_model(tmp_path / "nowhere")


def test_format_1_names_load_but_do_not_resume(model, tmp_path):
    """mmzoo's format 1 named the vision tower and projector vision_encoder.* and projector.*."""
    save_mm(model, tmp_path, variant="tiny")
    state = load_file(_weights(tmp_path))
    old = {
        "image_encoder.encoder.": "vision_encoder.",
        "image_encoder.projector.layernorm.": "projector.layernorm.",
        "image_encoder.projector.encoder.": "projector.",
    }
    renamed = {}
    for name, tensor in state.items():
        prefix = next((p for p in old if name.startswith(p)), "")
        renamed[old.get(prefix, "") + name[len(prefix) :]] = tensor
    assert (
        "projector.linear_fc2.bias" in renamed
        and "vision_encoder.blocks.layers.3.mlp.linear_fc1.bias" in renamed
    )
    save_file(renamed, _weights(tmp_path))
    _edit_meta(tmp_path, format_version=1)
    assert_same(model, load_mm_model(tmp_path))
    with pytest.raises(mmzoo.MmzooError, match=r"format_version 1: other parameter names.*start a new run"):
        load_mm_weights(model, tmp_path / "release" / "mp_rank_00")


def test_failed_save_changes_nothing(model, tmp_path, monkeypatch):
    save_mm(model, tmp_path, 1, variant="tiny")
    import mmzoo.checkpoint.mm as mm

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(mm, "write_json", boom)
    with pytest.raises(OSError, match="disk full"):
        save_mm(model, tmp_path, 2, variant="tiny")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", TRACKER]
    assert (tmp_path / TRACKER).read_text() == "1"


def test_outputs_are_readable_as_the_umask_allows(model, tmp_path):
    """Checkpoints and exports get plain-file modes, not safetensors' / mkdtemp's owner-only ones."""
    from mmzoo.checkpoint.hf_export import save_hf

    old = os.umask(0o022)
    try:
        save_mm(model, tmp_path / "mm", 3, variant="tiny")
        save_hf(model, tmp_path / "hf")
    finally:
        os.umask(old)
    for root in (tmp_path / "mm", tmp_path / "hf"):
        for path in [root, *root.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"


# --- re-saving an iteration, and temporaries of other writers -------------------------------------


def run_python(code: str, *args: str, **kwargs) -> subprocess.Popen:
    """A Python process running ``code`` with ``TINY`` and ``sys.argv[1:] = args`` (stdin/stdout pipes)."""
    prelude = f"import json, os, sys\nTINY = json.loads({json.dumps(json.dumps(TINY))})\n"
    return subprocess.Popen(
        [sys.executable, "-c", prelude + code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **kwargs,
    )


DIE_MID_SWAP = """
from pathlib import Path
import torch, mmzoo
from mmzoo.checkpoint.mm import save_mm
rename = os.rename
def die_after_moving_aside(src, dst):
    rename(src, dst)
    if "-old-" in Path(dst).name:
        os._exit(3)  # killed between moving the old copy aside and renaming the new one in
os.rename = die_after_moving_aside
torch.manual_seed(1)
save_mm(mmzoo.build_model("qwen2_5_vl", "tiny", **TINY), sys.argv[1], 1, variant="tiny")
"""


def test_a_save_killed_mid_swap_leaves_the_tracker_naming_a_complete_copy(model, tmp_path):
    save_mm(model, tmp_path, 1, variant="tiny")
    assert run_python(DIE_MID_SWAP, str(tmp_path)).wait(timeout=120) == 3
    assert not (tmp_path / "iter_0000001").exists()  # killed between the two renames
    assert_same(model, load_mm_model(tmp_path))  # the old copy is back under its name
    assert not [p for p in tmp_path.iterdir() if ".tmp-old-" in p.name]
    save_mm(model, tmp_path, 2, variant="tiny")  # and the next save drops the dead writer's new copy
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", TRACKER]


SLOW_WRITER = """
from mmzoo.checkpoint.mm import staged_iteration, write_model_shard
import mmzoo
with staged_iteration(sys.argv[1], 2) as tmp:
    write_model_shard(mmzoo.build_model("qwen2_5_vl", "tiny", **TINY), tmp, variant="tiny")
    print(tmp.name, flush=True)
    sys.stdin.readline()  # hold the temporary until told to finish
"""


def test_a_save_leaves_a_live_writers_temporary_alone(model, tmp_path):
    writer = run_python(SLOW_WRITER, str(tmp_path))
    try:
        temporary = tmp_path / writer.stdout.readline().strip()
        assert temporary.is_dir()
        save_mm(model, tmp_path, 1, variant="tiny")  # another writer into the same root meanwhile
        assert temporary.is_dir()
    finally:
        writer.communicate("go\n", timeout=120)
    assert writer.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", TRACKER]

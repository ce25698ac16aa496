"""``mm-convert``: the MindSpeed-MM converter class name picks the family that declares it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from extras_family import CONVERTER, NAME, SMALL

import mmzoo
from mmzoo import plugins, registry
from mmzoo.checkpoint.hf_export import save_hf
from mmzoo.checkpoint.mm import read_mm_meta
from mmzoo.commands.mm_convert import main
from mmzoo.plugins import PluginInfo
from mmzoo_qwen2_5_vl.plugin import SPEC as QWEN


def test_a_declared_converter_picks_its_family(extras, tmp_path):
    """``ExtrasVLConverter`` is ``extras_vl``: no name rule could derive one from the other."""
    torch.manual_seed(0)
    hf = save_hf(mmzoo.build_model(NAME, **SMALL), tmp_path / "hf")
    out = tmp_path / "mm"
    assert main([CONVERTER, "hf_to_mm", "--cfg.mm_dir", str(out), "--cfg.hf_config.hf_dir", str(hf)]) == 0
    assert read_mm_meta(out)["model"] == NAME
    assert mmzoo.load_model(out).name == NAME


def test_an_unknown_converter_lists_the_installed_ones(capsys):
    installed = sorted((c, r.spec.name) for r in mmzoo.all_models() for c in r.spec.mm_converters)
    listed = ", ".join(f"{converter} ({model})" for converter, model in installed)
    assert "Qwen2_5_VLConverter (qwen2_5_vl)" in listed
    assert main(["Qwen2VLConverter", "hf_to_mm"]) == 2
    assert capsys.readouterr().err == (
        "mm-convert: error: unknown converter 'Qwen2VLConverter' (did you mean 'Qwen2_5_VLConverter'?); "
        f"installed: {listed}\n"
    )
    assert main(["--help"]) == 0
    assert f"Converters: {listed}" in capsys.readouterr().out


class _Claimant:
    """A plugin whose family declares Qwen2.5-VL's converter too."""

    @mmzoo.hookimpl
    def mmzoo_register_models(self, register):
        register(dataclasses.replace(QWEN, name="claimant_vl", hf_architectures=()))


def test_a_converter_two_families_declare_is_an_error():
    plugins.reset()
    plugins.get_manager().register(
        _Claimant(), PluginInfo("claimant", "claimant-dist", "0.1", "tests", False)
    )
    registry.reset()
    try:
        with pytest.raises(
            mmzoo.MmzooError, match="converter 'Qwen2_5_VLConverter' is declared by model"
        ) as info:
            registry.model_for_converter("Qwen2_5_VLConverter")
        assert "model 'claimant_vl' of plugin claimant (claimant-dist 0.1)" in str(info.value)
        assert "model 'qwen2_5_vl' of plugin qwen2_5_vl (mmzoo-qwen2_5_vl" in str(info.value)
    finally:
        plugins.reset()

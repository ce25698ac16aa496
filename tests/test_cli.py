"""The ``mmzoo`` command line, run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from throwaway_plugin import FAKE_PLUGIN, install

import mmzoo
from mmzoo.cli import build_parser, main


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "mmzoo.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


def test_list_models_text(capsys):
    assert main(["list-models"]) == 0
    out = capsys.readouterr().out
    assert "\nqwen2_5_vl  (mmzoo-qwen2_5_vl " in f"\n{out}"
    assert "variants: 3b, 7b, 32b, 72b, tiny" in out
    assert out.startswith("internvl3  (mmzoo-internvl3 ")  # sorted by name
    assert "variants: 1b, 2b, 8b, 14b, 38b, 78b, tiny" in out
    assert "reads:    InternVLForConditionalGeneration, InternVLChatModel" in out
    assert "position_ids:    mmzoo_qwen2_5_vl.rope_index.position_ids" in out


def test_list_models_json_and_pattern(capsys):
    assert main(["list-models", "qwen*", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["qwen2_5_vl"]
    assert rows[0]["distribution"] == "mmzoo-qwen2_5_vl"
    assert rows[0]["hf_architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert rows[0]["parts"]["vision_encoder"].endswith("build_vision_encoder")
    assert main(["list-models", "internvl", "--json"]) == 0
    assert [r["name"] for r in json.loads(capsys.readouterr().out)] == ["internvl3"]
    assert main(["list-models", "llava", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == []


def test_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["qwen2_5_vl"]["hooks"] == ["mmzoo_register_models"]
    assert rows["kernels"]["builtin"] and rows["kernels"]["distribution"] == "mmzoo"
    assert rows["kernels"]["hooks"] == ["mmzoo_register_kernels"]


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"mmzoo {mmzoo.__version__}"


def test_help_on_every_command(capsys):
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    assert {"list-models", "plugins"} <= set(commands)
    for command in [[]] + [[c] for c in commands]:
        with pytest.raises(SystemExit) as exit_info:
            main([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: mmzoo" in capsys.readouterr().out


def test_errors_are_one_line_unless_debug(tmp_path):
    install(tmp_path, "fakeplug", "2.0", "fake", "fakeplug_cli", FAKE_PLUGIN.format(name="qwen2_5_vl"))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = run("list-models", env=env)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("mmzoo: error: model 'qwen2_5_vl' is registered by two plugins")
    for args in (("--debug", "list-models"), ("list-models", "--debug")):
        debug = run(*args, env=env)
        assert debug.returncode != 0 and "Traceback" in debug.stderr, args


def test_readme_lists_every_command():
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    cli = readme.split("## CLI", 1)[1].split("\n## ", 1)[0]
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001
    for name, sub in commands.items():
        nested = [a for a in sub._actions if isinstance(a, type(parser._subparsers._group_actions[0]))]  # noqa: SLF001
        names = [f"{name} {child}" for child in nested[0].choices] if nested else [name]
        for full in names:
            assert f"mmzoo {full}" in cli, f"`mmzoo {full}` is missing from the README's CLI section"

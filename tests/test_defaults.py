"""Defaults that depend on the chosen family: the default family, the output directory, and the
media options the embedded demo takes from the family's spec."""

from __future__ import annotations

import dataclasses

import yaml
from extras_family import NAME

import mmzoo
from mmzoo.cli import main
from mmzoo.config import DEFAULT_MODEL, Config, load_config, with_derived_defaults
from mmzoo.train.loop import with_demo_media


def test_the_default_family_is_named_once_and_the_output_dir_follows_the_model(tmp_path):
    assert DEFAULT_MODEL == "qwen2_5_vl" == load_config(None).model.name
    assert load_config(None).train.output_dir == "outputs/qwen2_5_vl-tiny-demo"
    assert with_derived_defaults(Config()).train.output_dir == "outputs/qwen2_5_vl-tiny-demo"
    chosen = load_config(None, ["--model.name", NAME, "--model.variant", "3b"])
    assert chosen.train.output_dir == f"outputs/{NAME}-3b-demo"
    given = load_config(None, ["--model.name", NAME, "--train.output_dir", str(tmp_path)])
    assert given.train.output_dir == str(tmp_path)
    file = tmp_path / "run.yaml"
    file.write_text("model: {variant: 7b}\n")
    assert load_config(file).train.output_dir == "outputs/qwen2_5_vl-7b-demo"


def test_train_model_flag_sets_the_output_dir(capsys):
    assert main(["train", "--model", NAME, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["name"] == NAME
    assert printed["train"]["output_dir"] == f"outputs/{NAME}-tiny-demo"


def test_the_demo_media_options_come_from_the_family():
    qwen = mmzoo.get_model("qwen2_5_vl")
    demo = load_config(None)
    assert demo.data.media == {} and demo.data.demo_media  # the config holds no family's options
    assert with_demo_media(demo, qwen).data.media == dict(qwen.demo_media)
    assert qwen.demo_media["max_pixels"] == 128 * 28 * 28
    # Keys given in data.media win; a family without demo options gets only those.
    given = load_config(None, ["--data.media", "{max_pixels: 3136, fps: 1.0}"])
    assert with_demo_media(given, qwen).data.media == {**qwen.demo_media, "max_pixels": 3136, "fps": 1.0}
    bare = dataclasses.replace(qwen, demo_media={})
    assert with_demo_media(demo, bare).data.media == {}
    assert with_demo_media(given, bare).data.media == {"max_pixels": 3136, "fps": 1.0}


def test_a_config_file_takes_no_demo_media(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("data: {media: {max_pixels: 3136}}\n")
    config = load_config(file)
    assert not config.data.demo_media
    assert with_demo_media(config, mmzoo.get_model("qwen2_5_vl")).data.media == {"max_pixels": 3136}

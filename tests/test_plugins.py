"""Plugin discovery through entry points, provenance, failures and the load switches."""

from __future__ import annotations

import sys

import pytest
from throwaway_plugin import FAKE_PLUGIN, install

import mmzoo
from mmzoo import plugins, registry


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    for var in ("MMZOO_PLUGINS", "MMZOO_DISABLE_PLUGIN_AUTOLOAD", "MMZOO_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    plugins.reset()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fakeplug")]:
        del sys.modules[name]
    plugins.reset()


def names():
    return [r.spec.name for r in registry.all_models()]


def test_entry_point_discovery_and_provenance(site):
    install(site, "fakeplug", "1.2.3", "fake", "fakeplug_a", FAKE_PLUGIN.format(name="fake_vl"))
    registered = {r.spec.name: r for r in registry.all_models()}
    assert {"fake_vl", "qwen2_5_vl"} <= set(registered)
    plugin = registered["fake_vl"].plugin
    assert (plugin.name, plugin.distribution, plugin.version) == ("fake", "fakeplug", "1.2.3")
    assert plugin.hooks == ["mmzoo_register_models"]
    assert mmzoo.build_model("fake_vl", "tiny").name == "fake_vl"


def test_loading_is_lazy_and_once(site):
    install(
        site, "fakeplug", "1.0", "fake", "fakeplug_b", FAKE_PLUGIN.format(name="fake_vl") + "\nLOADS = 1\n"
    )
    manager = plugins.get_manager()
    assert "fakeplug_b" not in sys.modules
    registry.all_models()
    module = sys.modules["fakeplug_b"]
    module.LOADS += 1
    manager.load()
    registry.all_models()
    assert sys.modules["fakeplug_b"] is module and module.LOADS == 2


def test_duplicate_model_name_names_both_plugins(site):
    install(site, "fakeplug", "2.0", "fake", "fakeplug_c", FAKE_PLUGIN.format(name="qwen2_5_vl"))
    with pytest.raises(mmzoo.MmzooError) as info:
        registry.all_models()
    message = str(info.value)
    assert "registered by two plugins" in message
    assert "fake (fakeplug 2.0)" in message and "qwen2_5_vl (mmzoo-qwen2_5_vl" in message


def test_broken_plugin_is_reported_and_others_load(site, capsys):
    install(site, "fakeplug", "0.9", "broken", "fakeplug_d", "import not_a_module_anywhere\n")
    assert "qwen2_5_vl" in names()
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "mmzoo: plugin broken (fakeplug 0.9) failed to load: ModuleNotFoundError: "
        "No module named 'not_a_module_anywhere'"
    ]
    assert [f.name for f in plugins.get_manager().failures] == ["broken"]


def test_only_named_plugins_load(site, monkeypatch):
    install(site, "fakeplug", "1.0", "fake", "fakeplug_e", FAKE_PLUGIN.format(name="fake_vl"))
    monkeypatch.setenv("MMZOO_PLUGINS", "fake")
    assert names() == ["fake_vl"]
    assert set(plugins.get_manager().plugins) == {"fake", "kernels"}  # built-ins always load


def test_disable_autoload_keeps_only_builtins(site, monkeypatch):
    install(site, "fakeplug", "1.0", "fake", "fakeplug_f", FAKE_PLUGIN.format(name="fake_vl"))
    monkeypatch.setenv("MMZOO_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert names() == []
    assert set(plugins.get_manager().plugins) == {"kernels"}
    with pytest.raises(mmzoo.MmzooError, match="no model named 'qwen2_5_vl'; installed: none"):
        mmzoo.get_model("qwen2_5_vl")


def test_block_one_plugin(site, monkeypatch):
    install(site, "fakeplug", "1.0", "fake", "fakeplug_g", FAKE_PLUGIN.format(name="fake_vl"))
    monkeypatch.setenv("MMZOO_BLOCK_PLUGINS", "qwen2_5_vl")
    # fake reuses the qwen spec object but only its own hook ran; other installed plugins still load
    assert "fake_vl" in names() and "qwen2_5_vl" not in names()
    monkeypatch.setenv("MMZOO_BLOCK_PLUGINS", "fake")
    plugins.reset()
    assert "qwen2_5_vl" in names() and "fake_vl" not in names()


def test_every_hook_is_documented_in_the_plugin_guide():
    from pathlib import Path

    from mmzoo import hookspecs

    guide = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    hooks = [name for name in dir(hookspecs) if name.startswith("mmzoo_")]
    assert hooks
    for name in hooks:
        assert getattr(hookspecs, name).__doc__, f"{name} has no docstring"
        assert f"`{name}" in guide, f"{name} is not described in docs/plugins.md"


BROKEN_PARTS = FAKE_PLUGIN.replace(
    "register(dataclasses.replace(SPEC, name={name!r}, hf_architectures=()))",
    "register(dataclasses.replace(SPEC, name={name!r}, hf_architectures=(), **{changes}))",
)


@pytest.mark.parametrize(
    ("changes", "lacks"),
    [
        # a media processor without dummy(): ranks without media could not run the vision encoder
        (
            "dict(media_processor=lambda config, **o: type('P', (), dict((k, v) for k, v in "
            "vars(SPEC.media_processor(config, **o).__class__).items() if k != 'dummy'))())",
            "its media_processor lacks dummy",
        ),
        ("dict(position_ids=lambda config, ids: None)", "its position_ids lacks parameter attention_mask"),
        ("dict(template=object())", "its template lacks encode, image_placeholder, name, place_media"),
        ("dict(variants=dict(tiny=object()))", "its variant config object lacks __dataclass_fields__"),
    ],
)
def test_parts_are_checked_against_their_protocols_at_registration(site, changes, lacks):
    body = BROKEN_PARTS.replace("{changes}", changes).format(name="broken_vl")
    install(site, "fakeplug", "3.0", "fake", "fakeplug_p", body)
    with pytest.raises(mmzoo.MmzooError) as info:
        registry.all_models()
    message = str(info.value)
    assert message.startswith("plugin fake (fakeplug 3.0): model 'broken_vl': ") and lacks in message
    assert "mmzoo.protocols." in message

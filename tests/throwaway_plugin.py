"""Throwaway plugin distributions written into a temporary site directory by tests."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator

FAKE_PLUGIN = textwrap.dedent(
    """
    import dataclasses

    import mmzoo
    from mmzoo_qwen2_5_vl.plugin import SPEC

    @mmzoo.hookimpl
    def mmzoo_register_models(register):
        register(dataclasses.replace(SPEC, name={name!r}, hf_architectures=()))
    """
)


def install(site, dist, version, ep_name, module, body):
    """Write a throwaway distribution (module + dist-info with an mmzoo entry point) into ``site``."""
    (site / f"{module}.py").write_text(body)
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mmzoo]\n{ep_name} = {module}\n")


def installed_family(tmp_path, monkeypatch, module: str, name: str) -> Iterator:
    """Install the test module ``module`` (which implements ``mmzoo_register_models``) as a plugin
    beside the real ones and yield the spec of its family ``name``; uninstall it afterwards."""
    import mmzoo
    from mmzoo import plugins

    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    for var in ("MMZOO_PLUGINS", "MMZOO_DISABLE_PLUGIN_AUTOLOAD", "MMZOO_BLOCK_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    plugins.reset()
    plugin_module = f"{module}_plugin"
    install(
        site, f"{module}-dist", "1.0", module, plugin_module, f"from {module} import mmzoo_register_models\n"
    )
    yield mmzoo.get_model(name)
    sys.modules.pop(plugin_module, None)
    plugins.reset()

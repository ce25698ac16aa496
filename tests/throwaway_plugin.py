"""Throwaway plugin distributions written into a temporary site directory by tests."""

from __future__ import annotations

import textwrap

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

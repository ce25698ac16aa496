"""The InternVL3 plugin's hook implementations.

None yet: the ``ModelSpec`` is registered once mmzoo's family seam (a family-owned media batch,
``feature_slots``, ``MediaProcessor``) is in the core; the parts it will name live beside this
module (config, media, template, mapping, vision).
"""

"""mmzoo: a plugin-based model zoo for vision-language models.

Public API::

    import mmzoo
    model = mmzoo.build_model("qwen2_5_vl", "tiny")   # random init
    model = mmzoo.load_model("path/to/hf_checkpoint")  # family from config.json
"""

from mmzoo.api import load_model
from mmzoo.build import build_model
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel, VLOutput
from mmzoo.plugins import hookimpl
from mmzoo.registry import ModelSpec, all_models, get_model
from mmzoo.version import __version__

__all__ = [
    "MmzooError",
    "ModelSpec",
    "VLModel",
    "VLOutput",
    "__version__",
    "all_models",
    "build_model",
    "get_model",
    "hookimpl",
    "load_model",
]

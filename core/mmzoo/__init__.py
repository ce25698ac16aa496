"""mmzoo: a plugin-based model zoo for vision-language models.

Public API::

    import mmzoo
    model = mmzoo.build_model("qwen2_5_vl", "tiny")   # random init
    model = mmzoo.load_model("path/to/hf_checkpoint")  # family from config.json
"""

from importlib.metadata import PackageNotFoundError, version

from mmzoo.api import build_model, load_model
from mmzoo.errors import MmzooError
from mmzoo.model import VLModel, VLOutput
from mmzoo.plugins import hookimpl
from mmzoo.registry import ModelSpec, all_models, get_model

try:
    __version__ = version("mmzoo")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

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

"""steerdiff: reproduce and read finetunes with learned steering vectors."""

from .hooks import (  # noqa: E402
    HookError,
    hook_dim,
    list_hook_points,
    record,
    select_hooks,
    steer,
)
from .models import LoadedModel, ModelLoadError, load_model  # noqa: E402
from .vectors import VectorSet, VectorSetError  # noqa: E402
from .version import __version__  # noqa: E402, F401

__all__ = [
    "HookError",
    "LoadedModel",
    "ModelLoadError",
    "VectorSet",
    "VectorSetError",
    "hook_dim",
    "list_hook_points",
    "load_model",
    "record",
    "select_hooks",
    "steer",
]

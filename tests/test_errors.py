"""Every exception class the package defines subclasses SteerdiffError (one `except` catches all).

The bug this catches: a new module adds `class SomethingError(ValueError)` and the CLI's one
handler (`except SteerdiffError`) lets it escape as a traceback.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import steerdiff
from steerdiff.errors import SteerdiffError

OPTIONAL = {"steerdiff.data.corpus_build"}  # a maintainer's rebuild script, not package code


def package_modules() -> list[str]:
    names = [steerdiff.__name__]
    for info in pkgutil.walk_packages(steerdiff.__path__, prefix="steerdiff."):
        if info.name not in OPTIONAL and not info.name.endswith("__main__"):  # runs the CLI
            names.append(info.name)
    return names


def defined_exceptions() -> list[type[BaseException]]:
    found = []
    for name in package_modules():
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, inspect.isclass):
            if issubclass(obj, BaseException) and obj.__module__ == name:
                found.append(obj)
    return found


def test_walk_finds_the_package_errors() -> None:
    names = {e.__name__ for e in defined_exceptions()}
    # a few that must exist; guards against a walk that silently imports nothing
    assert {"HookError", "VectorSetError", "ModelLoadError", "FitError", "DatasetError"} <= names
    assert len(names) >= 12


def test_every_package_exception_subclasses_steerdiff_error() -> None:
    bad = [
        f"{e.__module__}.{e.__qualname__}"
        for e in defined_exceptions()
        if not issubclass(e, SteerdiffError)
    ]
    assert not bad, f"exception classes that do not subclass SteerdiffError: {bad}"

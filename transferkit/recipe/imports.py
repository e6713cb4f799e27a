"""The Python objects a recipe names by import path (``package.module:name``), and their signatures."""

from __future__ import annotations

import importlib
import inspect

from transferkit.errors import RecipeError
from transferkit.recipe.messages import one_line


def import_object(path: str, key: str, expected: str, *, arguments: int | None = None):
    """The callable named by a recipe's import path ``package.module:name`` (or dotted).

    Args:
        path: the import path.
        key: the recipe key it came from, for the error message.
        expected: what it should be, e.g. "a function fn(epoch, lr) -> lr".
        arguments: how many positional arguments it will be called with, checked against its
            signature (None: not checked).

    Raises:
        RecipeError: the module or name cannot be imported, is not callable, or does not take
            ``arguments`` positional arguments.
    """
    module_name, colon, attribute = str(path).partition(":")
    if not colon:
        module_name, _, attribute = module_name.rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except Exception as error:  # noqa: BLE001 - a broken user module is reported in one line too
        raise RecipeError(f"cannot import {path!r} ({type(error).__name__}: {one_line(error)}): "
                          f"give package.module:name of {expected}, on the Python path", key=key) from None
    if not callable(found):
        raise RecipeError(f"{path!r} is a {type(found).__name__}, not {expected}", key=key)
    if arguments is not None:
        check_arguments(found, arguments, key, expected, shown=repr(path))
    return found


def check_arguments(function, arguments: int, key: str, expected: str, shown: str | None = None) -> None:
    """Checks that ``function`` can be called with ``arguments`` positional arguments, without calling it.

    A callable whose signature Python cannot read (some built-ins) passes.

    Raises:
        RecipeError: it cannot, naming its signature and what is expected.
    """
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*[None] * arguments)
    except TypeError:
        name = shown or getattr(function, "__qualname__", None) or repr(function)
        raise RecipeError(f"{name} takes {signature}, not {arguments} positional arguments: "
                          f"expected {expected}", key=key) from None

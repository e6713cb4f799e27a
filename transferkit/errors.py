"""Errors that the user can fix.

Every problem caused by input (a recipe key, an image folder, a weights file) is raised as a
:class:`TransferkitError` whose message is one line naming the problem and the fix. The CLI prints
that line and exits with code 2 (:class:`ResourceError`, a problem of the machine rather than the input:
exit code 1); anything else is a bug and keeps its traceback.
"""

import contextlib


class TransferkitError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""

    exit_code = 2


class ResourceError(TransferkitError):
    """The machine cannot do it (a full disk, a folder another run holds); the input is fine."""

    exit_code = 1


class RecipeError(TransferkitError):
    """A recipe key (or a building block's argument) is unknown, has the wrong type or is out of range.

    ``key`` is the argument or key the problem is about, relative to where it was raised: a building
    block says ``RecipeError("expected a number > 0", key="fraction")`` and the strategy that called
    it with a recipe section adds the section's path with :meth:`under`, so the user reads
    ``finetune.unfreeze.fraction: expected a number > 0``.
    """

    def __init__(self, problem: str, key: str | None = None):
        self.problem, self.key = problem, key
        super().__init__(f"{key}: {problem}" if key else problem)

    @staticmethod
    @contextlib.contextmanager
    def under(section: str):
        """Re-raise a :class:`RecipeError` raised inside with ``section`` in front of its key.

        >>> with RecipeError.under("finetune.unfreeze"):
        ...     unfreeze(model, fraction=spec.fraction)   # "fraction: ..." -> "finetune.unfreeze.fraction: ..."
        """
        try:
            yield
        except RecipeError as error:
            key = f"{section}.{error.key}" if error.key and not error.key.startswith("[") else \
                f"{section}{error.key or ''}"
            raise RecipeError(error.problem, key=key) from None


class DataError(TransferkitError):
    """An image folder cannot be used: missing, empty, one class, or an empty class."""


class BackboneError(TransferkitError):
    """An unknown backbone or layer, or weights that cannot be found."""


class DeviceMemoryError(TransferkitError):
    """The device ran out of memory; a smaller ``data.batch_size`` fits."""


def did_you_mean(word, choices, otherwise: str = "", *, show=str) -> str:
    """``"did you mean X?"`` for the choice closest to ``word`` (``difflib``, cutoff 0.6), else ``otherwise``:
    the one way transferkit suggests a fix for a misspelt name. ``show`` writes the choice found
    (e.g. ``repr`` to quote it, or a function adding the key's path); the match is on the bare choice."""
    import difflib

    close = difflib.get_close_matches(str(word), [str(choice) for choice in choices], n=1, cutoff=0.6)
    return f"did you mean {show(close[0])}?" if close else otherwise

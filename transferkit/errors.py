"""Errors that the user can fix.

Every problem caused by input (a recipe key, an image folder, a weights file) is raised as a
:class:`TransferkitError` whose message is one line naming the problem and the fix. The CLI prints
that line and exits with code 2; anything else is a bug and keeps its traceback.
"""


class TransferkitError(Exception):
    """A problem with the user's input; the message says what is wrong and how to fix it."""


class RecipeError(TransferkitError):
    """A recipe key is unknown, has the wrong type or is out of range."""


class DataError(TransferkitError):
    """An image folder cannot be used: missing, empty, one class, or an empty class."""


class BackboneError(TransferkitError):
    """An unknown backbone or layer, or weights that cannot be found."""


class DeviceMemoryError(TransferkitError):
    """The device ran out of memory; a smaller ``data.batch_size`` fits."""

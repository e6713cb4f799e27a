"""The wording shared by recipe errors: what kind a YAML value is, one-line text, did-you-mean tails."""

from __future__ import annotations

from transferkit.errors import did_you_mean as _closest


def did_you_mean(name: str, choices, prefix: str = "") -> str:
    """``": did you mean X?"`` (:func:`transferkit.errors.did_you_mean`, the choice shown after
    ``prefix``) for the closest choice, else ``" (valid: a, b, ...)"``: a tail for a recipe error."""
    choices = list(choices)
    hint = _closest(name, choices, show=lambda choice: f"{prefix}{choice}")
    return f": {hint}" if hint else f" (valid: {', '.join(sorted(choices))})"


def kind_of(value) -> str:
    """What a YAML value is, in the words of an error message: "a mapping", "text", "null", ..."""
    return {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def one_line(text) -> str:
    """``text`` (an exception, a parser's message) with its line breaks and runs of spaces folded."""
    return " ".join(str(text).split())

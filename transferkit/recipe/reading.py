"""Reading a recipe's YAML: the file's text, a loader that bounds what aliases expand to, overrides.

Everything here fails with a one-line :class:`~transferkit.errors.RecipeError` naming where (the
file, the override) and what to do.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from transferkit.errors import RecipeError
from transferkit.recipe.messages import one_line
from transferkit.recipe.schema import MAX_RECIPE_BYTES, MAX_YAML_VALUES, UNFREEZE_MODES


def read_recipe_text(path: Path) -> str:
    """The recipe file's text, or a one-line RecipeError (missing, unreadable, too big, not UTF-8)."""
    if not path.is_file():
        raise RecipeError(f"recipe not found: {path} (check the path, or run `transferkit recommend --write {path.name}`)")
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(f"{path}: {size:,} bytes is too big for a recipe (at most {MAX_RECIPE_BYTES:,}): "
                              "is it the right file?")
        data = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read the recipe ({error.strerror or error})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise RecipeError(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}): "
                          "save the recipe as UTF-8") from None


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses a document whose aliases expand to too many values.

    An alias is a reference, so ``a: &a [x, x]`` ``b: &b [*a, *a]`` ... (a "billion laughs") is small
    as text and as nodes, but explodes when the recipe is copied, compared or written out. The
    composed node graph is measured before anything is constructed: every node counts as often as it
    is reachable, each node's size computed once, so measuring is as fast as reading.
    """

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _expanded_size(node)
        return node


def _expanded_size(root) -> int:
    """How many values the YAML node graph holds with every alias expanded (iteratively: no recursion).

    Raises:
        RecipeError: more than :data:`MAX_YAML_VALUES`, or an alias inside its own anchor.
    """
    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [item for pair in node.value for item in pair]
        return []

    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()  # nodes whose children are being measured: the current path
    stack = [(root, False)]
    while stack:
        node, measured = stack.pop()
        if measured:
            open_nodes.discard(id(node))
            sizes[id(node)] = size = 1 + sum(sizes[id(child)] for child in children(node))
            if size > MAX_YAML_VALUES:
                raise RecipeError(f"YAML aliases (*name) expand to more than {MAX_YAML_VALUES:,} values near line "
                                  f"{node.start_mark.line + 1}: write the values out instead of nesting aliases")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise RecipeError(f"a YAML alias at line {node.start_mark.line + 1} refers to its own anchor: "
                              "a recipe holds no recursive values")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children(node) if id(child) not in sizes)
    return sizes[id(root)]


def parse_yaml(text: str, where: str, fix: str = ""):
    """Parse one YAML document safely (no Python objects, aliases bounded by :data:`MAX_YAML_VALUES`).

    Args:
        text: the YAML text.
        where: what it is (a file name, an override), to start error messages with.
        fix: how to write it right, added to syntax errors.

    Raises:
        RecipeError: one line saying what is wrong and where.
    """
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from None
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{where}: not valid YAML{line}: {one_line(error.problem or error.context)}{fix}") from None
    except yaml.YAMLError as error:  # e.g. a control character
        raise RecipeError(f"{where}: not valid YAML: {one_line(error)}{fix}") from None
    except RecursionError:
        raise RecipeError(f"{where}: the YAML is nested too deeply to be a recipe") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise RecipeError(f"{where}: a value cannot be read: {one_line(error)}") from None


def apply_overrides(raw: dict, overrides) -> dict:
    """``raw`` with ``key.path=value`` overrides applied (copies along each path; ``raw`` is untouched).

    An override that sets an unfreeze mode removes the recipe's other modes: overrides replace.
    """
    values = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise RecipeError(f"override {item!r}: expected key.path=value, e.g. finetune.epochs=2")
        values[key.strip()] = parse_yaml(text, f"override {item!r}: the value",
                                         fix=" (write a whole YAML value, e.g. [a, b], or quote text)")
    return set_keys(raw, values)


def set_keys(raw: dict, values: dict) -> dict:
    """``raw`` with each dotted ``key: value`` of ``values`` set (copies along each path).

    Setting an unfreeze mode (``finetune.unfreeze.fraction``) removes the other modes; setting two is an error.
    """
    modes_set = []
    for key, value in values.items():
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part)
            node[part] = child = dict(child) if isinstance(child, dict) else {}
            node = child
        node[leaf] = value
        if parents == ["finetune", "unfreeze"] and leaf in UNFREEZE_MODES and value not in (None, False):
            modes_set.append(leaf)
    if len(set(modes_set)) > 1:
        raise RecipeError(f"overrides set finetune.unfreeze.{' and .'.join(dict.fromkeys(modes_set))}: "
                          f"give one of {', '.join(UNFREEZE_MODES)}")
    if modes_set:
        unfreeze = raw["finetune"]["unfreeze"]
        for mode in UNFREEZE_MODES:
            if mode != modes_set[0]:
                unfreeze.pop(mode, None)
    return raw

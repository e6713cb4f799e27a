"""The package keeps the shape the README's "How it fits together" promises: imports point one way
down the stages, no module reaches into another's private names, and modules and functions stay a
size a reader can take in."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "transferkit"

#: Lowest first: a module may import from its own stage and from the stages before it, never after.
STAGES = [
    {"errors", "io", "logs", "outputs", "version"},
    {"data"},
    {"recipe"},
    {"models"},
    {"reports"},
    {"features"},
    {"training"},
    {"run", "predictors"},
    {"strategies"},
    {"export", "recommend", "recommend_search", "cli", "cli_recipe", "cli_recommend", "__main__", "__init__"},
]
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _stage(module: str) -> int:
    """The stage of ``transferkit.<part>...`` (``transferkit`` itself is the package's __init__)."""
    part = module.split(".")[1] if "." in module else "__init__"
    return next(i for i, names in enumerate(STAGES) if part in names)


def _name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path):
    """``(line, module, names)`` of every transferkit import in ``path``, inside functions too."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("transferkit"):
            yield node.lineno, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("transferkit"):
                    yield node.lineno, alias.name, []


def test_every_module_has_a_stage():
    parts = {_name(path).split(".")[1] if "." in _name(path) else "__init__" for path in _modules()}
    assert parts <= set().union(*STAGES), parts - set().union(*STAGES)


def test_imports_point_down_the_stages():
    upward = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
              for path in _modules() for line, module, _ in _imports(path)
              if _stage(module) > _stage(_name(path))]
    assert not upward, "\n".join(upward)


def test_no_module_imports_another_modules_private_names():
    private = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {name} from {module}"
               for path in _modules() for line, module, names in _imports(path)
               for name in names if name.startswith("_") and not name.startswith("__") and module != _name(path)]
    assert not private, "\n".join(private)


@pytest.mark.parametrize("path", _modules(), ids=lambda path: str(path.relative_to(PACKAGE)))
def test_module_and_function_sizes(path):
    lines = path.read_text().splitlines()
    assert len(lines) < MAX_MODULE_LINES, f"{len(lines)} lines: split it by job"
    long = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
            length = node.end_lineno - body[0].lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{node.name} (line {node.lineno}): {length} lines")
    assert not long, long


def test_the_commands_import_no_keras_until_they_start_it_quietly():
    """TensorFlow prints start-up lines that no setting silences; `logs.start_keras_quietly` captures
    them, so nothing a command imports before it may import Keras (an error stays one line)."""
    modules = ["transferkit.cli", "transferkit.cli_recipe", "transferkit.cli_recommend", "transferkit.run", "transferkit.export",
               "transferkit.recommend", "transferkit.recommend_search", *(f"transferkit.strategies.{name}" for name in
                                          ("extract", "finetune", "phases", "compare")),
               "transferkit.training.trainer", "transferkit.training.diagnose"]
    code = (f"import sys; import {', '.join(modules)}; "
            "print(sorted(m for m in ('tensorflow', 'keras', 'jax', 'torch') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout

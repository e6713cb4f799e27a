"""One self-contained HTML page of a run folder, ``report.html``: the metrics of every evaluated split, the
training curves, confusion matrices, reliability diagrams, worst-mistakes grids, per-class scores, the
recipe and the run's timings and versions.

The page travels as one file and opens offline: images are embedded as ``data:`` URIs, the style is
inline, and it holds no script, no event handler and nothing fetched from elsewhere (its
Content-Security-Policy forbids them too). Every string read from the run folder is HTML-escaped, so a
class or run name cannot inject markup. Only the folder's files are read; the model is never loaded.

Example:
    >>> write_html_report("runs/flowers")
    PosixPath('runs/flowers/report.html')
"""

from __future__ import annotations

import base64
import json
from html import escape
from pathlib import Path

from transferkit.io import atomic_write_text
from transferkit.outputs import folder_lock, read_run_json

REPORT_NAME = "report.html"
#: The run's own splits come in this order; any other prefix follows, by name.
SPLIT_ORDER = ("val", "test")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: A value of run.json's ``info`` longer than this is cut (a long list of skipped files, say).
MAX_INFO_CHARS = 600
#: Keys of run.json's ``info`` that the page shows elsewhere (``diagnosis.txt`` under the curves).
SHOWN_ELSEWHERE = {"diagnosis"}
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .5em 0 1em; } th, td { padding: .25em .7em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; } tr:nth-child(even) td { background: #fafafa; }
figure { display: inline-block; margin: .5em 1em .5em 0; vertical-align: top; }
img { max-width: 100%; border: 1px solid #eee; } figcaption { color: #666; font-size: .9em; }
pre { background: #f7f7f7; padding: .8em; white-space: pre-wrap; font-size: 12.5px; } .muted { color: #777; }
"""
#: No script, no plugin, no fetch: only inline style and embedded images.
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def write_html_report(folder: str | Path) -> Path:
    """Write ``<folder>/report.html`` from the files of a run folder (atomically) and return its path.

    Works for every strategy (an extract run has no curves) without loading the model.

    Raises:
        TransferkitError: ``folder`` is not a run folder (no ``run.json``) or its ``run.json`` is damaged.
        ResourceError: a run is replacing the folder right now.
    """
    folder = Path(folder)
    summary = read_run_json(folder)
    with folder_lock(folder):  # not while a run is replacing the folder
        page = render_report(folder, summary)
        atomic_write_text(folder / REPORT_NAME, page)
    return folder / REPORT_NAME


def render_report(folder: Path, summary: dict) -> str:
    """The HTML page of the run folder ``folder`` whose ``run.json`` is ``summary``."""
    recipe_text = _read_text(folder / "recipe.yaml")
    name = _recipe_name(recipe_text) or folder.resolve().name
    splits = evaluated_splits(folder)
    body = [f"<h1>{escape(name)}</h1>",
            f"<p>{escape(str(summary['strategy']))} run, {len(summary['class_names'])} classes, "
            f"{escape(str(summary['image_size']))} px images"
            + (f", saved {escape(str(summary['saved']))}" if summary.get("saved") else "") + "</p>",
            "<h2>Metrics</h2>", _metrics_table(splits) if splits else '<p class="muted">no evaluated split</p>',
            "<h2>Training curves</h2>", _curves(folder)]
    for title, metrics, stem in splits:
        body += [f"<h2>{escape(title)}</h2>", _split_figures(stem, title), _per_class_table(metrics)]
    body += ["<h2>Recipe</h2>", f"<pre>{escape(recipe_text or '(no recipe.yaml)')}</pre>",
             "<h2>Run</h2>", _run_info(summary)]
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
            f"<title>{escape(name)}: transferkit report</title><style>{STYLE}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def evaluated_splits(folder: Path) -> list[tuple[str, dict, str]]:
    """``(title, metrics, file stem)`` of each split with a readable ``{prefix}_metrics.json``: the run's own
    (val, then test, then any other) and then those of ``evaluations/<data>/``."""
    def rank(path: Path):
        prefix = path.name.removesuffix("_metrics.json")
        return (SPLIT_ORDER.index(prefix) if prefix in SPLIT_ORDER else len(SPLIT_ORDER), prefix)

    found = [(path.name.removesuffix("_metrics.json"), path) for path in sorted(folder.glob("*_metrics.json"), key=rank)]
    found += [(f"{path.parent.name} ({path.name.removesuffix('_metrics.json')})", path)
              for path in sorted((folder / "evaluations").glob("*/*_metrics.json"))]
    splits = []
    for title, path in found:
        metrics = _read_json(path)
        if isinstance(metrics, dict) and isinstance(metrics.get("per_class"), dict):
            splits.append((title, metrics, str(path).removesuffix("metrics.json")))
    return splits


def _metrics_table(splits) -> str:
    header = ["split", "n", "top-1", "balanced accuracy", "top-5", "loss", "ECE", "temperature scaling"]
    rows = []
    for title, metrics, _ in splits:
        calibration = metrics.get("calibration")
        scaling = (f"T {_number(calibration.get('temperature'))}: ECE {_number(calibration.get('ece_before'))} "
                   f"&rarr; {_number(metrics.get('ece'))}, loss {_number(calibration.get('loss_before'))} &rarr; "
                   f"{_number(metrics.get('loss'))}") if isinstance(calibration, dict) else "none"
        rows.append([escape(title), _number(metrics.get("n"), "d")]
                    + [_number(metrics.get(key)) for key in ("top1", "balanced_accuracy", "top5", "loss", "ece")]
                    + [scaling])
    return _table(header, rows)


def _per_class_table(metrics: dict) -> str:
    rows = [[escape(str(name))] + [_number(scores.get(key)) for key in ("precision", "recall", "f1")]
            + [_number(scores.get("support"), "d")]
            for name, scores in metrics["per_class"].items() if isinstance(scores, dict)]
    return "<h3>Per class</h3>" + _table(["class", "precision", "recall", "F1", "support"], rows)


def _split_figures(stem: str, title: str) -> str:
    figures = [_figure(Path(stem + kind), caption) for kind, caption in (
        ("confusion_matrix.png", "confusion matrix"), ("reliability.png", "reliability diagram"),
        ("mistakes.png", "worst mistakes"))]
    return "".join(figures) or f'<p class="muted">no figures for {escape(title)}</p>'


def _curves(folder: Path) -> str:
    figure = _figure(folder / "curves.png", "loss and accuracy per epoch")
    diagnosis = _read_text(folder / "diagnosis.txt")
    if not figure:
        return '<p class="muted">no training curves in this run (an extract run fits its classifier in one go)</p>'
    return figure + (f"<pre>{escape(diagnosis)}</pre>" if diagnosis else "")


def _run_info(summary: dict) -> str:
    """Timings, image counts and the rest of ``info``, then the versions, as key-value tables."""
    info = summary.get("info") if isinstance(summary.get("info"), dict) else {}
    versions = summary.get("versions") if isinstance(summary.get("versions"), dict) else {}
    rows = [[escape(str(key)), _plain(value)] for key, value in info.items() if key not in SHOWN_ELSEWHERE]
    rows.append(["classes", _plain(summary["class_names"])])
    return (_table(None, rows)
            + "<h3>Versions</h3>" + _table(None, [[escape(str(k)), _plain(v)] for k, v in versions.items()]))


def _figure(path: Path, caption: str) -> str:
    """An ``<img>`` holding the PNG at ``path`` as a data URI, or "" when there is no such PNG."""
    try:
        data = path.read_bytes() if path.is_file() else b""
    except OSError:
        data = b""
    if not data.startswith(PNG_SIGNATURE):
        return ""
    source = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (f'<figure><img src="{source}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _table(header: list[str] | None, rows: list[list[str]]) -> str:
    """An HTML table of cells that are already escaped (no header row for ``header=None``)."""
    head = "<tr>" + "".join(f"<th>{cell}</th>" for cell in header) + "</tr>" if header else ""
    return "<table>" + head + "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                                      for row in rows) + "</table>"


def _number(value, form: str = ".3f") -> str:
    return format(value, form) if isinstance(value, (int, float)) and not isinstance(value, bool) else "&ndash;"


def _plain(value) -> str:
    """A value of run.json, escaped: a dict of scalars as ``key value, ...``, anything else as JSON."""
    if isinstance(value, dict) and all(isinstance(v, (str, int, float, bool, type(None))) for v in value.values()):
        text = ", ".join(f"{k} {v}" for k, v in value.items())
    else:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return escape(text if len(text) <= MAX_INFO_CHARS else text[:MAX_INFO_CHARS - 1] + "…")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(errors="replace") if path.is_file() else ""
    except OSError:
        return ""


def _read_json(path: Path):
    try:
        return json.loads(_read_text(path) or "null")
    except ValueError:
        return None


def _recipe_name(recipe_text: str) -> str:
    """The recipe's ``name``, read as plain data (nothing in it is imported)."""
    import yaml

    try:
        recipe = yaml.safe_load(recipe_text)
    except yaml.YAMLError:
        return ""
    return str(recipe["name"]) if isinstance(recipe, dict) and recipe.get("name") else ""

"""The worst-mistakes grid and `transferkit report`'s one-file HTML page, on real extract and finetune runs
(MobileNet alpha 0.25, 64 px, a dozen cats and dogs)."""

import base64
import re
import shutil
import subprocess
from html import escape
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest

from transferkit.recipe import load_recipe
from transferkit.reports.html import write_html_report
from transferkit.reports.mistakes import PLACEHOLDER_GREY, plot_mistakes, thumbnail

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOG = "dog <b>&"  # a class folder whose name is markup: the page must show it, not obey it
NAME = "pets <b>bold</b>"


@pytest.fixture(scope="module")
def pets(datasets, tmp_path_factory):
    """6 cats and 6 dogs, the dogs in a folder named like markup."""
    root = tmp_path_factory.mktemp("pets")
    for source, target in (("cat", "cat"), ("dog", DOG)):
        (root / target).mkdir()
        for path in sorted((datasets / "cats_dogs" / source).iterdir())[:6]:
            shutil.copyfile(path, root / target / path.name)
    return root


def make_run(pets, output, strategy):
    recipe = {"name": NAME, "seed": 0, "strategy": strategy,
              "data": {"train": str(pets), "val": 0.25, "test": 0.25, "image_size": 64, "batch_size": 8},
              "backbone": {"name": "mobilenet", "alpha": 0.25}, "output": str(output)}
    if strategy == "extract":
        from transferkit.strategies.extract import extract
        return extract(load_recipe({**recipe, "extract": {"classifier": {"name": "logistic_regression", "grid": {}}}}),
                       progress=False)
    from transferkit.strategies.finetune import finetune
    optimizer = {"name": "adam", "learning_rate": 1e-3}
    return finetune(load_recipe({**recipe, "warmup": {"epochs": 1, "optimizer": optimizer},
                                 "finetune": {"epochs": 1, "optimizer": optimizer}}), progress=False)


@pytest.fixture(scope="module")
def extract_run(pets, home, tmp_path_factory):
    return make_run(pets, tmp_path_factory.mktemp("runs") / "extract", "extract")


@pytest.fixture(scope="module")
def finetune_run(pets, home, tmp_path_factory):
    return make_run(pets, tmp_path_factory.mktemp("runs") / "finetune", "finetune")


class Page(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self, text):
        super().__init__()
        self.tags = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def assert_png(data: bytes):
    assert data[:8] == PNG_SIGNATURE


def assert_safe_and_self_contained(text: str) -> list[bytes]:
    """No script, no event handler, nothing fetched: every image a PNG data URI. Returns the PNGs."""
    tags = Page(text).tags
    assert "<script" not in text.lower() and not any(tag in ("script", "iframe", "object", "embed", "link")
                                                    for tag, _ in tags)
    handlers = [(tag, name) for tag, attrs in tags for name in attrs if name.lower().startswith("on")]
    assert not handlers and not re.search(r"<[^>]*\son\w+\s*=", text, re.IGNORECASE)
    assert not re.search(r"(https?:|//)[^\s\"']*\.(css|js)", text)
    images = [attrs.get("src", "") for tag, attrs in tags if tag == "img"]
    assert images and all(src.startswith("data:image/png;base64,") for src in images)
    pngs = [base64.b64decode(src.split(",", 1)[1], validate=True) for src in images]
    for png in pngs:
        assert_png(png)
    return pngs


def test_the_mistakes_grid_draws_thumbnails_and_a_tile_for_each_unreadable_file(datasets, tmp_path):
    cats = sorted(str(p) for p in (datasets / "cats_dogs" / "cat").iterdir())[:2]
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    pixels, problem = thumbnail(cats[0])
    assert pixels.shape == (96, 96, 3) and pixels.dtype == np.uint8 and pixels.std() > 5 and problem is None
    pixels, problem = thumbnail(str(tmp_path / "broken.jpg"))
    assert (pixels == PLACEHOLDER_GREY).all() and problem.startswith("unreadable")
    assert thumbnail(str(tmp_path / "gone.jpg"))[1] == "missing file"

    rows = [{"path": path, "true": "cat", "predicted": "dog", "prob_predicted": 0.9}
            for path in [*cats, str(tmp_path / "broken.jpg"), str(tmp_path / "gone.jpg")]]
    plot_mistakes(rows, tmp_path / "four.png")
    plot_mistakes(rows * 4, tmp_path / "sixteen.png")
    plot_mistakes(rows * 6, tmp_path / "twenty_four.png")
    plot_mistakes([], tmp_path / "none.png")
    shapes = {name: matplotlib.image.imread(tmp_path / f"{name}.png").shape
              for name in ("four", "sixteen", "twenty_four", "none")}
    assert shapes["twenty_four"] == shapes["sixteen"]  # at most 16 tiles
    assert shapes["four"][0] < shapes["sixteen"][0] and shapes["none"][0] > 50
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.jpg", "four.png", "none.png", "sixteen.png", "twenty_four.png"]  # no temp files left


@pytest.mark.slow
def test_an_extract_runs_report_is_one_safe_page_with_every_figure(extract_run):
    folder = extract_run.folder
    for split in ("val", "test"):
        assert_png((folder / f"{split}_mistakes.png").read_bytes())
    path = write_html_report(folder)
    assert path == folder / "report.html"
    text = path.read_text()
    pngs = assert_safe_and_self_contained(text)
    assert len(pngs) == 6  # confusion matrix, reliability diagram and mistakes of val and test
    assert (folder / "val_mistakes.png").read_bytes() in pngs
    assert "<b>" not in text and escape(NAME) in text and f"<td>{escape(DOG)}</td>" in text
    assert f"<pre>{escape((folder / 'recipe.yaml').read_text())}</pre>" in text
    for split in ("val", "test"):
        metrics = extract_run.metrics[split]
        assert f"<td>{split}</td><td>{metrics['n']}</td><td>{metrics['top1']:.3f}</td>" in text
        assert f"<td>{metrics['ece']:.3f}</td>" in text
    assert "no training curves" in text and "keras_backend" in text


@pytest.mark.slow
def test_a_finetune_runs_report_has_its_curves(finetune_run):
    text = write_html_report(finetune_run.folder).read_text()
    pngs = assert_safe_and_self_contained(text)
    assert (finetune_run.folder / "curves.png").read_bytes() in pngs and len(pngs) == 7
    assert "no training curves" not in text and escape(NAME) in text


def find_chromium():
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.slow
@pytest.mark.skipif(find_chromium() is None, reason="no headless Chromium (chromium, chromium-browser or "
                                                    "google-chrome) on PATH to render the page with")
def test_the_report_renders_in_a_headless_browser(extract_run, tmp_path):
    path = write_html_report(extract_run.folder)
    done = subprocess.run([find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                           f"--user-data-dir={tmp_path}", path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"<h1>{escape(NAME)}</h1>" in done.stdout and done.stdout.count("<img") == 6


@pytest.mark.slow
def test_the_report_command(extract_run, in_process, tmp_path):
    code, out, err = in_process("report", extract_run.folder)
    assert (code, out, err) == (0, f"wrote {extract_run.folder / 'report.html'}\n", "")
    code, out, err = in_process("report", tmp_path)
    assert code == 2 and err.startswith(f"error: not a run folder: {tmp_path}") and err.count("\n") == 1
    (tmp_path / "run.json").write_text("{")
    code, out, err = in_process("report", tmp_path)
    assert code == 2 and "run.json is damaged" in err and err.count("\n") == 1


@pytest.mark.slow
def test_the_report_shows_evaluations_on_other_data_too(extract_run, pets, in_process, tmp_path):
    folder = shutil.copytree(extract_run.folder, tmp_path / "run")
    assert in_process("evaluate", folder, "--data", pets)[0] == 0
    text = write_html_report(folder).read_text()
    assert len(assert_safe_and_self_contained(text)) == 9 and f"<h2>{pets.name} (eval)</h2>" in text

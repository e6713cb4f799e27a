"""Labels files: data.train as a CSV of path,label[,split] rows, on real pneumonia28 X-rays."""

import os
import shutil
import warnings

import numpy as np
import pytest
from conftest import DATASETS

from transferkit.data import labels as labels_module
from transferkit.data.labels import has_split_column, read_labels
from transferkit.data.splits import load_splits, scan_source
from transferkit.errors import DataError, RecipeError
from transferkit.recipe import load_recipe, recipe_splits

PNEUMONIA = DATASETS / "pneumonia28"
HEADER = "path,label,split\n"


def xrays(folder, per_class=6):
    """``folder/images/<name>.png``: copies of ``per_class`` real normal and pneumonia X-rays; returns
    ``[(relative path, label), ...]``."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    listed = []
    for label in ("normal", "pneumonia"):
        for source in sorted((PNEUMONIA / label).iterdir())[:per_class]:
            shutil.copyfile(source, folder / "images" / f"{label[0]}{source.name}")
            listed.append((f"images/{label[0]}{source.name}", label))
    return listed


def write_csv(path, rows, header=HEADER):
    path.write_text(header + "".join(",".join(row) + "\n" for row in rows))
    return path


def with_splits(listed):
    """Each class's rows: 4 train, 1 val, 1 test."""
    return [(path, label, "train" if i % 6 < 4 else "val" if i % 6 == 4 else "test")
            for i, (path, label) in enumerate(listed)]


def test_pneumonia28_splits_csv_gives_its_three_fixed_splits():
    recipe = load_recipe({"data": {"train": str(PNEUMONIA / "splits.csv")}})
    assert recipe.data.val is None and recipe.data.test is None  # the column fixes them; the saved recipe says so
    splits = recipe_splits(recipe, screen=False)  # names and stat only: no image is decoded
    assert splits.class_names == ["normal", "pneumonia"]
    assert splits.train.class_counts() == {"normal": 1213, "pneumonia": 3477}
    assert splits.val.class_counts() == {"normal": 135, "pneumonia": 389}
    assert splits.test.class_counts() == {"normal": 234, "pneumonia": 390}
    assert splits.train.paths[0] == str(PNEUMONIA / "normal" / "train_00003.png") and not splits.skipped
    assert not set(splits.train.paths) & (set(splits.val.paths) | set(splits.test.paths))
    assert splits.describe().startswith("2 classes; images: train 4690, val 524, test 624; classes: normal, pneumonia")


def test_paths_are_relative_to_the_csvs_folder_and_classes_are_its_sorted_labels(tmp_path):
    listed = xrays(tmp_path / "data")
    renamed = [({"normal": "zebra", "pneumonia": "ant"}[label], path) for path, label in reversed(listed)]
    csv = write_csv(tmp_path / "data" / "labels.csv", renamed, header="\ufeff Label , PATH\n")  # a BOM, spaces,
    with warnings.catch_warnings():                                          # capitals, columns in any order
        warnings.simplefilter("error")
        images, fixed = read_labels(csv)
    assert fixed is None and images.class_names == ["ant", "zebra"] and images.root == str(csv)
    assert images.class_counts() == {"ant": 6, "zebra": 6}
    assert images.paths == sorted(images.paths[:6]) + sorted(images.paths[6:])  # by class, then path
    assert all(os.path.dirname(path) == str(tmp_path / "data" / "images") for path in images.paths)
    splits = load_splits(csv, val=0.25, seed=0)  # without a split column, the usual stratified fraction
    assert len(splits.train) == 9 and sorted(splits.val.class_counts().values()) == [1, 2]
    copied = images.copy_to(tmp_path / "tree")  # an ImageSet from a CSV still becomes a class-per-folder tree
    assert sorted(p.name for p in (copied / "ant" / "images").iterdir()) == \
        sorted(os.path.basename(p) for p in images.paths[:6])
    (tmp_path / "data" / "lists").mkdir()  # ../ leads out of the CSV's folder lists/: refused like a link out
    nested = write_csv(tmp_path / "data" / "lists" / "labels.csv", [(f"../{p}", label) for p, label in listed],
                       header="path,label\n")
    with pytest.warns(UserWarning, match=r"skipped 12 rows .*/data/images/.* is outside .*/data/lists/"):
        with pytest.raises(DataError, match="no usable rows"):
            read_labels(nested)
    assert len(read_labels(nested, follow_links=True)[0]) == 12


def test_bad_rows_are_listed_once_and_skipped(tmp_path):
    listed = xrays(tmp_path)
    (tmp_path / "images" / "broken.png").write_bytes(b"not an image")
    os.link(tmp_path / listed[0][0], tmp_path / "images" / "hardlink.png")
    rows = [(p, label, "train") for p, label in listed] + [
        ("images/missing.png", "normal", "train"),      # line 14
        ("images/broken.png", "normal", "train"),       # decoded only when screening
        (listed[1][0], "", "train"),                    # empty label
        (listed[2][0], "normal", "dev"),                # unknown split
        (listed[3][0], "normal", "train"),              # listed again, same label: the first row is kept
        (listed[7][0], "normal", "train"),              # listed again with another label: every row skipped
        ("images/hardlink.png", "normal", "train"),     # a second name of the first file
        ("only-a-path.png",),                           # too few fields
    ]
    csv = write_csv(tmp_path / "labels.csv", rows)
    with pytest.warns(UserWarning) as caught:
        images, fixed = read_labels(csv)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert message.startswith(f"skipped 9 rows of {csv}: line 9 (")  # lines 9 and 19: listed[7] twice
    assert "line 14 (images/missing.png: no such file)" in message and message.endswith("and 4 more")
    reasons = dict(images.skipped)
    assert reasons[f"{csv}:15"] == "images/broken.png: not an image"
    assert reasons[f"{csv}:16"].endswith("empty label")
    assert "unknown split 'dev': expected train, val, test" in reasons[f"{csv}:17"]
    assert reasons[f"{csv}:18"].endswith("listed again (first on line 5)")
    assert reasons[f"{csv}:9"] == reasons[f"{csv}:19"] == \
        f"{listed[7][0]}: listed on lines 9, 19 with different labels or splits"
    assert reasons[f"{csv}:20"] == f"images/hardlink.png: same file as {listed[0][0]}"
    assert reasons[f"{csv}:21"] == "only-a-path.png: 1 fields, expected 3 (path,label,split)"
    assert len(images) == 11 and set(fixed) == {"train"}  # 12 good files, less the one listed with two labels
    with pytest.warns(UserWarning, match="skipped 8 rows"):  # without screening the broken file is kept
        assert len(read_labels(csv, screen=False)[0]) == 12


def test_a_row_leading_outside_the_csvs_folder_is_refused_unless_follow_links(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    listed = xrays(root)
    xrays(outside / "sub")
    stray = f"images/{os.path.basename(listed[0][0])}"
    (root / "escape.png").symlink_to(outside / "sub" / stray)
    (root / "up").symlink_to(outside / "sub")  # up/.. is elsewhere/, as the system resolves it
    (outside / "secret.png").symlink_to(outside / "sub" / stray)
    (root / "secret.png").write_bytes(b"a decoy that up/../secret.png must not become")
    rows = listed + [("../elsewhere/sub/" + stray, "normal"), (str(outside / "sub" / listed[1][0]), "normal"),
                     ("escape.png", "normal"), ("up/../secret.png", "normal"),
                     (str(root / listed[2][0]), "normal")]  # absolute, but inside: allowed (and listed again)
    csv = write_csv(root / "labels.csv", rows, header="path,label\n")
    with pytest.warns(UserWarning, match=r"skipped 5 rows .*line 14 \(\.\./elsewhere/.*: .* is outside "
                                         r".*/data/: set data.follow_links: true"):
        images, _ = read_labels(csv, screen=False)
    assert len(images) == 12 and all(path.startswith(str(root)) for path in images.paths)
    with pytest.warns(UserWarning, match=r"skipped 3 rows .*same file as"):  # the links lead to one file
        followed, _ = read_labels(csv, screen=False, follow_links=True)
    assert len(followed) == 14 and str(outside / "sub" / listed[1][0]) in followed.paths
    assert str(root / "secret.png") not in followed.paths  # up/../secret.png is elsewhere/secret.png


@pytest.mark.parametrize("content, fragment", [
    ("file,class\na.png,cat\n", "starts with 'file,class': expected the header path,label or path,label,split"),
    ("images/a.png,normal\n", "starts with 'images/a.png,normal': expected the header"),
    ("", "is empty: expected the header"),
    ("path,label\n" + "x" * 10000 + ",cat\n", "line 2 is longer than 8192 characters"),
    ("path,label\n\"a.png,cat\n" + "b.png,dog\n" * 20000, "field larger than field limit"),  # a quote not closed
    (b"path,label\n\xff\xfe.png,cat\n", "not UTF-8 text"),
])
def test_a_file_that_is_not_a_labels_csv_is_one_line(tmp_path, content, fragment):
    csv = tmp_path / "labels.csv"
    csv.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError) as error:
        read_labels(csv)
    assert fragment in str(error.value) and "\n" not in str(error.value), error.value


def test_a_huge_or_special_labels_file_is_refused_before_it_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(labels_module, "MAX_ROWS", 100)
    csv = write_csv(tmp_path / "labels.csv", [(f"{i}.png", "cat") for i in range(101)], header="path,label\n")
    with pytest.raises(DataError, match="more than 100 rows"):
        read_labels(csv)
    monkeypatch.setattr(labels_module, "MAX_BYTES", 1000)
    with pytest.raises(DataError, match="1,113 bytes, more than the 1,000 a labels file may hold"):
        read_labels(csv)
    os.mkfifo(tmp_path / "fifo.csv")  # opening it would wait for a writer forever
    with pytest.raises(DataError, match=r"not a regular file \(FIFO\)"):
        read_labels(tmp_path / "fifo.csv")
    assert not has_split_column(tmp_path / "fifo.csv")


def test_fixed_splits_keep_the_columns_splits_and_need_training_images_of_each_class(tmp_path):
    listed = xrays(tmp_path)
    csv = write_csv(tmp_path / "labels.csv", with_splits(listed))
    splits = load_splits(csv, val=None, test=None, screen=False)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [8, 2, 2]
    assert splits.val.class_counts() == {"normal": 1, "pneumonia": 1}
    assert len(scan_source(csv, screen=False, test_rows=False)) == 10  # what recommend measures: no test rows
    with pytest.raises(DataError, match=r"data.test: .* has a split column.*set data.test to null"):
        load_splits(csv, val=None, test=0.2, screen=False)
    with pytest.raises(DataError, match=r"data.val: .* has a split column, which only data.train may have"):
        load_splits(write_csv(tmp_path / "plain.csv", listed, header="path,label\n"), val=csv, screen=False)
    only_val = [(p, label, "val" if label == "pneumonia" else split) for p, label, split in with_splits(listed)]
    with pytest.raises(DataError, match="data.train: class 'pneumonia' has no rows with split train"):
        load_splits(write_csv(csv, only_val), val=None, screen=False)


def write_recipe(tmp_path, data: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {data}\nbackbone: {{name: mobilenet, alpha: 0.25}}\nstrategy: extract\n")
    return path


def test_validate_lists_a_csv_datasets_classes_and_counts(tmp_path, in_process):
    write_csv(tmp_path / "labels.csv", with_splits(xrays(tmp_path)))
    code, out, error = in_process("validate", write_recipe(tmp_path, "{train: labels.csv}"))
    assert code == 0 and "val: null" in out, error
    assert "data: 2 classes; images: train 8, val 2, test 2; classes: normal, pneumonia" in error


@pytest.mark.parametrize("data, overrides, fragments", [
    ("{train: labels.csv, val: 0.2}", [], ["data.val: ", "labels.csv has a split column, which fixes the val images: "
                                           "remove data.val (or set it to null)"]),
    ("{train: labels.csv}", ["--set", "data.test=0.1"], ["data.test: ", "fixes the test images"]),
    ("{train: wrong.csv}", [], ["data.train: ", "wrong.csv starts with 'file,class': expected the header "
                                "path,label or path,label,split as its first line"]),
    ("{train: nowhere.csv}", [], ["data.train: labels file not found: ", "nowhere.csv"]),
])
def test_a_labels_file_that_cannot_make_a_run_fails_at_validate_in_one_line(tmp_path, in_process, data, overrides,
                                                                            fragments):
    write_csv(tmp_path / "labels.csv", with_splits(xrays(tmp_path)))
    (tmp_path / "wrong.csv").write_text("file,class\na.png,cat\n")
    path = write_recipe(tmp_path, data)
    code, _, error = in_process("validate", path, *overrides)
    assert code == 2 and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    assert error.startswith(f"error: {path}: ")
    for fragment in fragments:
        assert fragment in error


def test_a_split_column_and_a_fraction_is_a_recipe_error(tmp_path):
    write_csv(tmp_path / "labels.csv", with_splits(xrays(tmp_path)))
    with pytest.raises(RecipeError, match="data.val: .* has a split column"):
        load_recipe({"data": {"train": "labels.csv", "val": 0.2}}, base_dir=tmp_path)
    assert load_recipe({"data": {"train": "labels.csv", "val": None}}, base_dir=tmp_path).data.val is None


@pytest.mark.slow
def test_extract_runs_on_a_labels_csv_and_its_features_follow_the_csv(tmp_path, home, monkeypatch):
    from test_extract import _counting

    from transferkit.features.store import FeatureStore
    from transferkit.strategies.extract import extract

    listed = xrays(tmp_path / "data")
    csv = write_csv(tmp_path / "data" / "labels.csv", with_splits(listed))

    def run(name):
        recipe = load_recipe({"data": {"train": str(csv), "image_size": 64, "batch_size": 8},
                              "backbone": {"name": "mobilenet", "alpha": 0.25}, "strategy": "extract",
                              "extract": {"classifier": {"name": "logistic_regression"}},
                              "output": str(tmp_path / name)})
        return extract(recipe, progress=False)

    calls = []
    monkeypatch.setattr(FeatureStore, "compute", _counting(FeatureStore.compute, calls))
    first = run("first")
    assert first.class_names == ["normal", "pneumonia"] and calls == [12]  # one group: the CSV's files
    assert first.metrics["val"]["n"] == 2 and first.metrics["test"]["n"] == 2
    assert "val: null" in (first.folder / "recipe.yaml").read_text()
    relabelled = [(p, "pneumonia" if label == "normal" else "normal", split) for p, label, split in with_splits(listed)]
    write_csv(csv, relabelled)  # other labels for the same files: the features stand, the labels follow
    swapped = run("relabelled")
    train = [str(tmp_path / "data" / path) for path, _, split in with_splits(listed) if split == "train"]
    assert calls[-1] == 0  # nothing embedded again
    assert np.mean(first.predict(train).argmax(1) != swapped.predict(train).argmax(1)) >= 0.75
    write_csv(csv, with_splits(listed)[:-1])  # another list of files: computed again
    run("fewer")
    assert calls[-1] == 11


def test_recommend_counts_a_labels_csv_and_writes_a_recipe_that_keeps_its_splits(tmp_path):
    from transferkit.recommend import recommend

    csv = write_csv(tmp_path / "labels.csv", with_splits(xrays(tmp_path)))
    rec = recommend(similar="yes", data=str(csv))
    assert rec.evidence["images"] == 12 and rec.evidence["classes"] == 2
    written = rec.recipe(data=str(csv))
    assert "val" not in written["data"] and load_recipe(written).data.val is None

"""Scanning a data folder cannot be fooled by links or special files (24 real cats and dogs, copied)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from transferkit.data.decode import load_image
from transferkit.data.folders import find_images, scan_folder
from transferkit.data.splits import load_splits
from transferkit.errors import DataError


@pytest.fixture
def pets(datasets, tmp_path):
    """``pets/{cat,dog}/``: copies of 12 real cat and 12 real dog JPEGs."""
    root = tmp_path / "pets"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for path in sorted((datasets / "cats_dogs" / name).iterdir())[:12]:
            shutil.copyfile(path, root / name / path.name)
    return root


def _scan(root, **options):
    """scan_folder, and the messages of the skipped-files warnings it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        images = scan_folder(root, **options)
    return images, [str(w.message) for w in caught if "skipped" in str(w.message)]


def _real_labels(images):
    """Each image's class name as its real file name says (``cat.12.jpg``: cat)."""
    return [os.path.basename(os.path.realpath(p)).split(".")[0] for p in images.paths]


def _skipped(images, root):
    return {os.path.relpath(path, root): reason for path, reason in images.skipped}


def test_a_link_loop_yields_the_24_real_images(pets):
    (pets / "cat" / "loop").symlink_to("..")
    images, messages = _scan(pets)
    assert len(images) == 24 and images.class_counts() == {"cat": 12, "dog": 12}
    assert [images.class_names[i] for i in images.labels] == _real_labels(images)
    assert len({os.path.realpath(p) for p in images.paths}) == 24
    assert list(_skipped(images, pets)) == ["cat/loop"]
    assert "link to the folder" in _skipped(images, pets)["cat/loop"] and "not followed" in messages[0]
    assert len(messages) == 1 and "skipped 1 file in" in messages[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        splits = load_splits(pets, val=0.25, seed=0)
    assert (len(splits.train), len(splits.val)) == (18, 6)
    assert not {os.path.realpath(p) for p in splits.train.paths} & {os.path.realpath(p) for p in splits.val.paths}
    assert [os.path.relpath(p, pets) for p, _ in splits.skipped] == ["cat/loop"]  # once, not once per split


def test_a_link_out_of_the_data_folder_needs_follow_links(pets, datasets, tmp_path):
    outside = sorted((datasets / "cats_dogs" / "dog").iterdir())[-1]  # not among the 12 copies
    (pets / "dog" / "outside.jpg").symlink_to(outside)
    (pets / "dog" / "passwd.jpg").symlink_to("/etc/passwd")
    images, messages = _scan(pets)
    assert len(images) == 24 and not any(os.path.islink(p) for p in images.paths)
    skipped = _skipped(images, pets)
    assert skipped["dog/outside.jpg"].startswith(f"link to {outside}, outside {os.path.realpath(pets)}/")
    assert skipped["dog/passwd.jpg"].endswith("set data.follow_links: true (Python: follow_links=True) to use it")
    assert len(messages) == 1

    followed, _ = _scan(pets, follow_links=True)
    assert len(followed) == 25 and str(pets / "dog" / "outside.jpg") in followed.paths
    assert followed.class_counts() == {"cat": 12, "dog": 13}
    assert _skipped(followed, pets) == {"dog/passwd.jpg": "not an image"}  # decoded, as allowed, and refused
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert len(load_splits(pets, val=0.2, follow_links=True).train) == 20


def test_each_real_file_is_kept_once_where_it_lies(pets):
    cat, dog = sorted((pets / "cat").iterdir())[3].name, sorted((pets / "dog").iterdir())[5].name
    (pets / "cat" / "again.jpg").symlink_to(cat)
    (pets / "cat" / "nested").mkdir()
    (pets / "cat" / "nested" / "once-more.jpg").symlink_to(pets / "cat" / "again.jpg")  # a link to a link
    (pets / "cat" / dog).symlink_to(Path("..") / "dog" / dog)  # a dog linked into cat/
    images, messages = _scan(pets)
    assert len(images) == 24 and [images.class_names[i] for i in images.labels] == _real_labels(images)
    assert str(pets / "dog" / dog) in images.paths and str(pets / "cat" / dog) not in images.paths
    assert _skipped(images, pets) == {"cat/again.jpg": f"same file as cat/{cat}",
                                      "cat/nested/once-more.jpg": f"same file as cat/{cat}",
                                      f"cat/{dog}": f"same file as dog/{dog}"}
    assert len(messages) == 1 and "skipped 3 files" in messages[0]


def test_of_two_links_to_one_file_the_first_in_sorted_order_is_kept(pets, datasets):
    outside = sorted((datasets / "cats_dogs" / "cat").iterdir())[-1]
    for name in ("b.jpg", "a.jpg"):
        (pets / "cat" / name).symlink_to(outside)
    images, _ = _scan(pets, follow_links=True)
    assert str(pets / "cat" / "a.jpg") in images.paths and len(images) == 25
    assert _skipped(images, pets) == {"cat/b.jpg": "same file as cat/a.jpg"}


def test_a_data_folder_named_through_a_link_keeps_its_rules(pets, tmp_path):
    (tmp_path / "alias").symlink_to(tmp_path)  # the folder the user names is reached through a link
    named = tmp_path / "alias" / "pets"
    cat = sorted((pets / "cat").iterdir())[0].name
    (pets / "cat" / "again.jpg").symlink_to(cat)
    (pets / "cat" / "up.jpg").symlink_to(pets / "dog" / "dog.1.jpg")  # inside, by its real path
    images, _ = _scan(named)
    assert len(images) == 24 and all(p.startswith(str(named)) for p in images.paths)
    assert _skipped(images, named) == {"cat/again.jpg": f"same file as cat/{cat}",
                                       "cat/up.jpg": "same file as dog/dog.1.jpg"}


def test_a_link_to_a_class_folder_is_not_followed(pets, tmp_path):
    (pets / "kitty").symlink_to("cat")
    images, messages = _scan(pets, follow_links=True)
    assert images.class_names == ["cat", "dog"] and len(images) == 24
    assert "link to the folder" in _skipped(images, pets)["kitty"] and "kitty" in messages[0]
    only_links = tmp_path / "only_links"
    only_links.mkdir()
    (only_links / "cat").symlink_to(pets / "cat")
    (only_links / "dog").symlink_to(pets / "dog")
    with pytest.raises(DataError, match=r"no class folders in .*only_links/ \(cat \(link to the folder .*not followed"):
        scan_folder(only_links)


def test_a_hard_link_is_the_same_file_too(pets, tmp_path):
    dog = sorted((pets / "dog").iterdir())[2]
    os.link(dog, pets / "cat" / "hard.jpg")  # a dog hard-linked into cat/, as a deduplicating tool leaves it
    images, _ = _scan(pets)  # no path of the two is the original: the first in sorted order is kept
    assert len(images) == 24 and str(dog) not in images.paths
    assert _skipped(images, pets) == {f"dog/{dog.name}": "same file as cat/hard.jpg"}
    val = tmp_path / "val"
    (val / "dog").mkdir(parents=True)
    os.link(dog, val / "dog" / "x.jpg")
    with warnings.catch_warnings(), pytest.raises(DataError, match=r"^data.val: 1 image\(s\) of .*val/ are also in data.train"):
        warnings.simplefilter("ignore")  # the hard link in cat/, shown above
        load_splits(pets, val=val)


def test_split_folders_that_share_files_are_refused(pets, tmp_path):
    val = tmp_path / "val"
    (val / "dog").mkdir(parents=True)
    (val / "dog" / "x.jpg").symlink_to(sorted((pets / "dog").iterdir())[0])
    with pytest.raises(DataError, match=r"^data.val: 1 image\(s\) of .*val/ are also in data.train "
                                        r"\(e.g. .*x.jpg is .*dog\.1\.jpg\): give folders that share no files"):
        load_splits(pets, val=val, follow_links=True)
    with pytest.raises(DataError, match=r"^data.test: 24 image\(s\) .* are also in data.train"):
        load_splits(pets, val=None, test=pets)


def test_each_skipped_file_is_reported_once(pets):
    (pets / "cat" / "bad.jpg").write_text("not a picture")
    (pets / "dog" / "loop").symlink_to("..")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(pets, val=0.25, test=0.25, seed=0)
    messages = [str(w.message) for w in caught if "skipped" in str(w.message)]
    assert len(messages) == 1 and messages[0].count("bad.jpg") == 1 and messages[0].count("loop") == 1
    assert [os.path.relpath(p, pets) for p, _ in splits.skipped] == ["cat/bad.jpg", "dog/loop"]
    assert (len(splits.train), len(splits.val), len(splits.test)) == (12, 6, 6)


_SPECIAL_FILES_SCAN = """
import json, os, socket, sys, time, warnings
from transferkit.data.decode import load_image
from transferkit.data.folders import find_images, scan_folder
from transferkit.errors import DataError

root = sys.argv[1]
warnings.simplefilter("ignore")
started = time.perf_counter()
images = scan_folder(root, follow_links=True)
seconds = time.perf_counter() - started
_, named = find_images([os.path.join(root, "cat", "x.jpg")])
try:
    load_image(os.path.join(root, "cat", "x.jpg"), 8)
    decoded = "decoded"
except DataError as err:
    decoded = str(err)
print(json.dumps({"seconds": seconds, "n": len(images), "skipped": images.skipped, "named": named,
                  "decoded": decoded}))
"""


def test_fifos_sockets_and_devices_are_skipped_unopened_within_a_second(pets):
    os.mkfifo(pets / "cat" / "x.jpg")  # opening it would block until someone writes
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(pets / "dog" / "s.jpg"))
    (pets / "dog" / "zero.jpg").symlink_to("/dev/zero")  # endless, followed with follow_links=True
    try:  # in a child process, so a regression fails here instead of hanging the test run
        result = subprocess.run([sys.executable, "-c", _SPECIAL_FILES_SCAN, str(pets)], capture_output=True,
                                text=True, timeout=60)
    finally:
        server.close()
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["seconds"] < 1 and report["n"] == 24
    assert {os.path.relpath(path, pets): reason for path, reason in report["skipped"]} == {
        "cat/x.jpg": "not a regular file (FIFO)", "dog/s.jpg": "not a regular file (socket)",
        "dog/zero.jpg": "not a regular file (character device)"}
    assert report["named"] == [[str((pets / "cat" / "x.jpg").resolve()), "not a regular file (FIFO)"]]
    assert report["decoded"].endswith("x.jpg: not a regular file (FIFO)")


def test_predict_inputs_named_files_are_the_users_choice(pets, datasets, tmp_path):
    outside = sorted((datasets / "cats_dogs" / "dog").iterdir())[-1]
    link = tmp_path / "named.jpg"
    link.symlink_to(outside)
    (pets / "dog" / "outside.jpg").symlink_to(outside)
    (pets / "dog" / "loop").symlink_to("..")
    (pets / "dog" / "again.jpg").symlink_to("dog.1.jpg")
    with pytest.warns(UserWarning, match="skipped 3 files"):  # dog.1.jpg named again: used once, silently
        paths, skipped = find_images([link, pets / "dog", pets / "dog" / "dog.1.jpg"])
    assert len(paths) == 13 and paths[0] == str(outside)  # the named link, as it resolves
    reasons = {os.path.basename(path): reason for path, reason in skipped}
    assert reasons["outside.jpg"].endswith("name the file itself (Python: follow_links=True) to use it")
    assert "link to the folder" in reasons["loop"] and reasons["again.jpg"] == f"same file as {pets}/dog/dog.1.jpg"
    assert np.array_equal(load_image(paths[0], 16), load_image(outside, 16))


@pytest.mark.slow
def test_extract_on_a_link_loop_counts_the_real_images(pets, home, tmp_path):
    from transferkit.recipe import load_recipe
    from transferkit.strategies.extract import extract

    (pets / "cat" / "loop").symlink_to("..")
    (pets / "dog" / "loop").symlink_to("../..")
    recipe = load_recipe({"seed": 0, "data": {"train": str(pets), "val": 0.25, "image_size": 32, "batch_size": 8},
                          "backbone": {"name": "mobilenet", "alpha": 0.25},
                          "extract": {"classifier": {"name": "logistic_regression", "grid": {"C": [1.0]}}},
                          "output": str(tmp_path / "run")})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extract(recipe, progress=False)
    info = json.loads((tmp_path / "run" / "run.json").read_text())["info"]
    assert info["images"] == {"train": 18, "val": 6}
    assert {os.path.relpath(path, pets) for path, _ in info["skipped_files"]} == {"cat/loop", "dog/loop"}
    assert json.loads((tmp_path / "run" / "val_metrics.json").read_text())["n"] == 6

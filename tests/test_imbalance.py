"""data.class_weight and data.sampling on a small imbalanced set of real chest X-rays (pneumonia28):
60 pneumonia and 15 normal images to train on, a balanced validation folder of 10 + 10."""

import functools
import shutil

import numpy as np
import pytest
from sklearn.utils.class_weight import compute_class_weight

from transferkit.data.augment import BatchMixer
from transferkit.data.balance import balanced_order, class_weights, label_weights
from transferkit.data.folders import scan_folder
from transferkit.data.pipelines import make_dataset
from transferkit.recipe import load_recipe
from transferkit.strategies.extract import extract
from transferkit.strategies.finetune import finetune

TRAIN = {"normal": 15, "pneumonia": 60}
VAL = {"normal": 10, "pneumonia": 10}


@pytest.fixture(scope="module")
def xrays(datasets, tmp_path_factory):
    """``train/`` (15 normal, 60 pneumonia) and ``val/`` (10 + 10): copies of the dataset's own train
    and val images, so no file is on both sides."""
    root = tmp_path_factory.mktemp("pneumonia_imbalanced")
    for split, counts in (("train", TRAIN), ("val", VAL)):
        for name, count in counts.items():
            (root / split / name).mkdir(parents=True)
            for path in sorted((datasets / "pneumonia28" / name).glob(f"{split}_*.png"))[:count]:
                shutil.copyfile(path, root / split / name / path.name)
    return root


def make_recipe(xrays, output, strategy="extract", classifier=(), **data):
    return load_recipe({
        "name": "xray", "seed": 0, "strategy": strategy,
        "data": {"train": str(xrays / "train"), "val": str(xrays / "val"), "image_size": 32, "batch_size": 16, **data},
        "backbone": {"name": "mobilenet", "alpha": 0.25},
        "extract": {"classifier": {"name": "logistic_regression", "grid": {}, **dict(classifier)}},
        "warmup": {"epochs": 3, "optimizer": {"name": "adam", "learning_rate": 3e-3}},
        "finetune": {"epochs": 0},
        "calibrate": "none",  # the weighting itself, not a temperature fitted on the balanced val split after it
        "output": str(output)})


def sklearn_balanced(labels):
    return compute_class_weight("balanced", classes=np.unique(labels), y=labels)


def test_balanced_weights_are_sklearns_on_the_training_labels():
    labels = np.array([0] * 15 + [1] * 60 + [2] * 5)
    np.testing.assert_allclose(class_weights("balanced", labels, ["a", "b", "c"]), sklearn_balanced(labels))
    np.testing.assert_allclose(class_weights({"c": 4, 0: 2.0}, labels, ["a", "b", "c"]), [2.0, 1.0, 4.0])
    assert class_weights(None, labels, ["a", "b", "c"]) is None


def test_fits_on_features_take_balanced_sampling_as_balanced_weights():
    labels, names = np.array([0] * 15 + [1] * 60), ["a", "b"]
    np.testing.assert_allclose(class_weights(None, labels, names, sampling="balanced"), sklearn_balanced(labels))
    np.testing.assert_allclose(class_weights({"a": 2}, labels, names, sampling="balanced"),
                               [2 * 2.5, 0.625])  # in expectation: each class drawn as often, then weighed


def test_balanced_sampling_draws_each_class_equally_often_from_the_seed_and_epoch_alone():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    order = balanced_order(labels, seed=3, epoch=5)
    assert len(order) == len(labels) and order.min() >= 0 and order.max() < len(labels)
    shares = np.bincount(labels[order], minlength=3) / len(order)
    np.testing.assert_allclose(shares, [1 / 3] * 3, atol=0.05)  # 9:0.9:0.1 in the data
    np.testing.assert_array_equal(order, balanced_order(labels, seed=3, epoch=5))
    assert not np.array_equal(order, balanced_order(labels, seed=3, epoch=6))
    assert not np.array_equal(order, balanced_order(labels, seed=4, epoch=5))
    assert len(set(order[labels[order] == 2])) == 10  # the ten rare images all drawn, many times each


def test_imag_targets_keep_the_weight_of_the_class_that_carries_them():
    weights, labels = np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1, 2])
    targets = np.array([1, 2, 0])[labels]  # a derangement: class 0 learns 1, 1 learns 2, 2 learns 0
    np.testing.assert_allclose(label_weights(weights, labels, targets), [3.0, 1.0, 2.0])
    np.testing.assert_allclose(label_weights(weights, labels, labels), weights)


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_batches_carry_each_samples_weight_and_mixed_labels_mix_it(xrays, pipeline):
    images = scan_folder(xrays / "train", screen=False)
    weights = np.array([2.5, 0.625])
    plain = make_dataset(images, 32, 16, pipeline=pipeline, class_weight=weights)
    for _, labels, sample in (plain[i] for i in range(len(plain))) if pipeline == "pydataset" else plain:
        np.testing.assert_allclose(np.asarray(sample), weights[np.asarray(labels)])
    mixed = make_dataset(images, 32, 16, pipeline=pipeline, num_classes=2, seed=1, class_weight=weights,
                         mix=functools.partial(BatchMixer, 0.4, 0.0), epochs=range(1))
    batches = [mixed[i] for i in range(len(mixed))] if pipeline == "pydataset" else list(mixed)
    soft = np.concatenate([np.asarray(labels) for _, labels, _ in batches])
    sample = np.concatenate([np.asarray(sample) for _, _, sample in batches])
    assert ((soft > 0.01) & (soft < 0.99)).any()  # MixUp did mix some labels
    np.testing.assert_allclose(sample, soft @ weights, rtol=1e-5)


@pytest.mark.parametrize("pipeline", ["tf", "pydataset"])
def test_balanced_batches_are_balanced_and_resume_exactly(xrays, pipeline):
    images = scan_folder(xrays / "train", screen=False)

    def labels(epochs):
        data = make_dataset(images, 32, 16, pipeline=pipeline, seed=2, epochs=epochs, balanced=True)
        batches = [data[i] for i in range(len(data))] if pipeline == "pydataset" else list(data)
        return np.concatenate([np.asarray(batch[1]) for batch in batches])

    drawn = labels(range(4))
    assert len(drawn) == 4 * len(images)
    assert 0.4 < np.mean(drawn == 0) < 0.6  # normal is 15 of the 75 images, half of the draws
    np.testing.assert_array_equal(labels(range(2, 4)), drawn[2 * len(images):])
    with pytest.raises(ValueError, match="give epochs too"):
        make_dataset(images, 32, 16, pipeline=pipeline, balanced=True)


def test_extract_gives_the_classifier_the_training_splits_balanced_weights(xrays, home, tmp_path):
    plain = extract(make_recipe(xrays, tmp_path / "plain"), progress=False)
    balanced = extract(make_recipe(xrays, tmp_path / "balanced", class_weight="balanced"), progress=False)
    train_labels = scan_folder(xrays / "train", screen=False).labels
    given = balanced.predictor.classifier.named_steps["classifier"].class_weight
    assert given == pytest.approx(dict(enumerate(sklearn_balanced(train_labels))))  # train only: 2.5 and 0.625
    assert plain.predictor.classifier.named_steps["classifier"].class_weight is None
    sampled = extract(make_recipe(xrays, tmp_path / "sampled", sampling="balanced"), progress=False)
    assert sampled.predictor.classifier.named_steps["classifier"].class_weight == pytest.approx(given)
    recall_plain, recall_balanced = (run.metrics["val"]["per_class"]["normal"]["recall"] for run in (plain, balanced))
    assert recall_balanced >= recall_plain


def test_the_older_classifier_key_still_weighs_the_classes(xrays, home, tmp_path):
    recipe = make_recipe(xrays, tmp_path / "older", classifier={"class_weight": {"normal": 3}})
    assert recipe.data.class_weight == {"normal": 3} and recipe.extract.classifier.class_weight is None
    run = extract(recipe, progress=False)
    assert run.predictor.classifier.named_steps["classifier"].class_weight == {0: 3.0, 1: 1.0}


def test_finetuning_with_balanced_weights_or_sampling_predicts_the_rare_class_more(xrays, home, tmp_path):
    settings = {"plain": {}, "weights": {"class_weight": "balanced"}, "sampling": {"sampling": "balanced"}}
    runs = {name: finetune(make_recipe(xrays, tmp_path / name, "finetune", **data), progress=False)
            for name, data in settings.items()}
    val = scan_folder(xrays / "val", screen=False)
    normal = {name: run.predict(val.paths)[:, 0].mean() for name, run in runs.items()}
    recall = {name: run.metrics["val"]["per_class"]["normal"]["recall"] for name, run in runs.items()}
    for balanced in ("weights", "sampling"):  # a normal image's loss counts 4x, or it is drawn 4x as often
        assert normal[balanced] > normal["plain"] + 0.1, normal
        assert recall[balanced] > recall["plain"], recall


@pytest.mark.parametrize("data, said", [
    ("class_weight: {normla: 2}", "data.class_weight: unknown class 'normla': did you mean normal?"),
    ("class_weight: {normal: 0}", "data.class_weight.normal: expected a weight > 0, got 0"),
    ("class_weight: balanced}\nextract: {classifier: {name: knn, class_weight: balanced}",
     "extract.classifier.class_weight: data.class_weight is the one key for both strategies"),
    ("class_weight: balanced}\nextract: {classifier: knn", "data.class_weight: knn does not take class weights"),
    ("class_weight: balanced, sampling: balanced", "data.sampling: balanced sampling and balanced class weights"),
    ("sampling: balanced}\nextract: {classifier: knn", "data.sampling: knn takes no class weights"),
    ("sampling: balancd", "data.sampling: "),
])
def test_a_class_weight_that_cannot_work_fails_at_validate_in_one_line(xrays, tmp_path, in_process, data, said):
    path = tmp_path / "recipe.yaml"
    path.write_text(f"data: {{train: {xrays / 'train'}, {data}}}\nbackbone: {{name: mobilenet, alpha: 0.25}}\n")
    code, _, error = in_process("validate", path)
    assert code == 2 and len(error.strip().splitlines()) == 1 and "Traceback" not in error, error
    assert f"error: {path}: {said}" in error

import csv
import json
import math

import matplotlib.image
import numpy as np
import pytest

from transferkit.reports.calibration import apply_temperature, expected_calibration_error
from transferkit.reports.evaluate import evaluate_predictions, format_metrics, plot_history, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["ant", "bee", "cat"]
# Six samples, two per class; samples 1 (ant -> bee) and 3 (bee -> cat) are wrong.
Y_TRUE = [0, 0, 1, 1, 2, 2]
PROBS = [[0.7, 0.2, 0.1],
         [0.2, 0.5, 0.3],
         [0.1, 0.8, 0.1],
         [0.1, 0.3, 0.6],
         [0.2, 0.2, 0.6],
         [0.1, 0.1, 0.8]]
P_TRUE = [0.7, 0.2, 0.8, 0.3, 0.6, 0.8]
PATHS = [f"images/{i}.jpg" for i in range(6)]


def read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    height, width = matplotlib.image.imread(path).shape[:2]
    assert height > 100 and width > 100


def test_metrics_match_a_hand_computed_example():
    metrics = evaluate_predictions(Y_TRUE, PROBS, NAMES)
    assert metrics["n"] == 6 and metrics["top1"] == pytest.approx(4 / 6)
    assert "top5" not in metrics
    assert metrics["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert metrics["loss"] == pytest.approx(np.mean([-math.log(p) for p in P_TRUE]))
    expected = {"ant": (1, 1 / 2, 2 / 3), "bee": (1 / 2, 1 / 2, 1 / 2), "cat": (2 / 3, 1, 4 / 5)}
    for name, (precision, recall, f1) in expected.items():
        scores = metrics["per_class"][name]
        assert (scores["precision"], scores["recall"], scores["f1"]) == pytest.approx(
            (precision, recall, f1))
        assert scores["support"] == 2
    assert metrics["balanced_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    assert metrics["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)


def test_top5_only_with_five_classes_or_more_and_counts_the_top_five():
    probs = [[0.01, 0.30, 0.25, 0.20, 0.15, 0.09],  # true 0 ranked sixth: top-1, top-5 wrong
             [0.30, 0.25, 0.20, 0.15, 0.06, 0.04],  # true 2 ranked third: top-1 wrong, top-5 right
             [0.10, 0.10, 0.10, 0.10, 0.10, 0.50]]  # true 5: right
    metrics = evaluate_predictions([0, 2, 5], probs, list("abcdef"))
    assert metrics["top1"] == pytest.approx(1 / 3)
    assert metrics["top5"] == pytest.approx(2 / 3)
    assert "top5" not in evaluate_predictions([0, 1], [[1, 0, 0, 0], [0, 1, 0, 0]], list("abcd"))


def test_class_absent_from_y_true_is_still_reported():
    probs = [[0.9, 0.05, 0.05, 0.0], [0.1, 0.2, 0.1, 0.6], [0.0, 0.1, 0.9, 0.0]]
    metrics = evaluate_predictions([0, 1, 2], probs, ["a", "b", "c", "d"])
    assert metrics["confusion_matrix"] == [[1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert metrics["per_class"]["d"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert metrics["balanced_accuracy"] == pytest.approx(2 / 3)  # over the classes that occur


def test_probabilities_floor_keeps_loss_finite():
    metrics = evaluate_predictions([1], [[1.0, 0.0]], ["a", "b"])
    assert metrics["loss"] == pytest.approx(-math.log(1e-7))


@pytest.mark.parametrize("y_true, probs, match", [
    ([0, 1], [[2.0, -1.0], [0.5, 3.0]], "softmax"),
    ([0, 1], [[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]], "shape"),
    ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "class indices"),
    ([0], [[0.5, 0.5], [0.5, 0.5]], "class indices"),
])
def test_bad_input_is_refused_with_a_message_that_says_what(y_true, probs, match):
    with pytest.raises(ValueError, match=match):
        evaluate_predictions(y_true, probs, ["a", "b"])


def test_format_metrics_gives_the_headline_and_weakest_classes():
    text = format_metrics(evaluate_predictions(Y_TRUE, PROBS, NAMES))
    headline, weakest = text.splitlines()
    assert headline == f"top-1 0.667  balanced accuracy 0.667  loss {np.mean(-np.log(P_TRUE)):.3f}  (n=6)"
    assert weakest.startswith("weakest by F1: bee 0.500, ant 0.667")
    always_first = format_metrics(evaluate_predictions([0, 0, 0, 1], [[0.9, 0.1]] * 4, ["a", "b"]))
    assert always_first.startswith("top-1 0.750  balanced accuracy 0.500  loss")  # beside top-1, apart from it


def test_write_report_writes_eight_files_that_read_back(tmp_path):
    folder = tmp_path / "run" / "eval"
    metrics = write_report(folder, Y_TRUE, PROBS, NAMES, PATHS, prefix="val", worst=1)
    kinds = ["metrics.json", "confusion_matrix.csv", "confusion_matrix.png", "predictions.csv",
             "mistakes.csv", "mistakes.png", "report.txt", "reliability.png"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(f"val_{k}" for k in kinds)

    assert json.loads((folder / "val_metrics.json").read_text()) == metrics
    assert read_csv(folder / "val_confusion_matrix.csv") == [
        ["true\\predicted", *NAMES], ["ant", "1", "1", "0"], ["bee", "0", "1", "1"],
        ["cat", "0", "0", "2"]]
    assert_png(folder / "val_confusion_matrix.png")
    assert_png(folder / "val_reliability.png")
    assert_png(folder / "val_mistakes.png")  # its image file is missing: a placeholder tile, not a failure
    assert metrics["ece"] == pytest.approx(expected_calibration_error(Y_TRUE, PROBS)) and "calibration" not in metrics

    header, *rows = read_csv(folder / "val_predictions.csv")
    assert header == ["path", "true", "predicted", "prob_predicted", "prob_true", "loss", "top_k"]
    assert [r[0] for r in rows] == PATHS
    assert rows[1][1:6] == ["ant", "bee", "0.5", "0.2", str(round(-math.log(0.2), 6))]
    assert rows[1][6] == "bee:0.5000;cat:0.3000;ant:0.2000"

    header, *mistakes = read_csv(folder / "val_mistakes.csv")
    assert header == ["path", "true", "predicted", "prob_predicted", "prob_true", "loss"]
    assert mistakes == [["images/1.jpg", "ant", "bee", "0.5", "0.2", rows[1][5]]]  # worst=1

    report = (folder / "val_report.txt").read_text()
    assert "top-1 0.667" in report and "images/1.jpg" in report
    assert all(name in report for name in NAMES)


def test_a_report_after_temperature_scaling_gives_ece_and_loss_before_and_after(tmp_path):
    calibrated = apply_temperature(PROBS, 0.5)
    metrics = write_report(tmp_path, Y_TRUE, calibrated, NAMES, prefix="test", uncalibrated=PROBS, temperature=0.5)
    assert metrics["calibration"] == {"temperature": 0.5, "ece_before": pytest.approx(expected_calibration_error(
        Y_TRUE, PROBS)), "loss_before": pytest.approx(np.mean(-np.log(P_TRUE)))}
    assert metrics["ece"] == pytest.approx(expected_calibration_error(Y_TRUE, calibrated))
    report = (tmp_path / "test_report.txt").read_text()
    assert (f"temperature 0.500, ECE {metrics['calibration']['ece_before']:.3f} -> {metrics['ece']:.3f}, "
            f"loss {metrics['calibration']['loss_before']:.3f} -> {metrics['loss']:.3f}") in report


def test_mistakes_are_wrong_predictions_sorted_by_loss(tmp_path):
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, 200)
    probs = rng.dirichlet(np.ones(6), 200)
    write_report(tmp_path, y_true, probs, list("abcdef"), prefix="test", worst=20)
    header, *mistakes = read_csv(tmp_path / "test_mistakes.csv")
    assert header[0] == "true"  # no paths given, no path column
    losses = [float(r[-1]) for r in mistakes]
    assert len(mistakes) == 20 and losses == sorted(losses, reverse=True)
    assert all(true != predicted for true, predicted, *_ in mistakes)
    wrong = probs.argmax(axis=1) != y_true
    expected = -np.log(probs[np.arange(200), y_true])[wrong]
    assert losses[0] == pytest.approx(expected.max(), abs=1e-6)
    assert json.loads((tmp_path / "test_metrics.json").read_text())["top5"] > 0


def test_confusion_matrix_png_for_many_classes(tmp_path):
    rng = np.random.default_rng(1)
    names = [f"class number {i}" for i in range(40)]
    write_report(tmp_path, rng.integers(0, 40, 500), rng.dirichlet(np.ones(40), 500), names)
    assert_png(tmp_path / "test_confusion_matrix.png")


def test_plot_history_with_phases_and_nans(tmp_path):
    history = {"loss": [1.2, 0.9, float("nan"), 0.6, 0.5], "val_loss": [1.3, 1.0, 0.9, None, 0.7],
               "accuracy": [0.4, 0.6, 0.7, 0.8, 0.85], "top5_acc": [0.8, 0.9, 0.95, 0.97, 0.98],
               "learning_rate": [0.1] * 5}
    path = tmp_path / "curves.png"
    plot_history(history, path, phases=["normal", "normal", "imag", "normal", "imag"], title="t")
    assert_png(path)
    plot_history({"loss": [1.0, 0.5]}, tmp_path / "loss_only.png")  # no val, no accuracy keys
    assert_png(tmp_path / "loss_only.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "loss_only.png"]
    with pytest.raises(ValueError, match="one per epoch"):
        plot_history(history, tmp_path / "x.png", phases=["normal"])
    with pytest.raises(ValueError, match="no loss or accuracy"):
        plot_history({"learning_rate": [0.1]}, tmp_path / "x.png")

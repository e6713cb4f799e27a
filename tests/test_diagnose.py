import json
import math
import subprocess
import sys

import pytest

from transferkit.training.curves import ACCURACY_GAP, GOOD, OVER, TOO_SHORT, UNDER, UNSTABLE, VERDICTS
from transferkit.training.diagnose import Diagnosis, diagnose

NAN = math.nan

# Train accuracy climbs to 0.99 while val loss bottoms out at epoch 4 and climbs back: a U.
OVERFIT = {"loss": [1.2, 0.8, 0.5, 0.3, 0.15, 0.08, 0.04, 0.02],
           "val_loss": [1.0, 0.7, 0.5, 0.42, 0.45, 0.55, 0.7, 0.85],
           "accuracy": [0.6, 0.75, 0.85, 0.92, 0.96, 0.98, 0.99, 0.99],
           "val_accuracy": [0.62, 0.74, 0.82, 0.85, 0.85, 0.84, 0.84, 0.83]}
# Both accuracies near 0.5 and both losses still dropping ~10% an epoch.
UNDERFIT = {"loss": [2.0, 1.8, 1.6, 1.4, 1.25, 1.1],
            "val_loss": [1.9, 1.75, 1.6, 1.45, 1.3, 1.18],
            "accuracy": [0.3, 0.35, 0.4, 0.45, 0.5, 0.52],
            "val_accuracy": [0.32, 0.36, 0.41, 0.46, 0.5, 0.53]}
# Close curves; val loss flat over the last epochs, train loss flattening.
GOOD_FIT = {"loss": [0.9, 0.5, 0.35, 0.3, 0.28, 0.27],
            "val_loss": [0.8, 0.5, 0.38, 0.33, 0.32, 0.326],
            "accuracy": [0.7, 0.85, 0.9, 0.92, 0.93, 0.935],
            "val_accuracy": [0.72, 0.84, 0.88, 0.9, 0.91, 0.91]}


def text_of(diagnosis: Diagnosis) -> str:
    return " ".join(diagnosis.evidence)


def test_textbook_overfit():
    d = diagnose(OVERFIT)
    assert d.verdict == OVER
    evidence = text_of(d)
    assert "train 0.990 vs val 0.830, a gap of 0.160" in evidence
    assert "train 0.020 vs val 0.850" in evidence
    assert "best 0.420 at epoch 4, 4 epochs before the end (well before it)" in evidence
    assert "+102.4% above the best" in evidence
    assert d.measures["val_loss_best_epoch"] == 4 and d.measures["epochs_since_best"] == 4


def test_overfit_remedies_name_recipe_keys_and_start_with_early_stopping():
    remedies = diagnose(OVERFIT).remedies
    assert remedies[0].startswith("Early stopping") and "epoch 4" in remedies[0]
    joined = " ".join(remedies)
    for key in ("finetune.mixup: 0.2", "rand_augment", "head.dropout", "finetune.label_smoothing",
                "finetune.unfreeze", "finetune.early_stopping"):
        assert key in joined


def test_accuracy_gap_alone_is_overfitting():
    history = {**GOOD_FIT, "accuracy": [0.7, 0.85, 0.93, 0.97, 0.99, 1.0]}  # val loss stays flat
    d = diagnose(history)
    assert d.verdict == OVER
    assert f"a gap of 0.090 (above the {ACCURACY_GAP:.2f} over-fitting threshold)" in text_of(d)
    assert d.remedies[0].startswith("More augmentation")  # val loss never turned: early stopping is not first


def test_underfit():
    d = diagnose(UNDERFIT)
    assert d.verdict == UNDER
    evidence = text_of(d)
    assert "train 0.520 vs val 0.530, a gap of -0.010" in evidence
    assert "Train loss is still falling steeply: -0.150 per epoch (-12.0%)" in evidence
    assert "best 1.180 at the last epoch (6)" in evidence
    assert d.remedies[0] == ("Train longer: `finetune.epochs: 12` (this phase ran 6), "
                             "as the loss curves are still falling.")
    joined = " ".join(d.remedies)
    assert "finetune.optimizer.learning_rate" in joined and "finetune.unfreeze: all" in joined
    assert "backbone.name" in joined and "Less regularisation" in joined


def test_low_accuracy_with_flat_losses_is_underfitting_with_capacity_first():
    history = {"loss": [1.3, 1.2, 1.19, 1.19], "val_loss": [1.3, 1.25, 1.24, 1.24],
               "accuracy": [0.5, 0.6, 0.61, 0.62], "val_accuracy": [0.5, 0.58, 0.6, 0.6]}
    d = diagnose(history)
    assert d.verdict == UNDER
    assert d.remedies[0].startswith("A higher learning rate") and d.remedies[-1].startswith("Train longer")


def test_good_fit():
    d = diagnose(GOOD_FIT)
    assert d.verdict == GOOD
    evidence = text_of(d)
    assert "train 0.935 vs val 0.910, a gap of 0.025 (within the 0.08" in evidence
    assert "Val loss over the last 3 epochs: -0.002 per epoch" in evidence
    assert "+1.9% above the best" in evidence
    assert len(d.remedies) == 1


def test_good_fit_with_val_still_improving_suggests_more_epochs():
    history = {**GOOD_FIT, "val_loss": [0.8, 0.5, 0.38, 0.35, 0.33, 0.31]}
    d = diagnose(history)
    assert d.verdict == GOOD and d.remedies == [
        "Val loss is still improving: a few more epochs may help, `finetune.epochs: 9`."]


def test_fast_falling_train_loss_beside_flat_val_loss_is_not_underfitting():
    history = {**GOOD_FIT, "loss": [0.9, 0.5, 0.35, 0.25, 0.2, 0.16]}
    d = diagnose(history)
    assert d.verdict == GOOD and "still falling steeply" in text_of(d)


def test_real_run_train_092_val_076_with_val_loss_rising_is_overfitting():
    history = {"loss": [0.95, 0.62, 0.48, 0.39, 0.33, 0.29],
               "val_loss": [0.85, 0.72, 0.66, 0.64, 0.68, 0.73],
               "accuracy": [0.68, 0.79, 0.85, 0.88, 0.9, 0.92],
               "val_accuracy": [0.66, 0.72, 0.75, 0.77, 0.76, 0.76]}
    d = diagnose(history, phases=["warmup", "warmup", "finetune", "finetune", "finetune", "finetune"])
    assert d.verdict == OVER and d.phase == "finetune" and d.epochs == [3, 4, 5, 6]
    evidence = text_of(d)
    assert "Judged the final phase 'finetune': epochs 3-6 (4 epochs)." in evidence
    assert "train 0.920 vs val 0.760, a gap of 0.160" in evidence
    assert "best 0.640 at epoch 4, 2 epochs before the end (well before it); now 0.730, +14.1%" in evidence
    assert "Over the whole run (6 epochs without 'imag'), val loss was lowest at epoch 4 (finetune): 0.640" \
        in evidence


def test_one_epoch_is_too_short():
    d = diagnose({"loss": [0.9], "val_loss": [0.8], "accuracy": [0.5], "val_accuracy": [0.5]})
    assert d.verdict == TOO_SHORT
    assert "`finetune.epochs: 5`" in d.remedies[0] and "data.val" in d.remedies[0]


@pytest.mark.parametrize("history", [{"loss": []}, {"loss": [NAN, NAN, 0.5], "accuracy": [None, None, 0.8]}])
def test_no_or_one_usable_epoch_is_too_short(history):
    assert diagnose(history).verdict == TOO_SHORT


def test_nan_and_none_values_are_skipped():
    history = {"loss": [0.9, None, 0.35, NAN, 0.28, 0.27],
               "val_loss": [0.8, 0.5, None, 0.33, 0.32, 0.325],
               "top1": [0.7, 0.85, 0.9, 0.92, None, 0.935],
               "val_top1": [0.72, 0.84, 0.88, 0.9, 0.91, NAN]}
    d = diagnose(history)
    assert d.verdict == GOOD
    evidence = text_of(d)
    assert "5 of the judged epochs have missing or NaN values" in evidence
    assert "train 0.935 vs val 0.910, a gap of 0.025" in evidence  # val's last known value, epoch 5
    json.dumps(d.to_dict(), allow_nan=False)


def test_imag_epochs_are_ignored():
    # Epochs 4 and 8 (imag, on permuted labels) alone look over-fit: train 0.99, val 0.5, val loss 0.9.
    history = {"loss": [0.9, 0.5, 0.35, 0.05, 0.3, 0.28, 0.27, 0.05],
               "val_loss": [0.8, 0.5, 0.38, 0.9, 0.33, 0.32, 0.325, 0.95],
               "accuracy": [0.7, 0.85, 0.9, 0.99, 0.92, 0.93, 0.935, 0.99],
               "val_accuracy": [0.72, 0.84, 0.88, 0.5, 0.9, 0.91, 0.91, 0.5]}
    phases = ["warmup", "finetune", "finetune", "imag", "finetune", "finetune", "finetune", "imag"]
    d = diagnose(history, phases)
    assert d.verdict == GOOD and d.phase == "finetune"
    assert d.epochs == [2, 3, 5, 6, 7]
    evidence = text_of(d)
    assert "epochs 2-7 (5 epochs; 2 imag epochs ignored)" in evidence
    assert "train 0.935 vs val 0.910" in evidence and "0.950" not in evidence
    assert diagnose(history).verdict == OVER  # judged with the imag epochs, it would look over-fit


def test_both_losses_rising_at_the_end_is_unstable_not_a_good_fit():
    # A real imag run's shape: the last episode (epoch 7) shook the body, and the normal epoch after
    # it has a val loss far above the best with the train loss up too.
    history = {"loss": [0.9, 0.5, 0.35, 0.3, 0.28, 0.27, 1.9, 0.62],
               "val_loss": [0.8, 0.5, 0.38, 0.34, 0.33, 0.32, 2.5, 1.41],
               "accuracy": [0.7, 0.85, 0.9, 0.92, 0.93, 0.935, 0.2, 0.8],
               "val_accuracy": [0.72, 0.84, 0.88, 0.9, 0.91, 0.91, 0.1, 0.75]}
    phases = ["finetune"] * 6 + ["imag", "finetune"]
    d = diagnose(history, phases)
    assert d.verdict == UNSTABLE
    assert "Train loss rose too since the best val loss (0.270 then, 0.620 now)" in text_of(d)
    assert "imag.normal_epochs" in d.remedies[0] and "imag.train: head" in d.remedies[0]
    assert "learning_rate` about 3x lower" in d.remedies[1] and "(epoch 6 here)" in d.remedies[2]
    without_imag = diagnose(history, ["finetune"] * 8)  # a learning rate too high looks the same
    assert without_imag.verdict == UNSTABLE and without_imag.remedies[0].startswith("A lower learning rate")
    assert d.to_text().startswith("Unstable. ")


def test_final_phase_too_short_falls_back_to_the_whole_run():
    phases = ["warmup"] * 7 + ["finetune"]
    d = diagnose(OVERFIT, phases)
    assert d.verdict == OVER and d.epochs == list(range(1, 9))
    assert "The final phase 'finetune' has 1 usable epoch, so all 8 epochs were judged." in text_of(d)


def test_warmup_phase_remedies_use_the_warmup_section():
    d = diagnose(UNDERFIT, phases=["warmup"] * 6)
    assert d.verdict == UNDER and "`warmup.epochs: 12`" in d.remedies[0]


def test_missing_val_keys_judge_train_only():
    d = diagnose({"loss": [0.9, 0.5, 0.35, 0.33, 0.32], "accuracy": [0.7, 0.9, 0.95, 0.96, 0.96]})
    assert d.verdict == GOOD
    assert "No validation metrics" in d.evidence[1] and "over-fitting cannot be seen" in d.evidence[1]
    assert "Final train accuracy 0.960; no val accuracy to compare." in text_of(d)
    assert d.remedies == ["Add a validation split to see over-fitting: `data.val: 0.2`."]
    low = diagnose({"loss": [2.0, 1.6, 1.3], "accuracy": [0.3, 0.4, 0.5]})
    assert low.verdict == UNDER and "data.val: 0.2" in low.remedies[-1]


def test_losses_only():
    d = diagnose({"loss": [1.0, 0.5, 0.2, 0.1], "val_loss": [1.0, 0.6, 0.7, 0.9]})
    assert d.verdict == OVER and "No accuracy metric" in text_of(d)


def test_to_text_and_to_dict():
    d = diagnose(OVERFIT, phases=["warmup"] * 2 + ["finetune"] * 6)
    text = d.to_text()
    assert text.startswith("Over-fitting. Judged the final phase 'finetune'")
    assert "Try: Early stopping" in text
    assert d.remedies[2] in text and d.remedies[3] not in text and d.remedies[3] in d.to_text(remedies=5)
    as_dict = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert as_dict["verdict"] == OVER and as_dict["evidence"] == d.evidence
    assert as_dict["measures"]["accuracy_gap"] == pytest.approx(0.16)
    assert d.verdict in VERDICTS


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="no loss or accuracy keys"):
        diagnose({"lr": [0.1, 0.01]})
    with pytest.raises(ValueError, match="phases has 2 labels for 8 epochs"):
        diagnose(OVERFIT, phases=["warmup", "finetune"])


def test_importing_does_not_pull_in_keras():
    code = "import sys, transferkit.training.diagnose; print('keras' in sys.modules or 'tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_an_exploding_loss_is_divergence_and_asks_for_a_lower_learning_rate():
    from transferkit.training.curves import DIVERGED

    # learning rate 1e6: the loss went from 2.1 to 2.4e8 (the regulariser of weights blowing up)
    history = {"loss": [2.1, 3.5e7, 2.4e8], "val_loss": [1.0, 5e6, 3e8], "accuracy": [0.5, 0.5, 0.5],
               "val_accuracy": [0.5, 0.5, 0.5], "learning_rate": [1e-3, 1e6, 1e6]}
    d = diagnose(history, ["warmup", "finetune", "finetune"])
    assert d.verdict == DIVERGED and d.phase == "finetune"
    assert "The train loss reached 2.4e+08 in epoch 3" in text_of(d)
    assert d.remedies[0].startswith("A much lower learning rate: `finetune.optimizer.learning_rate` 10x lower")
    assert "1e+06" in d.remedies[0] and not any("higher learning rate" in r for r in d.remedies)
    json.dumps(d.to_dict(), allow_nan=False)


@pytest.mark.parametrize("history, fragment", [
    ({"loss": [0.7, 0.5, math.inf], "val_loss": [0.7, 0.6, 0.6]}, "The train loss became infinite in epoch 3"),
    ({"loss": [0.7, 0.05, 0.9], "val_loss": [0.7, 0.6, 0.9]}, "18x its lowest (0.05) and above where it started"),
    ({"loss": [50.0], "val_loss": [math.inf]}, "The val loss became infinite in epoch 1"),  # even one epoch
])
def test_other_divergences(history, fragment):
    d = diagnose(history)
    assert d.verdict == "diverged" and fragment in text_of(d)


def test_a_loss_that_rose_but_stayed_below_its_start_is_not_divergence():
    history = {"loss": [0.7, 0.01, 0.1], "val_loss": [0.7, 0.3, 0.4]}  # e.g. a warm restart of the schedule
    assert diagnose(history).verdict != "diverged"


def test_this_phase_ran_counts_the_epochs_of_the_judged_section():
    # one warm-up and one fine-tuning epoch: too few of the last phase, so both are judged, but
    # the advice is about finetune.epochs, which ran 1
    history = {"loss": [0.9, 0.7], "val_loss": [0.85, 0.7], "accuracy": [0.5, 0.55], "val_accuracy": [0.5, 0.55]}
    d = diagnose(history, ["warmup", "finetune"])
    assert d.verdict == UNDER
    assert any("`finetune.epochs: 2` (this phase ran 1)" in remedy for remedy in d.remedies)
    imag = diagnose({key: values * 3 for key, values in history.items()}, ["warmup", "finetune", "finetune",
                                                                             "imag", "finetune", "finetune"])
    assert any("(this phase ran 5)" in remedy for remedy in imag.remedies)  # imag episodes are finetune.epochs

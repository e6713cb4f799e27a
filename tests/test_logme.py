"""LogME against a direct transcription of the paper's algorithm, and properties it must have."""

import numpy as np
import pytest

from transferkit.features.logme import logme


def reference_logme(f, labels):
    """Algorithm 1 of You et al. (2021) as written: eigendecomposition of F^T F, explicit m and residual."""
    f = f.astype(np.float64)
    n, d = f.shape
    s, v = np.linalg.eigh(f.T @ f)
    s = np.clip(s, 0, None)
    scores = []
    for k in np.unique(labels):
        y = (labels == k).astype(np.float64)
        alpha, beta = 1.0, 1.0
        lam = alpha / beta
        projected = v.T @ (f.T @ y)
        for _ in range(11):
            gamma = (s / (s + lam)).sum()
            m = v @ (projected * beta / (alpha + beta * s))
            alpha_de = (m * m).sum()
            alpha = gamma / (alpha_de + 1e-5)
            beta_de = ((y - f @ m) ** 2).sum()
            beta = (n - gamma) / (beta_de + 1e-5)
            new_lam = alpha / beta
            if abs(new_lam - lam) / lam < 0.01:
                break
            lam = new_lam
        evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - 0.5 * np.log(alpha + beta * s).sum()
                    - beta / 2 * beta_de - alpha / 2 * alpha_de - n / 2 * np.log(2 * np.pi))
        scores.append(evidence / n)
    return float(np.mean(scores))


def blobs(n=120, d=16, classes=3, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    centres = rng.normal(0, 3, (classes, d))
    return centres[labels] + rng.normal(0, spread, (n, d)), labels


@pytest.mark.parametrize("n, d", [(120, 16), (40, 100)])  # more examples than features, and fewer
def test_matches_the_papers_algorithm(n, d):
    features, labels = blobs(n=n, d=d)
    assert logme(features, labels) == pytest.approx(reference_logme(features, labels), rel=1e-6)


def test_worked_example():
    # four points, one feature that separates two classes: the fit is nearly exact, so the evidence is high
    features = np.array([[1.0], [1.1], [-1.0], [-0.9]])
    labels = np.array([0, 0, 1, 1])
    assert logme(features, labels) == pytest.approx(reference_logme(features, labels), rel=1e-9)
    assert logme(features, labels) > logme(features, np.array([0, 1, 0, 1]))


def test_separable_features_score_higher_than_shuffled_labels():
    features, labels = blobs()
    shuffled = np.random.default_rng(1).permutation(labels)
    assert logme(features, labels) > logme(features, shuffled) + 0.1


def test_better_separated_features_score_higher():
    tight, labels = blobs(spread=0.5)
    loose, _ = blobs(spread=3.0)
    assert logme(tight, labels) > logme(loose, labels)


def test_invariant_to_the_order_of_features_and_examples():
    features, labels = blobs()
    rng = np.random.default_rng(2)
    columns, rows = rng.permutation(features.shape[1]), rng.permutation(len(features))
    assert logme(features[:, columns], labels) == pytest.approx(logme(features, labels), rel=1e-9)
    assert logme(features[rows], labels[rows]) == pytest.approx(logme(features, labels), rel=1e-9)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="expected features"):
        logme(np.zeros((3, 2)), np.zeros(4))

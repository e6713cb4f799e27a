"""LogME: how well features suit a labelling, without training a classifier (You et al., ICML 2021).

For each class ``k`` LogME fits a Bayesian linear regression of the one-vs-rest target ``y_k`` on the
features ``F`` (``n x d``), with prior ``w ~ N(0, 1/alpha)`` and noise ``N(0, 1/beta)``, choosing
``alpha`` and ``beta`` by evidence maximisation (MacKay's fixed point). The score is the log
evidence per example, averaged over classes:

    L = d/2 log a + n/2 log b - 1/2 log|A| - b/2 ||F m - y||^2 - a/2 ||m||^2 - n/2 log 2 pi,
    A = a I + b F^T F,  m = b A^-1 F^T y

Higher is better; scores compare feature sets (layers, backbones) on the same images and labels.
Everything runs on the thin SVD ``F = U S V^T``, so one decomposition serves all classes and the
cost is ``O(n d min(n, d))``; the ``d - rank`` zero singular values contribute ``log a`` each to
``log|A|``.

Example:
    >>> logme(features, labels)      # features [n, d], integer labels [n]
    -0.41
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 11  # the paper's bound; the fixed point usually settles in two or three


def logme(features: np.ndarray, labels: np.ndarray) -> float:
    """The LogME score of ``features`` ``[n, d]`` for integer ``labels`` ``[n]`` (mean over classes)."""
    f = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if f.ndim != 2 or len(f) != len(labels):
        raise ValueError(f"expected features [n, d] and labels [n], got {f.shape} and {labels.shape}")
    n, d = f.shape
    u, s, _ = np.linalg.svd(f, full_matrices=False)
    sigma = s ** 2  # eigenvalues of F^T F on its range; the other d - len(s) are zero
    return float(np.mean([_evidence((labels == k).astype(np.float64), u, sigma, n, d)
                          for k in np.unique(labels)]))


def _evidence(y: np.ndarray, u: np.ndarray, sigma: np.ndarray, n: int, d: int) -> float:
    """Log evidence per example of one target, at the evidence-maximising alpha and beta."""
    z2 = (u.T @ y) ** 2                   # squared coordinates of y on the range of F
    outside = float(y @ y - z2.sum())     # the part of ||y||^2 no linear map of F can fit
    alpha, beta, epsilon = 1.0, 1.0, 1e-5
    ratio = alpha / beta
    for _ in range(MAX_ITERATIONS):
        denominator = alpha + beta * sigma
        gamma = float((beta * sigma / denominator).sum())
        m_norm2 = float((beta ** 2 * sigma * z2 / denominator ** 2).sum())             # ||m||^2
        residual2 = float((alpha ** 2 * z2 / denominator ** 2).sum()) + outside        # ||F m - y||^2
        alpha = gamma / (m_norm2 + epsilon)
        beta = (n - gamma) / (residual2 + epsilon)
        new_ratio = alpha / beta
        if abs(new_ratio - ratio) / ratio < 0.01:
            break
        ratio = new_ratio
    log_det = float(np.log(alpha + beta * sigma).sum()) + (d - len(sigma)) * np.log(alpha)
    evidence = (d / 2 * np.log(alpha) + n / 2 * np.log(beta) - log_det / 2 - beta / 2 * residual2
                - alpha / 2 * m_norm2 - n / 2 * np.log(2 * np.pi))
    return float(evidence / n)

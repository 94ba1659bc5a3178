"""The floor every classifier is measured against: TF-IDF + logistic regression (scikit-learn).

Word 1-2-grams with sublinear term frequency (terms in at least 2 notes), logistic regression
with C=10. Nothing is tuned on validation: the settings are fixed here, and the model is fitted
on the same training rows the heads see. It is refitted whenever it is needed (seconds), never
pickled.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import numpy as np

log = logging.getLogger(__name__)

NAME = "baseline"
DESCRIPTION = "TF-IDF (word 1-2-grams, sublinear tf, min_df 2) + logistic regression (C=10)"


def fit_predict(train_texts: Sequence[str], train_y: np.ndarray, texts: Sequence[str]) -> np.ndarray:
    """Class indices predicted for `texts` by the baseline fitted on (train_texts, train_y)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    started = time.perf_counter()
    model = make_pipeline(
        TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2),
        LogisticRegression(C=10, max_iter=2000),
    )
    model.fit(list(train_texts), np.asarray(train_y))
    predicted = model.predict(list(texts))
    log.info("baseline (%s) fitted on %d rows in %.1f s", DESCRIPTION, len(train_texts), time.perf_counter() - started)
    return np.asarray(predicted, dtype=np.int64)

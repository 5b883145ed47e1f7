"""Data for the extreme-classification experiments: XMLRepo BoW files, tf-idf, synthetic sets.

* :func:`read_xmlrepo` / :func:`write_xmlrepo`: the Extreme Classification Repository BoW format
  (C++ parser, errors naming file, line and token) <-> scipy CSR ``(X, Y)``;
* :func:`tfidf` (idf fitted on the training matrix), :class:`TfIdf`, :func:`l2_normalize`;
* :func:`synthetic_xmc`: a seeded, cached synthetic set with a real data set's statistics;
  :data:`PRESETS` (``"amazon670k"``, ``"amazoncat13k"``) and :func:`scaled_preset` for the
  ``"tiny"`` / ``"cpu"`` / ``"full"`` scales; :func:`dataset_stats` for any ``(X, Y)``.
"""

from __future__ import annotations

from .features import TfIdf, idf_weights, l2_normalize, tfidf
from .synthetic import (
    GENERATOR_VERSION,
    PRESETS,
    SCALES,
    Preset,
    XMCData,
    dataset_stats,
    scaled_preset,
    synthetic_xmc,
    zipf_slope,
)
from .xmlrepo import read_xmlrepo, write_xmlrepo

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "SCALES",
    "Preset",
    "TfIdf",
    "XMCData",
    "dataset_stats",
    "idf_weights",
    "l2_normalize",
    "read_xmlrepo",
    "scaled_preset",
    "synthetic_xmc",
    "tfidf",
    "write_xmlrepo",
    "zipf_slope",
]

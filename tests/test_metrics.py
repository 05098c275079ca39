"""Market-protocol ranking metrics on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from shared.metrics import rank_metrics


def test_junk_removed_distractor_kept_and_ap_by_hand() -> None:
    # gallery: same pid+cam (junk), other pid, match, distractor (pid 0), match
    g_pids, g_cams = np.array([1, 2, 1, 0, 1]), np.array([0, 1, 1, 2, 2])
    dist = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    r = rank_metrics(dist, np.array([1]), g_pids, np.array([0]), g_cams, max_rank=4)
    # ranked list after junk removal: 2, 1, 0, 1 -> hits at ranks 2 and 4
    assert r["mAP"] == pytest.approx((1 / 2 + 2 / 4) / 2, abs=1e-12)
    assert r["mINP"] == pytest.approx(2 / 4, abs=1e-12)
    assert r["cmc"].tolist() == [0.0, 1.0, 1.0, 1.0]


def test_query_without_positive_is_skipped_and_ties_are_stable() -> None:
    g_pids, g_cams = np.array([3, 1, 1]), np.array([1, 1, 0])
    dist = np.array([[0.5, 0.5, 0.9], [0.5, 0.5, 0.9]])
    # query 0 (pid 1, cam 0): tie between gallery 0 and 1 keeps gallery order -> hit at rank 2; gallery 2 is junk
    # query 1 (pid 7): no positive -> excluded from every average
    r = rank_metrics(dist, np.array([1, 7]), g_pids, np.array([0, 0]), g_cams)
    assert r["num_valid_queries"] == 1
    assert r["mAP"] == pytest.approx(0.5, abs=1e-12) and r["cmc"][0] == 0.0 and r["cmc"][1] == 1.0
    assert len(r["cmc"]) == 3  # max_rank capped at the gallery size


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="distmat is 1x2 but there are 1 query and 3 gallery pids"):
        rank_metrics(np.zeros((1, 2)), [1], [1, 2, 3], [0], [0, 1, 2])

"""The shadow-agreement rule both servers count with (``tl_models.core.heads.agreed``): by label, not index."""

from __future__ import annotations

import numpy as np

from tl_models.core.heads import agreed


def test_the_same_labels_compare_top1_indices():
    labels = ("cat", "dog", "fox")
    assert agreed(labels, np.array([0, 1, 2, 2]), labels, np.array([0, 2, 2, 1])) == 2


def test_other_label_orders_compare_names_not_indices():
    answering, shadow = ("cat", "dog", "fox"), ("fox", "cat", "dog")
    # index 0 is "cat" for the answering head and "fox" for the shadow: the same index, different answers
    assert agreed(answering, np.array([0, 1, 2]), shadow, np.array([0, 0, 2])) == 0
    assert agreed(answering, np.array([0, 1, 2]), shadow, np.array([1, 2, 0])) == 3


def test_a_shadow_head_with_other_classes_agrees_only_on_shared_labels():
    assert agreed(("0", "1", "2"), np.array([0, 1, 2]), ("1", "2", "7"), np.array([2, 0, 1])) == 2
    assert agreed(("0", "1"), np.array([], dtype=int), ("0", "1"), np.array([], dtype=int)) == 0

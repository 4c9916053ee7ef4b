"""The serving plan both servers follow (``tl_models.core.plan``): each request's answering head and shadows drawn
before the pass, rows grouped per head version, and the shadow-agreement rule (by label, not index)."""

from __future__ import annotations

import numpy as np
import pytest

from tl_models.core.plan import BatchPlan, Planned, agreed, plan_request
from tl_models.core.routing import NoTraffic, Route, UnknownHead

ROUTE = Route(
    weights={"a": 1.0, "b": 1.0},
    versions={"a": 2, "b": 1},
    revision=3,
    shadow={"a:3": 1.0, "b:2": 0.25, "a:2": 1.0},
)


def test_a_request_plan_names_its_answer_and_the_shadows_drawn_before_the_pass():
    plan = plan_request(ROUTE, head="a")
    assert plan.key == ("a", 2)
    # a:2 answers, so it is no shadow of its own request; a:3 (share 1) always; b:2 by its share
    assert plan.shadows in ((("a", 3),), (("a", 3), ("b", 2)))
    assert plan_request(ROUTE, head="a", dropped={"a:3"}).shadows in ((), (("b", 2),))
    assert {plan_request(ROUTE, key="user-7").key for _ in range(20)} == {ROUTE.choose("user-7")}  # sticky


def test_shadows_are_drawn_by_their_share():
    drawn = sum(("b", 2) in plan_request(ROUTE, head="a").shadows for _ in range(4000))
    assert 800 < drawn < 1200  # share 0.25 of 4000


def test_a_plan_on_a_route_that_cannot_answer_raises_the_route_errors():
    with pytest.raises(UnknownHead, match="unknown head 'z'"):
        plan_request(ROUTE, head="z")
    with pytest.raises(NoTraffic):
        plan_request(Route(versions={"a": 1}))


def test_a_batch_plan_groups_rows_by_answering_and_shadow_head_version():
    planned = [
        Planned("a", 2, (("a", 3),)),
        Planned("b", 1, (("a", 3), ("b", 2))),
        Planned("a", 2),
    ]
    plan = BatchPlan(planned, [2, 3, 1])
    assert plan.size == 6 and [plan.rows(i) for i in range(3)] == [slice(0, 2), slice(2, 5), slice(5, 6)]
    assert {key: rows.tolist() for key, rows in plan.answering.items()} == {("a", 2): [0, 1, 5], ("b", 1): [2, 3, 4]}
    assert {key: rows.tolist() for key, rows in plan.shadowing.items()} == {
        ("a", 3): [0, 1, 2, 3, 4],
        ("b", 2): [2, 3, 4],
    }
    assert plan.members == {("a", 2): [0, 2], ("b", 1): [1]}
    assert plan.needed() == {("a", 2), ("b", 1), ("a", 3), ("b", 2)}
    with pytest.raises(ValueError, match="2 plans for 1 requests"):
        BatchPlan(planned[:2], [1])


def test_agreement_is_counted_against_the_head_that_answered_each_row():
    plan = BatchPlan([Planned("a", 2, (("s", 1),)), Planned("b", 1, (("s", 1),)), Planned("a", 2)], [2, 2, 1])
    labels = ("cat", "dog")
    answers = {
        ("a", 2): (labels, np.array([0, 1, 1])),  # rows 0, 1, 4
        ("b", 1): (("dog", "cat"), np.array([0, 0])),  # rows 2, 3: both "dog"
    }
    shadow_top = np.array([0, 0, 1, 0])  # rows 0..3: cat, cat, dog, cat
    assert plan.agreement(("s", 1), labels, shadow_top, answers) == (4, 2)  # rows 0 and 2 agree
    del answers[("b", 1)]  # b:1 failed: its rows are not scored
    assert plan.agreement(("s", 1), labels, shadow_top, answers) == (2, 1)


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

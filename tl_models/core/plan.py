"""What both servers do with a batch of requests, in one place: the serving plan.

* **Per request** (:func:`plan_request`), on the route read once for the batch: the head version that answers (an
  explicit head, else the weighted split, sticky on the request's key) and the shadow head versions drawn for it,
  each by its share, never the answering version itself nor one this process dropped. Shadows are drawn *before*
  the backbone pass, so every graph a request needs is known when it is queued.
* **Per batch** (:class:`BatchPlan`): each request's embedding rows, the rows grouped by answering head version
  (one run of each head version on its rows) and by shadow head version, and every head version the batch needs.
* **After the pass** (:meth:`BatchPlan.agreement`): a shadow head's top-1 agreement with the heads that answered its
  rows, by label (:func:`agreed`).

Triton's router plans a whole batch of requests; BentoML's engine plans each request when it arrives (its judge
counts agreement on a plan of that one request). Neither server decides any of this on its own.
"""

from __future__ import annotations

import random
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .routing import Route

HeadKey = tuple[str, int]  # (head name, version)


@dataclass(frozen=True)
class Planned:
    """One request's plan: the head version that answers it and the shadow head versions drawn for it."""

    head: str
    version: int
    shadows: tuple[HeadKey, ...] = ()

    @property
    def key(self) -> HeadKey:
        return self.head, self.version


def plan_request(
    route: Route, key: str | None = None, head: str | None = None, dropped: Container[str] = ()
) -> Planned:
    """The head version answering one request (``head`` if given, else the weighted split, sticky on ``key``;
    UnknownHead / NoTraffic from :meth:`Route.choose`) and each of the route's shadow heads drawn by its share,
    except the answering version and those named ``"name:version"`` in ``dropped``."""
    name, version = route.choose(key or None, head or None)
    shadows = tuple(
        (shadow, shadow_version)
        for shadow, shadow_version, share in route.shadows()
        if (shadow, shadow_version) != (name, version)
        and f"{shadow}:{shadow_version}" not in dropped
        and (share >= 1 or random.random() < share)
    )
    return Planned(name, version, shadows)


class BatchPlan:
    """Planned requests of one batch, ``sizes[i]`` images for request ``i``, whose embeddings are rows
    :meth:`rows` ``(i)`` of the batch's. :attr:`answering` and :attr:`shadowing` hold the (ascending) rows of each
    answering and shadow head version, :attr:`members` the requests each answering version answers."""

    def __init__(self, planned: Sequence[Planned], sizes: Sequence[int]):
        if len(planned) != len(sizes):
            raise ValueError(f"{len(planned)} plans for {len(sizes)} requests")
        self.planned = list(planned)
        bounds = np.cumsum([0, *sizes])
        self.starts, self.stops = bounds[:-1].tolist(), bounds[1:].tolist()
        self.size = int(bounds[-1])
        self.members: dict[HeadKey, list[int]] = {}
        shadowed: dict[HeadKey, list[int]] = {}
        for index, plan in enumerate(self.planned):
            self.members.setdefault(plan.key, []).append(index)
            for shadow in plan.shadows:
                shadowed.setdefault(shadow, []).append(index)
        self.answering = {key: self._rows(indices) for key, indices in self.members.items()}
        self.shadowing = {key: self._rows(shadowed[key]) for key in sorted(shadowed)}

    def rows(self, index: int) -> slice:
        """Request ``index``'s rows of the batch's embeddings."""
        return slice(self.starts[index], self.stops[index])

    def _rows(self, indices: list[int]) -> np.ndarray:
        return np.concatenate([np.arange(self.starts[i], self.stops[i]) for i in indices])

    def needed(self) -> set[HeadKey]:
        """Every head version the batch runs: those that answer and those drawn as shadows."""
        return set(self.answering) | set(self.shadowing)

    def agreement(
        self,
        shadow: HeadKey,
        shadow_labels: Sequence[str],
        shadow_top: np.ndarray,
        answers: Mapping[HeadKey, tuple[Sequence[str], np.ndarray]],
    ) -> tuple[int, int]:
        """``(scored, agreed)`` of shadow head ``shadow``, whose top-1 class on its rows (:attr:`shadowing`) is
        ``shadow_top``, against the heads that answered those rows. ``answers`` maps an answering head version, as
        planned, to the labels of the version that answered (a retry may have answered with another) and its top-1
        on that version's rows (:attr:`answering`); rows whose head failed, absent from ``answers``, are not
        scored."""
        rows = self.shadowing[shadow]
        scored = same = 0
        for key, answer_rows in self.answering.items():
            if key not in answers:
                continue
            labels, answer_top = answers[key]
            mine = np.isin(rows, answer_rows, assume_unique=True)
            if not mine.any():
                continue
            where = np.searchsorted(answer_rows, rows[mine])
            scored += int(mine.sum())
            same += agreed(labels, np.asarray(answer_top)[where], shadow_labels, np.asarray(shadow_top)[mine])
        return scored, same


def agreed(
    answer_labels: Sequence[str],
    answer_top: Sequence[int] | np.ndarray,
    shadow_labels: Sequence[str],
    shadow_top: Sequence[int] | np.ndarray,
) -> int:
    """How many images a shadow head gives the same top-1 label as the head that answered. Labels are compared by
    name, not by class index: a shadow head trained on other classes, or on the same classes in another order, is
    judged on what it says."""
    if tuple(shadow_labels) == tuple(answer_labels):
        return int((np.asarray(shadow_top) == np.asarray(answer_top)).sum())
    return int(sum(shadow_labels[i] == answer_labels[j] for i, j in zip(shadow_top, answer_top)))

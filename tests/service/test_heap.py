"""The start-up heap leaves the cyclic collector's scans; garbage made afterwards is still collected."""

from __future__ import annotations

import gc
import weakref

import pytest

from service.heap import freeze_startup_heap


@pytest.fixture
def restore_collector():
    yield
    gc.unfreeze()


class _Node:
    def __init__(self) -> None:
        self.partner: _Node | None = None


def _tracked_ids() -> set[int]:
    return {id(obj) for obj in gc.get_objects()}


def test_startup_objects_leave_the_scans_and_later_cycles_are_still_freed(restore_collector):
    startup_state = [{"weights": [float(i)]} for i in range(20_000)]  # long-lived, like a loaded model
    frozen = freeze_startup_heap()
    assert frozen >= 40_000  # the 20 000 dicts and their lists at least

    scanned = _tracked_ids()
    assert id(startup_state) not in scanned
    assert not any(id(entry) in scanned for entry in startup_state[::1000])

    def make_cycle() -> weakref.ref[_Node]:  # per-request garbage: a reference cycle only the collector frees
        a, b = _Node(), _Node()
        a.partner, b.partner = b, a
        return weakref.ref(a)

    garbage = [make_cycle() for _ in range(500)]
    gc.collect()
    assert all(ref() is None for ref in garbage)  # freed, though their type was frozen with the heap
    assert startup_state[19_999]["weights"] == [19_999.0]  # frozen state is untouched

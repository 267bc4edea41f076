"""Apps with bugs, for the node's fault tests (``--app apps_for_tests:Class``)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from cloudq.wire import InputEvent
from cloudq.workers.apps import PaintApp


class Fragile(PaintApp):
    """Paint that raises in ``handle_input`` on key ``x`` and in ``render`` after key ``r``."""

    broken_render = False

    def handle_input(self, ev: InputEvent) -> None:
        if ev.type == "key" and ev.key == "x":
            raise RuntimeError("bug in handle_input")
        if ev.type == "key" and ev.key == "r":
            self.broken_render = True
        super().handle_input(ev)

    def render(self, t: float) -> np.ndarray:
        if self.broken_render:
            raise RuntimeError("bug in render")
        return super().render(t)


class BrokenLoad(PaintApp):
    def load(self, data_dir: Path) -> None:
        raise RuntimeError("bug in load")


class SlowSave(PaintApp):
    """Takes 3 s to save (longer than the tests' node TTL)."""

    def save(self, data_dir: Path) -> None:
        time.sleep(3.0)
        super().save(data_dir)

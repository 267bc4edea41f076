"""The interface between the node loop and the interactive program it runs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from cloudq.wire import InputEvent


class App(ABC):
    """What the node loop drives. Subclass it, or provide the same attributes and methods."""

    def __init__(self, width: int, height: int) -> None:
        if width <= 0 or height <= 0:
            raise ValueError(f"bad frame size {width}x{height}")
        self.width = width
        self.height = height

    @abstractmethod
    def render(self, t: float) -> np.ndarray:
        """The current picture, (height, width, 3) uint8 RGB, owned by the caller. ``t`` is seconds."""

    @abstractmethod
    def handle_input(self, ev: InputEvent) -> None:
        """Apply one input event (never a ``keyframe_request``: the node handles those)."""

    def changed(self) -> bool:
        """Whether the picture changed since the last :meth:`render`."""
        return True

    def load(self, data_dir: Path) -> None:  # noqa: B027 - a stateless app needs no override
        """Restore state from the user's data directory (which may be empty)."""

    def save(self, data_dir: Path) -> None:  # noqa: B027 - a stateless app needs no override
        """Write state into the user's data directory."""

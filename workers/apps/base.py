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

    def damage(self) -> tuple[int, int, int, int] | None:
        """The rectangle ``(x0, y0, x1, y1)`` (x1, y1 exclusive) outside which the picture the last
        :meth:`render` returned equals the one the render before returned; an empty one if they
        are equal; None if the app cannot tell (the default: the node then converts the whole
        picture for the encoder). A wrong answer shows for at most one keyframe interval."""
        return None

    def load(self, data_dir: Path) -> None:  # noqa: B027 - a stateless app needs no override
        """Restore state from the user's data directory (which may be empty)."""

    def save(self, data_dir: Path) -> None:  # noqa: B027 - a stateless app needs no override
        """Write state into the user's data directory."""

    # -- hooks of apps that run programs (no-ops for the built-ins) -------------------------------
    def sleep(self, freeze: bool = False) -> None:  # noqa: B027 - nothing runs between renders
        """The session went to sleep (no renders until :meth:`wake`). With ``freeze`` the app should
        also stop whatever it runs (e.g. SIGSTOP a program) so a sleeping session costs no CPU."""

    def wake(self) -> None:  # noqa: B027
        """The session woke up; called before the first render after :meth:`sleep`."""

    def close(self) -> None:  # noqa: B027
        """The session is over: stop everything the app started and leave nothing of the user's on
        screen. Called once, after the final :meth:`save`."""

    def exit_status(self) -> tuple[str, int | str] | None:
        """None while the app runs; ``("app_exited", 0)`` or ``("app_crashed", code)`` once the
        program it runs has ended on its own (the node then ends the session, data saved); ``code``
        may be a reason instead (``"memory limit"``)."""
        return None

    def audio_capture(self) -> str | None:
        """The path of a FIFO that carries what the app plays (s16le, 48 kHz, stereo: the node
        reads, encodes and streams it while the session is awake, :mod:`cloudq.workers.audio`),
        or None: the app makes no sound. Asked after :meth:`load` and at each wake."""
        return None

    def stats(self) -> dict[str, int]:
        """Counters the node publishes with its own (as ``app.NAME``), e.g. dropped input."""
        return {}

    def fileno(self) -> int | None:
        """A file descriptor that becomes readable when the picture may have changed (the node waits
        on it together with Redis and renders at once), or None (the node checks :meth:`changed`
        on its frame clock)."""
        return None

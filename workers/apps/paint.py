"""``paint``: draw with the mouse; keys pick colour and brush size; the canvas persists."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from cloudq.codec import Box, box_union
from cloudq.wire import InputEvent

from .base import App

logger = logging.getLogger(__name__)


PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (220, 30, 30),
    (30, 160, 40),
    (30, 70, 220),
    (240, 200, 0),
    (200, 40, 200),
    (0, 190, 200),
    (250, 130, 0),
    (255, 255, 255),  # eraser
)
BACKGROUND = (255, 255, 255)
MIN_BRUSH, MAX_BRUSH = 1, 64
KEY_NAMES = {"plus": "+", "equal": "=", "minus": "-", "KP_Add": "+", "KP_Subtract": "-"}
"""X keysym names (what the viewer sends) of the keys paint reads as characters."""


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PaintApp(App):
    """A canvas: mouse_down/move/up draw round-brush strokes.

    Keys (``key`` or ``key_down``; characters or X keysym names): ``1``..``9`` pick a colour (``9`` is the eraser), ``c`` cycles colours, ``+``/``=`` and
    ``-`` grow and shrink the brush, ``Delete`` clears the canvas. The canvas is
    ``canvas.npy`` in the data directory.
    """

    FILE = "canvas.npy"

    def __init__(self, width: int, height: int, brush: int = 4) -> None:
        super().__init__(width, height)
        self.canvas = self._blank()
        self.colour_index = 0
        self.brush = brush
        self._pen: tuple[int, int] | None = None  # last point while the button is down
        self._dirty = True
        self._box: Box | None = None  # painted since the last render
        self._whole = True  # the whole canvas changed since the last render (new, cleared, loaded)
        self._damage: Box | None = None  # what the last render changed

    @property
    def colour(self) -> tuple[int, int, int]:
        return PALETTE[self.colour_index]

    def _blank(self) -> np.ndarray:
        return np.full((self.height, self.width, 3), BACKGROUND, dtype=np.uint8)

    def render(self, t: float) -> np.ndarray:
        self._dirty = False
        self._damage = None if self._whole else (self._box or (0, 0, 0, 0))
        self._box, self._whole = None, False
        return self.canvas.copy()  # 0.05 ms at 720p; the caller may keep it while we draw on

    def damage(self) -> Box | None:
        return self._damage

    def changed(self) -> bool:
        return self._dirty

    def handle_input(self, ev: InputEvent) -> None:
        if ev.type in ("key", "key_down") and ev.key is not None:
            self._key(KEY_NAMES.get(ev.key, ev.key))
        elif ev.type in ("mouse_down", "mouse_move", "mouse_up") and ev.x is not None and ev.y is not None:
            point = (ev.x, ev.y)
            if ev.type == "mouse_down":
                self._stroke(point, point)
                self._pen = point
            elif self._pen is not None:
                self._stroke(self._pen, point)
                self._pen = None if ev.type == "mouse_up" else point

    def _key(self, key: str) -> None:
        if len(key) == 1 and key in "123456789":
            self.colour_index = int(key) - 1
        elif key == "c":
            self.colour_index = (self.colour_index + 1) % len(PALETTE)
        elif key in ("+", "=", "plus", "equal"):  # the character or its X keysym name
            self.brush = min(MAX_BRUSH, self.brush + 1)
        elif key in ("-", "minus"):
            self.brush = max(MIN_BRUSH, self.brush - 1)
        elif key == "Delete":
            self.canvas[:] = BACKGROUND
            self._dirty = self._whole = True

    def _stroke(self, a: tuple[int, int], b: tuple[int, int]) -> None:
        """Paint every pixel within ``brush`` of the segment a-b (a round-capped line)."""
        r = self.brush
        x0, x1 = max(0, min(a[0], b[0]) - r), min(self.width, max(a[0], b[0]) + r + 1)
        y0, y1 = max(0, min(a[1], b[1]) - r), min(self.height, max(a[1], b[1]) + r + 1)
        if x0 >= x1 or y0 >= y1:
            return  # entirely off the canvas
        ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        ax, ay = float(a[0]), float(a[1])
        dx, dy = float(b[0] - a[0]), float(b[1] - a[1])
        length2 = dx * dx + dy * dy
        if length2 == 0:
            dist2 = (xs - ax) ** 2 + (ys - ay) ** 2
        else:
            u = np.clip(((xs - ax) * dx + (ys - ay) * dy) / length2, 0.0, 1.0)
            dist2 = (xs - ax - u * dx) ** 2 + (ys - ay - u * dy) ** 2
        mask = dist2 <= r * r
        if mask.any():
            self.canvas[y0:y1, x0:x1][mask] = self.colour
            self._dirty = True
            self._box = box_union(self._box, (x0, y0, x1, y1))

    def save(self, data_dir: Path) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(data_dir / self.FILE, self.canvas)

    def load(self, data_dir: Path) -> None:
        path = Path(data_dir) / self.FILE
        self._pen = None
        self._dirty = self._whole = True
        self.canvas = self._blank()
        if not path.exists():
            logger.info("paint: no %s, starting with a blank canvas", path)
            return
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            logger.warning("paint: cannot read %s (%s), starting blank", path, e)
            return
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.shape != self.canvas.shape:
            logger.warning(
                "paint: %s holds %s %s, expected uint8 %s; starting blank",
                path,
                getattr(data, "dtype", type(data).__name__),
                getattr(data, "shape", ""),
                self.canvas.shape,
            )
            return
        self.canvas = np.ascontiguousarray(data)

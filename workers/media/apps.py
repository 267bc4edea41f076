"""The interactive program a node runs for its user, and the built-in ones.

An app renders RGB frames (numpy, H x W x 3 uint8), takes input events, says whether its picture
changed since the last render (so an idle app costs no encode), and keeps its state in the user's
data directory (``load`` on mount, ``save`` before close). Built-ins:

- ``paint``: draw with the mouse; keys pick colour and brush size; the canvas persists.
- ``probe``: shows, in blocks that survive H.264, the seq of the last input it applied and a frame
  counter; :func:`read_probe` reads them back from a decoded frame (for latency measurements).

Third-party apps are named ``"package.module:Class"`` and built as ``Class(width, height)``.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np

from .wire import InputEvent

logger = logging.getLogger(__name__)

__all__ = [
    "APPS",
    "PROBE_BITS",
    "PROBE_BLOCK",
    "App",
    "PaintApp",
    "ProbeApp",
    "load_app",
    "probe_rows",
    "read_probe",
]


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


# ---------------------------------------------------------------------------------------------------
# paint

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


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class PaintApp(App):
    """A canvas: mouse_down/move/up draw round-brush strokes.

    Keys: ``1``..``9`` pick a colour (``9`` is the eraser), ``c`` cycles colours, ``+``/``=`` and
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

    @property
    def colour(self) -> tuple[int, int, int]:
        return PALETTE[self.colour_index]

    def _blank(self) -> np.ndarray:
        return np.full((self.height, self.width, 3), BACKGROUND, dtype=np.uint8)

    def render(self, t: float) -> np.ndarray:
        self._dirty = False
        return self.canvas.copy()  # 0.05 ms at 720p; the caller may keep it while we draw on

    def changed(self) -> bool:
        return self._dirty

    def handle_input(self, ev: InputEvent) -> None:
        if ev.type == "key" and ev.key is not None:
            self._key(ev.key)
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
        elif key in ("+", "="):
            self.brush = min(MAX_BRUSH, self.brush + 1)
        elif key == "-":
            self.brush = max(MIN_BRUSH, self.brush - 1)
        elif key == "Delete":
            self.canvas[:] = BACKGROUND
            self._dirty = True

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

    def save(self, data_dir: Path) -> None:
        data_dir = Path(data_dir)
        data_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(data_dir / self.FILE, self.canvas)

    def load(self, data_dir: Path) -> None:
        path = Path(data_dir) / self.FILE
        self._pen = None
        self._dirty = True
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


# ---------------------------------------------------------------------------------------------------
# probe

PROBE_BLOCK = 16
"""Side of one bit's square, in pixels: a 16x16 block is one H.264 macroblock."""
_MARKER = 0b10110010
PROBE_BITS = 8 + 32 + 32 + 8  # marker, last input seq, frame counter, check byte
_BLACK, _WHITE, _GREY = 0, 255, 96


def probe_rows(width: int) -> int:
    """How many block rows the probe code takes in a frame ``width`` pixels wide."""
    cols = width // PROBE_BLOCK
    if cols < 1:
        raise ValueError(f"frame too narrow for the probe ({width} px)")
    return math.ceil(PROBE_BITS / cols)


def _check_byte(a: int, b: int) -> int:
    c = 0x5A
    for v in (a, b):
        for shift in (0, 8, 16, 24):
            c ^= (v >> shift) & 0xFF
    return c


def _probe_bits(seq: int, counter: int) -> np.ndarray:
    seq &= 0xFFFFFFFF
    counter &= 0xFFFFFFFF
    word = (_MARKER << 72) | (seq << 40) | (counter << 8) | _check_byte(seq, counter)
    return np.array([(word >> (PROBE_BITS - 1 - i)) & 1 for i in range(PROBE_BITS)], dtype=np.uint8)


def read_probe(frame: np.ndarray) -> tuple[int, int]:
    """``(last_input_seq, frame_counter)`` from a (decoded) probe frame, (H, W, 3) uint8 RGB.

    Each bit is the mean brightness of the middle 8x8 of its block, thresholded at 128. Raises
    ``ValueError`` if the frame does not carry a probe code (marker or check byte wrong).
    """
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) frame, got {frame.shape}")
    height, width = frame.shape[:2]
    cols, rows = width // PROBE_BLOCK, probe_rows(width)
    if rows * PROBE_BLOCK > height:
        raise ValueError(f"frame too small for the probe ({width}x{height})")
    b, q = PROBE_BLOCK, PROBE_BLOCK // 4
    area = frame[: rows * b, : cols * b].reshape(rows, b, cols, b, 3)[:, q : b - q, :, q : b - q]
    bits = (area.mean(axis=(1, 3, 4)) >= 128).reshape(-1)[:PROBE_BITS]
    word = 0
    for bit in bits:
        word = (word << 1) | int(bit)
    marker, seq, counter, check = word >> 72, (word >> 40) & 0xFFFFFFFF, (word >> 8) & 0xFFFFFFFF, word & 0xFF
    if marker != _MARKER:
        raise ValueError("no probe code in this frame (marker mismatch)")
    if check != _check_byte(seq, counter):
        raise ValueError("probe code damaged (check byte mismatch)")
    return seq, counter


class ProbeApp(App):
    """A measurement app: every frame shows the seq of the last input event it applied and a frame
    counter, as black/white 16x16 blocks along the top rows (MSB first, row-major), with a marker
    and a check byte; a white bar below moves with the counter. It changes every frame.
    """

    def __init__(self, width: int, height: int) -> None:
        super().__init__(width, height)
        self.cols = width // PROBE_BLOCK
        self.rows = probe_rows(width)
        if self.rows * PROBE_BLOCK > height:
            raise ValueError(f"frame too small for the probe ({width}x{height})")
        self.last_seq = 0
        self.counter = 0
        self._background = np.full((height, width, 3), _GREY, dtype=np.uint8)

    def handle_input(self, ev: InputEvent) -> None:
        self.last_seq = ev.seq

    def render(self, t: float) -> np.ndarray:
        frame = self._background.copy()
        b = PROBE_BLOCK
        cells = np.zeros(self.rows * self.cols, dtype=np.uint8)
        cells[:PROBE_BITS] = _probe_bits(self.last_seq, self.counter)
        blocks = np.where(cells.reshape(self.rows, self.cols), _WHITE, _BLACK).astype(np.uint8)
        frame[: self.rows * b, : self.cols * b] = np.kron(blocks, np.ones((b, b), np.uint8))[..., None]
        bar = (self.counter * 8) % self.width
        frame[self.rows * b + b :, bar : bar + 8] = _WHITE
        self.counter += 1
        return frame


# ---------------------------------------------------------------------------------------------------
# loading

APPS: dict[str, type[App]] = {"paint": PaintApp, "probe": ProbeApp}
_REQUIRED = ("render", "handle_input", "changed", "load", "save")


def load_app(spec: str, width: int, height: int) -> App:
    """``"paint"``, ``"probe"`` or ``"package.module:Class"`` -> an app of that size.

    Raises ``ValueError`` saying what is wrong with an unknown or unusable spec.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"empty app spec {spec!r}")
    spec = spec.strip()
    if spec in APPS:
        return APPS[spec](width, height)
    if ":" not in spec:
        raise ValueError(
            f"unknown app {spec!r}: use one of {', '.join(sorted(APPS))} or 'package.module:Class'"
        )
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"bad app spec {spec!r}: expected 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"app {spec!r}: cannot import {module_name!r}: {e}") from e
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"app {spec!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(obj):
        raise ValueError(f"app {spec!r} is not a class or factory")
    app = obj(width, height)
    missing = [m for m in _REQUIRED if not callable(getattr(app, m, None))]
    if missing:
        raise ValueError(f"app {spec!r} lacks {', '.join(missing)}")
    if getattr(app, "width", None) != width or getattr(app, "height", None) != height:
        raise ValueError(f"app {spec!r} does not report width={width}, height={height}")
    return app

"""``probe``: a measurement app whose every frame carries the probe code (:mod:`cloudq.probe`)."""

from __future__ import annotations

import numpy as np

from cloudq.probe import BLACK, GREY, PROBE_BITS, PROBE_BLOCK, WHITE, probe_bits, probe_rows
from cloudq.wire import InputEvent

from .base import App


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
        self._background = np.full((height, width, 3), GREY, dtype=np.uint8)

    def handle_input(self, ev: InputEvent) -> None:
        self.last_seq = ev.seq

    def render(self, t: float) -> np.ndarray:
        frame = self._background.copy()
        b = PROBE_BLOCK
        cells = np.zeros(self.rows * self.cols, dtype=np.uint8)
        cells[:PROBE_BITS] = probe_bits(self.last_seq, self.counter)
        blocks = np.where(cells.reshape(self.rows, self.cols), WHITE, BLACK).astype(np.uint8)
        frame[: self.rows * b, : self.cols * b] = np.kron(blocks, np.ones((b, b), np.uint8))[..., None]
        bar = (self.counter * 8) % self.width
        frame[self.rows * b + b :, bar : bar + 8] = WHITE
        self.counter += 1
        return frame

"""The probe code: a frame counter and the seq of the last input applied, drawn as black/white
16x16 blocks that survive H.264, and read back from a decoded frame.

Both sides of a latency measurement use it: the node's ``probe`` app draws it and the client
(or a benchmark) reads it, so it lives in the core.
"""

from __future__ import annotations

import math

import numpy as np

PROBE_BLOCK = 16
"""Side of one bit's square, in pixels: a 16x16 block is one H.264 macroblock."""
_MARKER = 0b10110010
PROBE_BITS = 8 + 32 + 32 + 8  # marker, last input seq, frame counter, check byte
BLACK, WHITE, GREY = 0, 255, 96


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


def probe_bits(seq: int, counter: int) -> np.ndarray:
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

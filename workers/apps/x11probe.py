"""A Tk program that shows the last key it received as blocks that survive H.264 (for latency benchmarks).

Run it on the X display (``python -m cloudq.workers.apps.x11probe``; ``cloudq bench x11`` runs it as
``x11:PYTHON -m cloudq.workers.apps.x11probe``). It fills the screen with a grey canvas and
draws, at the top-left, a row of :data:`BITS` blocks of :data:`BLOCK` x :data:`BLOCK` px, white for 1,
black for 0, most significant bit first: the value is ``keysym & 0xFFF`` of the last key pressed
(``a`` -> 0x061, ``Return`` -> 0xFF0D & 0xFFF = 0xF0D). A digit-entry mode is also there for
benchmarks that want arbitrary numbers: type digits then ``Return`` and the number (mod 4096) is shown.
Below the row the value is also written in large text for humans.

:func:`read_probe_value` reads the value back from an RGB frame (the grab, or a decoded video frame).
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

BITS = 12
BLOCK = 40
ORIGIN = (BLOCK, BLOCK)  # x, y of the first block: one block of grey margin around the row
BACKGROUND = "#808080"
MAX_VALUE = (1 << BITS) - 1


def block_centres() -> list[tuple[int, int]]:
    """(x, y) pixel centre of each block, most significant bit first."""
    x0, y0 = ORIGIN
    return [(x0 + i * BLOCK + BLOCK // 2, y0 + BLOCK // 2) for i in range(BITS)]


def read_probe_value(frame: np.ndarray) -> int:
    """The value shown in an RGB (h, w, 3) frame: each block's centre 16x16 luma thresholded at 128."""
    value = 0
    r = BLOCK // 5
    for x, y in block_centres():
        patch = frame[y - r : y + r, x - r : x + r].astype(np.float32)
        luma = float((0.299 * patch[..., 0] + 0.587 * patch[..., 1] + 0.114 * patch[..., 2]).mean())
        value = (value << 1) | (luma >= 128)
    return value


def probe_shown(frame: np.ndarray) -> bool:
    """Whether the probe's window is on screen (its grey margin; a bare X root is black)."""
    corner = frame[4 : BLOCK - 4, 4 : BLOCK - 4].astype(np.float32)
    return bool(np.abs(corner - 128).max() < 24)


def main(argv: list[str] | None = None) -> int:
    """Run the Tk probe window until it is closed or killed."""
    import tkinter as tk

    root = tk.Tk()
    root.title("cloudq latency probe")
    w, h = root.winfo_screenwidth(), root.winfo_screenheight()
    root.geometry(f"{w}x{h}+0+0")
    canvas = tk.Canvas(root, width=w, height=h, background=BACKGROUND, highlightthickness=0)
    canvas.pack(fill="both", expand=True)
    blocks = []
    for x, y in block_centres():
        half = BLOCK // 2
        blocks.append(canvas.create_rectangle(x - half, y - half, x + half, y + half, width=0, fill="black"))
    label = canvas.create_text(
        ORIGIN[0], ORIGIN[1] + 2 * BLOCK, anchor="nw", fill="white", font=("Helvetica", 48), text="0"
    )
    digits: list[str] = []

    def show(value: int) -> None:
        value &= MAX_VALUE
        for i, item in enumerate(blocks):
            bit = (value >> (BITS - 1 - i)) & 1
            canvas.itemconfigure(item, fill="white" if bit else "black")
        canvas.itemconfigure(label, text=str(value))

    def on_key(ev: Any) -> None:
        if ev.keysym == "Return" and digits:
            show(int("".join(digits)))
            digits.clear()
            return
        if ev.char.isdigit() and len(ev.char) == 1:
            digits.append(ev.char)
        show(ev.keysym_num)

    root.bind_all("<KeyPress>", on_key)
    # no window manager gives us focus: take it once mapped (and keep it on re-map)
    root.bind("<Map>", lambda _e: root.focus_force())
    show(0)
    root.mainloop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

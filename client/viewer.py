"""The viewer window (Tk, from the standard library): the stream at its native size, scaled to fit
the window (nearest neighbour, aspect kept, centred), keyboard and mouse sent back as input, and a
status line (state, node, fps, bitrate, input latency, queue position, warnings).

Tk owns the main thread; the session (login, kernel, watch loop, reconnection) runs on a second
thread. Decoded frames reach the window through a one-slot mailbox (the newest wins, so a slow
window drops frames instead of falling behind), polled every ``TICK_MS``.

Input mapping: window pixels -> stream pixels through the current scale and offset. Mouse button
presses, drags and releases are sent (``mouse_down``/``mouse_move``/``mouse_up``, ``button`` = the
Tk button number 1-3); plain hovering is not sent; the wheel (Tk buttons 4-7 on X11, ``<MouseWheel>``
elsewhere) is sent as ``wheel`` steps at the pointer. Keys are sent as ``key_down`` and ``key_up``
with their X keysym names (Tk's ``keysym``: ``a``, ``plus``, ``Return``, ``Shift_L``), modifier keys
included, so a real program sees shortcuts and held keys as typed. Closing the window ends the
session (and logs out).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Any

import av
import numpy as np

from cloudq.client.session import ClientSession
from cloudq.client.sinks import CallbackSink
from cloudq.wire import VideoPacket

log = logging.getLogger(__name__)

TICK_MS = 15
STATUS_MS = 250
WHEEL_BUTTONS = {4: (0, -1), 5: (0, 1), 6: (-1, 0), 7: (1, 0)}
"""X11 Tk reports the wheel as buttons 4-7: (dx, dy) steps of each."""
RESIZE_DEBOUNCE_MS = 300
SHIFT, CONTROL = 0x1, 0x4
"""Tk event state bits."""


class NoWindow(Exception):
    """The display refused the window (nothing has connected yet: the caller may go headless)."""


def unavailable() -> str | None:
    """Why no window can be shown here (None: it can)."""
    if not os.environ.get("DISPLAY"):
        return "no display (DISPLAY is not set)"
    try:
        import tkinter  # noqa: F401
    except ImportError as exc:
        return f"Tk is not available ({exc})"
    return None


def ppm(rgb: np.ndarray) -> bytes:
    h, w = rgb.shape[:2]
    return b"P6 %d %d 255\n" % (w, h) + np.ascontiguousarray(rgb).tobytes()


def fit(w: int, h: int, cw: int, ch: int) -> tuple[float, int, int, int, int]:
    """(scale, shown width, shown height, x offset, y offset) of a w x h picture in cw x ch."""
    scale = min(cw / w, ch / h) if cw > 1 and ch > 1 else 1.0
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return scale, nw, nh, (cw - nw) // 2, (ch - nh) // 2


def resize(rgb: np.ndarray, nw: int, nh: int) -> np.ndarray:
    h, w = rgb.shape[:2]
    if (nw, nh) == (w, h):
        return rgb
    rows = np.minimum((np.arange(nh) * h) // nh, h - 1)
    cols = np.minimum((np.arange(nw) * w) // nw, w - 1)
    return rgb[rows][:, cols]


def show_status(label: Any, text: str, width: int) -> None:
    """Set the status line, wrapped at the picture's width: a long warning adds a line instead of
    widening the window past the picture."""
    pad = 2 * sum(label.winfo_pixels(str(label.cget(o))) for o in ("bd", "padx", "highlightthickness"))
    label.configure(text=text, wraplength=max(100, width - pad), justify="left")


def key_name(char: str, keysym: str) -> str | None:
    """The X keysym name to send for a Tk key event (None: Tk could not name it)."""
    if keysym and keysym != "??":
        return keysym
    if len(char) == 1 and char.isprintable() and not char.isspace():
        return char
    return None


class Viewer:
    def __init__(self, session: ClientSession, title: str = "cloudq") -> None:
        self.session = session
        self.title = title
        self._mail: np.ndarray | None = None
        self._mail_lock = threading.Lock()
        self.size: tuple[int, int] | None = None  # stream (w, h)
        self.view = (1.0, 0, 0)  # scale, x offset, y offset
        self.shown = 0
        self.error: BaseException | None = None
        self.result = ""
        self.pressed: int | None = None
        self._clip_mail: str | None = None  # the session's newest clipboard text, for the Tk thread
        self._resize_job: Any = None  # the pending (debounced) resize request
        self._asked: tuple[int, int] | None = None  # the size last asked of the session
        session.opt.sinks.append(CallbackSink(self._on_frame))
        session.clipboard_listeners.append(self._on_clipboard)

    # -- player thread -----------------------------------------------------------------------
    def _on_frame(self, frame: av.VideoFrame, vp: VideoPacket) -> None:
        rgb = frame.to_ndarray(format="rgb24")
        with self._mail_lock:
            self._mail = rgb

    def _on_clipboard(self, text: str) -> None:  # the clipboard's thread
        with self._mail_lock:
            self._clip_mail = text

    # -- session thread ----------------------------------------------------------------------
    def _session_main(self) -> None:
        try:
            self.result = self.session.run()
        except BaseException as exc:  # handed to the main thread, which reports it
            self.error = exc

    # -- Tk (main thread) --------------------------------------------------------------------
    def run(self) -> str:
        """Show the window until the session ends or the window is closed; returns why it ended,
        raises what the session raised (:class:`ClientError`)."""
        import tkinter as tk

        try:
            self.root = root = tk.Tk()
        except tk.TclError as exc:
            raise NoWindow(f"cannot open the viewer window: {exc}") from None
        root.title(self.title)
        root.geometry("+0+0")
        root.configure(background="black")
        self.canvas = tk.Canvas(root, width=640, height=360, background="black", highlightthickness=0, bd=0)
        self.canvas.pack(fill="both", expand=True)
        self.status = tk.Label(root, text="connecting...", anchor="w", font=("TkFixedFont", 9))
        self.status.pack(fill="x", side="bottom")
        self.image_item = self.canvas.create_image(0, 0, anchor="nw")
        self.photo: Any = None
        root.protocol("WM_DELETE_WINDOW", self.session.stop.set)
        root.bind("<KeyPress>", lambda e: self._key("key_down", e))
        root.bind("<KeyRelease>", lambda e: self._key("key_up", e))
        root.bind("<FocusIn>", lambda e: self._offer_clipboard())
        self.canvas.bind("<Configure>", self._on_configure)
        self.canvas.bind("<MouseWheel>", self._wheel)
        self.canvas.bind("<ButtonPress>", lambda e: self._mouse("mouse_down", e))
        self.canvas.bind("<Motion>", lambda e: self._mouse("mouse_move", e))
        self.canvas.bind("<ButtonRelease>", lambda e: self._mouse("mouse_up", e))
        self.canvas.focus_set()
        thread = threading.Thread(target=self._session_main, name="session", daemon=True)
        thread.start()
        root.after(TICK_MS, self._tick, thread)
        root.after(STATUS_MS, self._status)
        try:
            root.mainloop()
        finally:
            self.session.stop.set()
            thread.join(30)
            with contextlib.suppress(tk.TclError):
                root.destroy()
        if self.error is not None:
            raise self.error
        return self.result

    def _tick(self, thread: threading.Thread) -> None:
        if not thread.is_alive():
            self.root.quit()
            return
        with self._mail_lock:
            rgb, self._mail = self._mail, None
            clip, self._clip_mail = self._clip_mail, None
        if rgb is not None:
            self._show(rgb)
        if clip is not None:  # a program in the session copied it: the local clipboard too
            self.root.clipboard_clear()
            self.root.clipboard_append(clip)
        self.root.after(TICK_MS, self._tick, thread)

    def _show(self, rgb: np.ndarray) -> None:
        import tkinter as tk

        h, w = rgb.shape[:2]
        if self.size != (w, h):  # first frame or a new picture size: native size if it fits
            self.size = (w, h)
            sw, sh = self.root.winfo_screenwidth(), self.root.winfo_screenheight() - 60
            s = min(1.0, sw / w, sh / h)
            self.canvas.configure(width=round(w * s), height=round(h * s))
            self.root.update_idletasks()
        cw, ch = self.canvas.winfo_width(), self.canvas.winfo_height()
        scale, nw, nh, ox, oy = fit(w, h, cw, ch)
        self.view = (scale, ox, oy)
        self.photo = tk.PhotoImage(data=ppm(resize(rgb, nw, nh)), format="PPM")
        self.canvas.coords(self.image_item, ox, oy)
        self.canvas.itemconfigure(self.image_item, image=self.photo)
        self.shown += 1

    def _on_configure(self, event: Any) -> None:
        """The window changed size: ask the session for a screen of the canvas's size, once it
        settles (300 ms, as the page does); the node clamps it and apps that cannot resize ignore it."""
        if self._resize_job is not None:
            self.root.after_cancel(self._resize_job)
        self._resize_job = self.root.after(
            RESIZE_DEBOUNCE_MS, self._ask_size, int(event.width), int(event.height)
        )

    def _ask_size(self, w: int, h: int) -> None:
        self._resize_job = None
        if self.size is None:
            # no picture yet: this is the window's first, default size (640x360), not a size
            # anyone chose; the first frame fits the window to the session's own screen
            return
        if w < 64 or h < 64 or (w, h) in (self.size, self._asked):
            return  # the picture's own size (the window fitted to it), or asked already
        self._asked = (w, h)
        self.session.send_input("resize", width=w, height=h)

    def _status(self) -> None:
        show_status(self.status, self.session.status_line(), self.canvas.winfo_width())
        self.root.after(STATUS_MS, self._status)

    def to_stream(self, x: int, y: int) -> tuple[int, int] | None:
        """Window pixel -> stream pixel (None outside the picture)."""
        if self.size is None:
            return None
        scale, ox, oy = self.view
        sx, sy = int((x - ox) / scale), int((y - oy) / scale)
        w, h = self.size
        if 0 <= sx < w and 0 <= sy < h:
            return sx, sy
        return None

    def _offer_clipboard(self) -> None:
        """Send the local clipboard's text to the session (before a paste reaches it, and when
        the window gets the focus); the session's clipboard decides if it is new."""
        import tkinter as tk

        try:
            text = self.root.clipboard_get()
        except tk.TclError:  # empty, or not text
            return
        self.session.send_clipboard(text)

    def _key(self, kind: str, event: Any) -> None:
        state, keysym = int(getattr(event, "state", 0) or 0), event.keysym or ""
        if kind == "key_down" and (
            (state & CONTROL and keysym in ("v", "V")) or (state & SHIFT and keysym == "Insert")
        ):
            self._offer_clipboard()  # queued before the keys: the program pastes the new text
        key = key_name(event.char or "", keysym)
        if key:
            self.session.send_input(kind, key=key)

    def _wheel(self, event: Any, steps: tuple[int, int] | None = None) -> None:
        if steps is None:  # <MouseWheel> (Windows, macOS): delta > 0 scrolls up
            delta = int(getattr(event, "delta", 0) or 0)
            if not delta:
                return
            steps = (0, -1 if delta > 0 else 1)
        point = self.to_stream(event.x, event.y)
        dx, dy = steps
        if point is None:
            self.session.send_input("wheel", dx=dx, dy=dy)
        else:
            self.session.send_input("wheel", dx=dx, dy=dy, x=point[0], y=point[1])

    def _mouse(self, kind: str, event: Any) -> None:
        num = int(getattr(event, "num", 0) or 0) if kind != "mouse_move" else 0
        if num in WHEEL_BUTTONS:
            if kind == "mouse_down":
                self._wheel(event, WHEEL_BUTTONS[num])
            return
        if kind == "mouse_move" and self.pressed is None:
            return  # hovering is not input
        point = self.to_stream(event.x, event.y)
        if point is None:
            if kind == "mouse_down" or self.size is None:
                return
            w, h = self.size
            scale, ox, oy = self.view  # drags leaving the picture stick to its edge
            point = (
                min(w - 1, max(0, int((event.x - ox) / scale))),
                min(h - 1, max(0, int((event.y - oy) / scale))),
            )
        button = min(31, max(0, int(getattr(event, "num", 1) or 1))) if kind != "mouse_move" else None
        if kind == "mouse_down":
            self.pressed = button
        elif kind == "mouse_up":
            self.pressed = None
        self.session.send_input(kind, x=point[0], y=point[1], button=button or self.pressed or 1)

"""The screen follows the client's window: RandR on our Xvfb, in :class:`ScreenMixin`.

Xvfb allocates its framebuffer once, at its ``-screen`` size, which is also the largest size RandR
will set; its one output (``screen``) knows only that mode. So a node's Xvfb starts at the node's
maximum (``cloudq node --max-size``), and a resize creates the mode it needs (``RRCreateMode``,
one per size, reused; the mode it replaces is deleted unless it is the built-in one, so a client
that asks for many sizes cannot make the server keep many), puts it on the CRTC and sets the screen
size, all on the app's own X connection (about 1-2 ms). Each session starts at the node's
``--size``. The program sees a root window of the new size (RRScreenChangeNotify, ConfigureNotify
on the root); the app refits its top-level windows (no window manager runs) and re-creates its
MIT-SHM grabber, whose buffer is sized at the screen's size when it is made.

A display we did not start (``--display :0``) is never resized: :meth:`ScreenMixin.resize` returns
the size it has.
"""

from __future__ import annotations

import logging
from typing import Any

import mss
from Xlib import X
from Xlib import error as xerror
from Xlib.ext import randr

from .errors import DisplayError

logger = logging.getLogger(__package__)

__all__ = ["MIN_SIDE", "ScreenMixin", "set_screen_size"]

MIN_SIDE = 64
"""Smallest width or height a resize sets (a picture smaller than that is no use to anyone)."""
_MM_PER_PX = 25.4 / 96  # report 96 DPI, as Xvfb does


def _even(v: int) -> int:
    return v - (v % 2)


def set_screen_size(d: Any, root: Any, width: int, height: int) -> tuple[int, int]:
    """Set the screen of ``d`` to ``width`` x ``height`` (clamped to what the server allows, made
    even for H.264) through RandR; return the size set. Raises :class:`DisplayError` if the server
    refuses (no RANDR, no output, a CRTC it will not configure)."""
    rng = root.xrandr_get_screen_size_range()
    w = _even(max(MIN_SIDE, rng.min_width, min(width, rng.max_width)))
    h = _even(max(MIN_SIDE, rng.min_height, min(height, rng.max_height)))
    res = root.xrandr_get_screen_resources()
    if not res.outputs or not res.crtcs:
        raise DisplayError("the display has no RandR output to resize")
    output, crtc = res.outputs[0], res.crtcs[0]
    geom = root.get_geometry()
    if (geom.width, geom.height) == (w, h):
        return w, h
    ci = d.xrandr_get_crtc_info(crtc, res.config_timestamp)
    old_mode = ci.mode
    mode = next((m.id for m in res.modes if (m.width, m.height) == (w, h)), None)
    if mode is None:
        name = f"cloudq-{w}x{h}"
        info = {
            "id": 0,
            "width": w,
            "height": h,
            "dot_clock": w * h * 60,
            "h_sync_start": w,
            "h_sync_end": w,
            "h_total": w,
            "h_skew": 0,
            "v_sync_start": h,
            "v_sync_end": h,
            "v_total": h,
            "name_length": len(name),
            "flags": 0,
        }
        mode = root.xrandr_create_mode(info, name).mode
        d.xrandr_add_output_mode(output, mode)
    # the CRTC must fit the screen at every step: grow the screen first, shrink it last
    big_w, big_h = max(w, geom.width), max(h, geom.height)
    if (big_w, big_h) != (geom.width, geom.height):
        root.xrandr_set_screen_size(big_w, big_h, int(big_w * _MM_PER_PX), int(big_h * _MM_PER_PX))
    reply = d.xrandr_set_crtc_config(crtc, res.config_timestamp, 0, 0, mode, randr.Rotate_0, [output])
    if reply.status != 0:
        raise DisplayError(f"RandR refused a {w}x{h} mode (status {reply.status})")
    root.xrandr_set_screen_size(w, h, int(w * _MM_PER_PX), int(h * _MM_PER_PX))
    if old_mode and old_mode != mode:
        old = next((m for m in res.modes if m.id == old_mode), None)
        if old is not None and (old.width, old.height) != (rng.max_width, rng.max_height):  # not Xvfb's own
            d.xrandr_delete_output_mode(output, old_mode)
            d.xrandr_destroy_mode(old_mode)
    d.sync()
    geom = root.get_geometry()
    return geom.width, geom.height


class ScreenMixin:
    """The resize side of :class:`X11App` (its state is set in ``X11App.__init__``)."""

    @property
    def resizable(self) -> bool:
        """Whether :meth:`resize` can change the display: our own Xvfb, with RANDR."""
        return (
            self._d is not None
            and self._xdm is not None
            and self._xdm.owned
            and self._d.has_extension("RANDR")
        )

    def resize(self, width: int, height: int) -> tuple[int, int]:
        """Make the screen ``width`` x ``height`` (clamped to the display's maximum, even), refit the
        program's windows to it; frames from then on have that size. Returns the size the screen
        has (unchanged on a display we may not resize). Raises :class:`DisplayError` if the display
        is gone or refuses."""
        if not self.resizable:
            self.counters["resize_ignored"] += 1
            return self.width, self.height
        try:
            self._drain()
            w, h = set_screen_size(self._d, self._root, width, height)
        except (xerror.XError, xerror.ConnectionClosedError, OSError) as e:
            raise DisplayError(f"cannot resize the display to {width}x{height}: {e}") from None
        if (w, h) == (self._screen_w, self._screen_h) == (self.width, self.height):
            return w, h
        self._screen_w, self._screen_h = w, h
        self.width, self.height = w, h
        self._frame, self._box, self._full = None, None, True
        if self._sct is not None:  # its MIT-SHM buffer has the old screen's size
            self._sct.close()
        self._sct = mss.MSS(display=self.display_name)
        self._refit()
        self.counters["resizes"] += 1
        logger.info("display %s resized to %dx%d", self.display_name, w, h)
        return w, h

    def _refit(self) -> None:
        """Fit every mapped top-level window to the new screen (with a fresh budget of refits)."""
        assert self._d is not None
        for w in self._root.query_tree().children:
            try:
                attrs = w.get_attributes()
            except xerror.XError:  # destroyed meanwhile
                continue
            if attrs.map_state == X.IsViewable and not attrs.override_redirect:
                self._fit_budget[w.id] = 3
                self._fit(w)
        self._d.flush()

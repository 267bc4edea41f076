"""The clipboard both ways (:class:`ClipboardMixin`), through ``xclip`` on the session's display.

Into the session: a ``clipboard`` input event starts ``xclip -quiet`` (it stays in the
foreground, so we keep its process and kill it on the next paste and on close) for CLIPBOARD
and PRIMARY, the text on its stdin. Out of it: XFixes reports each new CLIPBOARD owner; at most
once a second the node asks :meth:`ClipboardMixin.clipboard_text`, which reads the text with
``xclip -o`` (at most ``MAX_CLIPBOARD_BYTES``, within ``READ_TIMEOUT``). What we set ourselves
is not read back (no echo to the browser that sent it). Without ``xclip`` the clipboard is off
(logged once); without XFixes only the way in works.
"""

from __future__ import annotations

import logging
import os
import select
import shutil
import subprocess
import time
from typing import Any

from cloudq.wire import MAX_CLIPBOARD_BYTES, InputEvent

logger = logging.getLogger(__package__)

__all__ = ["ClipboardMixin"]

READ_TIMEOUT = 1.0
SELECTIONS = ("clipboard", "primary")
_XFIXES_SET_OWNER_MASK = 1  # XFixesSetSelectionOwnerNotifyMask
_warned_missing = False


def _xclip() -> str | None:
    global _warned_missing
    path = shutil.which("xclip")
    if path is None and not _warned_missing:
        _warned_missing = True
        logger.warning("xclip not found: the clipboard is not shared with the browser")
    return path


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        logger.debug("xclip %d did not end", proc.pid)


class ClipboardMixin:
    """The clipboard side of :class:`X11App` (its state is set here, called from ``__init__``)."""

    counters: Any
    _d: Any
    _root: Any

    def _init_clipboard(self) -> None:
        self._clip_owners: list[subprocess.Popen[bytes]] = []
        self._clip_set: bytes | None = None  # what we set last (not echoed back)
        self._clip_event = -1  # XFixes SelectionNotify event code (-1: none)
        self._clip_dirty = False

    def _clip_env(self) -> dict[str, str]:
        return {**os.environ, "DISPLAY": self.display_name}  # type: ignore[attr-defined]

    def _xclip_run(self, xclip: str, *args: str, read: bool = False) -> subprocess.Popen[bytes] | None:
        """``xclip ARGS`` on the session's display: text in on its stdin, or (``read``) out on its
        stdout; None (logged) if it cannot start."""
        try:
            return subprocess.Popen(
                [xclip, *args],
                stdin=subprocess.DEVNULL if read else subprocess.PIPE,
                stdout=subprocess.PIPE if read else subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                env=self._clip_env(),
                close_fds=True,
            )
        except OSError as e:
            logger.warning("cannot start xclip: %s", e)
            return None

    def _watch_clipboard(self) -> None:
        """Ask XFixes to report CLIPBOARD owner changes (after connecting)."""
        d = self._d
        if d is None or not d.has_extension("XFIXES"):
            return
        try:
            d.xfixes_query_version()
            atom = d.intern_atom("CLIPBOARD")
            d.xfixes_select_selection_input(self._root, atom, _XFIXES_SET_OWNER_MASK)
            self._clip_event = d.query_extension("XFIXES").first_event  # + XFixesSelectionNotify (0)
        except Exception as e:
            logger.info("no clipboard watch: %s", e)
            self._clip_event = -1

    def _on_event(self, ev: Any) -> None:
        if self._clip_event >= 0 and ev.type & 0x7F == self._clip_event:
            self._clip_dirty = True
            self.counters["clipboard_owner_changes"] += 1
            return
        super()._on_event(ev)  # type: ignore[misc]

    def _set_clipboard(self, ev: InputEvent) -> None:
        text = ev.text
        if not isinstance(text, str) or not text:
            return
        data = text.encode()
        if len(data) > MAX_CLIPBOARD_BYTES:
            self.counters["clipboard_dropped"] += 1
            return
        xclip = _xclip()
        if xclip is None:
            self.counters["clipboard_dropped"] += 1
            return
        self._stop_clip_owners()
        self._clip_set = data
        for sel in SELECTIONS:
            proc = self._xclip_run(xclip, "-quiet", "-selection", sel, "-i")
            if proc is None:
                self.counters["clipboard_dropped"] += 1
                return
            self._clip_owners.append(proc)
            try:
                assert proc.stdin is not None
                proc.stdin.write(data)
                proc.stdin.close()
            except OSError as e:
                logger.info("xclip took no text: %s", e)
        self.counters["clipboard_in"] += 1

    def _stop_clip_owners(self) -> None:
        owners, self._clip_owners = self._clip_owners, []
        for proc in owners:
            _kill(proc)

    def clipboard_text(self) -> str | None:
        """The CLIPBOARD's text if a program in the session set it since the last call, else None."""
        if getattr(self, "_d", None) is None:
            return None
        self._drain()  # type: ignore[attr-defined]
        if not self._clip_dirty:
            return None
        self._clip_dirty = False
        xclip = _xclip()
        if xclip is None:
            return None
        data = self._read_clipboard(xclip)
        if not data or data == self._clip_set:
            return None  # empty, not text, or our own paste
        self._clip_set = None  # the session's program owns it now: the same text again goes out
        self.counters["clipboard_out"] += 1
        return data.decode(errors="replace")

    def _read_clipboard(self, xclip: str) -> bytes | None:
        proc = self._xclip_run(xclip, "-o", "-selection", "clipboard", read=True)
        if proc is None:
            return None
        assert proc.stdout is not None
        out = bytearray()
        deadline = time.monotonic() + READ_TIMEOUT
        try:
            while len(out) <= MAX_CLIPBOARD_BYTES:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                    self.counters["clipboard_read_timeouts"] += 1
                    return None
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                out += chunk
            if len(out) > MAX_CLIPBOARD_BYTES:
                self.counters["clipboard_too_big"] += 1
                return None
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            return bytes(out) if rc == 0 else None
        except subprocess.TimeoutExpired:
            return None
        finally:
            proc.stdout.close()
            _kill(proc)

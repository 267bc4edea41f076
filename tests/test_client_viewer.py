"""The viewer window under a virtual X display (Xvfb): it shows the stream, and synthetic key presses
and mouse drags (xdotool, through the X server like a real user's) reach the app.

Needs the ``Xvfb`` and ``xdotool`` programs (Debian: ``apt-get install xvfb xdotool``); skipped,
saying so, where they are missing. The screen is read back with FFmpeg's x11grab through PyAV.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import redis
from helpers import Procs, desktop, missing_prerequisite, wait_for
from test_client_headless import BLUE, pool, share, stats

from cloudq.client.viewer import fit, key_name, resize, show_status
from cloudq.keys import Keys

MISSING = [p for p in ("Xvfb", "xdotool") if shutil.which(p) is None]


@pytest.fixture
def _x_programs() -> None:
    """Skips the test, saying why, where a program is missing; in CI that fails instead."""
    if MISSING:
        missing_prerequisite(f"viewer test needs {' and '.join(MISSING)} on PATH (apt: xvfb xdotool)")


needs_x = pytest.mark.usefixtures("_x_programs")


def test_window_pixels_map_to_stream_pixels_and_keys_map_to_names() -> None:
    assert fit(320, 240, 320, 240) == (1.0, 320, 240, 0, 0)
    assert fit(320, 240, 800, 480) == (2.0, 640, 480, 80, 0)  # letterboxed, centred
    rgb = np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3)
    assert resize(rgb, 12, 8)[::2, ::2].tolist() == rgb.tolist()
    assert key_name("a", "a") == "a" and key_name("+", "plus") == "plus"
    assert key_name("\x7f", "Delete") == "Delete" and key_name(" ", "space") == "space"
    assert key_name("", "Shift_L") == "Shift_L" and key_name("é", "??") == "é"


@pytest.fixture
def display() -> Iterator[str]:
    with desktop() as name:
        yield name


def screen(disp: str) -> np.ndarray:
    with av.open(disp, format="x11grab", options={"video_size": "640x480"}) as grab:
        return next(grab.decode(video=0)).to_ndarray(format="rgb24")


@needs_x
def test_viewer_shows_the_stream_and_a_synthetic_key_press_and_drag_reach_the_app(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path, display: str
) -> None:
    pool(r, keys, procs)  # paint, 320x240: the window opens at native size at the screen's corner
    js, png = tmp_path / "stats.json", tmp_path / "last.png"
    client = procs.start(
        "connect", "--user", "alice", "--password-stdin", "--stats-json", str(js), "--snapshot", str(png),
        stdin=b"pw\n", DISPLAY=display, CLOUDQ_HEADLESS="0",
    )  # fmt: skip
    wait_for(lambda: stats(js).get("frames", 0) >= 1, 20, what="a frame decoded")
    white = (255, 255, 255)
    wait_for(lambda: share(screen(display)[120, 20:300], white) > 0.95, 10, what="the canvas on screen")

    def xdo(*args: str) -> None:
        subprocess.run(["xdotool", *args], env={**os.environ, "DISPLAY": display}, check=True, timeout=10)

    xdo("mousemove", "160", "60")  # no window manager: keyboard focus follows the pointer
    xdo("key", "4")  # paint: 4 = blue
    wait_for(lambda: stats(js).get("counters", {}).get("inputs_sent", 0) >= 1, 5, what="key sent")
    xdo("mousemove", "40", "120", "mousedown", "1")
    for x in range(60, 281, 20):
        xdo("mousemove", str(x), "120")
    xdo("mouseup", "1")
    wait_for(lambda: share(screen(display)[120, 40:281], BLUE) > 0.9, 10, what="a blue stroke on screen")
    shot = screen(display)
    Procs.kill(client, signal.SIGTERM)
    assert client.returncode == 0, procs.output(client)
    with av.open(str(png)) as c:
        decoded = next(iter(c.decode(video=0))).to_ndarray(format="rgb24")
    shown = shot[:240, :320].astype(int)
    assert np.abs(shown - decoded.astype(int)).mean() < 3, "the window shows the decoded frame"
    s = stats(js)
    assert s["counters"]["inputs_sent"] >= 3 and s["exit_code"] == 0
    assert "Traceback" not in procs.output(client)


@needs_x
def test_a_long_warning_wraps_the_status_line_instead_of_widening_the_window(
    display: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tkinter as tk

    monkeypatch.setenv("DISPLAY", display)
    root = tk.Tk()
    try:
        canvas = tk.Canvas(root, width=320, height=240, highlightthickness=0, bd=0)
        canvas.pack(fill="both", expand=True)
        label = tk.Label(root, text="active", anchor="w", font=("TkFixedFont", 9))
        label.pack(fill="x", side="bottom")
        root.update()
        width = root.winfo_width()
        show_status(
            label, "active | 30 fps | WARNING: " + "the session reaches its maximum length soon " * 5, 320
        )
        root.update()
        assert root.winfo_width() == width  # not wider than before the warning
        assert label.winfo_reqheight() > 20  # the text took more than one line
    finally:
        root.destroy()


def test_viewer_sends_wheel_buttons_as_wheel_steps_at_the_pointer() -> None:
    from types import SimpleNamespace

    from cloudq.client.viewer import Viewer

    sent: list[tuple[str, dict[str, object]]] = []
    v = Viewer.__new__(Viewer)  # no window, no session: only the event mapping
    v.session = SimpleNamespace(send_input=lambda kind, **kw: sent.append((kind, kw)))
    v.size, v.view, v.pressed = (320, 240), (1.0, 0, 0), None
    v._mouse("mouse_down", SimpleNamespace(x=10, y=20, num=5))
    v._mouse("mouse_up", SimpleNamespace(x=10, y=20, num=5))
    v._mouse("mouse_down", SimpleNamespace(x=999, y=20, num=4))
    v._key("key_down", SimpleNamespace(char="", keysym="Shift_L"))
    assert sent == [
        ("wheel", {"dx": 0, "dy": 1, "x": 10, "y": 20}),
        ("wheel", {"dx": 0, "dy": -1}),
        ("key_down", {"key": "Shift_L"}),
    ]


def test_the_viewers_default_window_before_the_first_frame_asks_for_no_resize() -> None:
    """The window opens at a default 640x360 and settles (300 ms) before a slow first frame
    arrives: that size is nobody's choice and must not resize the session's screen (it did,
    when the first frame came late on a loaded machine)."""
    from types import SimpleNamespace

    from cloudq.client.viewer import Viewer

    sent: list[tuple[str, dict[str, object]]] = []
    v = Viewer.__new__(Viewer)  # no window, no session: only the resize decision
    v.session = SimpleNamespace(send_input=lambda kind, **kw: sent.append((kind, kw)))
    v.size, v._asked, v._resize_job = None, None, None
    v._ask_size(640, 360)  # the default window settled, no picture yet
    assert sent == []
    v.size = (320, 240)  # the first frame: the window fits it
    v._ask_size(320, 240)
    assert sent == []
    v._ask_size(500, 376)  # the user resized the window
    assert sent == [("resize", {"width": 500, "height": 376})]


@needs_x
def test_resizing_the_viewer_window_resizes_the_sessions_screen(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path, display: str
) -> None:
    """The viewer asks for a screen of its canvas's size once the window settles; an x11 session's
    display follows (RandR) and the stream restarts at that size."""
    from cloudq.wire import VideoPacket

    if shutil.which("xterm") is None:
        missing_prerequisite("the x11 viewer test needs xterm (apt: xterm)")
    pool(r, keys, procs, app="x11:xterm")  # 320x240
    js = tmp_path / "stats.json"
    client = procs.start(
        "connect", "--user", "alice", "--password-stdin", "--stats-json", str(js),
        stdin=b"pw\n", DISPLAY=display, CLOUDQ_HEADLESS="0",
    )  # fmt: skip
    try:
        wait_for(lambda: stats(js).get("frames", 0) >= 1, 30, what="a frame decoded")
        sid = r.smembers(keys.sessions).pop().decode()

        def newest_size() -> tuple[int, int] | None:
            for _, f in r.xrevrange(keys.video(sid), count=200):
                vp = VideoPacket.unpack(f)
                if vp.keyframe and vp.width:
                    return vp.width, vp.height
            return None

        assert newest_size() == (320, 240)
        env = {**os.environ, "DISPLAY": display}
        subprocess.run(
            ["xdotool", "search", "--name", "cloudq", "windowsize", "%@", "500", "400"],
            env=env, check=True, timeout=10,
        )  # fmt: skip
        wait_for(lambda: (newest_size() or (0, 0))[0] == 500, 15, what="a keyframe 500 wide")
        w, h = newest_size() or (0, 0)
        assert 300 <= h <= 400 and h % 2 == 0, (w, h)  # the canvas: the window minus the status line
    finally:
        Procs.kill(client, signal.SIGTERM)

"""The clipboard of ``x11:`` sessions both ways, through real processes: a ``clipboard`` input
event becomes the session's CLIPBOARD and PRIMARY (``xclip`` on the node); text a program there
puts on CLIPBOARD goes out on ``session:{sid}:clip``, and the gateway hands it to the page.

The node runs on a display this test process starts (``--display``), so ``xclip`` here can use it
with the same cookie. Needs ``Xvfb``, ``xterm`` and ``xclip``; the browser test needs Chromium.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from helpers import Procs, desktop, missing_prerequisite, session_field, start_pool, wait_for

from cloudq.client.launcher import Launcher
from cloudq.keys import Keys
from cloudq.wire import InputEvent

MISSING = [p for p in ("Xvfb", "xterm", "xclip") if shutil.which(p) is None]
W, H = 320, 240
TEXT_IN = "héllo ✓"
TEXT_OUT = "from the session ✓ ünïcode"


@pytest.fixture(scope="module", autouse=True)
def _programs() -> None:
    if MISSING:
        missing_prerequisite(f"clipboard tests need {', '.join(MISSING)} on PATH (apt: xvfb xterm xclip)")


@pytest.fixture
def display() -> Iterator[Any]:
    from cloudq.workers.apps.x11 import DisplayManager

    with DisplayManager(W, H) as dm:
        yield dm


def xclip_out(name: str, selection: str = "clipboard") -> str:
    env = {**os.environ, "DISPLAY": name}
    got = subprocess.run(
        ["xclip", "-o", "-selection", selection], env=env, capture_output=True, timeout=5, check=False
    )
    return got.stdout.decode(errors="replace") if got.returncode == 0 else ""


def xclip_in(name: str, text: str) -> subprocess.Popen[bytes]:
    """Own CLIPBOARD on ``name`` with ``text`` (a program in the session copying it); kill it after."""
    proc = subprocess.Popen(
        ["xclip", "-quiet", "-selection", "clipboard", "-i"],
        env={**os.environ, "DISPLAY": name},
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(text.encode())
    proc.stdin.close()
    return proc


def clipboard_page(gw: Any, profile: str) -> Any:
    """Headless Chromium with the page's clipboard permissions granted (as a user would when
    asked), logged in to the gateway as alice."""
    from test_gateway_browser import login, new_driver

    driver = new_driver(profile)
    driver.execute_cdp_cmd(
        "Browser.grantPermissions",
        {"origin": gw.url, "permissions": ["clipboardReadWrite", "clipboardSanitizedWrite"]},
    )
    login(driver, gw, "alice")
    return driver


def clip_texts(r: redis.Redis, keys: Keys, sid: str) -> list[str]:
    return [f[b"text"].decode() for _, f in r.xrange(keys.clip(sid))]


def pool(r: redis.Redis, keys: Keys, procs: Procs, dm: Any) -> None:
    start_pool(
        r,
        keys,
        procs,
        1,
        "x11:xterm",
        ("--size", f"{W}x{H}", "--display", dm.name),
        users=("alice",),
        idle_timeout=30,
        grace=30,
    )


def test_a_clipboard_event_sets_the_sessions_clipboard_and_a_programs_copy_comes_out(
    r: redis.Redis, keys: Keys, procs: Procs, display: Any
) -> None:
    from test_x11 import Screen

    pool(r, keys, procs, display)
    launcher = Launcher(r, keys)
    t = launcher.login("alice", "pw")
    wait_for(lambda: session_field(r, keys, t.sid) == "active", 20, what="the session active")
    with Screen(r, keys, t):  # a client: heartbeats, so the session stays awake
        ev = InputEvent(type="clipboard", seq=1, client_time=time.time(), text=TEXT_IN)
        launcher.sr.xadd(keys.input(t.sid), ev.pack())  # as the session's own Redis user
        wait_for(lambda: xclip_out(display.name) == TEXT_IN, 10, what="the text on CLIPBOARD")
        # PRIMARY's xclip starts just after CLIPBOARD's: it may take ownership a moment later
        wait_for(lambda: xclip_out(display.name, "primary") == TEXT_IN, 5, what="the text on PRIMARY")
        time.sleep(1.5)  # the node polls once a second: its own paste is not echoed
        assert clip_texts(r, keys, t.sid) == []

        owner = xclip_in(display.name, TEXT_OUT)
        try:
            wait_for(lambda: TEXT_OUT in clip_texts(r, keys, t.sid), 10, what="the copy on the clip stream")
            # the session user may read it (the gateway relays it as that user)
            assert launcher.sr.xrevrange(keys.clip(t.sid), count=1)[0][1][b"text"].decode() == TEXT_OUT
        finally:
            owner.kill()
            owner.wait(5)


def test_the_page_gets_the_sessions_clipboard_and_sends_its_own(
    r: redis.Redis, keys: Keys, procs: Procs, display: Any, tmp_path: Any
) -> None:
    from test_gateway_browser import HAVE_BROWSER, Gateway, stats

    if not HAVE_BROWSER:
        missing_prerequisite("chromium and chromium-driver are not installed")
    pool(r, keys, procs, display)
    gw = Gateway(procs).start()
    driver = clipboard_page(gw, str(tmp_path / "profile"))
    owner: subprocess.Popen[bytes] | None = None
    try:
        wait_for(lambda: (stats(driver) or {}).get("frames", 0) > 0, 20, what="the first decoded frame")

        def clip() -> dict[str, int]:
            return (stats(driver) or {}).get("clipboard") or {}

        owner = xclip_in(display.name, TEXT_OUT)
        wait_for(lambda: clip().get("received", 0) >= 1, 10, what="the clipboard at the page")
        wait_for(lambda: clip().get("written", 0) + clip().get("errors", 0) >= 1, 5, what="writeText done")
        got = driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "navigator.clipboard.readText().then(done, (e) => done('error: ' + e));"
        )
        assert got == TEXT_OUT, (got, clip())
        assert clip()["errors"] == 0

        # the browser's paste: its text becomes the session's clipboard
        driver.execute_script(
            "const c = document.getElementById('screen'); c.focus();"
            "const dt = new DataTransfer(); dt.setData('text/plain', arguments[0]);"
            "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));",
            TEXT_IN,
        )
        wait_for(lambda: xclip_out(display.name) == TEXT_IN, 10, what="the pasted text on CLIPBOARD")
        assert clip()["sent"] >= 1
    finally:
        if owner is not None:
            owner.kill()
            owner.wait(5)
        driver.quit()


def test_an_honest_mebibyte_passes_the_wire_and_the_guard_and_more_does_not() -> None:
    from collections import Counter

    from cloudq.wire import MAX_CLIPBOARD_BYTES, MAX_INPUT_BYTES, BadMessage
    from cloudq.workers.guard import InputGuard, InputLimits

    text = "é" * (MAX_CLIPBOARD_BYTES // 2)  # 1 MiB of UTF-8
    fields = InputEvent(type="clipboard", seq=1, client_time=1.0, text=text).pack()
    assert InputEvent.unpack(fields).text == text
    guard = InputGuard(InputLimits(), Counter())
    assert guard.admit(len(fields["m"]) + 1) == ""
    with pytest.raises(BadMessage):
        InputEvent(type="clipboard", seq=1, client_time=1.0, text=text + "x")
    with pytest.raises(BadMessage):
        InputEvent(type="clipboard", seq=1, client_time=1.0, text="")
    # only a clipboard event may be that big
    import msgpack

    big = msgpack.packb(
        {"v": 1, "type": "key", "seq": 1, "ct": 1.0, "key": "a", "pad": "x" * MAX_INPUT_BYTES}
    )
    with pytest.raises(BadMessage):
        InputEvent.unpack({"m": big})
    assert guard.admit(InputLimits().clip_entry + 1) == "size"


SILENT_OWNER = """
import sys, time
from Xlib import X, display
d = display.Display(sys.argv[1])
w = d.screen().root.create_window(0, 0, 1, 1, 0, X.CopyFromParent)
w.set_selection_owner(d.intern_atom("CLIPBOARD"), X.CurrentTime)
d.flush()
print("owner", flush=True)
time.sleep(60)  # owns CLIPBOARD and never answers a request for it
"""


def test_a_hostile_programs_clipboard_neither_stalls_nor_floods_the_node(
    r: redis.Redis, keys: Keys, procs: Procs, display: Any
) -> None:
    """A program in the session that puts 3 MiB on CLIPBOARD, or owns it and never answers: the
    node reads at most 1 MiB within 1 s, publishes nothing of either, keeps streaming, and the
    next ordinary copy still goes out."""
    import json
    import sys

    from test_x11 import Screen

    pool(r, keys, procs, display)
    t = Launcher(r, keys).login("alice", "pw")
    wait_for(lambda: session_field(r, keys, t.sid) == "active", 20, what="the session active")

    def app_stat(name: str) -> int:
        raw = r.hget(keys.node(t.node), "stats")
        return int(json.loads(raw).get(f"app.{name}", 0)) if raw else 0

    def packets() -> int:
        return r.xlen(keys.video(t.sid))

    with Screen(r, keys, t):
        huge = xclip_in(display.name, "x" * (3 * 2**20))
        try:
            wait_for(lambda: app_stat("clipboard_too_big") >= 1, 15, what="the 3 MiB clipboard refused")
        finally:
            huge.kill()
            huge.wait(5)
        silent = subprocess.Popen(
            [sys.executable, "-c", SILENT_OWNER, display.name], stdout=subprocess.PIPE, text=True
        )
        try:
            assert silent.stdout is not None and silent.stdout.readline().strip() == "owner"
            wait_for(
                lambda: app_stat("clipboard_read_timeouts") >= 1, 15, what="the silent owner given up on"
            )
            before = packets()
            ev = InputEvent(type="key_down", seq=1, client_time=time.time(), key="a")
            r.xadd(keys.input(t.sid), ev.pack())  # the node still answers input while the owner sits
            wait_for(lambda: packets() > before, 5, what="a frame after the silent owner")
        finally:
            silent.kill()
            silent.wait(5)
        assert clip_texts(r, keys, t.sid) == [], "nothing of either was published"
        owner = xclip_in(display.name, TEXT_OUT)
        try:
            wait_for(lambda: TEXT_OUT in clip_texts(r, keys, t.sid), 10, what="an ordinary copy after them")
        finally:
            owner.kill()
            owner.wait(5)


def test_the_python_viewer_shares_the_clipboard_both_ways(
    r: redis.Redis, keys: Keys, procs: Procs, display: Any, tmp_path: Any
) -> None:
    """The viewer window on its own display (the user's desktop): a program's copy in the
    session lands on that desktop's clipboard; text copied on the desktop reaches the session's
    CLIPBOARD when the user presses Ctrl+V in the window."""
    import json

    if shutil.which("xdotool") is None:
        missing_prerequisite("the viewer test needs xdotool (apt: xdotool)")
    pool(r, keys, procs, display)
    stack = contextlib.ExitStack()
    desk = stack.enter_context(desktop())
    js = tmp_path / "stats.json"
    client = procs.start(
        "connect", "--user", "alice", "--password-stdin", "--stats-json", str(js),
        stdin=b"pw\n", DISPLAY=desk, CLOUDQ_HEADLESS="0",
    )  # fmt: skip
    owners: list[subprocess.Popen[bytes]] = []
    try:

        def clip_stats() -> dict[str, int]:
            try:
                return json.loads(js.read_text()).get("clipboard", {})
            except (OSError, ValueError):
                return {}

        wait_for(lambda: json.loads(js.read_text()).get("frames", 0) >= 1 if js.exists() else False, 30,
                 what="the viewer showing frames")  # fmt: skip
        owners.append(xclip_in(display.name, TEXT_OUT))  # a program in the session copies
        wait_for(lambda: xclip_out(desk) == TEXT_OUT, 10, what="the copy on the desktop's clipboard")

        owners.append(xclip_in(desk, TEXT_IN))  # the user copies something on the desktop
        env = {**os.environ, "DISPLAY": desk}
        subprocess.run(["xdotool", "mousemove", "100", "100"], env=env, check=True, timeout=10)
        subprocess.run(["xdotool", "key", "ctrl+v"], env=env, check=True, timeout=10)
        wait_for(lambda: xclip_out(display.name) == TEXT_IN, 10, what="the desktop's text in the session")
        wait_for(lambda: clip_stats().get("sent", 0) >= 1 and clip_stats().get("received", 0) >= 1, 5,
                 what="both counted in the client's stats")  # fmt: skip
    finally:
        for o in owners:
            o.kill()
            o.wait(5)
        Procs.kill(client)
        stack.close()

"""Issue 22 item 6: a page that lost its gateway and reconnected keeps what a remote desktop has:
the sound resumes (once input wakes the session the drop put to sleep) and the clipboard syncs both ways again, through real processes (an ``x11:``
program playing a tone, the node on a display this test can reach with ``xclip``, the gateway
killed with SIGKILL and started again on the same port, headless Chromium)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import redis
from helpers import Procs, missing_prerequisite, session_field, start_pool, wait_for

from cloudq.keys import Keys


def test_after_a_reconnect_the_page_plays_sound_and_syncs_the_clipboard_again(
    r: redis.Redis, keys: Keys, procs: Procs, tmp_path: Path
) -> None:
    from test_audio import tone_app
    from test_clipboard import TEXT_IN, TEXT_OUT, clipboard_page, xclip_in, xclip_out
    from test_gateway_browser import HAVE_BROWSER, Gateway, drag, stats

    from cloudq.workers.apps.x11 import DisplayManager

    if not HAVE_BROWSER:
        missing_prerequisite("chromium and chromium-driver are not installed")
    if shutil.which("xclip") is None:
        missing_prerequisite("xclip is not installed (apt: xclip)")
    app, node_args = tone_app(tmp_path)
    with DisplayManager(320, 240) as dm:
        start_pool(r, keys, procs, 1, app, (*node_args, "--display", dm.name), users=("alice",),
                   grace=30, idle_timeout=30)  # fmt: skip
        gw = Gateway(procs).start()
        driver = clipboard_page(gw, str(tmp_path / "profile"))
        owner: subprocess.Popen[bytes] | None = None
        try:

            def st(name: str) -> dict[str, Any]:
                return (stats(driver) or {}).get(name) or {}

            wait_for(lambda: st("audio").get("frames", 0) >= 25, 30, what="sound before the reconnect")
            sid = stats(driver)["sid"]
            connects = stats(driver)["connects"]
            gw.kill()
            wait_for(lambda: session_field(r, keys, sid) == "disconnected", 10, what="the page gone")
            gw.start()  # same port: the page's backoff finds it
            wait_for(lambda: stats(driver)["connects"] > connects, 20, what="the page reconnected")
            assert stats(driver)["sid"] == sid

            # the drop put the session to sleep (its heartbeat lapsed); the user's next input wakes
            # it, and the sound resumes on the new socket (its relay starts at the stream's end)
            frames = st("audio").get("frames", 0)
            drag(driver, [(100, 100), (120, 110)])
            wait_for(
                lambda: st("audio").get("frames", 0) >= frames + 25, 15, what="sound after the reconnect"
            )
            # the session's clipboard reaches the page on the new socket
            received = st("clipboard").get("received", 0)
            owner = xclip_in(dm.name, TEXT_OUT)
            wait_for(
                lambda: st("clipboard").get("received", 0) > received, 10, what="a copy after the reconnect"
            )
            # and the page's paste reaches the session
            driver.execute_script(
                "const c = document.getElementById('screen'); c.focus();"
                "const dt = new DataTransfer(); dt.setData('text/plain', arguments[0]);"
                "document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));",
                TEXT_IN,
            )
            wait_for(lambda: xclip_out(dm.name) == TEXT_IN, 10, what="a paste after the reconnect")
            assert st("audio").get("errors", 0) == 0
        finally:
            if owner is not None:
                owner.kill()
                owner.wait(5)
            driver.quit()
            procs.stop_all()  # before the display goes

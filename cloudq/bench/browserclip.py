"""``cloudq bench browser``'s clipboard rows: how long a paste in the page takes to become the
session's CLIPBOARD, and a program's copy to reach the page.

Its own run: embedded Valkey, central, worker, one ``x11:xterm`` node on a display this benchmark
owns (so it can run ``xclip`` there, as a program in the session would), ``cloudq gateway``, and
headless Chromium logged in with the clipboard permissions granted (CDP). Per sample, a unique text:

- **paste → remote selection**: the page dispatches a ``paste`` event with the text (``Date.now()``
  just before), the benchmark polls ``xclip -o`` on the session's display every 2 ms until it
  returns the text (``time.time()``);
- **remote copy → page**: ``xclip -i`` on the session's display takes CLIPBOARD with the text
  (``time.time()`` just before), the page polls its ``cloudqStats.clipboard.received`` every
  millisecond until it counts it (``Date.now()``). The node looks at the clipboard at most once a
  second (``CLIP_POLL``) and only while the session is awake (a pointer move in the page before
  each sample keeps it so), so this one is dominated by that poll: up to 1 s by design.

Wall clocks of one host; pastes 1.1 s apart (the gateway takes one clipboard message a second),
copies 300 ms apart, each after the previous one arrived.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from typing import Any

from cloudq.bench.browser import Browser, _free_port, _healthy
from cloudq.bench.media import Rig, _wait
from cloudq.percentile import percentile

PASTE = r"""
const c = document.getElementById('screen'); c.focus();
const dt = new DataTransfer(); dt.setData('text/plain', arguments[0]);
const t = Date.now();
document.dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true}));
return t;
"""
# the user is there: a pointer move over the canvas (input keeps the session awake; asleep the node
# does not look at the clipboard)
NUDGE = r"""
const c = document.getElementById('screen'), r = c.getBoundingClientRect();
c.dispatchEvent(new PointerEvent('pointermove', {clientX: r.left + 10 + Math.random() * 50,
                                                 clientY: r.top + 10, bubbles: true}));
"""
# resolves with Date.now() once the page counted one more clipboard text from the session
RECEIVED = r"""
const [before, done] = [arguments[0], arguments[arguments.length - 1]];
const t0 = performance.now();
(async () => {
  const s = window.cloudqStats;
  while (((s.clipboard || {}).received || 0) <= before && performance.now() - t0 < 5000)
    await new Promise((r) => setTimeout(r, 1));
  done(((s.clipboard || {}).received || 0) > before ? Date.now() : null);
})();
"""


def _xclip_out(display: str) -> str:
    got = subprocess.run(["xclip", "-o", "-selection", "clipboard"], env={**os.environ, "DISPLAY": display},
                         capture_output=True, timeout=5, check=False)  # fmt: skip
    return got.stdout.decode(errors="replace") if got.returncode == 0 else ""


def run(samples: int = 20) -> dict[str, Any]:
    from cloudq.central.auth import Users
    from cloudq.workers.apps.x11 import DisplayManager

    rig = Rig()
    browser: Browser | None = None
    owners: list[subprocess.Popen[bytes]] = []
    paste: list[float] = []
    copy: list[float] = []
    try:
        with DisplayManager(640, 360) as dm:
            Users(rig.r, rig.keys).add("web", "pw", cost=4)
            rig.spawn("node", "--id", "xterm1", "--host", "bench", "--app", "x11:xterm", "--size", "640x360",
                      "--display", dm.name)  # fmt: skip
            _wait(lambda: rig.r.zcard(rig.keys.pool) == 1, 30, "the x11 node registered")
            port = _free_port()
            rig.spawn("gateway", "--host", "127.0.0.1", "--port", str(port))
            url = f"http://127.0.0.1:{port}"
            _wait(lambda: _healthy(url), 20, "the gateway")
            browser = Browser(url, permissions=("clipboardReadWrite", "clipboardSanitizedWrite"))
            d = browser.d
            for _ in range(samples):
                text = f"cloudq {uuid.uuid4().hex}"
                t0 = d.execute_script(PASTE, text) / 1000
                _wait(lambda text=text: _xclip_out(dm.name) == text, 10, "the paste on CLIPBOARD")
                paste.append((time.time() - t0) * 1000)
                time.sleep(1.1)  # the gateway takes one clipboard message a second (burst 4)
            for _ in range(samples):
                d.execute_script(NUDGE)
                before = (browser.stats().get("clipboard") or {}).get("received", 0)
                text = f"copied {uuid.uuid4().hex}"
                t0 = time.time()
                p = subprocess.Popen(["xclip", "-quiet", "-selection", "clipboard", "-i"],
                                     env={**os.environ, "DISPLAY": dm.name}, stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                owners.append(p)
                assert p.stdin is not None
                p.stdin.write(text.encode())
                p.stdin.close()
                got = d.execute_async_script(RECEIVED, before)
                if got is not None:
                    copy.append(got - t0 * 1000)
                time.sleep(0.3)
            rig.group.stop_all()  # before the display goes
    finally:
        for p in owners:
            p.kill()
            p.wait(5)
        if browser is not None:
            browser.close()
        rig.close()

    def summary(v: list[float]) -> dict[str, Any]:
        return {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)} if v else {"n": 0}

    return {"paste_to_selection_ms": summary(paste), "copy_to_page_ms": summary(copy)}

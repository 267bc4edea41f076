"""``cloudq bench browser``: input -> decoded frame in a real browser, next to the Python client.

One run starts its own embedded Valkey, a central server, an RQ worker, two ``probe`` nodes at
1280x720 30 fps and a ``cloudq gateway``; user ``py`` logs in with the Python client kernel (player +
input sender + :class:`~cloudq.client.stats.StatsSink`) in this process, user ``web`` logs in through
the gateway's page in headless Chromium (Selenium). Both figures are measured the same way (see
:mod:`cloudq.client.stats`): from sending an input event (``time.time()`` / ``Date.now()``) to decoding
the first frame whose capture time is later; in the page that is the WebCodecs output callback after
the frame is drawn on the canvas. Inputs go one at a time (the next after the previous one was
answered, then a random 30-70 ms pause, so inputs land at random phases of the frame clock), in
alternating blocks (Python, browser, Python, browser, ...) so a busy moment of the machine does not
land on one side only; each block starts with a few unmeasured inputs that wake its node.

Then a resize row: a third node runs ``x11:xterm``; user ``rs`` logs in with a second page and its
window is set to alternating sizes (CDP device metrics); each time, the page's own figure
(``cloudqStats.resize.lastMs``: from sending the new size to decoding the first frame of that
size; the page's 300 ms debounce comes before it) is taken.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import tempfile
import time
import urllib.request
from typing import Any

from cloudq.bench.media import Rig, _wait
from cloudq.bench.report import machine, write_section
from cloudq.client.kernel import Kernel
from cloudq.client.launcher import Launcher
from cloudq.client.stats import StatsSink
from cloudq.percentile import percentile
from cloudq.settings import Settings

SIZE = (1280, 720)
WARMUP = 5
RESIZES = 20
WAKE = r"""
const c = document.getElementById('screen'), r = c.getBoundingClientRect();
c.dispatchEvent(new PointerEvent('pointermove', {clientX: r.left + 10, clientY: r.top + 10, bubbles: true}));
"""
WINDOWS = ((900, 600), (1200, 800))  # CSS pixels, device pixel ratio 1

# Runs in the page: ``n`` pointer moves over the canvas, each after the previous one was answered
# (the page's latency sample count went up) and a random pause; returns the page's samples.
PAGE_LOOP = r"""
const [n, warmup, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
const c = document.getElementById('screen');
const s = window.cloudqStats;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
(async () => {
  const samples = [];
  let unanswered = 0;
  for (let i = 0; i < n + warmup; i++) {
    const r = c.getBoundingClientRect();
    const before = s.latency.n, last = s.latency.last;
    const x = r.left + 5 + ((i * 37) % Math.max(1, r.width - 10)), y = r.top + r.height / 2;
    c.dispatchEvent(new PointerEvent('pointermove', {clientX: x, clientY: y, bubbles: true}));
    const t0 = performance.now();
    while (s.latency.n === before && performance.now() - t0 < 5000) await sleep(1);
    if (s.latency.n === before) unanswered++;
    else if (i >= warmup) samples.push(s.latency.last);
    await sleep(30 + Math.random() * 40);
  }
  done({samples, unanswered});
})().catch((e) => done({error: String(e)}));
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PythonClient:
    """The ``cloudq connect`` kernel with the client's own latency measurement."""

    def __init__(self, rig: Rig) -> None:
        self.launcher = Launcher(rig.r, rig.keys)
        self.ticket = self.launcher.login("py", "pw")
        self.stats = StatsSink()
        self.kernel = Kernel(
            rig.r,
            rig.keys,
            self.ticket.sid,
            Settings.load(rig.r, rig.keys),
            [self.stats],
            on_input=lambda: self.launcher.mark_activity(self.ticket.sid),
        ).start()
        _wait(lambda: self.stats.frames > 0, 30, "the Python client's first frame")

    def block(self, n: int, warmup: int) -> list[float]:
        out: list[float] = []
        for i in range(n + warmup):
            count = len(self.stats.latencies_ms)
            ev = self.kernel.input.send("mouse_move", x=5 + (i * 37) % 1200, y=360)
            self.stats.on_sent(ev)
            _wait(lambda c=count: len(self.stats.latencies_ms) > c, 5, "an answer to the input")
            if i >= warmup:
                assert self.stats.last_latency_ms is not None
                out.append(self.stats.last_latency_ms)
            time.sleep(random.uniform(0.03, 0.07))
        return out

    def close(self) -> None:
        self.kernel.close()
        self.launcher.logout(self.ticket.token)


class Browser:
    def __init__(self, url: str, user: str = "web", permissions: tuple[str, ...] = ()) -> None:
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
            from selenium.webdriver.common.by import By
        except ImportError:
            raise RuntimeError("bench browser needs selenium: pip install selenium") from None
        chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if not (chromium and driver):
            raise RuntimeError(
                "bench browser needs chromium and chromedriver (apt-get install chromium chromium-driver)"
            )
        self.profile = tempfile.mkdtemp(prefix="cloudq-bench-chrome-")
        opts = webdriver.ChromeOptions()
        opts.binary_location = chromium
        for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--window-size=1400,900", f"--user-data-dir={self.profile}",
                  "--autoplay-policy=no-user-gesture-required"):  # fmt: skip
            opts.add_argument(a)
        self.d = webdriver.Chrome(service=Service(driver), options=opts)
        self.d.set_script_timeout(600)
        if permissions:  # what a user would grant when the page asks (e.g. clipboard access)
            self.d.execute_cdp_cmd(
                "Browser.grantPermissions", {"origin": url, "permissions": list(permissions)}
            )
        self.d.get(url + "/")
        _wait(lambda: self.d.find_element(By.ID, "login").is_displayed(), 20, "the login form")
        self.d.find_element(By.NAME, "user").send_keys(user)
        self.d.find_element(By.NAME, "password").send_keys("pw")
        self.d.find_element(By.CSS_SELECTOR, "#login button[type=submit]").click()
        _wait(lambda: self.stats()["frames"] > 0, 30, "the page's first frame")
        self.codec = self.stats()["codec"]

    def stats(self) -> dict[str, Any]:
        return self.d.execute_script("return window.cloudqStats || {frames: 0}")

    def block(self, n: int, warmup: int) -> list[float]:
        got = self.d.execute_async_script(PAGE_LOOP, n, warmup)
        if "error" in got:
            raise RuntimeError(f"page loop failed: {got['error']}")
        return [float(v) for v in got["samples"]]

    def resizes(self, n: int) -> list[float]:
        """Set the window to each of :data:`WINDOWS` in turn, ``n`` times; ms from the page sending
        each size to its first decoded frame of that size."""
        out = []
        for i in range(n):
            w, h = WINDOWS[i % len(WINDOWS)]
            # a resize does not wake a sleeping session (a user's input does): the pointer over it
            self.d.execute_script(WAKE)
            _wait(lambda: self.stats()["state"] == "active", 10, "the session awake")
            before = self.stats()["resize"]["applied"]
            self.d.execute_cdp_cmd(
                "Emulation.setDeviceMetricsOverride",
                {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False},
            )
            _wait(lambda b=before: self.stats()["resize"]["applied"] > b, 10, "a frame at the new size")
            out.append(float(self.stats()["resize"]["lastMs"]))
        return out

    def close(self) -> None:
        self.d.quit()
        shutil.rmtree(self.profile, ignore_errors=True)


def run(
    samples: int = 300, blocks: int = 6, clipboard_samples: int = 20, audio_seconds: float = 8.0
) -> dict[str, Any]:
    """Input latency (Python client vs page), then the clipboard rows (``clipboard_samples``, 0 =
    skip: :mod:`cloudq.bench.browserclip`) and the sound rows (``audio_seconds`` of
    :mod:`cloudq.bench.audio`, 0 = skip), each in its own run."""
    result = _input_latency(samples, blocks)
    if clipboard_samples:
        from cloudq.bench import browserclip

        result["clipboard"] = browserclip.run(clipboard_samples)
    if audio_seconds:
        from cloudq.bench import audio

        result["audio"] = {k: v for k, v in audio.run(audio_seconds).items() if k != "table"}
    result["table"] = table(result)
    return result


def _input_latency(samples: int, blocks: int) -> dict[str, Any]:
    w, h = SIZE
    result: dict[str, Any] = {"machine": machine(), "size": f"{w}x{h}", "samples": samples}
    rig = Rig()
    from cloudq.central.auth import Users

    users = Users(rig.r, rig.keys)
    for u in ("py", "web", "rs"):
        users.add(u, "pw", cost=4)
    browser = py = None
    try:
        for i in (1, 2):
            rig.spawn(
                "node",
                "--id",
                f"probe{i}",
                "--host",
                "bench",
                "--app",
                "probe",
                "--size",
                f"{w}x{h}",
                "--fps",
                "30",
            )
        _wait(lambda: rig.r.zcard(rig.keys.pool) == 2, 30, "two nodes registered")
        port, admin_port = _free_port(), _free_port()
        rig.spawn("gateway", "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin_port))
        url = f"http://127.0.0.1:{port}"
        _wait(lambda: _healthy(url), 20, "the gateway")
        py = PythonClient(rig)
        browser = Browser(url)
        per = max(1, samples // (blocks // 2 or 1))
        lat: dict[str, list[float]] = {"python": [], "browser": []}
        for _ in range(max(1, blocks // 2)):
            lat["python"] += py.block(per, WARMUP)
            lat["browser"] += browser.block(per, WARMUP)
        with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/stats", timeout=5) as resp:
            result["gateway"] = json.loads(resp.read())["video_ms_p50"]
        s = browser.stats()
        result["page"] = {
            k: s.get(k)
            for k in (
                "frames",
                "keyframes",
                "gaps",
                "decodeErrors",
                "codec",
                "transitMs",
                "decodeMs",
                "drawMs",
            )
        }
        for name, v in lat.items():
            result[name] = {"p50": percentile(v, 50), "p99": percentile(v, 99), "n": len(v)}
        result["p50_difference_ms"] = result["browser"]["p50"] - result["python"]["p50"]
        result["resize"] = _resize_run(rig, url)
    finally:
        if browser is not None:
            browser.close()
        if py is not None:
            py.close()
        rig.close()
    return result


def _resize_run(rig: Rig, url: str) -> dict[str, Any]:
    """The resize row: an x11:xterm node, user ``rs`` in a second page, :data:`RESIZES` resizes."""
    w, h = SIZE
    rig.spawn("node", "--id", "xterm", "--host", "bench", "--app", "x11:xterm", "--size", f"{w}x{h}",
              "--max-size", "1920x1200", "--fps", "30")  # fmt: skip
    _wait(lambda: b"xterm" in rig.r.zrange(rig.keys.pool, 0, -1), 30, "the xterm node registered")
    page = Browser(url, "rs")
    try:
        _wait(lambda: page.stats()["resize"]["applied"] >= 1, 20, "the page's first size applied")
        ms = page.resizes(RESIZES)
    finally:
        page.close()
    return {"p50": percentile(ms, 50), "max": max(ms), "n": len(ms)}


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


def table(x: dict[str, Any]) -> str:
    py, br = x["python"], x["browser"]
    rows = [
        "| input → decoded frame, probe " + x["size"] + " 30 fps | p50 | p99 | n |",
        "|---|---|---|---|",
        f"| Python client (`cloudq connect` kernel, PyAV) | {py['p50']:.1f} ms | {py['p99']:.1f} ms | {py['n']} |",
        f"| browser (headless Chromium, WebCodecs, via `cloudq gateway`) | {br['p50']:.1f} ms | {br['p99']:.1f} ms | {br['n']} |",
        f"| browser minus Python, p50 (target ≤ +5 ms) | {x['p50_difference_ms']:+.1f} ms | | |",
    ]
    rs = x.get("resize")
    if rs:
        rows += [
            "",
            "| page resize → first decoded frame at the new size, x11:xterm | p50 | max | n |",
            "|---|---|---|---|",
            f"| size sent (after the 300 ms debounce) → frame of that size | {rs['p50']:.0f} ms | {rs['max']:.0f} ms | {rs['n']} |",
        ]
    for key, label in (
        ("paste_to_selection_ms", "paste in the page → the session's CLIPBOARD (xclip -o there)"),
        ("copy_to_page_ms", "a program's copy → the page has it (node polls once a second)"),
    ):
        c = (x.get("clipboard") or {}).get(key) or {}
        if c.get("n"):
            rows.append(f"| {label} | {c['p50']:.1f} ms | {c['p99']:.1f} ms | {c['n']} |")
    a = x.get("audio") or {}
    for key, label in (("to_page", "a program's sound → decoded in the page"),
                       ("to_output", "a program's sound → the speakers (page's estimate)")):  # fmt: skip
        v = a.get(key) or {}
        if v.get("n"):
            rows.append(f"| {label} | {v['p50']:.1f} ms | {v['p99']:.1f} ms | {v['n']} |")
    return "\n".join(rows)


def write_markdown(result: dict[str, Any], path: str) -> None:
    page, gw = result["page"], result["gateway"]
    body = f"""Through real processes: embedded Valkey, central, RQ worker, two `probe` nodes at
{result["size"]} 30 fps, and `cloudq gateway`. User `py` runs the Python client kernel in the
benchmark process; user `web` logs in through the gateway's page in headless Chromium (Selenium,
`--disable-gpu`: software decoding). Both latencies are measured the same way, by the client
itself: from sending an input (wall clock) to decoding the first frame rendered after it (in the
page: the WebCodecs output callback, before drawing to the canvas). One input at a time, 30-70 ms
apart, in alternating blocks (Python, browser, ...), each block after a few unmeasured inputs.
The resize row: a third node runs `x11:xterm`, a second page (user `rs`) is set to {WINDOWS[0][0]}x{WINDOWS[0][1]}
and {WINDOWS[1][0]}x{WINDOWS[1][1]} in turn (CDP device metrics); the page times each from sending the size to
its first decoded frame of that size (RandR on the node's Xvfb, xterm refitted and redrawn, a
new encoder's IDR); the node applies at most one resize per 0.25 s.

{result["table"]}

Where a browser frame's time goes (medians over the last 200 frames, each side's own window, so they
need not add up): node capture → packet in the page {page["transitMs"]["p50"]} ms; capture → read by the
gateway {gw["capture_to_gateway"]} ms (encode, XADD, XREAD); gateway → socket {gw["gateway_to_socket"]} ms; packet → WebCodecs output {page["decodeMs"]["p50"]} ms;
input sent by the page → read by the gateway {gw.get("page_input_to_gateway")} ms, → its XADD answered {gw.get("gateway_input_to_xadd")} ms
(the node has the input before that answer comes back);
output → drawn on the 2D canvas {page["drawMs"]["p50"]} ms (not in the latency above, as the Python
client's figure has no display step either). Page counters at the end: {page["frames"]} frames,
{page["keyframes"]} keyframes, {page["gaps"]} gaps, {page["decodeErrors"]} decode errors, codec
`{page["codec"]}`. Machine: {result["machine"]}; the machine is shared, so figures move between runs
by several ms (the alternating blocks keep both clients under the same load).
Rerun: `cloudq bench browser --write BENCHMARKS.md` (`--json` for JSON; needs `chromium`,
`chromium-driver` and `pip install selenium`)."""
    write_section("Browser", body, path)

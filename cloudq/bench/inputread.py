"""``cloudq bench reader``: what the node's input reader costs the server per input event.

One embedded Valkey; a writer XADDs a person's input (a small entry, ``rate`` a second) to one
stream while a real :class:`~cloudq.workers.reader.StreamReader` reads it and a quiet control
stream, as a node does, handing each batch to a
consumer thread that advances the read position as the node loop does. Two readers take turns,
``rounds`` times each (the machine is shared: medians of alternating phases):

- **script on every read** (``script_every=0``): the bounded read script pipelined behind every
  blocking ``XREAD`` wake-up, as the node read before;
- **fast reads** (the default): the ``XREAD``'s own entry is the read between two script runs.

Figures per phase: Valkey's CPU (its process CPU clock, ns) per event above its floor (the same
server, same writer connection, no reader, nothing written), server commands per event (INFO
commandstats, a script's inner calls included), script runs per event.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from cloudq.bench.report import machine, write_section
from cloudq.embedded import EmbeddedServer
from cloudq.percentile import percentile
from cloudq.procstat import cpu_ns
from cloudq.workers.reader import SCRIPT_EVERY, StreamReader

SECTION = "Node input reader: Valkey CPU per input event"
READERS = {"script on every read": 0.0, "fast reads (default)": SCRIPT_EVERY}
ENTRY = {b"m": b"x" * 60}
"""About the size of a packed mouse event."""


def _commands(r: redis.Redis) -> dict[str, int]:
    return {k: int(v["calls"]) for k, v in r.info("commandstats").items()}


def _phase(
    pid: int, r: redis.Redis, url: str, rate: float, seconds: float, script_every: float | None
) -> dict:
    """``rate`` XADDs a second for ``seconds`` read by a reader with ``script_every``; None: the
    floor (no reader, nothing written, the writer's connection idle)."""
    stream, control = f"in:{time.monotonic_ns()}", f"ctl:{time.monotonic_ns()}"
    position = {control: r.xadd(control, {b"m": b"start"}), stream: r.xadd(stream, ENTRY)}
    reader = None
    read = [0]
    if script_every is not None:
        reader = StreamReader(
            redis.Redis.from_url(url), lambda: dict(position), block=1.0, trim=lambda n: n == stream,
            script_every=script_every,
        )  # fmt: skip
        reader.start()

        def consume(rd: StreamReader = reader) -> None:
            while not rd.stop.is_set():
                batch = rd.next(0.2)
                if isinstance(batch, Exception):
                    raise batch
                for key, entries in batch or ():
                    read[0] += len(entries)
                    position[key.decode()] = entries[-1][0]
                if batch is not None:
                    rd.done.set()

        threading.Thread(target=consume, daemon=True).start()
        time.sleep(0.3)  # the reader's first read is blocked
    c0, n0, t0 = cpu_ns(pid), _commands(r), time.monotonic()
    sent = ticks = 0
    while time.monotonic() - t0 < seconds:
        if script_every is not None:
            r.xadd(stream, ENTRY, maxlen=1000, approximate=True)
            sent += 1
        ticks += 1
        time.sleep(max(0.0, t0 + ticks / rate - time.monotonic()))
    end = time.monotonic() + 2.0
    while reader is not None and read[0] < sent and time.monotonic() < end:
        time.sleep(0.01)  # the last entries (their reads are in the window's CPU)
    dt = time.monotonic() - t0
    cpu, n1 = (cpu_ns(pid) - c0) / 1e9, _commands(r)
    if reader is not None:
        reader.close()
    cmds = {k: v - n0.get(k, 0) for k, v in n1.items()}
    for k in ("cmdstat_info",):  # the bench's own
        cmds.pop(k, None)
    return {
        "cpu_ms_per_s": 1000 * cpu / dt,
        "events": sent,
        "read": read[0],
        "seconds": dt,
        "commands": sum(cmds.values()),
        "scripts": cmds.get("cmdstat_evalsha", 0),
    }


def run(rate: float = 30.0, seconds: float = 8.0, rounds: int = 3) -> dict[str, Any]:
    """Alternating phases (floor, then each reader), ``rounds`` times; medians per reader."""
    server = EmbeddedServer().start()
    try:
        assert server.proc is not None
        pid, r = server.proc.pid, redis.Redis.from_url(server.url)
        phases: dict[str, list[dict]] = {"floor": [], **{name: [] for name in READERS}}
        for _ in range(rounds):
            phases["floor"].append(_phase(pid, r, server.url, rate, seconds, None))
            for name, every in READERS.items():
                phases[name].append(_phase(pid, r, server.url, rate, seconds, every))
    finally:
        server.stop()
    floor = percentile([p["cpu_ms_per_s"] for p in phases["floor"]], 50)
    out: dict[str, Any] = {"rate": rate, "seconds": seconds, "rounds": rounds, "floor_ms_per_s": floor}
    for name in READERS:
        ps = phases[name]
        out[name] = {
            "us_per_event": percentile(
                [1000 * (p["cpu_ms_per_s"] - floor) * p["seconds"] / max(1, p["events"]) for p in ps], 50
            ),
            "commands_per_event": percentile([p["commands"] / max(1, p["events"]) for p in ps], 50),
            "scripts_per_event": percentile([p["scripts"] / max(1, p["events"]) for p in ps], 50),
            "read_all": all(p["read"] >= p["events"] for p in ps),
        }
    a, b = (out[name]["us_per_event"] for name in READERS)
    out["ratio"] = a / b if b > 0 else float("nan")
    out["machine"] = machine()
    out["table"] = table(out)
    return out


def table(x: dict[str, Any]) -> str:
    lines = [
        "| reader | Valkey CPU per input event, µs (above its floor), median | server commands per event "
        "| script runs per event | every entry read |",
        "|---|---:|---:|---:|---|",
    ]
    for name in READERS:
        m = x[name]
        lines.append(
            f"| {name} | {m['us_per_event']:.0f} | {m['commands_per_event']:.1f} | {m['scripts_per_event']:.2f} "
            f"| {'yes' if m['read_all'] else 'NO'} |"
        )
    lines.append(f"| Valkey's floor (no reader, nothing written) | {x['floor_ms_per_s']:.2f} ms/s | | | |")
    return "\n".join(lines)


def write_markdown(x: dict[str, Any], path: str) -> None:
    body = f"""One embedded Valkey; a writer adds a small input entry {x["rate"]:g} times a second while a
real `StreamReader` (`workers/reader.py`) reads it and a quiet control stream, as a node does,
{x["seconds"]:g} s per phase, the phases
alternating {x["rounds"]} times (medians). Valkey's CPU from its process CPU clock, minus its
floor measured in the same run; commands from `INFO commandstats` (a script's inner calls
counted).

{x["table"]}

Script on every read / fast reads: **{x["ratio"]:.2f}x** Valkey CPU per input event.

Machine: {x["machine"]}; shared with other work, so compare the ratio.
Rerun: `cloudq bench reader --write BENCHMARKS.md` (`--rate`, `--seconds`, `--rounds`, `--json`)."""
    write_section(SECTION, body, path)

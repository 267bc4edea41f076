"""The node's stream reader (workers/reader.py) on a real server: what it reads, and what a read
costs the server while a person's input comes one entry at a time."""

from __future__ import annotations

import threading
import time

import redis

from cloudq.workers.reader import FAST_READS, OVERSIZE, SCRIPT_EVERY, ReadLimits, StreamReader, stub_size


def _reader(
    r: redis.Redis, streams: dict[str, bytes], limits: ReadLimits, **kw: float
) -> tuple[StreamReader, list]:
    """A reader on ``streams`` whose batches a thread takes at once, advancing the ids (the node
    loop's part); returns it and the list the entries go to."""
    got: list = []
    rd = StreamReader(r, lambda: dict(streams), block=1.0, limits=limits, trim=lambda n: n == "in", **kw)
    rd.start()

    def loop() -> None:
        while not rd.stop.is_set():
            batch = rd.next(0.2)
            if batch is None:
                continue
            assert not isinstance(batch, Exception), batch
            rd.at_handover = (rd.script_reads, rd.fast_reads)  # type: ignore[attr-defined]
            for key, entries in batch:
                for eid, fields in entries:
                    got.append(fields)
                    streams[key.decode()] = eid
            rd.done.set()  # the next read starts only now: the counts above are this batch's

    threading.Thread(target=loop, daemon=True).start()
    return rd, got


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_input_one_entry_at_a_time_is_read_in_order_with_the_script_only_now_and_then(r: redis.Redis) -> None:
    """30 entries a second for 2 s: every one read, in order; the bounded script runs a few times a
    second (its period or its read count), not once per entry as when it was pipelined behind
    every wake-up."""
    r.xadd("in", {"n": b"-1"})
    streams = {"ctl": b"$", "in": r.xrevrange("in", count=1)[0][0]}
    rd, got = _reader(r, streams, ReadLimits())
    try:
        time.sleep(0.2)  # the first (script) read is blocked
        before, n, t0 = rd.script_reads, 60, time.monotonic()
        for i in range(n):
            r.xadd("in", {"n": str(i).encode()})
            time.sleep(max(0.0, t0 + (i + 1) / 30 - time.monotonic()))
        _wait(lambda: len(got) == n, 5, "every entry read")
        elapsed = time.monotonic() - t0
        scripts = rd.script_reads - before
    finally:
        rd.close()
    assert [int(f[b"n"]) for f in got] == list(range(n))
    most = elapsed / SCRIPT_EVERY + n / FAST_READS + 2
    assert 1 <= scripts <= most, (
        f"{scripts} script runs for {n} entries in {elapsed:.1f} s (at most {most:.0f})"
    )
    assert scripts < n / 3


def test_an_oversized_entry_between_script_runs_is_a_stub_and_the_next_read_is_the_script(
    r: redis.Redis,
) -> None:
    limits = ReadLimits(max_entry=1024)
    r.xadd("in", {"n": b"0"})
    streams = {"in": r.xrevrange("in", count=1)[0][0]}
    rd, got = _reader(r, streams, limits, script_every=60.0)
    try:
        r.xadd("in", {"n": b"1"})  # the script's read; the next ones are the XREAD's own
        _wait(lambda: len(got) == 1, 5, "the first entry")
        before, fast = rd.at_handover  # type: ignore[attr-defined]
        r.xadd("in", {"big": b"x" * 5000})
        _wait(lambda: len(got) == 2, 5, "the oversized entry")
        scripts, fasts = rd.at_handover  # type: ignore[attr-defined]
        assert scripts == before and fasts > fast, "read by the XREAD alone"
        r.xadd("in", {"n": b"2"})
        _wait(lambda: len(got) == 3, 5, "the entry after it")
        scripts = rd.at_handover[0] - before  # type: ignore[attr-defined]
    finally:
        rd.close()
    assert stub_size(got[1]) == 5000 + len(b"big") and OVERSIZE in got[1]
    assert got[2] == {b"n": b"2"}
    assert scripts >= 1, "after an oversized entry the next read is the bounded script (trim, measure)"


def test_bench_reader_reads_every_event_and_runs_the_script_per_read_only_when_asked() -> None:
    from cloudq.bench import inputread

    x = inputread.run(rate=30, seconds=0.5, rounds=1)
    every, fast = x["script on every read"], x["fast reads (default)"]
    assert every["read_all"] and fast["read_all"]
    assert every["scripts_per_event"] >= 0.9 and fast["scripts_per_event"] < 0.5
    assert fast["commands_per_event"] < every["commands_per_event"]
    assert "| fast reads (default) |" in x["table"]

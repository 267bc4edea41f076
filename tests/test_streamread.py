"""The video stream reading decisions both readers share (:mod:`cloudq.streamread`: the client's
player and the gateway's socket), on real streams in the suite's server."""

from __future__ import annotations

import redis

from cloudq.keys import Keys
from cloudq.streamread import BATCH, MAX_LAG, Cursor, KeyframeScan, before, entry_ms
from cloudq.wire import VideoPacket


def packet(seq: int, keyframe: bool = False) -> dict[str, bytes]:
    return VideoPacket(seq, seq, keyframe, 1.0, b"\x00\x00\x00\x01" + bytes([seq % 256])).pack()


def scanned(r: redis.Redis, key: str, after: bytes = b"0-0", page: int = 4, pages: int = 100) -> KeyframeScan:
    """Run a scan as both readers do; it must end within ``pages`` XREVRANGE pages."""
    scan = KeyframeScan(after, page=page)
    for _ in range(pages):
        if scan.feed(r.xrevrange(key, **scan.page())):
            return scan
    raise AssertionError(f"the scan read more than {pages} pages")


def test_before_is_the_id_xread_must_be_given_to_read_an_entry_first(r: redis.Redis, keys: Keys) -> None:
    key = keys.video("s1")
    ids = [r.xadd(key, packet(0), id=i) for i in ("5-0", "5-1", "7-0", "8-18446744073709551615")]
    r.xadd(key, packet(0), id="9-0")
    for entry_id in [*ids, b"9-0"]:
        got = r.xread({key: before(entry_id)}, count=1)[0][1]
        assert got[0][0] == entry_id, (entry_id, before(entry_id))
    assert before(b"0-0") == b"0-0"
    assert before(b"9-0") == b"8-18446744073709551615"
    assert entry_ms(b"1700000000123-4") == 1700000000123


def test_the_scan_finds_the_newest_valid_keyframe_across_pages(r: redis.Redis, keys: Keys) -> None:
    key = keys.video("s1")
    r.xadd(key, packet(0, keyframe=True), id="1-0")
    kid = r.xadd(key, packet(1, keyframe=True), id="2-0")
    r.xadd(key, {"m": b"\xc1 not a packet"}, id="2-1")  # a bad entry is no keyframe
    for seq in range(2, 13):  # P-frames: more than two pages of 4 back to the keyframe
        r.xadd(key, packet(seq), id=f"{seq + 1}-0")
    tail = r.xadd(key, {"m": b"\xc1 bad"}, id="20-0")
    scan = scanned(r, key, pages=4)  # 16 entries back to the keyframe: each page read once
    assert (scan.found, scan.newest) == (kid, tail)
    assert scanned(r, key, after=kid).found is None  # nothing newer than the keyframe is one
    assert scanned(r, key, after=b"1-0").found == kid
    assert (scanned(r, keys.video("empty")).found, scanned(r, keys.video("empty")).newest) == (None, None)


def test_a_reader_starts_at_the_newest_keyframe_else_at_the_end_asking_for_one(
    r: redis.Redis, keys: Keys
) -> None:
    key = keys.video("s1")
    c = Cursor()
    assert c.start(scanned(r, key)) is False and c.last == b"0-0"  # empty: the first packet is an IDR
    r.xadd(key, packet(0), id="3-0")
    tail = r.xadd(key, packet(1), id="4-0")
    assert c.start(scanned(r, key)) is True and c.last == tail  # P-frames only: ask the node
    kid = r.xadd(key, packet(2, keyframe=True), id="5-0")
    r.xadd(key, packet(3), id="6-0")
    assert c.start(scanned(r, key)) is False and c.last == before(kid)
    assert r.xread({key: c.last}, count=1)[0][1][0][0] == kid  # the picture shows at once


def test_a_reader_is_behind_on_a_full_batch_or_more_than_max_lag_of_stream_time() -> None:
    c = Cursor(max_lag=MAX_LAG, batch=BATCH)
    lag_ms = int(MAX_LAG * 1000)
    assert not c.behind([])
    assert not c.behind([(b"1000-0", {}), (b"%d-0" % (1000 + lag_ms), {})])
    assert c.behind([(b"1000-0", {}), (b"%d-0" % (1001 + lag_ms), {})])
    assert c.behind([(b"1000-%d" % i, {}) for i in range(BATCH)])
    assert not c.behind([(b"1000-%d" % i, {}) for i in range(BATCH - 1)])


def test_a_reader_behind_jumps_only_to_a_keyframe_ahead_of_where_it_would_read(
    r: redis.Redis, keys: Keys
) -> None:
    key = keys.video("s1")
    c = Cursor()
    first = r.xadd(key, packet(0, keyframe=True), id="1-0")
    c.last = first
    for seq in range(1, 5):
        r.xadd(key, packet(seq), id=f"{seq + 1}-0")
    assert not c.jump(scanned(r, key, after=c.last)) and c.last == first  # none ahead: decode through
    next_kid = r.xadd(key, packet(5, keyframe=True), id="6-1")
    c.last = b"6-0"  # the keyframe is the very next entry: nothing to skip
    assert not c.jump(scanned(r, key, after=c.last)) and c.last == b"6-0"
    newest = r.xadd(key, packet(6, keyframe=True), id="9-0")
    r.xadd(key, packet(7), id="10-0")
    c.last = first
    assert c.jump(scanned(r, key, after=c.last)) and c.last == before(newest) != before(next_kid)

"""The H.264 boundary with real PyAV/libx264: keyframes, no B-frames, standalone IDRs, recovery."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from cloudq.bench.floor import measure_floor
from cloudq.codec import (
    DecodeError,
    EncodedPacket,
    H264Decoder,
    H264Encoder,
    Yuv420Picture,
    available_codecs,
    get_decoder,
    get_encoder,
    h264_is_keyframe,
)
from cloudq.probe import read_probe
from cloudq.wire import InputEvent
from cloudq.workers.apps import ProbeApp

W, H, FPS = 320, 240, 30


def probe_stream(n: int, gop_seconds: float = 2.0, force: tuple[int, ...] = ()) -> list[EncodedPacket]:
    app = ProbeApp(W, H)
    enc = H264Encoder(W, H, FPS, gop_seconds=gop_seconds)
    out: list[EncodedPacket] = []
    for i in range(n):
        packets = enc.encode(app.render(i / FPS), i, force_keyframe=i in force)
        assert len(packets) == 1, f"frame {i} gave {len(packets)} packets"
        out.extend(packets)
    enc.close()
    return out


def test_probe_frame_round_trips_through_encoder_and_decoder():
    app = ProbeApp(W, H)
    enc, dec = H264Encoder(W, H, FPS), H264Decoder()
    for i in range(20):
        if i == 5:
            app.handle_input(InputEvent("key", seq=123456789, client_time=1.0, key="a"))
        (packet,) = enc.encode(app.render(i / FPS), i)
        (rgb,) = dec.decode_rgb(packet.data, packet.pts)
        assert rgb.shape == (H, W, 3) and rgb.dtype == np.uint8
        assert read_probe(rgb) == (123456789 if i >= 5 else 0, i)


def test_first_packet_is_a_keyframe_and_later_ones_are_not():
    packets = probe_stream(10)
    assert packets[0].keyframe and h264_is_keyframe(packets[0].data)
    assert not any(p.keyframe or h264_is_keyframe(p.data) for p in packets[1:])


def test_force_keyframe_yields_an_idr_with_headers():
    packets = probe_stream(12, force=(7,))
    assert [i for i, p in enumerate(packets) if p.keyframe] == [0, 7]
    assert packets[7].data.startswith(b"\x00\x00\x00\x01\x67")  # SPS repeated in front of the IDR


def test_periodic_idr_every_gop_seconds_of_pts():
    packets = probe_stream(40, gop_seconds=0.5)  # 15 ticks at 30 fps
    assert [i for i, p in enumerate(packets) if p.keyframe] == [0, 15, 30]


def test_periodic_idr_is_timed_on_pts_not_frame_count():
    enc = H264Encoder(W, H, FPS, gop_seconds=1.0, time_base=Fraction(1, 1000))
    frame = np.zeros((H, W, 3), np.uint8)
    keys = [enc.encode(frame, ms)[0].keyframe for ms in (0, 100, 900, 1000, 1500, 2100)]
    assert keys == [True, False, False, True, False, True]


def test_no_b_frames_one_packet_per_frame_and_pts_in_order():
    packets = probe_stream(30)
    assert [p.pts for p in packets] == list(range(30))


def test_pts_must_increase():
    enc = H264Encoder(W, H, FPS)
    frame = np.zeros((H, W, 3), np.uint8)
    enc.encode(frame, 5)
    with pytest.raises(ValueError, match="pts"):
        enc.encode(frame, 5)


def test_wrong_frame_shape_is_refused():
    enc = H264Encoder(W, H, FPS)
    with pytest.raises(ValueError, match="uint8 RGB"):
        enc.encode(np.zeros((H, W + 2, 3), np.uint8), 0)
    with pytest.raises(ValueError, match="uint8 RGB"):
        enc.encode(np.zeros((H, W, 3), np.float32), 0)


def test_non_contiguous_frames_are_accepted():
    enc, dec = H264Encoder(W, H, FPS), H264Decoder()
    frame = ProbeApp(W, H).render(0.0)
    view = np.asfortranarray(frame)
    (packet,) = enc.encode(view, 0)
    assert read_probe(dec.decode_rgb(packet.data)[0]) == (0, 0)


def test_closed_encoder_refuses_to_encode():
    enc = H264Encoder(W, H, FPS)
    enc.close()
    enc.close()
    with pytest.raises(RuntimeError):
        enc.encode(np.zeros((H, W, 3), np.uint8), 0)


def test_a_later_keyframe_decodes_on_its_own():
    packets = probe_stream(25, force=(10,))
    dec = H264Decoder()
    assert dec.decode(packets[3].data) == []  # joined mid-GOP: dropped until a keyframe
    assert dec.waiting_for_keyframe
    frames = [dec.to_rgb(f) for p in packets[10:] for f in dec.decode(p.data, p.pts)]
    assert not dec.waiting_for_keyframe
    assert [read_probe(f)[1] for f in frames] == list(range(10, 25))


@pytest.mark.parametrize("garbage", [b"", b"garbage" * 10, b"\x00\x00\x00\x01" + bytes(range(256)) * 4])
def test_decoder_raises_decode_error_on_garbage_and_recovers_at_next_keyframe(garbage):
    packets = probe_stream(20, force=(12,))
    dec = H264Decoder()
    for p in packets[:5]:
        assert len(dec.decode(p.data)) == 1
    with pytest.raises(DecodeError):
        dec.decode(garbage)
    assert dec.waiting_for_keyframe
    assert dec.decode(packets[5].data) == []  # refs are gone: P-frames are dropped, not mis-decoded
    out = [dec.to_rgb(f) for p in packets[6:] for f in dec.decode(p.data)]
    assert [read_probe(f)[1] for f in out] == list(range(12, 20))


def test_decoder_rejects_non_bytes():
    with pytest.raises(DecodeError):
        H264Decoder().decode("not bytes")  # type: ignore[arg-type]


def test_reset_waits_for_the_next_keyframe():
    packets = probe_stream(20, force=(15,))
    dec = H264Decoder()
    dec.decode(packets[0].data)
    dec.reset()
    assert dec.waiting_for_keyframe
    assert all(dec.decode(p.data) == [] for p in packets[1:15])
    assert len(dec.decode(packets[15].data)) == 1


def test_registry_builds_h264_and_refuses_unknown_codecs():
    assert "h264" in available_codecs()
    enc = get_encoder("h264", W, H, FPS, bitrate=500_000)
    assert isinstance(enc, H264Encoder)
    assert enc.params.codec == "h264" and (enc.params.width, enc.params.height) == (W, H)
    assert isinstance(get_decoder("h264"), H264Decoder)
    with pytest.raises(ValueError, match="unknown codec"):
        get_encoder("vp9", W, H, FPS)
    with pytest.raises(ValueError, match="unknown codec"):
        get_decoder("av1")


def test_odd_sizes_are_refused():
    with pytest.raises(ValueError, match="even"):
        H264Encoder(321, 240, FPS)


def test_720p_probe_round_trip_and_latency_floor():
    result = measure_floor(1280, 720, frames=40, warmup=0)
    assert result["probe_errors"] == 0
    assert result["keyframes"] >= 1
    assert 0 < result["total_p50_ms"] <= result["total_p99_ms"] <= result["total_max_ms"]
    assert result["total_p50_ms"] < 100  # generous: shared CI hosts


def test_the_stream_says_it_is_bt601_limited_range_at_every_size():
    # a decoder that has to guess takes an HD picture for BT.709 and shifts every colour
    for w, h in ((W, H), (1280, 720)):
        enc, dec = H264Encoder(w, h, FPS), H264Decoder()
        red = np.zeros((h, w, 3), np.uint8)
        red[..., 0] = 200
        (packet,) = enc.encode(red, 0)
        (frame,) = dec.decode(packet.data, packet.pts)
        assert (frame.colorspace, frame.color_range) == (6, 1), (w, h)  # AVCOL_SPC_SMPTE170M, MPEG range
        rgb = dec.to_rgb(frame)
        assert np.abs(rgb[h // 2, w // 2].astype(int) - (200, 0, 0)).max() <= 6, (w, h)
        enc.close()


def _changing_frames(
    n: int, seed: int, size: tuple[int, int] = (W, H)
) -> list[tuple[np.ndarray, tuple[int, int, int, int]]]:
    """Random pictures, each a copy of the one before with one random rectangle repainted (some
    touching the top or bottom edge, odd rows included), and that rectangle."""
    w, h = size
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    out = [(frame, (0, 0, w, h))]
    for i in range(n - 1):
        frame = frame.copy()
        y0 = 0 if i % 5 == 1 else int(rng.integers(0, h - 1))
        y1 = h if i % 5 == 2 else int(rng.integers(y0 + 1, min(h, y0 + 40) + 1))
        x0 = int(rng.integers(0, w - 1))
        x1 = int(rng.integers(x0 + 1, w + 1))
        frame[y0:y1, x0:x1] = rng.integers(0, 256, (y1 - y0, x1 - x0, 3), dtype=np.uint8)
        out.append((frame, (x0, y0, x1, y1)))
    return out


@pytest.mark.parametrize("size", [(W, H), (1280, 720)])
def test_converting_only_the_changed_rows_gives_the_same_picture_as_converting_all(size):
    """The partial conversion is exact: a picture told what changed holds the same Y, U and V bytes
    as the whole picture converted afresh, while converting a fraction of the rows."""
    w, h = size
    partial, fresh = Yuv420Picture(w, h), Yuv420Picture(w, h)
    frames = _changing_frames(16, seed=3, size=size)
    for i, (frame, box) in enumerate(frames):
        partial.update(frame, box)
        fresh.update(frame)
        for name, got, want in zip("YUV", partial.planes(), fresh.planes(), strict=True):
            assert np.array_equal(got, want), f"picture {i}: plane {name} differs"
    assert fresh.rows_converted == len(frames) * h
    assert partial.rows_converted < fresh.rows_converted / 3


def test_nothing_changed_converts_nothing_and_keyframes_convert_in_full():
    """An empty box reuses the picture; a wrong box (the app lied) lasts only until the next
    keyframe, which is converted in full whatever the box says."""
    rng = np.random.default_rng(4)
    first = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
    enc, dec = H264Encoder(W, H, FPS, gop_seconds=1.0), H264Decoder()
    dec.decode_rgb(enc.encode(first, 0)[0].data)
    assert enc.rows_converted == H
    enc.encode(first, 1, changed=(0, 0, 0, 0))
    assert enc.rows_converted == H  # nothing converted
    second = np.full_like(first, 200)
    (p,) = enc.encode(second, 2, changed=(0, 0, 0, 0))  # wrong: everything changed
    assert not p.keyframe
    (shown,) = dec.decode_rgb(enc.encode(second, 3, changed=(0, 0, 0, 0))[0].data)
    assert abs(float(shown.mean()) - 200) > 20  # still the first picture
    (k,) = enc.encode(second, FPS, changed=(0, 0, 0, 0))  # gop of 1 s: a keyframe
    assert k.keyframe and enc.rows_converted == 2 * H
    (shown,) = dec.decode_rgb(k.data)
    assert abs(float(shown.mean()) - 200) < 3

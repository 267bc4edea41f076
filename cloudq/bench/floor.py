"""The latency floor of the media pipeline: RGB -> YUV, encode, decode, YUV -> RGB in one process,
no Redis. Whatever an end-to-end benchmark measures above this is transport and scheduling.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from cloudq.codec import H264Decoder, H264Encoder
from cloudq.percentile import percentile
from cloudq.probe import read_probe
from cloudq.workers.apps import ProbeApp, load_app

logger = logging.getLogger(__name__)

__all__ = ["STAGES", "measure_floor"]

STAGES = ("convert", "encode", "decode", "to_rgb", "total")


def measure_floor(
    width: int = 1280,
    height: int = 720,
    frames: int = 300,
    app: str = "probe",
    fps: float = 30.0,
    bitrate: int = 2_000_000,
    warmup: int = 10,
) -> dict[str, Any]:
    """Time each stage for ``frames`` frames rendered by ``app`` (not counting the render).

    Returns a flat dict: ``{stage}_p50_ms``, ``{stage}_p99_ms``, ``{stage}_max_ms`` for each of
    :data:`STAGES` (``total`` = convert + encode + decode + to_rgb of the same frame), plus
    ``width``, ``height``, ``frames``, ``app``, ``mean_bytes``, ``keyframes`` and, for the probe,
    ``probe_errors`` (frames whose code did not read back as sent; should be 0).
    An app that reports no change is rendered anyway: the floor is per encoded frame.
    """
    if frames < 1:
        raise ValueError("frames must be at least 1")
    source = load_app(app, width, height)
    encoder = H264Encoder(width, height, fps, bitrate=bitrate)
    decoder = H264Decoder()
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    sizes: list[int] = []
    keyframes = probe_errors = 0
    clock = time.perf_counter
    try:
        for i in range(warmup + frames):
            rgb = source.render(i / fps)
            t0 = clock()
            yuv = encoder.to_video_frame(rgb)
            t1 = clock()
            packets = encoder.encode_frame(yuv, i)
            t2 = clock()
            decoded = [f for p in packets for f in decoder.decode(p.data, p.pts)]
            t3 = clock()
            out = [decoder.to_rgb(f) for f in decoded]
            t4 = clock()
            if i < warmup:
                continue
            for stage, dt in zip(STAGES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                times[stage].append(dt)
            sizes.extend(len(p.data) for p in packets)
            keyframes += sum(p.keyframe for p in packets)
            if isinstance(source, ProbeApp):
                try:
                    if not out or read_probe(out[-1])[1] != source.counter - 1:
                        probe_errors += 1
                except ValueError:
                    probe_errors += 1
    finally:
        encoder.close()
    result: dict[str, Any] = {"width": width, "height": height, "frames": frames, "app": app}
    for stage in STAGES:
        ms = [t * 1000.0 for t in times[stage]]
        result[f"{stage}_p50_ms"] = round(percentile(ms, 50), 3)
        result[f"{stage}_p99_ms"] = round(percentile(ms, 99), 3)
        result[f"{stage}_max_ms"] = round(max(ms), 3)
    result["mean_bytes"] = round(float(np.mean(sizes)), 1) if sizes else 0.0
    result["keyframes"] = keyframes
    if isinstance(source, ProbeApp):
        result["probe_errors"] = probe_errors
    logger.info("media latency floor: %s", result)
    return result

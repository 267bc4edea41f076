"""``cloudq demo`` end to end: a real ``cloudq demo`` process, its exit code, summary and MP4s."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import av
import pytest

from cloudq.procs import cloudq_command


@pytest.mark.slow
def test_demo_runs_every_step_it_claims_and_exits_0(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "CLOUDQ_DEMO_DURATION": "15", "CLOUDQ_GATEWAY_PORT": "0"}
    env.pop("CLOUDQ_REDIS_URL", None)
    res = subprocess.run(
        [*cloudq_command(), "demo", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    text = res.stdout
    assert res.returncode == 0, text[-3000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    first = text.splitlines()[0]
    assert first.startswith("gateway: http://127.0.0.1:"), first
    assert "--- cloudq demo" in text and "queue:" in text  # the live table
    summary = text.split("=== summary ===", 1)[1]
    assert "dropper  waited in the queue:" in summary
    assert "times asleep" in summary and "times woken" in summary
    assert "came back to session" in summary
    assert "always-encoding node, awake (measured, baseline)" in summary
    assert "CPU saved by sleeping: about" in summary
    for u in ("drawer", "idler", "dropper"):
        assert f"  {u:<8} " in summary.split("saved data versions", 1)[1]
        with av.open(str(out / f"{u}.mp4")) as c:
            assert sum(1 for _ in c.decode(video=0)) >= 1
    assert re.search(r"all \d+ checks passed", summary) and "FAIL" not in summary


def test_demo_refuses_a_duration_too_short_to_show_anything(tmp_path: Path) -> None:
    res = subprocess.run(
        [*cloudq_command(), "demo", "--duration", "5", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "--duration" in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()

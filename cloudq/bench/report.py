"""BENCHMARKS.md: each benchmark owns one ``## <name>`` section and rewrites only that."""

from __future__ import annotations

import math
import os
import platform
import re
from pathlib import Path
from typing import Any


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({cpu}){mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def write_section(name: str, body: str, path: str | Path = "BENCHMARKS.md") -> Path:
    p = Path(path)
    text = (
        p.read_text()
        if p.exists()
        else "# Benchmarks\n\nNumbers measured on this project's machine; each section says how to rerun it.\n"
    )
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = (
        pattern.sub(lambda m: section + "\n", text)
        if pattern.search(text)
        else text.rstrip() + "\n\n" + section
    )
    p.write_text(text.rstrip() + "\n")
    return p


def json_safe(value: Any) -> Any:
    """Strict JSON: a figure that is not a number (NaN: nothing to measure; infinity: an event
    that never arrived within the window) becomes ``null``; the table says which and why."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value

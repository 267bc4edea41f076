"""One definition each: key names in the Lua scripts come from ``Keys``; one ``/proc`` parser;
one percentile; one default workspace."""

from __future__ import annotations

import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import pytest
import redis
from helpers import wait_for

from cloudq.keys import Keys
from cloudq.percentile import percentile
from cloudq.procstat import alive, cpu_seconds, process_tree, read_stat, tree_cpu
from cloudq.state import LUA_PRELUDE
from cloudq.workers.data import workspace_root
from cloudq.workers.streamer import MediaConfig

SCRIPTS = sorted((Path(str(resources.files("cloudq"))) / "scripts").glob("*.lua"))

# Where a script may still build a key name itself: (file name, line text) of a truly dynamic key.
# None today; a line added here must say why no Keys member can name that key.
INLINE_EXCEPTIONS: set[tuple[str, str]] = set()

# `P ..` (the prefix glued to a name) or `.. ':suffix'`, `.. '{'`, `.. '}'` (a name glued from parts)
INLINE_KEY = re.compile(r"\bP\s*\.\.|\.\.\s*'(:\w|[{}])")


def _code(line: str) -> str:
    """A Lua line without its comment (no script has `--` inside a string)."""
    return line.split("--", 1)[0]


def _key_members() -> list[tuple[str, bool]]:
    """(name, takes an id) of every key ``Keys`` formats (``job_queue`` is an RQ queue name)."""
    out = []
    for name, member in vars(Keys).items():
        if name.startswith("_") or name == "job_queue":
            continue
        if isinstance(member, property):
            out.append((name, False))
        elif callable(member):
            out.append((name, True))
    return out


def test_no_script_builds_a_key_name_inline() -> None:
    assert SCRIPTS, "no scripts found"
    found = [
        f"{f.name}:{n}: {line.strip()}"
        for f in SCRIPTS
        for n, line in enumerate(f.read_text().splitlines(), 1)
        if INLINE_KEY.search(_code(line)) and (f.name, line.strip()) not in INLINE_EXCEPTIONS
    ]
    assert not found, "key names built inline (use the K_*/k_* helpers generated from Keys):\n" + "\n".join(
        found
    )


def test_scripts_use_only_generated_helpers_and_compile(r: redis.Redis) -> None:
    defined = set(re.findall(r"local (?:function )?([kK]_\w+)", LUA_PRELUDE))
    used = {m for f in SCRIPTS for m in re.findall(r"\b([kK]_\w+)\b", re.sub(r"--[^\n]*", "", f.read_text()))}
    assert used and not used - defined, f"helpers the generator does not make: {sorted(used - defined)}"
    lib = next(f for f in SCRIPTS if f.name == "_lib.lua").read_text()
    for f in SCRIPTS:
        if f.name != "_lib.lua":
            r.script_load("\n".join((LUA_PRELUDE, lib, f.read_text())))  # a syntax error raises


@pytest.mark.parametrize("prefix", ["cqt:", "cloudq:", "x'y\\z:"])
def test_each_lua_key_helper_formats_what_keys_formats(r: redis.Redis, prefix: str) -> None:
    members = _key_members()
    lua = ", ".join(f"k_{n}(ARGV[2])" if takes_id else f"K_{n.upper()}" for n, takes_id in members)
    keys = Keys(prefix)
    for sample in ("s42", "alice", "node-7", "a b:{c}"):
        got = [v.decode() for v in r.eval(LUA_PRELUDE + f"\nreturn {{{lua}}}", 0, prefix, sample)]
        want = [getattr(keys, n)(sample) if takes_id else getattr(keys, n) for n, takes_id in members]
        assert got == want
    # the session's keys carry its id as a hash tag, in Lua as in Python
    assert (
        r.eval(LUA_PRELUDE + "\nreturn k_heartbeat(ARGV[2])", 0, prefix, "s9").decode()
        == f"{prefix}session:{{s9}}:hb"
    )


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile([1, 2, 3, 4], 25) == 1.75
    assert percentile([1, 2, 3, 4], 0) == 1 and percentile([1, 2, 3, 4], 100) == 4
    assert percentile([10, 20, 30, 40, 50], 99) == pytest.approx(49.6)
    assert percentile([7], 99) == 7
    assert math.isnan(percentile([], 50))
    assert percentile([1, math.inf, math.inf], 99) == math.inf  # never inf - inf
    rnd = random.Random(1)
    for n in range(1, 30):
        xs = [rnd.uniform(0, 100) for _ in range(n)]
        assert percentile(xs, 50) == pytest.approx(statistics.median(xs))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_proc_stat_parses_odd_names_children_zombies_and_cpu() -> None:
    code = "open('/proc/self/comm','w').write('a) b (c')\nimport time\nt=time.process_time()\nwhile time.process_time()-t<0.3: pass\ntime.sleep(30)"
    p = subprocess.Popen([sys.executable, "-c", code])
    try:
        st = wait_for(lambda: (s := read_stat(p.pid)) and s.comm == "a) b (c" and s.state == "S" and s, 10)
        assert st.ppid == os.getpid() and st.pgrp == os.getpgrp()
        assert p.pid in process_tree(os.getpid())
        assert 0.25 <= cpu_seconds([p.pid]) < 5
        assert tree_cpu(os.getpid()) >= cpu_seconds([p.pid])
        p.kill()
        wait_for(lambda: not alive(p.pid), 5, what="a zombie")
        assert read_stat(p.pid).state == "Z" and p.pid not in process_tree(os.getpid())
    finally:
        p.kill()
        p.wait(5)
    assert read_stat(p.pid) is None and cpu_seconds([p.pid]) == 0


def test_nodes_and_jobs_share_one_default_workspace(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CLOUDQ_WORKSPACE", str(tmp_path))
    assert MediaConfig().workspace == str(workspace_root()) == str(tmp_path)
    monkeypatch.delenv("CLOUDQ_WORKSPACE")
    default = os.path.join(tempfile.gettempdir(), "cloudq-workspace")
    assert MediaConfig().workspace == str(workspace_root()) == default

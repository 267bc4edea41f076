"""The program's sandbox (issue 19), attacked from inside: a user's own xterm, through typed
keystrokes only, tries what an attacker with nothing but her account would; each attempt must fail.

One session runs every probe (one typed command line writes each result into a file of HOME, the
session's data directory, which the test reads), and a second test drives the limits. Both were
run once with the node ``--unconfined`` (and the cookie check with an Xvfb without ``-auth``):
each assertion then failed.

Needs ``bwrap`` (Debian: bubblewrap), Xvfb and xterm; the node runs as root here, as in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import redis
from helpers import Procs, missing_prerequisite, node_state, session_field, start_pool, wait_for
from test_x11 import Screen, differs, login, logout_and_wait, prompt_shown, type_line

from cloudq.keys import Keys
from cloudq.procstat import all_stats
from cloudq.secretfile import read_secret
from cloudq.workers.data import workspace_dir

MISSING = [p for p in ("Xvfb", "xterm", "xwininfo", "bwrap") if shutil.which(p) is None]
SIZE = ("--size", "480x320")


@pytest.fixture(scope="module", autouse=True)
def _programs() -> None:
    if MISSING:
        missing_prerequisite(
            f"confinement tests need {', '.join(MISSING)} (apt: xvfb xterm x11-utils bubblewrap)"
        )
    if os.geteuid() != 0:
        missing_prerequisite("confinement tests run the node as root (as CI does)")


def uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(ln for ln in fh if ln.startswith("Uid:")).split()[1])


def by_uid(uid: int) -> list[int]:
    out = []
    for pid in all_stats():
        try:
            if uid_of(pid) == uid:
                out.append(pid)
        except (OSError, StopIteration):
            continue
    return out


def by_cmdline(*needles: bytes) -> list[int]:
    out = []
    for pid in all_stats():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").strip()
        except OSError:
            continue
        if cmd in needles:
            out.append(pid)
    return out


def test_the_users_program_reaches_no_credential_file_display_network_or_later_session(
    r: redis.Redis, keys: Keys, procs: Procs, redis_url: str
) -> None:
    from cloudq.workers.apps.x11 import DisplayManager

    assert procs.log_dir is not None and procs.url_dir is not None
    pool = start_pool(r, keys, procs, 1, "x11:xterm", SIZE, users=("alice",), idle_timeout=30, grace=30)
    logs = Path(procs.log_dir)
    other_ws = workspace_dir(logs / "workspace", "n2")  # another node's workspace on this host
    other_ws.mkdir(parents=True)
    (other_ws / "secret.txt").write_text("bob's\n")
    url_files = sorted(str(p) for p in Path(procs.url_dir).glob("*.url"))
    passwords = {redis_url: urlsplit(redis_url).password}
    passwords |= {f: urlsplit(read_secret(f)).password for f in url_files}
    port = urlsplit(redis_url).port
    # another display on this host: even without a cookie to ask for, it must be out of reach
    with DisplayManager(160, 120, auth=False) as other:
        t, node = login(r, keys)
        home = workspace_dir(logs / "workspace", node)
        with Screen(r, keys, t) as s:
            wait_for(lambda: prompt_shown(s), 15, what="xterm and its prompt")
            hidden = [str(logs / "store"), str(other_ws), procs.url_dir, f"/tmp/.X11-unix/X{other.name[1:]}"]
            type_line(
                s,
                "R=~/r; id -u > $R.uid; { cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline; "
                "for f in $(cat /proc/[0-9]*/environ | tr '\\0' '\\n' | sed -n 's/^CLOUDQ_REDIS_URL_FILE=//p') "
                f"{procs.url_dir}/*.url; do cat $f; done; }} > $R.creds 2>/dev/null; "
                f"for p in {' '.join(hidden)}; do test -e $p && echo $p; done > $R.files; "
                "xwininfo -root >/dev/null 2>&1; echo own $? > $R.x; "
                f"xwininfo -root -display {other.name} >/dev/null 2>&1; echo other $? >> $R.x; "
                "XAUTHORITY=/dev/null xwininfo -root >/dev/null 2>&1; echo nocookie $? >> $R.x; "
                f"(echo > /dev/tcp/127.0.0.1/{port}) 2>/dev/null; echo $? > $R.net; "
                "setsid sh -c 'sleep 1000' & (sh -c 'sleep 1001 &' &); echo done > $R.done",
            )
            wait_for(lambda: (home / "r.done").exists(), 10, what="the probes' results in HOME")
            uid = int((home / "r.uid").read_text())
            # the uid is real outside the sandbox: the host sees the program's processes under it
            assert uid not in (0, os.getuid()), uid
            assert by_uid(uid), f"no process of uid {uid} seen from the host"
            creds = (home / "r.creds").read_bytes()
            for where, pw in passwords.items():
                assert pw and unquote(pw).encode() not in creds, f"the password of {where} was read"
            assert (home / "r.files").read_text() == "", "seen: " + (home / "r.files").read_text()
            x = dict(line.split() for line in (home / "r.x").read_text().splitlines())
            assert x["own"] == "0", "with its cookie the program opens its display (the probe works)"
            assert x["other"] != "0", "another display opened"
            assert x["nocookie"] != "0", "its own display opened without the cookie"
            assert (home / "r.net").read_text().strip() != "0", f"Redis port {port} reached"
            # the shell's "done" can come before its detached children have started: wait for them
            wait_for(
                lambda: by_cmdline(b"sleep 1000") and by_cmdline(b"sleep 1001"),
                10,
                what="the detached sleeps",
            )
        logout_and_wait(r, keys, t)
        wait_for(lambda: node_state(r, keys, node) == "free", 10, what="node free")
        # nothing of the session outlives it: not the setsid'd, not the double-forked sleep
        assert not by_uid(uid), f"processes of uid {uid} after the session"
        assert not by_cmdline(b"sleep 1000", b"sleep 1001"), "a detached process outlived the session"
        assert pool.nodes[0].poll() is None


def test_a_program_over_its_limits_ends_its_session_only_with_the_reason_and_data_saved(
    r: redis.Redis, keys: Keys, procs: Procs
) -> None:
    limits = ("--program-pids", "64", "--program-memory", "200M")
    pool = start_pool(
        r, keys, procs, 2, "x11:xterm", (*SIZE, *limits), users=("alice", "bob"), idle_timeout=30, grace=30
    )
    tb, _ = login(r, keys, "bob")
    with Screen(r, keys, tb) as bob:
        wait_for(lambda: prompt_shown(bob), 15, what="bob's prompt")

        def bob_streams(text: str) -> None:
            before = bob.last()
            type_line(bob, f"echo {text}")
            wait_for(lambda: differs(before, bob.last()), 5, what=f"bob's typing on screen ({text})")

        for hog, reason in (
            # a bounded fork flood (a real fork bomb, unconfined, would take the test machine down)
            ("echo kept > kept.txt; for i in $(seq 200); do sleep 60 & done", "app_crashed: pids limit"),
            ("head -c 400M /dev/zero | tail", "app_crashed: memory limit"),
        ):
            t, node = login(r, keys, "alice")
            home = workspace_dir(Path(procs.log_dir or "") / "workspace", node)
            if "memory" in reason:  # the first session's close saved its data: it is back
                assert (home / "kept.txt").read_text() == "kept\n"
            with Screen(r, keys, t) as s:
                wait_for(lambda: prompt_shown(s), 15, what="alice's prompt")
                type_line(s, hog)
                wait_for(lambda: session_field(r, keys, t.sid) == "closed", 20, what="alice's session closed")  # noqa: B023
            assert session_field(r, keys, t.sid, "close_reason") == reason
            wait_for(lambda: node_state(r, keys, node) == "free", 10, what="alice's node free again")  # noqa: B023
            assert all(p.poll() is None for p in pool.nodes), "a node died"
            bob_streams(reason.split()[-2])


def test_a_node_that_cannot_build_the_sandbox_refuses_to_start_and_says_what_is_missing(
    procs: Procs, tmp_path: Path
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for prog in ("xterm", "Xvfb", "setpriv"):
        (bin_dir / prog).symlink_to(shutil.which(prog) or prog)
    env = {**procs.child_env("node"), "PATH": str(bin_dir)}
    out = subprocess.run(
        [*procs_command(), "node", "--id", "n1", "--app", "x11:xterm"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 2, out.stderr
    assert "bubblewrap not installed (Debian package: bubblewrap)" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def procs_command() -> list[str]:
    from cloudq.procs import cloudq_command

    return cloudq_command()

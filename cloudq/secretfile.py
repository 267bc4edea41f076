"""Secrets in files, never in a process's environment or command line.

A role's Redis URL carries its ACL password. ``/proc/<pid>/cmdline`` is readable by everyone
and ``/proc/<pid>/environ`` by every process of the same OS user (a user's program included,
should its sandbox be misconfigured), so a cloudq process reads its URL from a file that only
its own OS user can read (``--redis-url-file``, ``CLOUDQ_REDIS_URL_FILE``). :func:`read_secret`
refuses a file that anyone else could read or that someone else owns, as ssh refuses a private
key that is too open; :func:`write_secret` writes one that passes (mode 0600, atomically, so a
process starting at that moment reads the old or the new content, never half of it).
"""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile


class UnsafeSecretFile(ValueError):
    """A secret file that cannot be used: missing, not a regular file, too open, someone else's, empty."""


def read_secret(path: str) -> str:
    """The first line of ``path`` (stripped), if only the current user can read the file."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise UnsafeSecretFile(f"cannot read {path}: {exc.strerror}") from None
    st = os.fstat(fd)  # the file opened, not whatever the name points to later
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeSecretFile(f"{path} is not a regular file")
    with os.fdopen(fd) as fh:
        if st.st_uid != os.geteuid():
            raise UnsafeSecretFile(
                f"{path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}): "
                "only the user who runs this process may hold its credentials"
            )
        if st.st_mode & 0o077:
            raise UnsafeSecretFile(
                f"permissions {stat.S_IMODE(st.st_mode):04o} of {path} are too open: it holds a password, "
                f"so nobody but its owner may read it (chmod 600 {path})"
            )
        text = fh.readline().strip()
    if not text:
        raise UnsafeSecretFile(f"{path} is empty")
    return text


def write_secret(path: str, text: str) -> str:
    """Write ``text`` to ``path`` with mode 0600 (its directory is created 0700); returns ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".secret-")  # mode 0600
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path

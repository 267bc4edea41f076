"""Versioned, checksummed snapshots of each user's data directory.

``Store`` is the interface the data-management jobs (mount = :meth:`Store.restore`, save =
:meth:`Store.save`) program against; :class:`DirectoryStore` implements it on a directory that is
local or shared between hosts (NFS, CephFS, ...). An object-store backend is one more module
implementing the same protocol.

Layout of a :class:`DirectoryStore`::

    <root>/<user>/00000007.tar    uncompressed tar of the user's directory (regular files + dirs)
    <root>/<user>/00000007.json   manifest: every file's relative path, size, sha256 and mode,
                                  the directories, total size, creation time, archive size and
                                  digest (sha256 of the archive with each file's data replaced
                                  by that data's sha256: MemberDigest)
    <root>/<user>/.tmp.*          in-flight temp files (ignored by readers, removed once stale)

Crash safety. A save streams the archive into a temp file in the user's directory (hashing every
file once as it goes: the archive's digest is built from the files' sha256s, so nothing is read or
hashed twice; big saves hash in a forked process, which the GIL does not slow), fsyncs it,
publishes it under its final name with ``link()`` (fails with ``EEXIST`` instead of overwriting,
so two racing writers fail loudly), fsyncs the directory, and then does the same with the manifest. The manifest appearing is
the commit point: a version exists for readers only when its manifest exists and parses completely.
A crash at any moment leaves the previous versions untouched plus, at worst, a temp file or an
archive without manifest; both are invisible and cleaned up later (temp files as soon as their
writer is known to be dead or they are older than ``stale_seconds``; archives without manifest
when older than ``stale_seconds`` or when pruning passes them).

Version numbers are ``max(any NNNNNNNN.tar/.json in the directory) + 1``, so they only increase
and never reuse the number of a half-written version. Concurrent writers of one user must be
serialised by the caller (a lock); if they are not, one of them fails with
:class:`VersionExists` rather than clobbering the other. After each successful save or promote the
newest ``keep`` valid versions are kept and everything numbered below them is removed.

Safety rules.

* User names must match ``^[A-Za-z0-9_@-][A-Za-z0-9_.@-]{0,63}$`` (no ``/``, no NUL, no leading dot,
  hence never ``.`` or ``..``).
* Save **refuses** (:class:`UnsafeSource`) a source containing symlinks, device nodes, FIFOs,
  sockets or names that are not valid UTF-8, rather than silently skipping them: a snapshot that
  quietly misses files is worse than a save that fails loudly and leaves the last good version.
  The source tree is walked with directory file descriptors and ``O_NOFOLLOW``, so swapping a
  directory for a symlink during the save cannot make the store archive files outside the source.
  Only permission bits (``0o777``) and mtimes are kept; owners are not (restored files belong to the
  restoring process).
* The per-user quota (total bytes of regular files) is checked before anything is written.
* Restore refuses (:class:`UnsafeArchive`) members that are absolute, contain ``..``/``.``/empty
  components, or are anything but regular files and directories (symlinks, hard links, devices,
  FIFOs, sparse/continuation members), and every member must match the manifest (path, size,
  sha256). It extracts into a fresh temp directory next to ``dest_dir`` and only then renames it
  into place, so a failed restore leaves ``dest_dir`` as it was. ``dest_dir`` is *replaced*
  entirely; it must be a plain directory (not a mount point) whose parent is writable.
* Restore verifies the data it writes (per-file sha256 + tar header checksums + exact member list);
  :meth:`DirectoryStore.verify` additionally checks the archive's digest (every byte of the
  file; manifests of format 1 recorded the file's plain sha256, still verified as such).
* Any ``OSError`` on the store side (not writable, ``ENOSPC``, ...) becomes :class:`StoreError` with a
  clear message, after removing this save's temp files; committed versions are never touched.

Restored files are not fsynced by default (``fsync_restore=False``): a workspace is a scratch copy
that is re-mounted from the store after a host crash, and GNU tar does not fsync either.
"""

from .directory import DirectoryStore
from .manifest import (
    DEFAULT_KEEP,
    DEFAULT_QUOTA_BYTES,
    CorruptVersion,
    FileEntry,
    InvalidUserName,
    Manifest,
    NoGoodVersion,
    NoVersions,
    Progress,
    QuotaExceeded,
    SourceError,
    Store,
    StoreError,
    UnsafeArchive,
    UnsafeSource,
    VersionExists,
    VersionInfo,
    VersionNotFound,
)

__all__ = [
    "DEFAULT_KEEP",
    "DEFAULT_QUOTA_BYTES",
    "CorruptVersion",
    "DirectoryStore",
    "FileEntry",
    "InvalidUserName",
    "Manifest",
    "NoGoodVersion",
    "NoVersions",
    "Progress",
    "QuotaExceeded",
    "SourceError",
    "Store",
    "StoreError",
    "UnsafeArchive",
    "UnsafeSource",
    "VersionExists",
    "VersionInfo",
    "VersionNotFound",
]

"""Run an ordinary X11 program as a cloudq app: a virtual display, damage-driven capture, XTEST input.

Pieces:

- :class:`DisplayManager` (``display.py``) starts an ``Xvfb`` (free display number learnt through
  ``-displayfd``; the server is killed by the kernel if the process that started it dies) or wraps an
  existing display.
- :class:`X11App` (``app.py``) runs one program on such a display for one session: its own process
  group, ``HOME`` and the XDG directories inside the user's data directory, no window manager (its
  top-level windows are moved and resized to fill the screen), capture through XDAMAGE + MIT-SHM
  (only the damaged bounding box is grabbed; ``capture.py``), input through XTEST (``input.py``),
  freeze on sleep (SIGSTOP of the whole process tree; ``process.py``) and a thorough
  :meth:`X11App.close` that leaves a black screen behind. Its capture, input and process sides are
  the mixins of those modules; ``app.py`` also holds :class:`X11Factory`, what a node builds for
  ``--app x11:COMMAND``. The exceptions are in ``errors.py``.
- The program runs in a sandbox of its own (``sandbox.py``: bubblewrap, its own uid, namespaces,
  files, X cookie; ``cgroup.py``: its memory and process limits, its freezer), checked at node
  start by :class:`X11Factory` (``--unconfined`` opts out).

Threading: an :class:`X11App` owns one python-xlib connection and one MIT-SHM grabber; neither is
thread-safe, so every method must be called from the same thread (the node loop). Another thread
that needs the display must open its own connection.
"""

from .app import X11App, X11Factory
from .display import DisplayManager
from .errors import (
    BadEventError,
    DisplayError,
    InputError,
    LaunchError,
    OffScreenError,
    UnknownKeyError,
    UnmappableKeyError,
    X11Error,
)
from .input import char_to_keysym, check_point, parse_key
from .process import cpu_seconds, process_tree

__all__ = [
    "BadEventError",
    "DisplayError",
    "DisplayManager",
    "InputError",
    "LaunchError",
    "OffScreenError",
    "UnknownKeyError",
    "UnmappableKeyError",
    "X11App",
    "X11Error",
    "X11Factory",
    "char_to_keysym",
    "check_point",
    "cpu_seconds",
    "parse_key",
    "process_tree",
]

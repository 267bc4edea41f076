"""The web gateway (``cloudq gateway``): the cloud client's launcher and kernel, run server-side for
browser users. One asyncio process (aiohttp + ``redis.asyncio``) serves the page, relays logins to
the central servers and carries each browser's session over one WebSocket.

Stateless: everything a socket needs comes from Redis and the browser's cookie, so any number of
gateways can sit behind a load balancer and a browser that reconnects to another one (or to this one
restarted) continues its session.

HTTP
    ``GET /``              the page (``static/index.html``); files under ``/static/``
    ``POST /login``        JSON ``{"user", "password"}``: relayed to the central servers as the same
                           :class:`~cloudq.messages.Request` ``cloudq connect`` sends (the gateway never
                           sees a password hash). 200 ``{"user", "status", "position", "sid"}``, the
                           token in the ``cloudq_token`` cookie (HttpOnly, SameSite=Strict, path /;
                           ``Secure`` behind TLS) and the session id in ``cloudq_sid`` (same flags);
                           401 ``{"error"}`` for wrong credentials or a locked account; 400 for a
                           malformed body; 503 if no central server answers. Only
                           ``Content-Type: application/json`` (else 415) with no ``Origin`` or a
                           same-origin one (else 403): no login CSRF by a cross-site form. The body
                           must arrive within ``--body-timeout`` (else 408).
    ``POST /logout``       relays a logout for the cookie's token and clears the cookies (403 for a
                           cross-site ``Origin``).
    ``GET /session``       200 ``{"user", "sid", "state"}`` if the cookie's token is live, else 401.
    ``GET /healthz``       200 ``ok`` if Redis answers, else 503.
    ``/files/*``           uploads into and downloads out of the session's HOME
                           (:mod:`cloudq.client.web.files`).
    ``GET /stats``         the gateway's counters (JSON): sockets, asyncio tasks, connections, closes
                           by reason, bad messages; 401 without a live token cookie. ``--admin-port``
                           serves ``/stats`` and ``/healthz`` without a login (a private address).

Which session a token stands for: the gateway reads no user hash (it holds the bcrypt hash), so
``/session`` and ``/ws`` take the session id the browser names (``?sid=`` from the page's last
``hello``, kept in ``sessionStorage``; else the ``cloudq_sid`` cookie) and check it against the
session hash (its ``user`` and token hash); a token of a user in the queue is that user's ticket.

Connections (:mod:`cloudq.client.web.guard`): at most ``--max-per-address`` open per client
address (more: 429 and closed), each request head within ``--header-timeout`` (else 408 and
closed). A socket's tasks, heartbeat and Redis connection end with it, whatever ends it.

The token is never in a URL and never readable by page scripts. The WebSocket (``GET /ws``) checks
``Origin`` (same host as the request, or one of ``--allow-origin``) before the upgrade and the cookie
right after it.

WebSocket, gateway -> page
    binary: one video packet (all little-endian), then one H.264 access unit (Annex B)::

        off size field
          0  u8   type          1 = video
          1  u8   flags         bit 0 keyframe
          2  u16  width         stream size (from the last keyframe's codec parameters; 0 = unknown)
          4  u16  height
          6  u16  reserved      0
          8  u64  seq           the node's packet counter: a jump means packets were lost
         16  i64  pts           milliseconds
         24  f64  capture time  the node's time.time() when it rendered the frame
         32  ...  data

    binary: one audio packet (``client/web/audio.py``; the session's sound, while it is awake),
    then one Opus packet (20 ms, decodable alone)::

        off size field
          0  u8   type          2 = audio
          1  u8   codec         1 = opus
          2  u8   channels
          3  u8   reserved      0
          4  u32  sample rate
          8  u64  seq           the node's audio packet counter (a jump: silence not sent, or lost)
         16  i64  timestamp     microseconds
         24  f64  capture time  the node's time.time() when it read the frame from the program's sink
         32  ...  data

    text (JSON): ``{"t": "hello", "user", "sid", "node", "rights"}`` once the session is attached;
    ``{"t": "state", "state", "node", "position"}`` on every change (``queued`` with a position
    while waiting for a node); ``{"t": "warning", "warning"}``; ``{"t": "close", "reason", "text"}`` just
    before the gateway closes the socket with code 4001 (the session is over: ``reason`` is a
    :class:`~cloudq.state.CloseReason`, possibly with a detail, ``text`` its words from
    :func:`cloudq.sessionend.close_message`, what ``cloudq connect`` says: the page keeps no table
    of its own). Code 4401: not logged in (or the token expired or was revoked).
    ``{"t": "clipboard", "text"}``: a program in the session put ``text`` on its CLIPBOARD
    (``client/web/clipboard.py`` relays the session's ``clip`` stream); the page writes it to the
    browser's clipboard if allowed (``window.cloudqStats.clipboard`` counts it).

WebSocket, page -> gateway (text only, JSON, at most ``MAX_MESSAGE`` bytes, at most ``RATE`` a
second sustained with bursts of ``BURST``)
    ``{"t": "input", "type", "seq", "ct", ...}`` one :class:`~cloudq.wire.InputEvent`
    (``key_down``/``key_up`` with ``key`` = X keysym name, ``text``, ``mouse_down``/``mouse_move``/
    ``mouse_up`` with ``x``, ``y`` in stream pixels and ``button`` 1-3, ``wheel`` with ``dx``, ``dy``,
    ``clipboard`` with ``text``: the browser's clipboard, at most 1 MiB of UTF-8, the only message
    allowed past ``MAX_MESSAGE``, up to ``CLIP_MESSAGE``, a few a second at most, more dropped);
    ``{"t": "keyframe"}`` (the page saw a gap; at most ``KEYFRAME_GAP`` apart are forwarded).
    Anything else (not JSON, unknown type, a field of the wrong type, binary, too big, too fast)
    is counted by reason in ``/stats`` and closes that socket only (1008, or 1009 when too big).

Heartbeat and activity: while a socket is attached the gateway refreshes the session's heartbeat
key every published ``heartbeat_interval`` (the socket *is* the heartbeat: when it drops, the
session goes ``disconnected`` and the reconnect grace runs), and refreshes the activity key on
real input (not on keyframe requests).

Redis rights: the gateway's own connection (``--redis-url``) posts login/logout requests, reads
their replies, reads the published settings and resolves a cookie's token to its session (token
key, the user's ``session`` field, the queue while waiting). Everything else a browser does goes
through :func:`open_session_redis`: a connection of its own that authenticates as the session's
Redis ACL user when the server has it, else falls back to the gateway's credentials.
"""

"""``cloudq central``: identity authentication and node management.

Two loops, each on its own thread so a slow bcrypt check never delays a deadline:
- requests: login/logout requests from the ``requests`` stream, shared by every replica
  through one consumer group; a reply goes to ``reply:<request id>``.
- sweeper: claims due deadlines atomically (``sweep.lua``), hands free nodes to waiting
  users (``dispatch.lua``) and enqueues the resulting jobs, in one script per pass. It sleeps
  until the next deadline (at most :data:`MAX_SWEEP_WAIT`): a script that adds an earlier one
  and a worker that freed a node wake it (``PUBLISH`` on ``wake``); keyspace notifications of
  expired keys wake it too (they are late and lossy).

With ACLs on (the default where the server has them), every login creates the session's
Redis user and every way a token stops being valid deletes it (:mod:`cloudq.central.acl`).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Sequence

import redis

from cloudq import credentials, jobs
from cloudq.central import acl, auth, intake
from cloudq.central.media import CHECK_EVERY, MediaServers
from cloudq.keys import Keys
from cloudq.messages import BadMessage, Reply, Request, unpack_request
from cloudq.retry import Backoff, passing
from cloudq.settings import Settings
from cloudq.state import Assignment, CloseReason, StateMachine, Sweep

log = logging.getLogger(__name__)

QUEUE_USER_KEEP = 2.0
"""How long a dispatched client's queue user outlives its notification (s): time to switch."""
IDLE_BLOCK = 2.0
"""How long the requests and notification loops block on Redis when nothing comes (s)."""
MAX_SWEEP_WAIT = 0.75
"""The sweeper's longest sleep (s) with nothing due (:meth:`Central.max_wait`)."""
ABANDONED_CHECK_EVERY = 3.0
LOOP_BACKOFF_CAP = 1.0
"""A failed loop's longest wait before it runs again (s): a few central replicas, not a fleet."""
REFUSED = {
    "invalid": "invalid credentials",
    "locked": "too many failed logins: account locked, try again later",
    "disabled": "this account is disabled: ask the operator",
    "busy": "the server is checking too many passwords: try again in a moment",
}
LOOPS = ("requests", "sweep", "notification")
"""The server's loops; each failure restarts one and counts in ``counters["restarts_<loop>"]``."""


class Central:
    def __init__(
        self,
        r: redis.Redis,
        keys: Keys,
        settings: Settings,
        name: str | None = None,
        notifications: bool = True,
        dead_after: float = intake.DEAD_AFTER,
        use_acl: bool = True,
        bcrypt_cost: int = auth.DEFAULT_COST,
        bcrypt_threads: int = 2,
        bcrypt_waiting: int = 32,
        acl_full_every: float = 60.0,
        replica_wait: float = 1.0,
        media_urls: Sequence[str] = (),
        media_check: float = CHECK_EVERY,
    ) -> None:
        self.r = r
        self.keys = keys
        self.settings = settings
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"
        self.notifications = notifications
        self.sm = StateMachine(r, keys)
        self.users = auth.Users(r, keys, cost=bcrypt_cost)
        self.intake = intake.Intake(r, keys, self.name, dead_after)
        self.checks = intake.Checks(
            lambda: auth.dummy_hash(bcrypt_cost), bcrypt_cost, bcrypt_threads, bcrypt_waiting
        )
        self.acl_full_every = acl_full_every
        self.replica_wait = replica_wait
        """Longest wait (s) for a replica's acknowledgement of a transition (0: do not wait)."""
        self.replicas = 0
        self._acl_due = 0.0  # monotonic time the incremental ACL pass has work (_next_wait)
        self._swept: Sweep | None = None  # the last sweep pass (plans the next one)
        self._dispatch = threading.Event()  # free nodes may have takers: dispatch on the next pass
        self._dispatch.set()
        self._reconnected = threading.Event()
        self._reconnected.set()
        r.connection_pool.connection_kwargs["redis_connect_func"] = self._on_connect
        self._bad_logged = float("-inf")
        self._after_check = threading.Lock()  # the state and ACL steps of concurrent logins, one at a time
        self.use_acl = use_acl
        self.acl: acl.SessionUsers | None = None
        self.stop = threading.Event()
        self.wakeup = threading.Event()
        self.counters: Counter[str] = Counter({f"restarts_{loop}": 0 for loop in LOOPS})
        self._backoffs: dict[str, Backoff] = {}
        self._threads: list[threading.Thread] = []
        self._run_id = ""
        self.media_check = media_check
        self.media = (
            MediaServers(list(media_urls), keys, r, lambda *a: self.acl and self.acl.setuser_on(*a))
            if media_urls
            else None
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def setup(self) -> None:
        self.settings.publish(self.r, self.keys)
        if self.use_acl and not credentials.supported(self.r):
            log.warning("the Redis server has no ACL command")
            self.use_acl = False
        self.acl = acl.SessionUsers(self.r, self.keys, self.settings.token_ttl) if self.use_acl else None
        if self.media is not None:
            self.media.publish()  # before any login: new sessions are placed on these
            if self.acl is not None:
                self.acl.media = self.media
        acl.announce(self.r, self.keys, self.use_acl)
        self.intake.setup()

    def start(self) -> None:
        self.setup()
        targets = [self._requests_loop, self._sweep_loop, self._notification_loop]
        if self.media is not None:
            targets.append(self._media_loop)
        for t in targets:
            th = threading.Thread(target=self._guard(t), name=t.__name__, daemon=True)
            th.start()
            self._threads.append(th)
        log.info("central %s running", self.name)

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop: the sweeper at once; the requests and notification loops end by themselves
        within their block (:data:`IDLE_BLOCK`), handing back what they take after this."""
        self.stop.set()
        self.wakeup.set()
        for th in self._threads:
            th.join(timeout if th.name == "_sweep_loop" else 0.05)
        self.checks.close()
        try:
            self.intake.leave()
        except redis.RedisError as exc:
            log.warning("could not hand back the requests this replica took: %s", exc)

    def _guard(self, fn):  # type: ignore[no-untyped-def]
        """Keep a loop alive across Redis outages and its own errors: log each with the error,
        count it (``restarts_<loop>``, the metric ``cloudq_central_loop_restarts_total``), back off
        and run the loop again. The backoff starts over once the loop runs again (:meth:`_ran`)."""
        loop = fn.__name__.strip("_").removesuffix("_loop")
        # at most 1 s (not the fleet's 5 s): after a failover the sweeper re-creates the session
        # users that every client waits for, so it must not sleep through the new primary's arrival
        backoff = self._backoffs[loop] = Backoff(cap=LOOP_BACKOFF_CAP)

        def run() -> None:
            while not self.stop.is_set():
                try:
                    fn()
                    return
                except Exception as exc:
                    self.counters[f"restarts_{loop}"] += 1
                    level = logging.WARNING if passing(exc) else logging.ERROR
                    log.log(
                        level,
                        "%s loop: %s: %s; restart %d in <%.1fs",
                        loop,
                        type(exc).__name__,
                        exc,
                        self.counters[f"restarts_{loop}"],
                        backoff.peek(),
                        exc_info=not isinstance(exc, redis.RedisError),  # a bug: its traceback
                    )
                backoff.wait(self.stop)

        return run

    def _ran(self, loop: str) -> None:
        """``loop`` went once round without an error: its next restart waits the shortest delay."""
        backoff = self._backoffs.get(loop)
        if backoff is not None:
            backoff.reset()

    # -- requests ----------------------------------------------------------------------------
    def _requests_loop(self) -> None:
        """Take requests (:class:`~cloudq.central.intake.Intake`) and answer each: logins after
        their password check on the bcrypt budget, resumes and logouts at once."""
        for raw in self.intake.take_over_own():  # taken before this loop restarted, unanswered
            self.handle_request(raw)
        while not self.stop.is_set():
            self.intake.beat()
            taken = self.intake.take(block=IDLE_BLOCK)
            if self.stop.is_set():  # taken during shutdown: for the other replicas
                self.intake.leave()
                return
            for raw in taken:
                self.handle_request(raw)
            self._ran("requests")

    def handle_request(self, raw: bytes) -> None:
        try:
            if self.intake.oversized(raw):
                raise BadMessage(f"{len(raw)} bytes")
            req = unpack_request(raw)
        except BadMessage as exc:
            self.counters["bad_request"] += 1
            if time.monotonic() - self._bad_logged >= 10.0:  # a flood of garbage is no flood of log lines
                self._bad_logged = time.monotonic()
                log.warning("dropped a request: %s (%d dropped so far)", exc, self.counters["bad_request"])
            self.intake.answer(raw, None, None)
            return
        if req.op == "login":
            self._login(raw, req)
            return
        try:
            reply = self.resume(req) if req.op == "resume" else self.logout(req)
        except (redis.ConnectionError, redis.TimeoutError):
            raise
        except Exception:
            log.exception("request %s failed", req.id)
            reply = Reply(ok=False, status="error", error="internal error")
        self._replicated()
        self.intake.answer(raw, req.id, reply.pack())

    def _login(self, raw: bytes, req: Request) -> None:
        """Start a login: a locked name is answered at once; an unknown one after a check's time
        without the check; a known one once its check ran on the budget (or ``busy``)."""
        found = self.users.lookup(req.user)

        def finish(ok: bool) -> None:
            with self._after_check:
                try:
                    reply = self.login(req, self.users.conclude(req.user, found, ok, self.settings))
                except (redis.ConnectionError, redis.TimeoutError) as exc:
                    # unanswered: the entry stays taken and is answered after the loop restarts
                    log.warning("login %s: %s; answered later", req.user, exc)
                    return
                except Exception:
                    log.exception("request %s failed", req.id)
                    reply = Reply(ok=False, status="error", error="internal error")
            self._replicated()
            self.intake.answer(raw, req.id, reply.pack())

        if found.locked:
            self.intake.answer(raw, req.id, self.login(req, "locked").pack())
        elif found.stored is None or len(req.password.encode()) > auth.MAX_PASSWORD_BYTES:
            self.checks.hold(lambda: finish(False))
        elif not self.checks.check(req.password.encode(), found.stored, finish):
            self.intake.answer(raw, req.id, self.login(req, "busy").pack())

    def login(self, req: Request, refused: str = "") -> Reply:
        """The reply to a login whose password check gave ``refused`` ("" when it passed)."""
        if refused:
            self.counters[f"login_{refused}"] += 1
            return Reply(ok=False, status=refused, error=REFUSED[refused])
        token = auth.new_token()
        th = auth.hash_token(token)
        pw_hash = acl.session_password_hash(token) if self.acl else ""
        status, sid, node, gen, pos = self.sm.login(req.user, th, pw_hash)
        self.counters[f"login_{status}"] += 1
        acl_user = ""
        if self.acl is not None:
            # before the reply: the client connects as this user as soon as it has the token
            acl_user = self.acl.session_user(sid, pw_hash) if sid else self.acl.queue_user(req.user, token)
        if status == "assigned":
            jobs.enqueue_assignment(self.r, self.keys, Assignment(sid, node, gen))
        elif status == "queued":
            self._dispatch.set()  # a node may be free by now (a race with a close): look at once
            self.wakeup.set()
        log.info("login %s: %s %s %s", req.user, status, sid, node)
        return Reply(ok=True, status=status, token=token, sid=sid, node=node, position=pos, acl_user=acl_user)

    def resume(self, req: Request) -> Reply:
        """A client back after an outage with its token: into its session, or why it cannot be
        (``resume.lua``). No password: nothing here waits behind bcrypt, and it never starts a
        session or queues, so a client never ends up in a session it did not ask for."""
        token = auth.new_token()
        th = auth.hash_token(token)
        pw_hash = acl.session_password_hash(token) if self.acl else ""
        status, sid, node, gen, reason = self.sm.resume(req.sid, auth.hash_token(req.token), th, pw_hash)
        self.counters[f"resume_{status}"] += 1
        if status == "closed":
            return Reply(ok=False, status=status, reason=reason, error="the session is over")
        if status == "expired":
            return Reply(ok=False, status=status, error="the login expired: log in again")
        acl_user = self.acl.session_user(sid, pw_hash) if self.acl is not None else ""
        if status == "assigned":
            jobs.enqueue_assignment(self.r, self.keys, Assignment(sid, node, gen))
        log.info("resume %s: %s %s", sid, status, node)
        return Reply(ok=True, status=status, token=token, sid=sid, node=node, acl_user=acl_user)

    def logout(self, req: Request) -> Reply:
        user = auth.token_user(self.r, self.keys, req.token)
        if user is None:
            return Reply(ok=False, status="invalid_token", error="unknown, expired or revoked token")
        # one atomic step (logout.lua): token revoked, session marked closing (so a login that
        # arrives before the close job runs gets a new session, mounted after this one's final
        # save) with a close deadline that re-issues the job if it is lost; queue place left
        th = auth.hash_token(req.token)
        queued = auth.same_token((self.r.hget(self.keys.user(user), "qtoken") or b"").decode(), th)
        sid, gen, node = self.sm.logout(user, th)
        if sid:
            if self.acl is not None:
                self.acl.revoke_session(sid)
            host = (self.r.hget(self.keys.node(node), "host") or b"").decode() if node else ""
            jobs.enqueue(self.r, self.keys, "close", sid, gen, host, CloseReason.LOGOUT.value)
        if queued and self.acl is not None:
            self.acl.drop(acl.queue_acl_user(user))
        return Reply(ok=True, status="logged_out")

    # -- deadlines ---------------------------------------------------------------------------
    def sweep_once(self) -> int:
        """One pass: due deadlines, free nodes to waiting users; returns jobs enqueued. The pass
        (one script) also says when the next one is due (:meth:`_next_wait`)."""
        n = 0
        if self._reconnected.is_set():
            # a new connection may mean a new server: its run id, read once per reconnect
            self._reconnected.clear()
            try:
                run_id = self.server_run_id()
                self._count_replicas()
            except BaseException:
                # not read (right after a failover the Sentinels may still call the new primary
                # down): read it on the next pass, else the new server would go unnoticed
                self._reconnected.set()
                raise
            if run_id != self._run_id:
                if self._run_id and not self.r.exists(self.keys.settings):
                    # the server restarted without our keys: publish the clocks and the group again
                    log.warning("the Redis server restarted and lost cloudq's keys; setting up again")
                    self.setup()
                self._run_id = run_id
        longest = self.max_wait()
        swept = self.sm.sweep(
            run_id=self._run_id,
            longest=longest,
            least=self.least_wait(longest),
            closed_after=self.acl.closed_after() if self.acl is not None else "",
        )
        self._swept = swept
        for action in swept.actions:
            jobs.enqueue_action(self.r, self.keys, action)
            n += 1
        if swept.free and (swept.queued or swept.moves):
            self._dispatch.set()
        if self._dispatch.is_set():
            self._dispatch.clear()
            n += self._dispatch_free_nodes()
        return n

    def _dispatch_free_nodes(self) -> int:
        """Free nodes to moved sessions, then to the queue (``dispatch.lua``); jobs enqueued."""
        n = 0
        for a in self.sm.dispatch():
            if a.token_hash:
                if self.acl is not None:
                    # a queued client got a node: its session user exists before the client
                    # learns the session id, so its first command as that user is accepted
                    pw_hash = (self.r.hget(self.keys.session(a.sid), "acl") or b"").decode()
                    if pw_hash:
                        self.acl.session_user(a.sid, pw_hash, kill=False)
                    # not dropped now: that would cut the connection the client is reading the
                    # notification on; its token is spent, so a pass drops it a little later
                    self.acl.drop_later(acl.queue_acl_user(a.user), QUEUE_USER_KEEP)
                pipe = self.r.pipeline(transaction=False)
                pipe.rpush(self.keys.notify(a.token_hash), a.sid)
                pipe.pexpire(self.keys.notify(a.token_hash), 60_000)
                pipe.execute()
            jobs.enqueue_assignment(self.r, self.keys, a)
            n += 1
        return n

    def _on_connect(self, conn: redis.connection.AbstractConnection) -> None:
        """redis-py's hook for every new connection of :attr:`r`: note it (see :meth:`sweep_once`)."""
        conn.on_connect()
        self._reconnected.set()

    def _count_replicas(self) -> None:
        """How many replicas follow the server now (read on reconnect and with each full ACL pass)."""
        try:
            self.replicas = int(self.r.info("replication").get("connected_slaves", 0))
        except redis.ResponseError:
            self.replicas = 0

    def _replicated(self) -> None:
        """Before a reply that records a transition (a login, a resume, a logout): wait until one
        replica has it (``WAIT 1``, at most ``replica_wait`` s), so a failover right after the
        reply cannot lose it. Nothing to wait for without replicas (or with ``replica_wait`` 0)."""
        if not self.replicas or not self.replica_wait:
            return
        if self.r.execute_command("WAIT", 1, int(self.replica_wait * 1000)) < 1:
            self.counters["replica_wait_timeouts"] += 1
            log.warning("no replica acknowledged a transition within %.1f s", self.replica_wait)

    def server_run_id(self) -> str:
        """The Redis server's ``run_id`` (a new one = the server restarted); '' if not allowed."""
        try:
            return str(self.r.info("server").get("run_id", ""))
        except redis.ResponseError:
            return ""

    def max_wait(self) -> float:
        """The sweeper's longest sleep: :data:`MAX_SWEEP_WAIT`, below a beat (``sweep.lua`` takes
        a gap of more than ``max(1 s, heartbeat_interval)`` between two passes for a blind
        period). A deadline that another process adds sooner wakes the sweeper (``_lib.lua``),
        so no clock shortens it."""
        return MAX_SWEEP_WAIT

    def least_wait(self, longest: float) -> float:
        """The sweeper's shortest sleep, so a crowd of due deadlines is swept in batches: a
        quarter of the longest, or of a quarter of the shortest liveness clock (as precise as
        the clocks are short)."""
        clocks = [
            c for c in (self.settings.heartbeat_ttl, self.settings.node_ttl, self.settings.idle_timeout) if c
        ]
        return max(0.005, min([longest, *(c / 4 for c in clocks)]) / 4)

    def _next_wait(self, longest: float) -> float:
        """How long the sweeper may sleep, from the last pass (no round trip): the wait the pass
        planned (until the first deadline, within ``longest``), or less until the first ACL expiry
        or a closed session's user is due to go (``CLOSED_KEEP`` after its close), at least
        :meth:`least_wait`."""
        w = self._swept
        if w is None:
            return self.least_wait(longest)
        acl_due = [] if w.acl_first is None else [w.acl_first - w.now]
        if w.closed_first is not None and self.acl is not None:
            acl_due.append(w.closed_first + self.acl.CLOSED_KEEP - w.now)
        # when the incremental ACL pass has work (the sweeper skips it until then)
        self._acl_due = time.monotonic() + min(acl_due, default=3600.0)
        return max(self.least_wait(longest), min([w.wait, *acl_due]))

    def _sweep_loop(self) -> None:
        last_abandoned = last_full = 0.0
        full_run_id = None  # the server the last full pass ran on
        while not self.stop.is_set():
            if self.acl is not None and time.monotonic() >= self._acl_due:
                # the incremental pass when it has work, before the sweep that plans the next
                self.acl.reconcile(full=False)
            self.sweep_once()
            if self.acl is not None:
                # the full one (O(sessions)) at once on a new server, else every acl_full_every s
                # (0: never)
                every = self.acl_full_every
                if self._run_id != full_run_id or bool(every and time.monotonic() - last_full > every):
                    self.acl.reconcile(full=True)
                    last_full, full_run_id = time.monotonic(), self._run_id
                    self._count_replicas()
            if time.monotonic() - last_abandoned > ABANDONED_CHECK_EVERY:
                jobs.requeue_abandoned(self.r, self.keys)
                last_abandoned = time.monotonic()
            wait = self._next_wait(self.max_wait())
            self._ran("sweep")
            self.wakeup.wait(wait)
            self.wakeup.clear()

    def _media_loop(self) -> None:
        """The media servers: their session users and whether they answer (its own thread: a
        media server that hangs holds neither logins' sweeps nor the control plane)."""
        assert self.media is not None
        self.media.watch(self.stop, self.media_check)

    def _notification_loop(self) -> None:
        """Wake the sweeper early: when a worker freed a node (``wake``: dispatch now), and, with
        keyspace notifications, on an ``expired`` event for one of our keys (best effort)."""
        db = self.r.connection_pool.connection_kwargs.get("db", 0)
        ps = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            channels = [self.keys.wake]
            if self.notifications:
                try:
                    # add E (keyevent) and x (expired) to whatever the operator configured
                    flags = self.r.config_get("notify-keyspace-events").get("notify-keyspace-events", "")
                    if not ("E" in flags and ("x" in flags or "A" in flags)):
                        self.r.config_set("notify-keyspace-events", "".join(sorted(set(flags + "Ex"))))
                except redis.ResponseError:
                    log.info("cannot enable keyspace notifications (CONFIG denied); sweeping on time only")
                channels.append(f"__keyevent@{db}__:expired")
            ps.subscribe(*channels)
            prefix, wake = self.keys.prefix.encode(), self.keys.wake.encode()
            while not self.stop.is_set():
                msg = ps.get_message(timeout=IDLE_BLOCK)
                if msg and msg.get("channel") == wake:
                    if msg.get("data") != b"deadline":  # a freed node ("free"): dispatch now
                        self._dispatch.set()
                    self.wakeup.set()
                elif msg and isinstance(msg.get("data"), bytes) and msg["data"].startswith(prefix):
                    self.wakeup.set()
                self._ran("notification")
        finally:
            ps.close()

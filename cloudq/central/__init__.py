"""The central server: identity authentication and node management (``cloudq central``).

- :mod:`cloudq.central.server`: the request loop (login/logout) and the sweeper (deadlines,
  dispatch, jobs), any number of replicas.
- :mod:`cloudq.central.auth`: users, bcrypt, lockout, tokens.
- :mod:`cloudq.central.acl`: who may do what in Redis (the rights table) and the session and
  queue users the server creates and deletes.
- :mod:`cloudq.central.status`: the operator's view of nodes, sessions and the queue.
- :mod:`cloudq.central.metrics`: the central server's Prometheus collector.

It imports only the core (:mod:`cloudq.keys`, :mod:`cloudq.state`, :mod:`cloudq.jobs`, ...),
never the client or the cloud server: it enqueues jobs by import path (:mod:`cloudq.jobs`).
"""

"""``python -m cloudq.cli``: how ``cloudq`` starts its own child processes (``cloudq.procs``)."""

from cloudq.cli import main

main()

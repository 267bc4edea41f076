"""The whole system on one machine: ``cloudq up`` (:mod:`cloudq.local.cluster`: an embedded
Valkey with the ACL users, central, nodes and workers as child processes) and ``cloudq demo``
(:mod:`cloudq.local.demo`: the same plus the gateway and scripted users). Harnesses, like the
CLI and the benchmarks: they may import every role."""

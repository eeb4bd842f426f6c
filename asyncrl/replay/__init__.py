"""Replay inspection: the Redis mirror of the transfer queue and the `asyncrl replay` queries.

`mirror.py` writes (a QueueObserver the wiring code hands to the queue server; `process.py` runs its
writer in a process of its own, `script.py` is the Lua script it writes with), `store.py` owns
the key layout and reads it, `cli.py` is the command group. The queue never imports this package;
Redis is an optional dependency (`pip install asyncrl[redis]`).
"""

"""The bridge's fan-out relay written with Django Channels, daphne and channels_redis.

A peer for ``bench/suite.py``: the same subset of protocol v1 as
``bench/ceiling_autobahn.py``, built the way the Channels documentation
recommends (one consumer per WebSocket, a group per device, ``group_send``
through channels_redis). See ``serve.py`` for how it is started.
"""

"""bridge: factory devices in front of the people who run them.

One Twisted process serves a Django site, protocol v1 WebSockets and a link to
Node-RED.  Start it with ``twistd -n bridge``; manage it with ``bridge-admin``.
"""

__version__ = "0.1.0"

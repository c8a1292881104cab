"""bridge: factory devices in front of the people who run them.

One Twisted process serves a Django site, protocol v1 WebSockets and a link to
Node-RED.  Start it with ``twistd -n bridge``; manage it with ``bridge-admin``.
"""

from typing import Any

__version__ = "0.1.0"


def publish(target: str, event: str, data: Any = None) -> None:
    """Send EVENT NOTIFY to the live sessions ``target`` names; see bridge.notify."""
    from bridge.notify import publish as _publish

    _publish(target, event, data)

"""The ``twistd bridge`` plugin: options, their checks, and what reaches the service."""

from __future__ import annotations

from typing import Any

from twisted.python import usage
from twisted.trial import unittest

from twisted.plugins.bridge_plugin import BridgeServiceMaker, Options


class OptionsTests(unittest.SynchronousTestCase):
    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def made(self, *argv: str) -> Any:
        """The Settings the plugin hands to make_service."""
        seen: list[Any] = []
        import bridge.service

        self.patch(bridge.service, "make_service", lambda settings: seen.append(settings))
        BridgeServiceMaker().makeService(self.parse(*argv))
        return seen[0]

    def test_limits_have_safe_defaults(self) -> None:
        settings = self.made()
        self.assertEqual(settings.max_message_size, 65_536)
        self.assertEqual(settings.max_connections, 20_000)
        self.assertEqual(settings.max_sessions_per_user, 100)
        self.assertEqual((settings.frames_per_second, settings.frames_burst), (50.0, 200))
        self.assertEqual((settings.connect_rate, settings.connect_burst), (50.0, 500))
        self.assertEqual((settings.slow_viewer_frames, settings.slow_viewer_seconds), (1000, 30.0))

    def test_every_limit_reaches_the_service(self) -> None:
        settings = self.made(
            "--max-connections", "7",
            "--max-sessions-per-user", "3",
            "--max-message-size", "2048",
            "--frames-per-second", "5",
            "--frames-burst", "9",
            "--identify-timeout", "4",
            "--handshake-timeout", "6",
            "--connect-rate", "0",
            "--connect-burst", "11",
            "--slow-viewer-frames", "100",
            "--slow-viewer-seconds", "8",
        )  # fmt: skip
        self.assertEqual(
            (
                settings.max_connections,
                settings.max_sessions_per_user,
                settings.max_message_size,
                settings.frames_per_second,
                settings.frames_burst,
                settings.identify_timeout,
                settings.handshake_timeout,
                settings.connect_rate,
                settings.connect_burst,
                settings.slow_viewer_frames,
                settings.slow_viewer_seconds,
            ),
            (7, 3, 2048, 5.0, 9, 4.0, 6.0, 0.0, 11, 100, 8.0),
        )

    def test_a_limit_below_its_minimum_is_refused(self) -> None:
        for argv in (
            ("--max-message-size", "10"),
            ("--frames-burst", "0"),
            ("--identify-timeout", "0.5"),
            ("--connect-rate", "-1"),
            ("--max-message-size", str(32 * 1024 * 1024)),
        ):
            with self.assertRaises(usage.UsageError, msg=argv):
                self.parse(*argv)

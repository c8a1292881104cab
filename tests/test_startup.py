"""What a bridge without ``--redis`` or ``--mqtt`` loads at start-up (fresh RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.trial import unittest

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = """
import json, sys
from pathlib import Path
from bridge.service import Settings, make_service
make_service(Settings(data_dir=Path(sys.argv[1])))
print(json.dumps(sorted(sys.modules)))
"""


class StartupImportsTests(unittest.TestCase):
    def test_no_redis_or_mqtt_client_without_their_options(self) -> None:
        with tempfile.TemporaryDirectory() as data_dir:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
            env.pop("DJANGO_SETTINGS_MODULE", None)
            done = subprocess.run(
                [sys.executable, "-c", PROGRAM, data_dir],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
        self.assertEqual(done.returncode, 0, done.stderr[-2000:])
        loaded = set(json.loads(done.stdout.strip().splitlines()[-1]))
        self.assertIn("bridge.vault", loaded)
        self.assertIn("bridge.websocket", loaded)
        for name in ("txredisapi", "hiredis", "bridge.redisbus", "paho", "bridge.mqtt"):
            self.assertNotIn(name, loaded)

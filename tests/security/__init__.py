"""Security tests against a real ``twistd bridge --tls`` process (SECURITY.md).

Each module starts one bridge of its own, provisioned for what it attacks,
with :mod:`tests.security.world`; the processes are killed at exit.
"""

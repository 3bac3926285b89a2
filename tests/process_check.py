"""No process outlives the test session: a pytest plugin (tests/conftest.py loads it).

Every process the suite starts carries SEGPIPE_TEST_SESSION=<this session's id> in its environment:
it is set here, on import, before anything starts, and children inherit it (subprocesses, the
session's Ray and its workers, a `ray start` and its daemons, Chromium). At the session's end,
after the fixtures' teardown, any process still running with this id fails the session: each is
named, then stopped by its process id.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import pytest

MARK = "SEGPIPE_TEST_SESSION"
SESSION = uuid.uuid4().hex
os.environ[MARK] = SESSION
# Ray's workers exit a few seconds after their raylet; on a loaded machine (two suites at once) one took over 15 s.
# The wait ends as soon as none is left, so a longer grace costs a green session nothing
GRACE_SECONDS = float(os.environ.get("SEGPIPE_TEST_GRACE_S", "40"))


def marked_processes(session: str = SESSION) -> dict[int, str]:
    """pid -> command line of every process of this machine whose environment holds the session's
    mark (a process's environment as it started: children of the session, not the session itself)."""
    mark = f"{MARK}={session}".encode()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if mark not in f.read().split(b"\0"):
                    continue
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, its parent not told yet
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                found[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


def leftovers(grace: float = GRACE_SECONDS) -> dict[int, str]:
    """The session's processes still running after `grace` seconds."""
    deadline = time.time() + grace
    while (found := marked_processes()) and time.time() < deadline:
        time.sleep(0.5)
    return found


@pytest.hookimpl(trylast=True)  # after the runner's own sessionfinish, which tears the fixtures down
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not os.path.isdir("/proc"):
        return
    found = leftovers()
    if not found:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    lines = [f"{len(found)} processes started by the test session were still running at its end (stopped now):"]
    lines += [f"  {pid} {command}" for pid, command in sorted(found.items())]
    for line in lines:
        if reporter is not None:
            reporter.write_line(line, red=True)
        else:
            print(line)
    for pid in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    session.exitstatus = pytest.ExitCode.TESTS_FAILED

"""tests/process_check.py: a session that leaves a process running fails, naming it, and stops it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_session(tmp_path: Path, body: str) -> subprocess.CompletedProcess:
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(body))
    env = {**os.environ, "PYTHONPATH": str(HERE), "SEGPIPE_TEST_GRACE_S": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "process_check", "-p", "no:cacheprovider", "test_inner.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_session_that_leaves_a_process_running_fails_names_it_and_stops_it(tmp_path):
    pidfile = tmp_path / "pid"
    # a passing test whose child outlives it, in a session of its own (as Ray's daemons are)
    proc = run_session(
        tmp_path,
        f"""
        import subprocess
        def test_leaves_a_sleep():
            child = subprocess.Popen(["sleep", "300"], start_new_session=True)
            open({str(pidfile)!r}, "w").write(str(child.pid))
        """,
    )
    pid = int(pidfile.read_text())
    assert proc.returncode == 1, proc.stdout[-2000:]
    assert "1 passed" in proc.stdout
    assert f"{pid} sleep 300" in proc.stdout and "still running at its end" in proc.stdout
    deadline = time.time() + 10
    while alive(pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def test_a_session_whose_children_end_passes(tmp_path):
    proc = run_session(
        tmp_path,
        """
        import subprocess
        def test_waits_for_its_child():
            subprocess.run(["sleep", "0.1"], check=True)
        """,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "still running" not in proc.stdout

"""A real `erasure erase` process: SIGTERM unwinds like Ctrl-C, and a second writer to the same --out is refused."""

import os
import signal
import subprocess
import sys
import time

import pytest

from erasure.testing import save_tiny_pipeline


def wait_for_lock(lock, process, seconds=120):
    deadline = time.monotonic() + seconds
    while not lock.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the erase never took its output lock"
        time.sleep(0.2)


@pytest.mark.slow  # two full process start-ups: about a minute on 2 cores
def test_sigterm_leaves_nothing_and_a_concurrent_writer_is_refused(tmp_path):
    model = save_tiny_pipeline(tmp_path / "tiny-sd1", "sd1")
    out = tmp_path / "runs" / "run"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "erasure", "erase", "esd-x", "--model", str(model), "--prompt", "pip",
               "--iterations", "100000", "--no-progress", "--device", "cpu", "--out", str(out)]  # fmt: skip
    first = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=environment)
    try:
        wait_for_lock(out.parent / ".run.lock", first)
        second = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)
        assert second.returncode == 1
        assert f"pid {first.pid}" in second.stderr and "another process" in second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        time.sleep(1.0)  # into the training loop
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 143, stderr
    assert "terminated" in stderr and "Traceback" not in stderr
    assert list(out.parent.iterdir()) == []  # no edit, no temporary folder, no lock

"""Stopping a bench's worker for good: a warm shutdown first, then a kill of its whole group.

The benches start ``celery worker`` with ``start_new_session=True``, so the worker and its pool
children share one process group; signalling the group leaves no pool child behind to consume
in a later run.
"""

from __future__ import annotations

import os
import signal
import subprocess


def stop_group(proc: subprocess.Popen, grace: float, kill_wait: float = 30) -> None:
    """SIGTERM ``proc``'s process group, wait ``grace`` seconds, then SIGKILL the group and wait
    ``kill_wait`` more; nothing to do if ``proc`` already exited."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(kill_wait)

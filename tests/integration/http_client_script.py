"""Run by test_http_client.py in a subprocess: a program that reports progress with ProgressClient.

It advances until someone pauses the job, says so on stdout, waits until it is resumed, then finishes.
Usage: python http_client_script.py URL TOKEN
"""

from __future__ import annotations

import sys
import time

from bot.client import ProgressClient


def main() -> int:
    """Track one job through pause and resume."""
    url, token = sys.argv[1], sys.argv[2]
    client = ProgressClient(url, token)
    with client.track("subprocess build", total=1000, room="!ops:example.org") as job:
        print(f"JOB {job.id}", flush=True)
        deadline = time.monotonic() + 60
        while not job.should_pause:
            if time.monotonic() > deadline:
                print("NEVER PAUSED", flush=True)
                return 1
            job.advance(1, message=f"step {int(job.current) + 1}")
            time.sleep(0.01)
        print(f"PAUSED at {job.current:g}", flush=True)
        if not job.wait_if_paused(timeout=60):
            print("NEVER RESUMED", flush=True)
            return 1
        print("RESUMED", flush=True)
        job.report(1000, message="finishing")
        job.log("finished after a pause")
    print(f"DONE {job.status}", flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Runs a list of SDK checks against sandlet's exec API: the part `sdk_checks.py` and
`code_checks.py` share.

`run(checks, argv, setup, teardown, deadline_s)`: checks are `(name, fn(ctx))`; `argv` picks
some by name (all when empty). The lifecycle stand-in (`lifecycle_stub`) is started first, its
port in `ctx["lifecycle_port"]`, and stopped last. `setup(ctx)` runs first (reported as the
check `setup`), `teardown(ctx)` last, whatever happened. Each runs under a hard deadline (SIGALRM), so a stream
that never ends fails instead of hanging. Each check prints one `ok:` line (with its time and
whatever note it returns); the first failure prints `FAIL:` and stops. The last line is
`N passed, M failed`; the exit status is 0 only when all passed.
"""

import os
import signal
import time
import traceback

import lifecycle_stub


class CheckTimeout(Exception):
    pass


def poll(what, fn, timeout_s, interval_s=0.05):
    """Call fn() until it returns a truthy value; fail with `what` after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {timeout_s} s (last: {last!r})")
        time.sleep(interval_s)


def run(checks, argv, setup, teardown, deadline_s):
    if not os.environ.get("SANDLET_EXEC_ADDR"):
        print("FAIL: set SANDLET_EXEC_ADDR=host:port of sandlet's exec API", flush=True)
        return 2
    names = [n for n, _ in checks]
    unknown = [a for a in argv if a not in names]
    if unknown:
        print(f"unknown checks {unknown}; known: {' '.join(names)}", flush=True)
        return 2
    selected = [(n, f) for n, f in checks if not argv or n in argv]

    def on_alarm(signum, frame):
        raise CheckTimeout(f"check did not finish within {deadline_s:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    passed = 0
    current = "setup"
    ctx = {"lifecycle_port": lifecycle_stub.start()}
    try:
        for name, fn in [("setup", setup)] + selected:
            current = name
            t0 = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, deadline_s)
            try:
                note = fn(ctx)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            passed += 1
            extra = f" ({note})" if note else ""
            print(f"ok: {name} [{time.monotonic() - t0:.2f} s]{extra}", flush=True)
    except Exception as e:
        if not isinstance(e, (AssertionError, CheckTimeout)):
            traceback.print_exc()
        print(f"FAIL: {current}: {type(e).__name__}: {e}", flush=True)
        if current == "setup":
            print(f"  (is sandlet's exec API listening on {os.environ['SANDLET_EXEC_ADDR']}?)", flush=True)
        print(f"{passed} passed, 1 failed", flush=True)
        return 1
    finally:
        teardown(ctx)
        lifecycle_stub.stop()
    print(f"{passed} passed, 0 failed", flush=True)
    return 0

"""The real OpenSandbox server, on Kubernetes with sandlet-controller and sandlet, driven by the
real SDK: create, use, renew, pause, resume and kill a sandbox, in template mode and in pool
mode, checking the server's own view (`GET /v1/sandboxes/{id}`) at each step.

Run where the server and the pods' IPs are reachable (in the node's network namespace:
`controller/tests/opensandbox_server.rs` runs it through `.ci/node exec`), with the Python of a
venv holding `opensandbox-server==1.1.1` and `opensandbox==1.1.1`:

    OPENSANDBOX_SERVER=127.0.0.1:8080 OPENSANDBOX_API_KEY=... SANDBOX_IMAGE=sandlet-sandbox:dev \
    SANDBOX_POOL=opensandbox-server python tests/sdk/server_checks.py [template] [pool]

Each step prints one `ok:` line with its time; the first failure prints `FAIL:` and the script
exits 1. Every step runs under a hard deadline (SIGALRM). The figures (create -> first command
output, pause, resume) follow as one `figures: {json}` line; the last line is
`N passed, M failed`.
"""

import json
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timedelta

import httpx
from check_runner import poll
from opensandbox.config import ConnectionConfigSync
from opensandbox.sync import SandboxManagerSync, SandboxSync

SERVER = os.environ["OPENSANDBOX_SERVER"]
API_KEY = os.environ["OPENSANDBOX_API_KEY"]
IMAGE = os.environ.get("SANDBOX_IMAGE", "sandlet-sandbox:dev")
POOL = os.environ.get("SANDBOX_POOL", "opensandbox-server")
STEP_DEADLINE_S = float(os.environ.get("SERVER_CHECK_STEP_DEADLINE", "180"))
READY = timedelta(seconds=120)
MARKER = "/root/written-before-pause.txt"


class StepTimeout(Exception):
    pass


def config():
    return ConnectionConfigSync(
        domain=SERVER,
        api_key=API_KEY,
        protocol="http",
        request_timeout=timedelta(seconds=60),
    )


def server_view(sandbox_id):
    """The server's own answer for the sandbox: (HTTP status, body)."""
    response = httpx.get(
        f"http://{SERVER}/v1/sandboxes/{sandbox_id}",
        headers={"OPEN-SANDBOX-API-KEY": API_KEY},
        timeout=30,
    )
    return response.status_code, (response.json() if response.content else None)


def state(sandbox_id):
    code, body = server_view(sandbox_id)
    assert code == 200, f"GET /v1/sandboxes/{sandbox_id}: {code} {body}"
    return body["status"]["state"]


def wait_state(sandbox_id, wanted, timeout_s=STEP_DEADLINE_S - 10):
    seen = []

    def reached():
        now = state(sandbox_id)
        if not seen or seen[-1] != now:
            seen.append(now)
        return now == wanted

    poll(f"{sandbox_id} state {wanted} (seen {seen})", reached, timeout_s)
    return seen


def stdout(execution):
    return "".join(m.text for m in execution.logs.stdout).strip()


def scenario(mode):
    """The steps of one sandbox's life, as (name, fn) pairs sharing `ctx`."""
    ctx = {}
    figures = {}

    def create():
        extensions = {"poolRef": POOL} if mode == "pool" else None
        started = time.monotonic()
        sandbox = SandboxSync.create(
            IMAGE,
            entrypoint=["tail", "-f", "/dev/null"],
            resource={"cpu": "250m", "memory": "256Mi"},
            timeout=timedelta(minutes=10),
            ready_timeout=READY,
            metadata={"suite": "server-checks"},
            extensions=extensions,
            connection_config=config(),
        )
        ctx["sandbox"] = sandbox
        execution = sandbox.commands.run('echo "hello from $OPENSANDBOX_ID"')
        figures[f"{mode}_create_to_first_output_s"] = round(time.monotonic() - started, 3)
        assert stdout(execution) == f"hello from {sandbox.id}", stdout(execution)
        assert execution.exit_code in (0, None), execution.exit_code
        code, body = server_view(sandbox.id)
        assert code == 200 and body["status"]["state"] == "Running", body
        assert body["metadata"].get("suite") == "server-checks", body
        return f"id {sandbox.id}"

    def files():
        sandbox = ctx["sandbox"]
        sandbox.files.write_file(MARKER, f"kept across the pause of {sandbox.id}")
        text = sandbox.files.read_file(MARKER)
        assert text == f"kept across the pause of {sandbox.id}", text

    def snapshot():
        """The server's own snapshot API (template mode): a SandboxSnapshot the controller
        commits, and a new sandbox restored from it."""
        sandbox = ctx["sandbox"]
        manager = SandboxManagerSync.create(connection_config=config())
        snap = sandbox.create_snapshot()
        ready = poll(
            f"snapshot {snap.id} Ready",
            lambda: (lambda s: s if s.status.state in ("Ready", "Failed") else None)(
                manager.get_snapshot(snap.id)
            ),
            STEP_DEADLINE_S - 30,
        )
        assert ready.status.state == "Ready", ready.status
        restored = SandboxSync.create(
            snapshot_id=snap.id,
            ready_timeout=READY,
            connection_config=config(),
        )
        text = restored.files.read_file(MARKER)
        assert text == f"kept across the pause of {sandbox.id}", text
        restored.kill()
        restored.close()
        manager.delete_snapshot(snap.id)
        return f"snapshot {snap.id} restored as {restored.id}"

    def metrics():
        m = ctx["sandbox"].get_metrics()
        assert m.cpu_count > 0 and m.memory_total_in_mib > 0, m
        return f"{m.cpu_count} cpu, {m.memory_total_in_mib:.0f} MiB"

    def renew():
        sandbox = ctx["sandbox"]
        _, before = server_view(sandbox.id)
        sandbox.renew(timedelta(minutes=30))
        _, after = server_view(sandbox.id)
        old = datetime.fromisoformat(before["expiresAt"].replace("Z", "+00:00"))
        new = datetime.fromisoformat(after["expiresAt"].replace("Z", "+00:00"))
        assert new - old > timedelta(minutes=15), (before["expiresAt"], after["expiresAt"])
        assert after["status"]["state"] == "Running", after
        return f"expiresAt {after['expiresAt']}"

    def pause():
        sandbox = ctx["sandbox"]
        started = time.monotonic()
        sandbox.pause()
        seen = wait_state(sandbox.id, "Paused")
        figures[f"{mode}_pause_s"] = round(time.monotonic() - started, 3)
        return f"states {seen}"

    def resume():
        sandbox = ctx["sandbox"]
        started = time.monotonic()
        resumed = SandboxSync.resume(
            sandbox.id, connection_config=config(), resume_timeout=READY
        )
        text = resumed.files.read_file(MARKER)
        figures[f"{mode}_resume_s"] = round(time.monotonic() - started, 3)
        assert text == f"kept across the pause of {sandbox.id}", text
        execution = resumed.commands.run(f"cat {MARKER}")
        assert stdout(execution) == text, stdout(execution)
        execution = resumed.commands.run('echo "$OPENSANDBOX_ID"')
        assert stdout(execution) == sandbox.id, stdout(execution)
        # The SDK is done once execd answers; the server's view follows the controller's next
        # status write (the phase stays Resuming until the pod's executor has answered).
        seen = wait_state(sandbox.id, "Running")
        ctx["sandbox"] = resumed
        return f"the file written before the pause is there; states {seen}"

    def kill():
        sandbox = ctx["sandbox"]
        sandbox.kill()
        poll(
            f"{sandbox.id} gone from the server",
            lambda: server_view(sandbox.id)[0] == 404,
            STEP_DEADLINE_S - 10,
        )
        sandbox.close()

    steps = [
        ("create", create),
        ("files", files),
    ]
    if mode == "template":
        steps.append(("snapshot", snapshot))
    steps += [
        ("metrics", metrics),
        ("renew", renew),
        ("pause", pause),
        ("resume", resume),
        ("kill", kill),
    ]
    return [(f"{mode}: {name}", fn) for name, fn in steps], figures


def main(argv):
    modes = argv or ["template", "pool"]
    unknown = [m for m in modes if m not in ("template", "pool")]
    if unknown:
        print(f"unknown modes {unknown}; known: template pool", flush=True)
        return 2

    def on_alarm(signum, frame):
        raise StepTimeout(f"step did not finish within {STEP_DEADLINE_S:.0f} s")

    signal.signal(signal.SIGALRM, on_alarm)
    passed = failed = 0
    figures = {}
    for mode in modes:
        steps, mode_figures = scenario(mode)
        for name, fn in steps:
            started = time.monotonic()
            signal.setitimer(signal.ITIMER_REAL, STEP_DEADLINE_S)
            try:
                note = fn()
            except BaseException:
                signal.setitimer(signal.ITIMER_REAL, 0)
                print(f"FAIL: {name}", flush=True)
                traceback.print_exc(file=sys.stdout)
                failed += 1
                break
            signal.setitimer(signal.ITIMER_REAL, 0)
            passed += 1
            took = time.monotonic() - started
            print(f"ok: {name} ({took:.2f} s){': ' + note if note else ''}", flush=True)
        figures.update(mode_figures)
        if failed:
            break
    print(f"figures: {json.dumps(figures, sort_keys=True)}", flush=True)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

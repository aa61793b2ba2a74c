"""Checks sandlet's execd-compatible exec API with the real OpenSandbox Python SDK.

Run with the Python of a venv that has the pinned `opensandbox` package
(`pip install opensandbox==1.1.1`), with sandlet's exec API already listening:

    SANDLET_EXEC_ADDR=127.0.0.1:40123 [SANDLET_EXEC_TOKEN=...] [SANDLET_SDK_CWD=/tmp] \
        /path/to/venv/bin/python tests/sdk/sdk_checks.py [check-name ...]

The SDK finds execd through a lifecycle server; `lifecycle_stub` (a stand-in, in this
folder) plays that part in-process and points the SDK at SANDLET_EXEC_ADDR. Each check
prints one `ok:` line; the first failure prints `FAIL:` and the script exits 1. Every
check runs under a hard deadline (SIGALRM), so a stream that never ends fails instead
of hanging. The last line is `N passed, M failed`.
"""

import json
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import check_runner
import lifecycle_stub
from check_runner import poll
from opensandbox.config import ConnectionConfigSync
from opensandbox.exceptions import SandboxApiException, SandboxException
from opensandbox.models.execd import RunCommandOpts
from opensandbox.models.filesystem import (
    ContentReplaceEntry,
    DirectoryListEntry,
    MoveEntry,
    SearchEntry,
    SetPermissionEntry,
    WriteEntry,
)
from opensandbox.sync import SandboxSync

CWD = os.environ.get("SANDLET_SDK_CWD", "/tmp")
TOKEN = os.environ.get("SANDLET_EXEC_TOKEN", "")
CHECK_DEADLINE_S = float(os.environ.get("SANDLET_SDK_CHECK_DEADLINE", "30"))  # per check; generous


def out(execution):
    return [m.text for m in execution.logs.stdout]


def err(execution):
    return [m.text for m in execution.logs.stderr]


def describe(execution):
    e = execution.error
    return (
        f"id={execution.id!r} exit_code={execution.exit_code!r} stdout={out(execution)!r} "
        f"stderr={err(execution)!r} error={None if e is None else (e.name, e.value, e.traceback)!r} "
        f"complete={execution.complete is not None}"
    )


# ---------------------------------------------------------------- the checks


def check_connect(ctx):
    """Sandbox.connect: endpoint lookup at the stub, then GET /ping at SANDLET_EXEC_ADDR."""
    sb = ctx["sandbox"]
    seen = [(r["method"], r["path"]) for r in lifecycle_stub.requests()]
    want = ("GET", f"/v1/sandboxes/{lifecycle_stub.SANDBOX_ID}/endpoints/{lifecycle_stub.EXECD_PORT}")
    assert want in seen, f"the SDK did not ask the stub for the execd endpoint; it asked {seen}"
    ep = sb.get_endpoint(lifecycle_stub.EXECD_PORT)
    assert ep.endpoint == os.environ["SANDLET_EXEC_ADDR"], f"endpoint {ep.endpoint!r}"
    if TOKEN:
        assert ep.headers.get(lifecycle_stub.TOKEN_HEADER) == TOKEN, f"endpoint headers {ep.headers!r}"


def check_ping(ctx):
    """GET /ping through the SDK's health call (is_healthy swallows errors -> False)."""
    assert ctx["sandbox"].is_healthy() is True, "is_healthy() is False: GET /ping did not answer 2xx"


def check_token_required(ctx):
    """Only with SANDLET_EXEC_TOKEN: without the token header, GET /ping must be refused."""
    if not TOKEN:
        return "skipped (SANDLET_EXEC_TOKEN not set)"
    other = SandboxSync.connect(
        lifecycle_stub.NO_TOKEN_SANDBOX_ID,
        connection_config=ctx["config_factory"](),
        skip_health_check=True,
    )
    try:
        assert other.is_healthy() is False, "GET /ping without X-EXECD-ACCESS-TOKEN was accepted"
    finally:
        other.close()


def check_foreground_exit_code(ctx):
    cmds = ctx["sandbox"].commands
    ex = cmds.run("echo hello; echo err >&2; exit 3")
    # execd 1.1: each event is a line with its line ending.
    assert out(ex) == ["hello\n"], f"stdout lines: {describe(ex)}"
    assert err(ex) == ["err\n"], f"stderr lines: {describe(ex)}"
    assert ex.text == "hello", f"Execution.text: {ex.text!r}"
    assert ex.exit_code == 3, f"exit code (from the error event's evalue) should be 3: {describe(ex)}"
    assert ex.error is not None and ex.error.name == "CommandExecError", f"error event: {describe(ex)}"
    assert ex.error.value == "3", f"error evalue should be '3': {describe(ex)}"
    assert ex.id, f"no init event with the command id: {describe(ex)}"
    st = cmds.get_command_status(ex.id)
    assert st.running is False and st.exit_code == 3, f"status of the finished foreground command: {st!r}"


def check_foreground_blank_lines(ctx):
    ex = ctx["sandbox"].commands.run("printf 'a\\n\\nb\\r\\nc'")
    assert out(ex) == ["a\n", "\n", "b\r\n", "c"], f"stdout texts keep their line endings: {describe(ex)}"
    assert ex.text == "a\n\nb\nc", f"Execution.text keeps the blank line: {ex.text!r}"
    assert ex.exit_code == 0, f"exit code (from execution_complete) should be 0: {describe(ex)}"
    assert ex.error is None and ex.complete is not None, f"terminal event: {describe(ex)}"


def check_envs(ctx):
    ex = ctx["sandbox"].commands.run("echo $FOO", opts=RunCommandOpts(envs={"FOO": "bar"}))
    assert out(ex) == ["bar\n"], f"envs FOO=bar: {describe(ex)}"
    assert ex.exit_code == 0, describe(ex)


def check_cwd(ctx):
    ex = ctx["sandbox"].commands.run("pwd", opts=RunCommandOpts(working_directory=CWD))
    assert out(ex) == [CWD + "\n"], f"cwd {CWD}: {describe(ex)}"
    assert ex.exit_code == 0, describe(ex)


def check_timeout(ctx):
    t0 = time.monotonic()
    ex = ctx["sandbox"].commands.run("sleep 30", opts=RunCommandOpts(timeout=timedelta(seconds=1)))
    took = time.monotonic() - t0
    assert took < 5.0, f"a 1 s timeout took {took:.1f} s to end the stream: {describe(ex)}"
    assert ex.error is not None, f"a timed-out command should end with an error event: {describe(ex)}"
    # execd reports a signal death as evalue "-1"; the SDK turns that into exit_code -1.
    assert ex.exit_code == -1, f"timed-out command: evalue should be '-1' (exit_code -1): {describe(ex)}"


def check_background(ctx):
    cmds = ctx["sandbox"].commands
    ex = cmds.run("echo one; sleep 0.5; echo two", opts=RunCommandOpts(background=True))
    cid = ex.id
    assert cid, f"background run gave no id: {describe(ex)}"
    assert ex.complete is not None, f"background stream should end with execution_complete: {describe(ex)}"
    st = cmds.get_command_status(cid)  # right away: must not be a 404 (execd's race, not repeated)
    assert st.id in (None, cid), f"status id {st.id!r} != {cid!r}"
    assert st.started_at is not None, f"status without started_at: {st!r}"

    def finished():
        s = cmds.get_command_status(cid)
        return s if s.running is False else None

    st = poll("background command finishes", finished, 10.0)
    assert st.exit_code == 0, f"background exit code: {st!r}"
    assert st.finished_at is not None, f"finished status without finished_at: {st!r}"

    logs = cmds.get_background_command_logs(cid, cursor=0)
    assert "one\ntwo\n" in logs.content, f"logs from cursor 0: {logs.content!r}"
    assert logs.cursor is not None, "no EXECD-COMMANDS-TAIL-CURSOR header on the logs response"
    assert logs.cursor >= len(logs.content.encode()), f"cursor {logs.cursor} < bytes read"
    again = cmds.get_background_command_logs(cid, cursor=logs.cursor)
    assert again.content == "", f"logs from the returned cursor should be empty: {again.content!r}"
    assert again.cursor is not None and again.cursor >= logs.cursor, f"cursor went back: {again.cursor}"


def check_interrupt(ctx):
    cmds = ctx["sandbox"].commands
    ex = cmds.run("sleep 30", opts=RunCommandOpts(background=True))
    cid = ex.id
    assert cid, f"background run gave no id: {describe(ex)}"

    def running():
        s = cmds.get_command_status(cid)
        return s if s.running is True else None

    poll("background sleep is running", running, 5.0)
    t0 = time.monotonic()
    cmds.interrupt(cid)

    def stopped():
        s = cmds.get_command_status(cid)
        return s if s.running is False else None

    st = poll("interrupted command stops", stopped, 5.0)
    assert st.exit_code not in (None, 0), f"interrupted command's exit code: {st!r}"
    return f"stopped after {time.monotonic() - t0:.2f} s, exit_code {st.exit_code}"


def check_sessions(ctx):
    cmds = ctx["sandbox"].commands
    sid = cmds.create_session()
    assert sid, "create_session returned no id"
    r = cmds.run_in_session(sid, f"export A=1; cd {CWD}")
    assert r.exit_code == 0, f"export/cd run: {describe(r)}"
    assert r.id == sid, f"session run's init id should be the session id {sid!r}: {describe(r)}"
    r = cmds.run_in_session(sid, "echo $A; pwd")
    assert out(r) == ["1\n", CWD + "\n"], f"env and cwd should persist in the session: {describe(r)}"
    assert r.exit_code == 0, describe(r)
    r = cmds.run_in_session(sid, "sh -c 'exit 7'")
    assert r.exit_code == 7, f"session run exit code should be 7: {describe(r)}"
    cmds.delete_session(sid)
    try:
        cmds.delete_session(sid)
    except SandboxApiException as e:
        assert e.status_code == 404, f"deleting a deleted session: status {e.status_code} (want 404): {e}"
    except SandboxException as e:
        raise AssertionError(f"deleting a deleted session raised a non-API error: {type(e).__name__}: {e}")
    else:
        raise AssertionError("deleting a deleted session did not raise")


def check_metrics(ctx):
    m = ctx["sandbox"].get_metrics()
    assert m.cpu_count > 0, f"cpu_count {m.cpu_count}"
    assert 0 <= m.cpu_used_percentage <= 100 * m.cpu_count, f"cpu_used_pct {m.cpu_used_percentage}"
    assert 0 < m.memory_used_in_mib <= m.memory_total_in_mib, (
        f"mem_used_mib {m.memory_used_in_mib}, mem_total_mib {m.memory_total_in_mib}"
    )
    assert m.timestamp > 0, f"timestamp {m.timestamp}"


def check_files(ctx):
    """The SDK's filesystem calls on the sandbox's files (see `exercise_files`)."""
    exercise_files(ctx["sandbox"].files, CWD)


def exercise_files(fs, root):
    """Every call of the SDK's filesystem interface on `fs`, below directory `root`:
    directories, upload/download (ranges, streamed), info, list, search, replace (plain and
    detailed), permissions, move and delete, with unicode and spaces. Acts through `fs` alone,
    so the same calls check `sandbox.files`, `files_with_identity(...)` and an isolated session's
    `files`, in any placement."""
    base = os.path.join(root, "sdk files é")
    sub = os.path.join(base, "sub dir")
    fs.create_directories([WriteEntry(path=sub, mode=750)])
    info = fs.get_file_info([sub])[sub]
    assert info.entry_type == "directory" and info.mode == 750, info

    text = os.path.join(sub, "hello wörld.txt")
    fs.write_file(text, "hello execd\n")
    assert fs.read_file(text) == "hello execd\n"
    info = fs.get_file_info([text])[text]
    assert (info.entry_type, info.mode, info.size) == ("file", 755, 12), info

    blob = bytes(range(256)) * 1000
    binary = os.path.join(sub, "blob.bin")
    fs.write_file(binary, blob, mode=644)
    assert fs.read_bytes(binary) == blob
    assert fs.read_bytes(binary, range_header="bytes=10-19") == blob[10:20]
    assert b"".join(fs.read_bytes_stream(binary, chunk_size=4096)) == blob

    # A file whose directories do not exist yet: made for it, as execd's `mkdir -p`.
    fresh = os.path.join(root, "sdk upload é", "new dir", "note.txt")
    fs.write_file(fresh, "parents made\n")
    assert fs.read_file(fresh) == "parents made\n"

    listed = [e.path for e in fs.list_directory(DirectoryListEntry(path=base, depth=2))]
    assert listed == [sub, binary, text], listed
    found = [e.path for e in fs.search(SearchEntry(path=base, pattern="*.txt"))]
    assert found == [text], found

    fs.replace_contents([ContentReplaceEntry(path=text, old_content="hello", new_content="hi")])
    assert fs.read_file(text) == "hi execd\n"
    detailed = fs.replace_contents_detailed(
        [ContentReplaceEntry(path=text, old_content="e", new_content="E")]
    )
    assert [(r.path, r.replaced_count) for r in detailed] == [(text, 2)], detailed
    assert fs.get_file_info([text])[text].mode == 755, "replace keeps the mode"

    fs.set_permissions([SetPermissionEntry(path=text, mode=600)])
    assert fs.get_file_info([text])[text].mode == 600

    moved = os.path.join(base, "elsewhere", "moved.txt")
    fs.move_files([MoveEntry(source=text, destination=moved)])
    assert fs.read_file(moved) == "hi ExEcd\n"
    expect_error(
        lambda: fs.move_files([MoveEntry(source=moved, destination=binary)]),
        409,
        "moving onto an existing file succeeded",
    )
    assert fs.read_bytes(binary) == blob, "a refused move changes nothing"

    fs.delete_files([moved, fresh])
    expect_error(lambda: fs.read_file(moved), 404, "a deleted file could still be read")
    fs.delete_directories([base, os.path.join(root, "sdk upload é")])
    expect_error(lambda: fs.get_file_info([base]), 404, "a deleted directory is still there")


def expect_error(call, status, why):
    """`call` must fail with HTTP `status` and execd's error body, JSON `{"code", "message"}`."""
    try:
        call()
    except SandboxApiException as e:
        assert e.status_code == status, f"{why}: expected {status}, got {e.status_code}: {e}"
        body = json.loads(e.response_body) if e.response_body else None
        assert isinstance(body, dict) and body.get("code") and body.get("message"), (
            f"{why}: the {status} is not JSON {{code, message}}: {e.response_body!r}"
        )
    else:
        raise AssertionError(why)


CHECKS = [
    ("connect", check_connect),
    ("ping", check_ping),
    ("token-required", check_token_required),
    ("foreground-exit-code", check_foreground_exit_code),
    ("foreground-blank-lines", check_foreground_blank_lines),
    ("envs", check_envs),
    ("cwd", check_cwd),
    ("timeout", check_timeout),
    ("background", check_background),
    ("interrupt", check_interrupt),
    ("sessions", check_sessions),
    ("metrics", check_metrics),
    ("files", check_files),
]


def connect(ctx):
    """The setup every check script shares: the SDK connects through the lifecycle stand-in."""

    def config_factory():
        return ConnectionConfigSync(
            domain=f"127.0.0.1:{ctx['lifecycle_port']}",
            protocol="http",
            request_timeout=timedelta(seconds=20),
        )

    ctx["config_factory"] = config_factory
    ctx["sandbox"] = SandboxSync.connect(
        lifecycle_stub.SANDBOX_ID,
        connection_config=config_factory(),
        connect_timeout=timedelta(seconds=20),
    )


def disconnect(ctx):
    if "sandbox" in ctx:
        ctx["sandbox"].close()


def main(argv):
    return check_runner.run(CHECKS, argv, connect, disconnect, CHECK_DEADLINE_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

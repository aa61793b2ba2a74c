"""Checks what execd 1.1 added, with the real OpenSandbox Python SDK 1.1.1: commands given as
argv, line-ranged reads, uploads framed as the 1.1 SDK frames them, set_env, files_with_identity,
isolated sessions. Every check acts through the SDK alone, so it runs the same against sandlet
in local and in sidecar placement.

Run like sdk_checks.py (same stand-in lifecycle server, same environment variables):

    SANDLET_EXEC_ADDR=127.0.0.1:40123 [SANDLET_SDK_CWD=/tmp] \\
        /path/to/venv/bin/python tests/sdk/sdk11_checks.py [check-name ...]
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from opensandbox.models.filesystem import DirectoryListEntry, WriteEntry
from opensandbox.models.isolated import (
    CreateIsolatedSessionRequest,
    IsolatedOverlaySpec,
    IsolatedRunOpts,
    IsolatedWorkspaceSpec,
)

import check_runner
from sdk_checks import (
    CHECK_DEADLINE_S,
    CWD,
    check_connect,
    connect,
    describe,
    disconnect,
    err,
    exercise_files,
    expect_error,
    out,
)


def check_argv(ctx):
    """commands.run(list) sends argv: nothing is split or expanded, no shell runs."""
    cmds = ctx["sandbox"].commands
    ex = cmds.run(["sh", "-c", 'printf "%s|%s\\n" "$0" "$1"', "a b", "$HOME;*"])
    assert out(ex) == ["a b|$HOME;*\n"], f"argv arrives as sent: {describe(ex)}"
    assert ex.exit_code == 0, describe(ex)
    st = cmds.get_command_status(ex.id)
    assert st.content and st.content.startswith("sh -c "), f"status content: {st!r}"
    ex = cmds.run(["no-such-program-x9"])
    assert ex.error is not None and "no-such-program-x9" in ex.error.value, describe(ex)
    ex = cmds.run(["sh", "-c", "exit 5"])
    assert ex.exit_code == 5, describe(ex)


def check_output_line_endings(ctx):
    """Events keep their line endings; Execution.text shows the lines (blank ones too)."""
    ex = ctx["sandbox"].commands.run("printf 'one\\n\\ntwo\\r\\nthree'; printf 'e1\\ne2\\n' >&2")
    assert out(ex) == ["one\n", "\n", "two\r\n", "three"], describe(ex)
    assert err(ex) == ["e1\n", "e2\n"], describe(ex)
    assert ex.text == "one\n\ntwo\nthree", f"text: {ex.text!r}"


def check_read_lines(ctx):
    """read_file(offset=, limit=) on the sandbox's files (see `read_lines`)."""
    read_lines(ctx["sandbox"].files, CWD)


def read_lines(fs, root):
    """read_file(offset=, limit=): lines from a 1-based offset, as text; not with a Range."""
    path = os.path.join(root, "sdk11 lines.txt")
    fs.write_file(path, "l1\nl2\nl3\nl4\n")
    assert fs.read_file(path, offset=2, limit=2) == "l2\nl3\n"
    assert fs.read_file(path, offset=4) == "l4\n"
    assert fs.read_file(path, limit=1) == "l1\n"
    assert fs.read_file(path, offset=9) == ""
    expect_error(
        lambda: fs.read_file(path, offset=2, range_header="bytes=0-1"),
        400,
        "offset together with a Range header was accepted",
    )
    fs.delete_files([path])


def check_upload_paths(ctx):
    """write_files: each file lands at its metadata path, whatever the part's file name."""
    fs = ctx["sandbox"].files
    a = os.path.join(CWD, "sdk11 a", "same.txt")
    b = os.path.join(CWD, "sdk11 b", "same.txt")
    fs.write_files([WriteEntry(path=a, data="in a\n"), WriteEntry(path=b, data=b"in b\n", mode=600)])
    assert fs.read_file(a) == "in a\n" and fs.read_file(b) == "in b\n"
    assert fs.get_file_info([b])[b].mode == 600


def check_set_env(ctx):
    """set_env appends to the EXECD_ENVS file; later commands and sessions start with it."""
    cmds = ctx["sandbox"].commands
    cmds.set_env("SDK11_PLAIN", "hello world $HOME")
    cmds.set_env("SDK11_QUOTE", "it's \"quoted\"")
    ex = cmds.run('printf "%s|%s\\n" "$SDK11_PLAIN" "$SDK11_QUOTE"')
    assert out(ex) == ['hello world $HOME|it\'s "quoted"\n'], describe(ex)
    sid = cmds.create_session()
    r = cmds.run_in_session(sid, 'echo "$SDK11_PLAIN"')
    assert out(r) == ["hello world $HOME\n"], describe(r)
    cmds.delete_session(sid)


def check_files_with_identity(ctx):
    """files_with_identity(uid, gid): every file call as that identity; the kernel decides.

    SANDLET_SDK_IDENTITY=uid:gid:dir:name names the identity (known to the sandbox's passwd as
    `name`) and a directory it owns; the scratch directory (SANDLET_SDK_CWD) holds `secret`, a
    file only root may read."""
    spec = os.environ.get("SANDLET_SDK_IDENTITY")
    if not spec:
        return "skipped (SANDLET_SDK_IDENTITY not set)"
    uid, gid, home, name = spec.split(":", 3)
    uid, gid = int(uid), int(gid)
    root = ctx["sandbox"].files
    fs = ctx["sandbox"].files_with_identity(uid, gid)
    mine = os.path.join(home, "by identity", "note.txt")
    fs.write_file(mine, "written as the identity\n", mode=640)
    assert fs.read_file(mine) == "written as the identity\n"
    info = root.get_file_info([mine])[mine]
    assert (info.owner, info.mode) == (name, 640), info
    secret = os.path.join(CWD, "secret")
    expect_error(lambda: fs.read_file(secret), 403, "the identity read a file only root may read")
    expect_error(lambda: fs.write_file(os.path.join(CWD, "not mine.txt"), "x"), 403, "the identity wrote where it may not")
    expect_error(lambda: root.get_file_info([os.path.join(CWD, "not mine.txt")]), 404, "a refused write left a file")
    listed = [e.path for e in fs.list_directory(DirectoryListEntry(path=home, depth=2))]
    assert mine in listed, listed
    fs.delete_files([mine])
    expect_error(lambda: root.read_file(mine), 404, "a deleted file could still be read")
    assert root.read_file(secret) == "root only\n"
    stranger = ctx["sandbox"].files_with_identity(3999999, 0)
    expect_error(lambda: stranger.read_file(mine), 400, "a uid the sandbox does not know was taken")
    expect_error(lambda: stranger.write_file(os.path.join(home, "stranger.txt"), "x"), 400, "a uid the sandbox does not know wrote")
    expect_error(lambda: root.get_file_info([os.path.join(home, "stranger.txt")]), 404, "a refused identity left a file")
    # Every other call of the filesystem interface, as the identity, in what it owns.
    exercise_files(fs, home)
    read_lines(fs, home)


def check_isolation(ctx):
    """sandbox.isolation: capabilities, a session's runs (streamed, background, timed out), its
    files, its state, attach, list, delete, run_once; and what is refused.

    SANDLET_SDK_ISOLATION_WS: a workspace directory in the sandbox."""
    ws = os.environ.get("SANDLET_SDK_ISOLATION_WS")
    if not ws:
        return "skipped (SANDLET_SDK_ISOLATION_WS not set)"
    iso = ctx["sandbox"].isolation
    caps = iso.capabilities()
    assert caps.available and caps.setpriv_available, caps
    session = iso.create(CreateIsolatedSessionRequest(workspace=IsolatedWorkspaceSpec(path=ws)))
    assert session.info.profile == "strict" and session.info.workspace.path == ws, session.info
    ex = session.run("echo hi > made.txt; cat made.txt; ls /proc | grep -c '^[0-9]'")
    assert ex.exit_code == 0 and out(ex)[0] == "hi\n", describe(ex)
    assert int(out(ex)[1]) <= 4, f"the session sees only its own processes: {describe(ex)}"
    expect_error(lambda: ctx["sandbox"].files.read_file(ws + "/made.txt"), 404, "the overlay wrote through")
    assert session.files.read_file(ws + "/made.txt") == "hi\n"
    session.files.write_file(ws + "/via-sdk.txt", "sdk\n")
    assert out(session.run("cat via-sdk.txt")) == ["sdk\n"]
    expect_error(lambda: session.files.read_file(ws + "/../escape.txt"), 400, "a path outside the overlay was taken")
    expect_error(lambda: session.files.write_file("/etc/escape.txt", "x"), 400, "a write outside the overlays was taken")
    expect_error(
        lambda: session.files.write_file(ws + "/../escape.txt", "x"),
        400,
        "a write climbing out of the overlay was taken",
    )
    # Every other call of the filesystem interface, in the session's view of its workspace.
    exercise_files(session.files, ws)
    read_lines(session.files, ws)
    expect_error(
        lambda: ctx["sandbox"].files.get_file_info([os.path.join(ws, "sdk files é")]),
        404,
        "the session's files reached the sandbox's workspace",
    )

    started = session.run_background("echo one; sleep 0.2; echo two; exit 4")
    st = check_runner.poll("the background run ends", lambda: (lambda s: s if not s.running else None)(session.run_status(started.run_id)), 10.0)
    assert st.exit_code == 4 and st.finished_at is not None, st
    logs = session.run_logs(started.run_id)
    assert logs.text == "one\ntwo\n", logs
    assert session.run_logs(started.run_id, cursor=logs.cursor).text == ""
    expect_error(lambda: session.run_status("no-such-run"), 404, "an unknown run had a status")
    expect_error(lambda: session.run_logs("no-such-run"), 404, "an unknown run had logs")

    t0 = time.monotonic()
    ex = session.run("sleep 30", opts=IsolatedRunOpts(timeout_seconds=1))
    assert ex.exit_code == -1 and time.monotonic() - t0 < 10, describe(ex)
    ex = session.run('echo "$X"', opts=IsolatedRunOpts(envs={"X": "from the run"}))
    assert out(ex) == ["from the run\n"], describe(ex)

    state = session.get()
    assert state.status == "active" and state.idle_remaining_seconds is not None, state
    assert any(x.session_id == session.session_id for x in iso.list())
    again = iso.attach(session.session_id)
    assert again.info.workspace.path == ws and out(again.run("cat made.txt")) == ["hi\n"]
    session.delete()
    expect_error(session.get, 404, "a deleted session still answered")
    expect_error(lambda: session.run("true"), 404, "a deleted session ran code")
    expect_error(lambda: session.run_background("true"), 404, "a deleted session ran code in the background")
    expect_error(lambda: session.run_status(started.run_id), 404, "a deleted session's run had a status")
    expect_error(lambda: session.files.read_file(ws + "/made.txt"), 404, "a deleted session's files were read")
    expect_error(session.delete, 404, "a deleted session was deleted again")

    ex = iso.run_once("echo once", workspace=ws)
    assert out(ex) == ["once\n"], describe(ex)
    assert not [x for x in iso.list() if x.status == "active"], "run_once left its session"
    expect_error(lambda: iso.attach("00000000-0000-4000-8000-000000000000"), 404, "an unknown session was attached")
    expect_error(
        lambda: iso.create(CreateIsolatedSessionRequest(workspace=IsolatedWorkspaceSpec(path="relative"))),
        400,
        "a relative workspace was taken",
    )
    expect_error(
        lambda: iso.create(CreateIsolatedSessionRequest(overlays=[IsolatedOverlaySpec(path=ws, mode="rw", persist=True)])),
        400,
        "persist with an rw overlay was taken",
    )


CHECKS = [
    ("connect", check_connect),
    ("argv", check_argv),
    ("output-line-endings", check_output_line_endings),
    ("read-lines", check_read_lines),
    ("upload-paths", check_upload_paths),
    ("set-env", check_set_env),
    ("files-with-identity", check_files_with_identity),
    ("isolation", check_isolation),
]


if __name__ == "__main__":
    sys.exit(check_runner.run(CHECKS, sys.argv[1:], connect, disconnect, CHECK_DEADLINE_S))

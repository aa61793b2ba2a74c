"""Checks what execd 1.1 added, with the real OpenSandbox Python SDK 1.1.1: commands given as
argv, line-ranged reads, uploads framed as the 1.1 SDK frames them, set_env, files_with_identity.

Run like sdk_checks.py (same stand-in lifecycle server, same environment variables):

    SANDLET_EXEC_ADDR=127.0.0.1:40123 [SANDLET_SDK_CWD=/tmp] \\
        /path/to/venv/bin/python tests/sdk/sdk11_checks.py [check-name ...]
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from opensandbox.exceptions import SandboxException
from opensandbox.models.filesystem import DirectoryListEntry, WriteEntry

import check_runner
from sdk_checks import CHECK_DEADLINE_S, CWD, check_connect, connect, describe, disconnect, err, out


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
    """read_file(offset=, limit=): lines from a 1-based offset, as text; not with a Range."""
    fs = ctx["sandbox"].files
    path = os.path.join(CWD, "sdk11 lines.txt")
    fs.write_file(path, "l1\nl2\nl3\nl4\n")
    assert fs.read_file(path, offset=2, limit=2) == "l2\nl3\n"
    assert fs.read_file(path, offset=4) == "l4\n"
    assert fs.read_file(path, limit=1) == "l1\n"
    assert fs.read_file(path, offset=9) == ""
    try:
        fs.read_file(path, offset=2, range_header="bytes=0-1")
    except SandboxException as e:
        assert "400" in str(e) or getattr(e, "status_code", None) == 400, e
    else:
        raise AssertionError("offset together with a Range header was accepted")


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

    SANDLET_SDK_IDENTITY=uid:gid:dir names the identity and a directory it owns; the scratch
    directory (SANDLET_SDK_CWD) holds a file only root may read, `secret`."""
    spec = os.environ.get("SANDLET_SDK_IDENTITY")
    if not spec:
        return "skipped (SANDLET_SDK_IDENTITY not set)"
    uid, gid, home = spec.split(":", 2)
    uid, gid = int(uid), int(gid)
    fs = ctx["sandbox"].files_with_identity(uid, gid)
    mine = os.path.join(home, "by identity", "note.txt")
    fs.write_file(mine, "written as the identity\n", mode=640)
    assert fs.read_file(mine) == "written as the identity\n"
    info = fs.get_file_info([mine])[mine]
    assert info.mode == 640, info
    st = os.stat(mine)
    assert (st.st_uid, st.st_gid) == (uid, gid), f"owned by {st.st_uid}:{st.st_gid}"
    try:
        fs.read_file(os.path.join(CWD, "secret"))
    except SandboxException as e:
        assert getattr(e, "status_code", None) == 403 or "403" in str(e), e
    else:
        raise AssertionError("the identity read a file only root may read")
    try:
        fs.write_file(os.path.join(CWD, "not mine.txt"), "x")
    except SandboxException:
        pass
    else:
        raise AssertionError("the identity wrote where it may not")
    assert not os.path.exists(os.path.join(CWD, "not mine.txt"))
    listed = [e.path for e in fs.list_directory(DirectoryListEntry(path=home, depth=2))]
    assert mine in listed, listed
    fs.delete_files([mine])
    assert not os.path.exists(mine)
    assert ctx["sandbox"].files.read_file(os.path.join(CWD, "secret")) == "root only\n"


CHECKS = [
    ("connect", check_connect),
    ("argv", check_argv),
    ("output-line-endings", check_output_line_endings),
    ("read-lines", check_read_lines),
    ("upload-paths", check_upload_paths),
    ("set-env", check_set_env),
    ("files-with-identity", check_files_with_identity),
]


if __name__ == "__main__":
    sys.exit(check_runner.run(CHECKS, sys.argv[1:], connect, disconnect, CHECK_DEADLINE_S))

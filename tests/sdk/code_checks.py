"""Checks sandlet's /code routes with the real code-interpreter SDK
(`pip install opensandbox-code-interpreter==1.1.1`), sandlet's exec API already listening and
backed by a Jupyter server with the python and bash kernels and matplotlib:

    SANDLET_EXEC_ADDR=127.0.0.1:40123 [SANDLET_EXEC_TOKEN=...] [SANDLET_SKIP_HEALTH_CHECK=1] \
        /path/to/venv/bin/python tests/sdk/code_checks.py [check-name ...]

`CodeInterpreterSync.create` runs the SDK's strict health check (GET /ping, then a command
that connects to 127.0.0.1:${JUPYTER_PORT:-44771}) unless SANDLET_SKIP_HEALTH_CHECK is set.
The lifecycle server is the stand-in of `lifecycle_stub`; `check_runner` runs the checks
(one `ok:` line each, `FAIL:` at the first failure, `N passed, M failed` last).
"""

import base64
import json
import os
import re
import sys
import threading
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import check_runner
import httpx
import lifecycle_stub
from code_interpreter.models.code_sync import CodeContextSync
from code_interpreter.sync import CodeInterpreterSync
from opensandbox.config import ConnectionConfigSync
from opensandbox.exceptions import SandboxException
from opensandbox.models.execd_sync import ExecutionHandlersSync
from opensandbox.sync import SandboxSync

TOKEN = os.environ.get("SANDLET_EXEC_TOKEN", "")
CHECK_DEADLINE_S = float(os.environ.get("SANDLET_SDK_CHECK_DEADLINE", "60"))  # kernels start slowly
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def describe(ex):
    e = ex.error
    return (
        f"id={ex.id!r} stdout={[m.text for m in ex.logs.stdout]!r} "
        f"stderr={[m.text for m in ex.logs.stderr]!r} results={[r.text for r in ex.result]!r} "
        f"error={None if e is None else (e.name, e.value, e.traceback[-1:] if e.traceback else None)!r} "
        f"complete={ex.complete is not None}"
    )


def stdout(ex):
    return "".join(m.text for m in ex.logs.stdout)


def raw_events(body):
    """POST /code outside the SDK (which keeps only `results.text`): every event of the stream."""
    headers = {"X-EXECD-ACCESS-TOKEN": TOKEN} if TOKEN else {}
    url = f"http://{os.environ['SANDLET_EXEC_ADDR']}/code"
    events = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=None) as r:
        assert r.status_code == 200, f"POST /code: {r.status_code} {r.read()!r}"
        for line in r.iter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events


# ---------------------------------------------------------------- the checks


def check_state_kept(ctx):
    codes = ctx["ci"].codes
    c = codes.create_context("python")
    assert c.id and c.language == "python", f"context {c!r}"
    ctx["python"] = c
    first = codes.run("x = 41\ny = 'kept'", context=c)
    assert first.error is None and first.complete is not None, describe(first)
    second = codes.run("x + 1", context=c)
    assert [r.text for r in second.result] == ["42"], f"state across runs: {describe(second)}"
    assert second.id == c.id, f"init carries the context id: {second.id!r} != {c.id!r}"
    assert second.execution_count == 2, f"execution_count: {second.execution_count!r}"


def check_stdout_stderr(ctx):
    ex = ctx["ci"].codes.run(
        "import sys\nprint('out line')\nprint('err line', file=sys.stderr)\nprint(y)",
        context=ctx["python"],
    )
    assert stdout(ex) == "out line\nkept\n", describe(ex)
    assert "".join(m.text for m in ex.logs.stderr) == "err line\n", describe(ex)
    assert ex.error is None and ex.complete is not None, describe(ex)


def check_exception(ctx):
    ex = ctx["ci"].codes.run("def f():\n    return 1/0\nf()", context=ctx["python"])
    assert ex.error is not None, describe(ex)
    assert ex.error.name == "ZeroDivisionError" and ex.error.value == "division by zero", describe(ex)
    # The kernel's traceback as it sent it, colours (ANSI escapes) included.
    tb = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(ex.error.traceback))
    assert "ZeroDivisionError" in tb and "return 1/0" in tb, f"traceback: {ex.error.traceback!r}"
    assert ex.complete is not None, f"execution_complete after the error: {describe(ex)}"
    again = ctx["ci"].codes.run("x", context=ctx["python"])
    assert [r.text for r in again.result] == ["41"], f"the context works after an error: {describe(again)}"


def check_default_context(ctx):
    codes = ctx["ci"].codes
    a = codes.run("z = 7", language="python")
    b = codes.run("z * 6", language="python")
    assert a.id and a.id == b.id, f"one default context: {a.id!r} {b.id!r}"
    assert [r.text for r in b.result] == ["42"], describe(b)


def check_matplotlib_png(ctx):
    code = (
        "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n"
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('sandlet')\nplt.show()"
    )
    ex = ctx["ci"].codes.run(code, context=ctx["python"])
    assert ex.error is None and ex.complete is not None, describe(ex)
    texts = [r.text for r in ex.result]
    assert any(t.startswith("<Figure size") for t in texts), f"the figure's result: {describe(ex)}"
    # The SDK keeps only the text; the PNG is in the same stream's result event.
    events = raw_events({"code": code, "context": {"id": ctx["python"].id, "language": "python"}})
    pngs = [e["results"]["image/png"] for e in events if e["type"] == "result" and "image/png" in e.get("results", {})]
    assert len(pngs) == 1, f"one image/png result: {[e['type'] for e in events]}"
    png = base64.b64decode(pngs[0])
    assert png.startswith(PNG_MAGIC) and len(png) > 1000, f"not a PNG: {png[:16]!r} ({len(png)} bytes)"
    return f"{len(png)} byte PNG"


def check_interrupt(ctx):
    codes = ctx["ci"].codes
    c = codes.create_context("python")
    started = threading.Event()
    handlers = ExecutionHandlersSync(on_stdout=lambda m: started.set())
    box = {}

    def spin():
        box["ex"] = codes.run("print('spinning', flush=True)\nwhile True: pass", context=c, handlers=handlers)

    t = threading.Thread(target=spin, daemon=True)
    t.start()
    assert started.wait(30), "the loop never printed that it started"
    t0 = time.monotonic()
    codes.interrupt(c.id)
    t.join(20)
    assert not t.is_alive(), "the run did not end after the interrupt"
    took = time.monotonic() - t0
    ex = box["ex"]
    assert ex.error is not None and ex.error.name == "KeyboardInterrupt", describe(ex)
    assert ex.complete is not None, describe(ex)
    after = codes.run("6 * 7", context=c)
    assert [r.text for r in after.result] == ["42"], f"the context works after the interrupt: {describe(after)}"
    codes.delete_context(c.id)
    return f"ended {took:.2f} s after the interrupt"


def check_bash(ctx):
    codes = ctx["ci"].codes
    c = codes.create_context("bash")
    assert c.language == "bash", repr(c)
    ctx["bash"] = c
    ex = codes.run("export GREETING=hello\ncd /tmp\necho $GREETING", context=c)
    assert stdout(ex) == "hello\n", describe(ex)
    ex = codes.run("echo $GREETING from $(pwd)", context=c)
    assert stdout(ex) == "hello from /tmp\n", f"bash state across runs: {describe(ex)}"


def check_list_and_delete(ctx):
    codes = ctx["ci"].codes
    py = {c.id for c in codes.list_contexts("python")}
    assert ctx["python"].id in py, f"{ctx['python'].id} not in {py}"
    assert all(c.language == "python" for c in codes.list_contexts("python"))
    got = codes.get_context(ctx["bash"].id)
    assert (got.id, got.language) == (ctx["bash"].id, "bash"), repr(got)
    codes.delete_context(ctx["bash"].id)
    assert ctx["bash"].id not in {c.id for c in codes.list_contexts("bash")}
    try:
        codes.get_context(ctx["bash"].id)
        raise AssertionError("a deleted context was still found")
    except SandboxException as e:
        assert "404" in str(e) or "CONTEXT_NOT_FOUND" in str(e), f"deleted context: {e}"
    codes.delete_contexts("python")
    assert codes.list_contexts("python") == [], "delete by language left python contexts"


def check_bad_input(ctx):
    codes = ctx["ci"].codes
    for what, call, expect in [
        ("unknown language", lambda: codes.create_context("cobol"), "INVALID_REQUEST_BODY"),
        ("unknown context", lambda: codes.get_context("0" * 32), "CONTEXT_NOT_FOUND"),
        ("delete unknown context", lambda: codes.delete_context("0" * 32), "CONTEXT_NOT_FOUND"),
        (
            "run in an unknown context",
            lambda: codes.run("1", context=CodeContextSync(id="0" * 32, language="python")),
            "CONTEXT_NOT_FOUND",
        ),
    ]:
        try:
            call()
        except SandboxException as e:
            assert expect in str(e), f"{what}: {e}"
        else:
            raise AssertionError(f"{what} was accepted")


CHECKS = [
    ("state-kept", check_state_kept),
    ("stdout-stderr", check_stdout_stderr),
    ("exception", check_exception),
    ("default-context", check_default_context),
    ("matplotlib-png", check_matplotlib_png),
    ("interrupt", check_interrupt),
    ("bash", check_bash),
    ("list-and-delete", check_list_and_delete),
    ("bad-input", check_bad_input),
]


def main(argv):
    def setup(ctx):
        config = ConnectionConfigSync(
            domain=f"127.0.0.1:{ctx['lifecycle_port']}",
            protocol="http",
            request_timeout=timedelta(seconds=60),
        )
        ctx["sandbox"] = SandboxSync.connect(lifecycle_stub.SANDBOX_ID, connection_config=config)
        ctx["ci"] = CodeInterpreterSync.create(
            ctx["sandbox"], skip_health_check=bool(os.environ.get("SANDLET_SKIP_HEALTH_CHECK"))
        )

    def teardown(ctx):
        if "ci" in ctx:
            ctx["ci"].close()
        if "sandbox" in ctx:
            ctx["sandbox"].close()

    return check_runner.run(CHECKS, argv, setup, teardown, CHECK_DEADLINE_S)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

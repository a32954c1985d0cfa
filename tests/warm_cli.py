"""A warm `forge-ds` for the many bad-input tests: one interpreter pays the imports (torch, DeepSpeed, datasets;
5-10 s on a busy 2-core machine) once, then forks a fresh child per command. Each child runs
`forge_ds.cli.main(args)` exactly as the console script does, in its own working directory and environment, with
its stdout/stderr in files, and ends with the exit status the console script would have; so every case is still a
real process whose exit code, stderr and timing are observed from outside, 30 cases cost seconds, not minutes.

Run as a script it is the server (one JSON request per stdin line, one JSON reply per stdout line); `WarmCli`
is the client the tests use.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(args: list[str], cwd: str, env: dict, out: str, err: str) -> None:
    """Inside the fork: become `forge-ds <args>` and never return."""
    code = 1
    try:
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
        for fd, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = ["forge-ds", *args]
        from forge_ds.cli import main

        try:
            main(args)
            code = 0
        except SystemExit as e:  # what the interpreter does with SystemExit at top level
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:  # noqa: BLE001 - an uncaught exception: traceback and status 1, as python does
            traceback.print_exc()
            code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve() -> None:
    # Replies go to a private copy of stdout; fd 1 becomes stderr, so a library printing at import time cannot
    # corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import datasets  # noqa: F401 - imported here once, before any fork
    import deepspeed  # noqa: F401
    import forge_ds.cli  # noqa: F401
    import forge_ds.train  # noqa: F401

    print(json.dumps({"ready": True}), file=replies, flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        tmp = tempfile.mkdtemp(prefix="warm-cli-")
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        started = time.time()
        pid = os.fork()
        if pid == 0:
            _child(req["args"], req["cwd"], req["env"], out, err)
        status = None
        while time.time() - started < req["timeout"]:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        reply = {"returncode": code, "stdout": Path(out).read_text(errors="replace"),
                 "stderr": Path(err).read_text(errors="replace"), "wall_s": time.time() - started}
        for path in (out, err):
            os.unlink(path)
        os.rmdir(tmp)
        print(json.dumps(reply), file=replies, flush=True)


class WarmCli:
    """Client: `run(args, cwd=..., env=...)` returns a conftest.Result from a forked `forge-ds` process."""

    def __init__(self, env: dict):
        self.env = env
        # Not waited for here: the imports overlap whatever the caller does next (e.g. a real run).
        self.proc = subprocess.Popen([sys.executable, __file__], cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.ready = False

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError("the warm forge-ds server did not answer (see its stderr above)")
        return json.loads(line)

    def run(self, args: list[str], cwd: Path, env: dict | None = None, timeout: float = 120):
        from conftest import Result

        if not self.ready:
            self._read(timeout=300)
            self.ready = True
        req = {"args": [str(a) for a in args], "cwd": str(cwd), "env": {**self.env, **(env or {})},
               "timeout": timeout}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._read(timeout + 30)
        return Result(reply["returncode"], reply["stdout"], reply["stderr"], reply["wall_s"])

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    serve()

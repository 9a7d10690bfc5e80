"""Running the command line from a spec test, the way a user runs it.

`run_cli("steps", "--records", 10, ...)` starts `python -m reference steps --records 10 ...` in a new
interpreter, offline (no model hub), and returns its exit code, stdout and stderr. Arguments may be paths or
numbers; they are passed as text. `text=False` keeps the output as the bytes the process wrote (a test that
looks for a secret in them must not lose any to decoding); `python_flags` go to the interpreter before `-m`.

`run_main(...)` calls `reference.cli.main` in this process instead, for the many quick refusals of
spec/test_cli_inputs.py, where a new interpreter per case would spend seconds importing torch each time.
It catches argparse's own `SystemExit` and returns the same triple.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from typing import NamedTuple

OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
QA = ("--columns", "instruction=input,response=output")
"""The column map of the QA fixture (fixtures/data/qa111_sample.jsonl), as command-line flags."""


class Ran(NamedTuple):
    """What a command did: the names of subprocess.CompletedProcess, and `code, out, err = ...` unpacks it."""

    returncode: int
    stdout: str | bytes
    stderr: str | bytes


def cli_command(*args, python_flags: tuple[str, ...] = ()) -> list[str]:
    """The argv of `python -m reference ARGS...` with this interpreter (for a test that must hold the process)."""
    return [sys.executable, *python_flags, "-m", "reference", *map(str, args)]


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment with the model hub off, plus `extra`."""
    return {**os.environ, **OFFLINE, **extra}


def run_cli(
    *args,
    input: str | None = None,
    env: dict[str, str] | None = None,
    cwd=None,
    timeout=600,
    text: bool = True,
    python_flags: tuple[str, ...] = (),
) -> Ran:
    """`python -m reference ARGS...` run to its end: exit code, stdout, stderr."""
    done = subprocess.run(
        cli_command(*args, python_flags=python_flags),
        input=input,
        capture_output=True,
        text=text,
        timeout=timeout,
        env=offline_env(**(env or {})),
        cwd=cwd,
    )
    return Ran(done.returncode, done.stdout, done.stderr)


def run_main(*args) -> Ran:
    """`reference.cli.main(ARGS)` in this process: exit code (argparse's SystemExit included), stdout, stderr."""
    from reference import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code
    return Ran(code, out.getvalue(), err.getvalue())


def killed_after_step(argv: list, step: int, total: int, timeout: float = 120) -> list[str]:
    """Run a training command and send it SIGKILL once it reports optimizer step `step` of `total` (its progress
    line `epoch ... step STEP/TOTAL ...`), as a power cut or the OOM killer would end it; the lines it wrote to
    stderr until then are returned. Fails when the process was not killed."""
    import signal

    process = subprocess.Popen(cli_command(*argv), stderr=subprocess.PIPE, text=True, env=offline_env())
    seen = []
    for line in process.stderr:
        seen.append(line)
        if line.startswith("epoch ") and f" step {step}/{total} " in line:
            process.send_signal(signal.SIGKILL)
            break
    process.stderr.close()
    process.wait(timeout=timeout)
    assert process.returncode == -signal.SIGKILL, "".join(seen)[-3000:]
    return seen

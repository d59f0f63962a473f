"""One rank started by conftest.run_ranks, in a process forked from a server that has already imported
torch and the project. It imports neither pytest nor conftest, so the server and its children hold no
test state: what a rank sees is only what this function sets up."""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def run_rank(script: str, args: list[str], env: dict[str, str], cwd: str, stdout: str, stderr: str) -> None:
    """Do what `python SCRIPT ARGS` run by torchrun does: this environment and folder, stdout and stderr
    to files, the script as __main__ with its own folder first on sys.path. Its exit code is the process's
    (multiprocessing turns SystemExit and exceptions into exit codes as the interpreter does)."""
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):
        out = os.open(path, os.O_WRONLY)
        os.dup2(out, fd)
        os.close(out)
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")

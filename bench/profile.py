"""Where a server's processes spend their time during a load level: py-spy, sampling without pausing.

`record(processes, folder)` runs one `py-spy record --nonblocking` per process while the level runs
(py-spy reads their memory; they are never stopped, so the figures are not slowed by it) and
writes, per process, py-spy's collapsed stacks (`<label>.folded`, for flame graphs) and a summary
(`<label>.top.json`): the share of samples each function is on top of the stack (its own time)
and anywhere in it (its own time plus what it calls). Idle samples are left out by py-spy, so the
shares are of the time the process was running Python.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import psutil

from bench.loadgen import process_label

NATIVE = "(native code: no Python frame)"


def py_spy() -> str | None:
    return shutil.which("py-spy")


def label(process: psutil.Process) -> str:
    """A file-name-safe name: what the process is (bench/loadgen.py) and its pid."""
    try:
        name = process_label(process)
    except psutil.Error:
        name = "gone"
    return "".join(c if c.isalnum() or c in "._-" else "_" for c in name) + f"-{process.pid}"


@contextmanager
def record(processes: list[psutil.Process], folder: Path, rate_hz: int = 100):
    """py-spy on each of `processes` for as long as the block runs; the files land in `folder`."""
    binary = py_spy()
    if binary is None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    spies = []
    for process in processes:
        name = label(process)
        argv = [binary, "record", "--nonblocking", "--threads", "--pid", str(process.pid), "--rate", str(rate_hz),
                "--format", "raw", "--output", str(folder / f"{name}.folded")]
        log = (folder / f"{name}.py-spy.log").open("w")
        spies.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        yield
    finally:
        for _, spy, _ in spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file when interrupted
        for name, spy, log in spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()
            log.close()
            folded = folder / f"{name}.folded"
            if folded.exists():
                (folder / f"{name}.top.json").write_text(json.dumps(summarize(folded), indent=1))


def summarize(folded: Path, top: int = 25) -> dict:
    """Samples per function from py-spy's collapsed stacks: on top of the stack (self) and
    anywhere in it (total), as shares of all samples."""
    own, anywhere, samples = Counter(), Counter(), 0
    for line in folded.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")[1:] or [NATIVE]  # the first frame is the thread (--threads)
        own[frames[-1]] += n
        for frame in set(frames):
            anywhere[frame] += n
    share = lambda counter: [(frame, round(n / samples, 4)) for frame, n in counter.most_common(top)]  # noqa: E731
    return {"samples": samples, "self": share(own), "total": share(anywhere)} if samples else {"samples": 0}

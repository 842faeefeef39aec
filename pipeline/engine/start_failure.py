"""Why a vLLM engine did not start, in one line for people.

vLLM's engine core runs in a process of its own; when it fails to start, it prints its error
to the stderr it inherited and the parent raises only "Engine core initialization failed.
See root cause above". In a Ray actor that stderr is a log file under Ray's session folder
that nobody reads, so the job would end on a message pointing at nothing. The engine's
constructor notes where stderr ends before it starts vLLM and, on that failure, reads the
error line the engine core wrote since.
"""

from __future__ import annotations

import os
import re
import stat

INIT_FAILED = "Engine core initialization failed"
_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception): \S.*$")
_COLOR = re.compile(r"\x1b\[[0-9;]*m")
_PROCESS = re.compile(r"^\(\w+ pid=\d+\)\s*")  # vLLM's prefix on its processes' lines, when it sets one
_MAX_READ = 1 << 20  # the engine core's last megabyte of log is plenty for its traceback


def stderr_mark() -> int | None:
    """Where this process's stderr ends now, when it is a file (in a Ray actor); else None."""
    try:
        st = os.fstat(2)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def root_cause(error: BaseException, mark: int | None) -> str | None:
    """The engine core's own error line ("ValueError: No available memory for the cache
    blocks. ...") written to stderr since `mark`, when `error` is vLLM's generic start
    failure; None when there is nothing better to say than `error` itself."""
    if mark is None or INIT_FAILED not in str(error):
        return None
    try:
        with open("/proc/self/fd/2", "rb") as f:
            f.seek(max(mark, os.fstat(f.fileno()).st_size - _MAX_READ))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    return last_error_line(text)


def last_error_line(text: str) -> str | None:
    """The last "SomeError: message" line of a log that is not vLLM's generic start failure."""
    lines = (_PROCESS.sub("", _COLOR.sub("", line).strip()) for line in text.splitlines())
    found = [line for line in lines if _ERROR_LINE.match(line) and INIT_FAILED not in line]
    return found[-1] if found else None

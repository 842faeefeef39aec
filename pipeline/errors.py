"""The failures that decide how a run ends: each a type with its exit code, found by type
wherever Ray carried it (no exit code depends on a function's name or a message's text)."""

from __future__ import annotations

import sys

# Exit codes of `qwen-batch run` (documented in the README).
EXIT_OK, EXIT_TOO_MANY_ERRORS, EXIT_INVALID, EXIT_CRASHED = 0, 1, 2, 3


class JobError(Exception):
    """A failure of the job the CLI reports by its message and exit code."""

    exit_code = EXIT_CRASHED


class SpecError(JobError, ValueError):
    """A job spec that cannot run; the message says what to change."""

    exit_code = EXIT_INVALID


class InputError(JobError, ValueError):
    """Input that cannot run; the message names each file and the fix."""

    exit_code = EXIT_INVALID


def one_line(e: BaseException, *, first: bool = False) -> str:
    """'Type: line' of an error for people: its last non-empty line (where a carried traceback
    says what finally went wrong), or with first its first one."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {(lines[0] if first else lines[-1]) if lines else ''}"


class NothingRan(JobError):
    """An unexpected error while the job was checked, before the output was touched."""

    def __init__(self, cause: BaseException):
        super().__init__(one_line(cause))
        self.cause = cause


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C once the run had taken the output's lock (committed shards are kept)."""


class LostLockError(JobError, RuntimeError):
    """This run's lock was taken over by another run: it must not write anything more."""


class RunStopped(JobError, RuntimeError):
    """Raised in an engine actor to stop the run with this message for people."""


class OutputWriteError(JobError, OSError):
    """A shard's output could not be written (full disk, no permission, ...)."""


class EngineStartError(JobError, RuntimeError):
    """An engine that could not start; the message carries the engine's own reason."""


class EngineDead(Exception):
    """An engine that will not answer again (a stand-in of vLLM's EngineDeadError)."""


def found(e: BaseException | None, cls: type[BaseException]) -> BaseException | None:
    """The error of type cls behind e: e itself, its causes and contexts, or the error a Ray
    task or actor raised (RayTaskError.cause), however deeply Ray Data wrapped it. Ray's
    wrapper is itself an instance of the error's type but says the whole remote traceback:
    the error it carries is preferred."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    wrapper = ray_exceptions.RayTaskError if ray_exceptions is not None else ()
    seen: set[int] = set()
    todo, fallback = [e], None
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, cls):
            if not isinstance(e, wrapper):
                return e
            fallback = fallback or e
        todo += [x for x in (e.__cause__, e.__context__, getattr(e, "cause", None), _raised_in_init(e))
                 if isinstance(x, BaseException)]
    return fallback


def _raised_in_init(e: BaseException) -> JobError | None:
    """The typed error an actor's constructor raised (an engine that could not start), rebuilt
    from the ActorDiedError Ray raises in its place, which keeps only the error's text."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is None or not isinstance(e, ray_exceptions.ActorDiedError):
        return None
    for line in reversed(str(e).splitlines()):
        name, sep, message = line.strip().partition(": ")
        cls = globals().get(name.removeprefix(__name__ + ".")) if name.startswith(__name__ + ".") else None
        if sep and isinstance(cls, type) and issubclass(cls, JobError) and cls is not NothingRan:
            return cls(message)
    return None


def is_engine_dead(e: BaseException) -> bool:
    """vLLM's EngineDeadError (when vLLM is loaded in this process: importing it only to ask
    would cost seconds), or EngineDead."""
    vllm = sys.modules.get("vllm.v1.engine.exceptions")
    dead = (EngineDead,) + ((vllm.EngineDeadError,) if vllm is not None else ())
    return isinstance(e, dead)

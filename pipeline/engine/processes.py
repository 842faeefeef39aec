"""Processes of a run that outlive it (vLLM's engine core and workers; Ray's services and
workers when the driver is killed): marked by environment variables, found and ended on
every node."""

from __future__ import annotations

import hashlib
import os
import socket
from contextlib import contextmanager

# Environment variables that mark every process of a run (the driver's Ray services and
# workers, vLLM's processes), so leftovers can be found: the run, the output it writes (an
# output_id, never the URI itself: it may hold credentials) and the driver that started it.
RUN_MARK = "QWEN_BATCH_RUN_ID"
OUTPUT_MARK = "QWEN_BATCH_OUTPUT"
DRIVER_MARK = "QWEN_BATCH_DRIVER"


def output_id(uri: str) -> str:
    """Who writes where, independent of how the path was spelled: a hash of the output's
    absolute URI without credentials (two jobs with `output.path: out` in different folders
    get different ids; the same folder named relatively or absolutely gets one)."""
    if "://" in uri:
        scheme, rest = uri.split("://", 1)
        netloc, _, path = rest.partition("/")
        canonical = f"{scheme.lower()}://{netloc.rpartition('@')[2]}/{path.split('?')[0].strip('/')}"
    else:
        canonical = "file://" + os.path.realpath(os.path.expanduser(uri))
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def process_identity(pid: int | None = None) -> dict:
    """What identifies a live process beyond its pid: the host, the kernel's boot, the pid
    namespace and the process's start time. Containers that share a host name (host
    networking) differ in pid namespace; a reused pid differs in start time."""
    import psutil

    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "boot": _boot_id(), "pidns": _pid_namespace(), "pid": pid,
            "started": round(psutil.Process(pid).create_time(), 2)}


def identity_alive(ident: dict) -> bool | None:
    """Whether the process ident names still runs: True or False when this process can tell
    (same boot and pid namespace), None when it cannot (another machine or container)."""
    import psutil

    if not ident.get("boot") or ident.get("boot") != _boot_id() or ident.get("pidns") != _pid_namespace():
        return None
    try:
        process = psutil.Process(int(ident["pid"]))
        # a zombie (killed, its parent dead too, not reaped yet) is no longer running
        return (abs(process.create_time() - float(ident["started"])) < 0.05
                and process.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, ValueError, KeyError, TypeError):
        return False
    except psutil.AccessDenied:
        return True


def driver_mark() -> str:
    """This process's identity as an environment value (DRIVER_MARK)."""
    ident = process_identity()
    return f"{ident['boot']}:{ident['pidns']}:{ident['pid']}:{ident['started']}"


def _driver_alive(mark: str | None) -> bool | None:
    """identity_alive for a DRIVER_MARK value; None when there is none or it cannot be judged."""
    try:
        boot, pidns, pid, started = (mark or "").split(":")
    except ValueError:
        return None
    return identity_alive({"boot": boot, "pidns": pidns, "pid": pid, "started": started})


@contextmanager
def environment(env: dict[str, str]):
    """os.environ with env set for the block (processes started in it inherit it), then as before."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.update({k: v})


def _kill(procs: list) -> int:
    import psutil

    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
    return len(procs)


def descendants() -> list:
    """This process's children and their children, now (psutil.Process objects)."""
    import psutil

    return psutil.Process().children(recursive=True)


def kill_started_since(before: list) -> int:
    """Kill this process's descendants that were not among before (descendants() taken
    earlier): the processes a library call started (vLLM's engine core and workers), and not
    the caller's own children. Returns how many were killed."""
    known = {(p.pid, p.create_time()) for p in before}
    started = []
    for p in descendants():
        try:
            if (p.pid, p.create_time()) not in known:
                started.append(p)
        except Exception:  # gone meanwhile
            continue
    return _kill(started)


def reap_orphans(run_id: str) -> int:
    """Kill processes of this run (marked by RUN_MARK) still alive after Ray shut down.

    A killed engine actor leaves vLLM's engine core and workers running, reparented to init,
    each burning a core. Returns how many were killed.
    """
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(RUN_MARK) == run_id:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return _kill(found)


def reap_dead_runs(output: str, run_id: str, *, dead: tuple[str, ...] = ()) -> int:
    """Kill processes left by earlier runs on the same output whose run is provably dead: its
    driver (DRIVER_MARK) is gone from this machine, or the run is one of dead (runs whose
    stale lock this run took over, while their driver cannot be checked from here). output
    is an output_id. A paused run that lost the lock still has its driver: spared, it stops
    itself when it wakes. Returns how many were killed."""
    import psutil

    found = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            run = env.get(RUN_MARK)
            if p.pid == os.getpid() or env.get(OUTPUT_MARK) != output or run in (None, run_id):
                continue
            alive = _driver_alive(env.get(DRIVER_MARK))
            if alive is False or (alive is None and run in dead):
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return _kill(found)


def reap_on_every_node(run_id: str) -> int:
    """reap_orphans(run_id) on every node of the connected Ray cluster; how many were killed."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    reap = ray.remote(num_cpus=0, max_retries=0)(reap_orphans)
    refs = [reap.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(run_id)
            for n in ray.nodes() if n.get("Alive")]
    try:
        return sum(ray.get(refs, timeout=60))
    except Exception:  # a node went away: nothing of ours is left running there
        return 0

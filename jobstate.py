#!/usr/bin/env python3
"""jobstate: run any command as a durable background job.

One file, standard library only (ctypes for kernel32 on Windows), Python 3.8+.
Copy it into your repository and run it; nothing to install.

A job is started under a stable, time-ordered id, supervised by a detached
process that outlives the caller, and recorded on disk in one directory per
job.  Any later process can see it, wait for it, read its output and stop its
whole process tree.

Public API (the CLI, the MCP server and the HTTP API are thin layers over it):
    run(argv, ...) -> Job        define and launch a job
    create(argv, ...) -> Job     define a job without launching it
    open_job(id_or_prefix) -> Job
    list_jobs(...) -> [JobSummary]
    gc(...) -> GcReport          remove old finished jobs
    Job                          .state() .wait() .tail() .kill() .start() .restart() .delete() .set_tags()
    JobState, JobStatus, JobSpec, JobPaths, Tail, KillResult, JobSummary, GcReport
    JobError and its subclasses (each has a stable .code)
    main(argv) -> int            the CLI
    SCHEMA_VERSION, JOB_ID_ENV   the documents' version; the variable every job carries
    DEFAULT_*                    the defaults the CLI documents (read them, do not rely on more)

CLI:
    python jobstate.py [--root PATH] [--pretty] [--format json|text] COMMAND ...
    commands: run create start restart status wait tail kill list ps delete (rm) gc tag schema mcp serve
    Every command prints one JSON object on stdout.  `python jobstate.py --help`.

Map of this file (`grep -n '^# [0-9]' jobstate.py`); calls point backwards,
so each section uses only what the sections above it define:
    1. Imports and platform facts
    2. Schema: constants, states, errors, documents
    3. Platform layer: processes, trees, locks and files on POSIX and Windows
    4. Helpers: time, ids, paths, parsing
    5. Store: atomic files, locks, job directories
    6. Supervisor: one job's life, from start to notifications
    7. Launch: every way a supervisor starts
    8. Jobs API: observe, list, collect, define, launch
    9. Responses: the one place that shapes each JSON document
    10. Agent surfaces: MCP server (stdio) and HTTP API
    11. Text rendering: --format text
    12. CLI
"""

# ---------------------------------------------------------------------------
# 1. Imports and platform facts
# ---------------------------------------------------------------------------


from __future__ import annotations

import errno
import functools
import json
import os
import re
import signal as _signal
import sys
import threading
import time
from dataclasses import dataclass, field
from enum import Enum

# Not imported here, for the supervisors' memory: subprocess (only where
# processes are started), shutil, argparse, ctypes and the network modules.
TYPE_CHECKING = False
if TYPE_CHECKING:  # annotations stay strings (PEP 563), so `typing` is never loaded at run time
    from typing import Callable, Dict, List, NoReturn, Optional, Sequence, Tuple

__version__ = "0.1.0"
__all__ = [
    "run", "create", "open_job", "list_jobs", "gc", "resolve_root", "new_job_id", "main",
    "Job", "JobPaths", "JobState", "JobStatus", "JobSpec", "Tail", "KillResult", "JobSummary", "GcReport",
    "JobError", "JobNotFoundError", "AmbiguousJobIdError", "InvalidJobIdError", "InvalidStateError",
    "InvalidArgumentError", "InvalidSignalError", "InvalidTagError", "StdinRequiredError",
    "StdinTooLargeError", "StateFileError", "LaunchError", "JobIOError",
    "SCHEMA_VERSION", "JOB_ID_ENV",
]

_WINDOWS = os.name == "nt"
_LINUX = sys.platform.startswith("linux")
_THIS_FILE = os.path.abspath(__file__)

# ---------------------------------------------------------------------------
# 2. Schema: constants, states, errors, documents
# ---------------------------------------------------------------------------


SCHEMA_VERSION = "1.0"
JOB_ID_ENV = "JOBSTATE_JOB_ID"
DEFAULT_MAX_BYTES = 65536
DEFAULT_TAIL_LINES = 50
DEFAULT_RUN_UNTIL_S = 10.0
DEFAULT_WAIT_UNTIL_S = 30.0
DEFAULT_KILL_AFTER_S = 5.0
DEFAULT_KILL_OBSERVE_S = 3.0
DEFAULT_STDIN_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_LIST_LIMIT = 50
LAUNCH_ACK_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 2.0
QUICK_DRAIN_S = 0.05  # how long the end waits for the output to end too, before being published alone

_MAX_CANDIDATES = 20
# Every file jobstate opens inside the root: binary on Windows, and never
# through a symlink someone planted (a log path pointing at ~/.bashrc must not
# be truncated).
_FILE_FLAGS = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
_CHUNK_BYTES = 1 << 20
# Signals a user may name; each platform layer says which of them exist.
_SIGNAL_NAMES = ("TERM", "INT", "KILL", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")
# Signals whose purpose is to end the job: a kill with one of these leaves a
# kill request, so the job is recorded as `killed` however the child reacts.
_TERMINATING = frozenset({"TERM", "INT", "KILL", "HUP", "QUIT"})
_TAG_RE = re.compile(r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\Z")
# What holds a job's process tree (state.json `containment`), and what may enforce a limit.
_CONTAINMENTS = ("cgroup", "process-group", "job-object")
_ENFORCERS = ("job-object", "cgroup", "cgroup-v1", "rlimit", "none")


class JobStatus(str, Enum):
    """Life-cycle state of a job, as stored in state.json (`job.status`)."""

    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"
    KILLED = "killed"
    FAILED = "failed"
    UNKNOWN = "unknown"  # reported for an unreadable state file; never written

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.EXITED, JobStatus.KILLED, JobStatus.FAILED)


class JobError(Exception):
    """Base of every error jobstate reports; `.code` is the stable JSON error code."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, hint: Optional[str] = None, details: Optional[dict] = None):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details


class JobNotFoundError(JobError):
    code = "job_not_found"

    def __init__(self, job_id: str, root: str):
        self.job_id, self.root = job_id, root
        super().__init__("no job %r under %s" % (job_id, root),
                         hint="run 'jobstate list --all' to see job ids")


class AmbiguousJobIdError(JobError):
    code = "ambiguous_job_id"

    def __init__(self, prefix: str, matches: List[str]):
        self.prefix, self.matches = prefix, matches
        super().__init__("job id prefix %r matches %d jobs" % (prefix, len(matches)),
                         hint="give more characters of the job id",
                         details={"candidates": matches[:_MAX_CANDIDATES],
                                  "truncated": len(matches) > _MAX_CANDIDATES})


class InvalidJobIdError(JobError):
    code = "invalid_job_id"

    def __init__(self, value: str):
        self.value = value
        super().__init__("invalid job id %r" % (value[:80],),
                         hint="a job id is 1 to 32 hexadecimal characters (a prefix of the full id)")


class InvalidStateError(JobError):
    code = "invalid_state"

    def __init__(self, job_id: str, state: "JobStatus", wanted: str):
        self.job_id, self.state = job_id, state
        super().__init__("job %s is %s; %s" % (job_id, state.value, wanted),
                         details={"job_id": job_id, "state": state.value})


class InvalidArgumentError(JobError):
    code = "invalid_argument"


class InvalidSignalError(InvalidArgumentError):
    code = "invalid_signal"


class InvalidTagError(InvalidArgumentError):
    code = "invalid_tag"


class StdinRequiredError(InvalidArgumentError):
    code = "stdin_required"


class StdinTooLargeError(InvalidArgumentError):
    code = "stdin_too_large"


class StateFileError(JobError):
    code = "state_unreadable"

    def __init__(self, path: str, reason: str):
        self.path = path
        super().__init__("cannot read %s: %s" % (path, reason),
                         hint="the file is missing or corrupt; 'jobstate delete' removes the job")


class LaunchError(JobError):
    code = "launch_failed"
    retryable = True


class JobIOError(JobError):
    code = "io_error"
    retryable = True


@dataclass
class JobInfo:
    id: str
    status: JobStatus
    started_at: Optional[str] = None


@dataclass
class JobResult:
    exit_code: Optional[int] = None
    signal: Optional[str] = None
    duration_ms: Optional[int] = None
    timed_out: bool = False


@dataclass
class Failure:
    """Why jobstate could not run or keep supervising a job (`error` in state.json)."""

    stage: str
    message: str
    limit: Optional[str] = None  # with stage "limit": which one ended the job (a JobSpec limit's name)

    def to_dict(self) -> dict:
        doc = {"stage": self.stage, "message": self.message}
        if self.limit is not None:
            doc["limit"] = self.limit
        return doc


@dataclass
class _Proc:
    """One process identity: a pid is only trusted together with its start-time token."""

    pid: int
    token: str


@dataclass
class JobState:
    """The content of state.json.  `to_dict`/`from_dict` are the only code that knows its keys."""

    job: JobInfo
    result: JobResult = field(default_factory=JobResult)
    pid: Optional[int] = None
    finished_at: Optional[str] = None
    updated_at: Optional[str] = None
    windows_job_name: Optional[str] = None
    error: Optional[Failure] = None
    supervisor_pid: Optional[int] = None
    pid_token: Optional[str] = None
    logs_drained: Optional[bool] = None
    leftovers: List[_Proc] = field(default_factory=list)  # where trees cannot be found again later
    containment: Optional[str] = None  # one of _CONTAINMENTS: what holds the job's tree
    cgroup: Optional[str] = None  # the job's cgroup v2 directory (Linux)
    cgroups_v1: List[str] = field(default_factory=list)  # cgroup v1 directories enforcing limits
    limits: Dict[str, Dict[str, object]] = field(default_factory=dict)  # name: {"value", "enforced_by"}
    extra: Dict[str, object] = field(default_factory=dict)  # keys of other versions, kept on rewrite

    @property
    def job_id(self) -> str:
        return self.job.id

    @property
    def status(self) -> JobStatus:
        return self.job.status

    @property
    def started_at(self) -> Optional[str]:
        return self.job.started_at

    @property
    def exit_code(self) -> Optional[int]:
        return self.result.exit_code

    @property
    def signal(self) -> Optional[str]:
        return self.result.signal

    @property
    def duration_ms(self) -> Optional[int]:
        return self.result.duration_ms

    def to_dict(self) -> dict:
        doc = dict(self.extra)
        doc["job"] = {"id": self.job.id, "status": self.job.status.value,
                      "started_at": self.job.started_at}
        doc["result"] = {"exit_code": self.result.exit_code, "signal": self.result.signal,
                         "duration_ms": self.result.duration_ms, "timed_out": self.result.timed_out}
        if self.pid is not None:
            doc["pid"] = self.pid
        doc["finished_at"] = self.finished_at
        doc["updated_at"] = self.updated_at
        if self.windows_job_name is not None:
            doc["windows_job_name"] = self.windows_job_name
        if self.error is not None:
            doc["error"] = self.error.to_dict()
        for key in ("supervisor_pid", "pid_token", "logs_drained"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.leftovers:
            doc["leftovers"] = [{"pid": p.pid, "token": p.token} for p in self.leftovers]
        for key in ("containment", "cgroup", "cgroups_v1", "limits"):
            if getattr(self, key):
                doc[key] = getattr(self, key)
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> "JobState":
        """Build from a parsed state.json; raises ValueError on a malformed document."""
        if not isinstance(doc, dict):
            raise ValueError("state is not a JSON object")
        job, result = doc.get("job"), doc.get("result") or {}
        if not isinstance(job, dict) or not isinstance(result, dict):
            raise ValueError("'job' or 'result' is not an object")
        error = doc.get("error")
        known = {"job", "result", "pid", "finished_at", "updated_at", "windows_job_name", "error",
                 "supervisor_pid", "pid_token", "logs_drained", "leftovers", "containment", "cgroup",
                 "cgroups_v1", "limits"}
        leftovers = doc.get("leftovers") or []
        if not isinstance(leftovers, list) or not all(isinstance(p, dict) for p in leftovers):
            raise ValueError("'leftovers' is not a list of objects")
        cgroups_v1, limits = doc.get("cgroups_v1") or [], doc.get("limits") or {}
        if not isinstance(cgroups_v1, list) or not all(isinstance(p, str) for p in cgroups_v1):
            raise ValueError("'cgroups_v1' is not a list of strings")
        if not isinstance(limits, dict) or not all(isinstance(v, dict) for v in limits.values()):
            raise ValueError("'limits' is not an object of objects")
        return cls(
            job=JobInfo(id=_typed(job.get("id"), str, "job.id", required=True),
                        status=JobStatus(job.get("status")),
                        started_at=_typed(job.get("started_at"), str, "job.started_at")),
            result=JobResult(exit_code=_typed(result.get("exit_code"), int, "result.exit_code"),
                             signal=_typed(result.get("signal"), str, "result.signal"),
                             duration_ms=_typed(result.get("duration_ms"), int, "result.duration_ms"),
                             timed_out=bool(result.get("timed_out", False))),
            pid=_typed(doc.get("pid"), int, "pid"),
            finished_at=_typed(doc.get("finished_at"), str, "finished_at"),
            updated_at=_typed(doc.get("updated_at"), str, "updated_at"),
            windows_job_name=_typed(doc.get("windows_job_name"), str, "windows_job_name"),
            error=Failure(str(error.get("stage")), str(error.get("message")),
                          _typed(error.get("limit"), str, "error.limit")) if isinstance(error, dict) else None,
            supervisor_pid=_typed(doc.get("supervisor_pid"), int, "supervisor_pid"),
            pid_token=_typed(doc.get("pid_token"), str, "pid_token"),
            logs_drained=_typed(doc.get("logs_drained"), bool, "logs_drained"),
            leftovers=[_Proc(_typed(p.get("pid"), int, "leftovers.pid", required=True),
                             _typed(p.get("token"), str, "leftovers.token", required=True)) for p in leftovers],
            containment=_typed(doc.get("containment"), str, "containment"),
            cgroup=_typed(doc.get("cgroup"), str, "cgroup"),
            cgroups_v1=cgroups_v1, limits=limits,
            extra={k: v for k, v in doc.items() if k not in known},
        )


@dataclass
class JobSpec:
    """The complete definition of a job (meta.json): enough to restart it exactly."""

    argv: List[str]
    cwd: str
    env: Dict[str, str] = field(default_factory=dict)
    env_files: List[str] = field(default_factory=list)
    inherit_env: bool = True
    masks: List[str] = field(default_factory=list)
    has_stdin: bool = False
    timeout_s: float = 0.0
    kill_after_s: float = DEFAULT_KILL_AFTER_S
    kill_orphans: bool = False
    tags: List[str] = field(default_factory=list)
    notify_command: Optional[str] = None
    notify_file: Optional[str] = None
    created_at: Optional[str] = None
    memory_max: Optional[int] = None  # bytes, for the whole tree where the platform can
    max_processes: Optional[int] = None
    cpu_time_s: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    _KEYS = ("argv", "cwd", "env", "env_files", "inherit_env", "masks", "has_stdin", "timeout_s",
             "kill_after_s", "kill_orphans", "tags", "notify_command", "notify_file", "created_at",
             "memory_max", "max_processes", "cpu_time_s")
    _LIMITS = ("memory_max", "max_processes", "cpu_time_s")

    def to_dict(self) -> dict:
        doc = dict(self.extra)
        doc["schema_version"] = SCHEMA_VERSION
        for key in self._KEYS:
            doc[key] = getattr(self, key)
        return doc

    @classmethod
    def from_dict(cls, doc: dict) -> "JobSpec":
        if not isinstance(doc, dict):
            raise ValueError("meta is not a JSON object")
        argv = doc.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("'argv' is not a non-empty list of strings")
        env = doc.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
            raise ValueError("'env' is not an object of strings")
        spec = cls(argv=argv, cwd=_typed(doc.get("cwd"), str, "cwd", required=True), env=env)
        for key in cls._KEYS[3:]:
            if doc.get(key) is not None:
                setattr(spec, key, doc[key])
        for key in cls._LIMITS:  # they reach setrlimit and cgroup files: numbers only
            value = getattr(spec, key)
            if value is not None and (isinstance(value, bool) or not isinstance(
                    value, (int, float) if key == "cpu_time_s" else int) or value < 0):
                raise ValueError("%r is not a non-negative number" % key)
        spec.extra = {k: v for k, v in doc.items() if k not in cls._KEYS and k != "schema_version"}
        return spec

    def limits(self) -> Dict[str, float]:
        """The limits asked for (a value of 0 or none means no limit)."""
        return {key: getattr(self, key) for key in self._LIMITS if getattr(self, key)}

    def masked_env(self) -> Dict[str, str]:
        return {k: ("***" if k in self.masks else v) for k, v in self.env.items()}


def _typed(value, kind, name, required=False):
    """Return value if it is None (and allowed) or of `kind`; else raise ValueError."""
    if value is None and not required:
        return None
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ValueError("%r is not a %s" % (name, kind.__name__))


@dataclass
class Tail:
    """The last part of a job's output.  Ranges are half-open byte offsets into the log files."""

    stdout: str
    stderr: str
    stdout_range: Tuple[int, int]
    stderr_range: Tuple[int, int]
    stdout_total_bytes: int
    stderr_total_bytes: int
    encoding: str = "utf-8-lossy"


@dataclass
class KillResult:
    state: JobState
    signal_sent: str
    processes_signalled: int
    processes_alive: int


@dataclass
class JobSummary:
    """One row of `list_jobs`: the state plus the parts of the definition people filter on."""

    job_id: str
    state: JobState
    argv: List[str]
    cwd: Optional[str]
    tags: List[str]
    created_at: Optional[str]


@dataclass
class GcReport:
    """What gc removed (or would remove, with dry_run)."""

    deleted: List[dict]
    kept: int
    freed_bytes: int
    dry_run: bool

# ---------------------------------------------------------------------------
# 3. Platform layer: processes, trees, locks and files on POSIX and Windows
# ---------------------------------------------------------------------------


@dataclass
class _Containment:
    """What holds a job's tree and how each of its limits is enforced, as the
    platform layer decided when it started the child (state.json keeps it)."""

    kind: str = "process-group"  # one of _CONTAINMENTS
    cgroup: Optional[str] = None  # the job's cgroup v2 directory
    cgroups_v1: List[str] = field(default_factory=list)
    limits: Dict[str, Dict[str, object]] = field(default_factory=dict)  # name: {"value", "enforced_by"}
    baselines: Dict[str, float] = field(default_factory=dict)  # limit counters before the child ran

    @classmethod
    def from_state(cls, state: JobState) -> "_Containment":
        return cls(state.containment or "process-group", state.cgroup, list(state.cgroups_v1),
                   dict(state.limits))

    def cgroups(self) -> List[str]:
        return ([self.cgroup] if self.cgroup else []) + self.cgroups_v1


@dataclass
class _Child:
    """The job's main process, as seen by its supervisor."""

    popen: Optional[subprocess.Popen]  # None once a forked launch has exec'd its watcher
    pid: int
    token: Optional[str]
    windows_job_name: Optional[str] = None
    handle: object = None  # platform-private (the Job Object handle on Windows)
    containment: _Containment = field(default_factory=_Containment)


@dataclass
class _TreeRef:
    """Everything recorded about a job's process tree, so any later process can find it."""

    job_id: str
    pid: Optional[int]
    pid_token: Optional[str]
    supervisor_pid: Optional[int]
    windows_job_name: Optional[str]
    descendants: List[_Proc] = field(default_factory=list)
    cgroups: List[str] = field(default_factory=list)  # cgroup directories (v2 first) holding the tree

    @classmethod
    def from_state(cls, state: JobState) -> "_TreeRef":
        return cls(state.job_id, state.pid, state.pid_token, state.supervisor_pid,
                   state.windows_job_name, list(state.leftovers), _Containment.from_state(state).cgroups())


def _survive_signal(signum, frame) -> None:
    """The supervisor's handler for signals it must survive (see supervisor_signals)."""


# -- Linux cgroups -------------------------------------------------------------
#
# A job's cgroup v2 holds its whole tree: no process leaves it without
# privileges, whatever it does to its session, group or environment, and
# `cgroup.kill` ends everything in it with one write.  jobstate makes one per
# job where it may: in each hierarchy, under the topmost cgroup on its own path
# that it can write (the hierarchy's root for root; `user@UID.service` where
# systemd delegates a subtree to a user), in a directory `jobstate` of its own:
# `<that cgroup>/jobstate/<job_id>`.  Topmost, because moving a process needs
# write access to the common ancestor of where it is and where it goes, and
# because cgroup v2 enables controllers only below cgroups that hold no process.
# Nothing outside a `jobstate` directory is ever written.

_CGROUP_PARENT = "jobstate"


def _unescape_mountinfo(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


@functools.lru_cache(maxsize=None)
def _cgroup_mounts() -> Tuple[Tuple[str, str, str, frozenset], ...]:
    """(mount point, root inside the hierarchy, fstype, options) of each read-write
    cgroup mount (cached: a job's hierarchies do not move under it)."""
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            lines = f.read().decode("utf-8", "surrogateescape").splitlines()
    except OSError:
        return ()
    found = []
    for line in lines:
        fields = line.split()
        sep = fields.index("-") if "-" in fields else -1
        if sep < 0 or len(fields) < sep + 4 or fields[sep + 1] not in ("cgroup", "cgroup2"):
            continue
        if "rw" in fields[5].split(","):
            options = frozenset(fields[sep + 3].split(","))
            found.append((_unescape_mountinfo(fields[4]), _unescape_mountinfo(fields[3]), fields[sep + 1], options))
    return tuple(found)


def _own_cgroup_paths() -> Dict[str, str]:
    """This process's cgroup per hierarchy: '' for v2, else each v1 controller's name."""
    paths: Dict[str, str] = {}
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, controllers, path = line.rstrip("\n").split(":", 2)
                for name in controllers.split(",") if controllers else [""]:
                    paths[name] = path
    except (OSError, ValueError):
        pass
    return paths


def _cgroup_home(controller: str = "") -> Optional[str]:
    """Where our `jobstate` directory goes in one hierarchy ('' = v2, else a v1
    controller): the topmost cgroup on this process's path that we may write."""
    path = _own_cgroup_paths().get(controller)
    if path is None:
        return None
    for mount, root, fstype, options in _cgroup_mounts():
        if (fstype == "cgroup2") != (controller == "") or (controller and controller not in options):
            continue
        root = root.rstrip("/")
        if not (path + "/").startswith(root + "/"):
            continue  # this mount shows another part of the hierarchy
        parts = [p for p in path[len(root):].split("/") if p]
        for depth in range(len(parts) + 1):
            here = os.path.join(mount, *parts[:depth])
            if os.access(here, os.W_OK) and os.access(os.path.join(here, "cgroup.procs"), os.W_OK):
                return here
    return None


def _make_job_cgroup(home: str, job_id: str) -> str:
    """`home/jobstate/job_id`, fresh where it can be (a previous run's counters gone);
    a previous run's cgroup whose processes live on is reused as it is."""
    parent = os.path.join(home, _CGROUP_PARENT)
    path = os.path.join(parent, job_id)
    try:
        os.mkdir(parent, 0o755)
    except FileExistsError:
        pass
    try:
        os.mkdir(path, 0o755)
    except FileExistsError:
        try:
            os.rmdir(path)
            os.mkdir(path, 0o755)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
    return path


def _is_job_cgroup(path: Optional[str], job_id: str) -> bool:
    """A recorded path names `.../jobstate/<this job>` inside a cgroup mount: a state
    file can never make jobstate write to, kill or remove any other cgroup."""
    if not path or not os.path.isabs(path) or os.path.normpath(path) != path:
        return False
    if os.path.basename(path) != job_id or os.path.basename(os.path.dirname(path)) != _CGROUP_PARENT:
        return False
    return any(path.startswith(mount.rstrip("/") + "/") for mount, _, _, _ in _cgroup_mounts())


def _cgroup_tree_pids(path: str) -> List[int]:
    """Every pid in a cgroup and the cgroups below it (a job run as root may make some)."""
    pids: List[int] = []
    for here, _, _ in os.walk(path):
        try:
            with open(os.path.join(here, "cgroup.procs"), "rb") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:  # removed meanwhile
            pass
    return pids


def _remove_cgroup_tree(path: str) -> bool:
    """rmdir the cgroup and those below it, deepest first; False while processes live in it."""
    for here, _, _ in os.walk(path, topdown=False):
        try:
            os.rmdir(here)
        except FileNotFoundError:
            pass
        except OSError:  # EBUSY: processes live in it
            return False
    return True


# Each limit in a cgroup: the controller and file that set it in v2, then in v1
# (no controller: the file is always there, and the supervisor watches it).
_CGROUP_LIMIT_FILES = {
    "memory_max": (("memory", "memory.max"), ("memory", "memory.limit_in_bytes")),
    "max_processes": (("pids", "pids.max"), ("pids", "pids.max")),
    "cpu_time_s": ((None, "cpu.stat"), ("cpuacct", "cpuacct.usage")),
}
# What counts towards each limit, in v2 then v1: (file, key); no key: the file is
# the number.  OOM kills and refused forks mean "reached"; CPU time is compared.
_CGROUP_COUNTERS = {
    "memory_max": (("memory.events", "oom_kill"), ("memory.oom_control", "oom_kill")),
    "max_processes": (("pids.events", "max"), ("pids.events", "max")),
    "cpu_time_s": (("cpu.stat", "usage_usec"), ("cpuacct.usage", None)),
}


def _write_cgroup_file(path: str, name: str, value: str) -> None:
    with open(os.path.join(path, name), "wb", buffering=0) as f:
        f.write(value.encode())


def _cgroup_counter(path: str, name: str) -> Optional[float]:
    """What a limit's cgroup counted so far: OOM kills, refused forks or CPU seconds; None if unreadable."""
    for filename, key in _CGROUP_COUNTERS[name]:
        try:
            with open(os.path.join(path, filename), "rb") as f:
                text = f.read().decode()
            if key is None:
                return int(text.strip()) / 1e9  # cpuacct.usage: nanoseconds
            for line in text.splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[0] == key:
                    return int(parts[1]) / (1e6 if key == "usage_usec" else 1)
        except (OSError, ValueError):  # gone, or not what this kernel writes there
            continue
    return None


def _containment_counters(held: _Containment) -> Dict[str, float]:
    """What counts towards each limit its cgroup enforces (see _CGROUP_COUNTERS)."""
    counters = {}
    for name, entry in held.limits.items():
        paths = {"cgroup": [held.cgroup], "cgroup-v1": held.cgroups_v1}.get(entry.get("enforced_by"), [])
        for path in paths:
            value = _cgroup_counter(path, name) if path else None
            if value is not None:
                counters[name] = value
                break
    return counters


class _ChildPlan:
    """What the child does between fork and exec to start contained: enter its
    cgroups (writing "0" to a cgroup.procs moves the writer) and set the
    rlimits that stand in for limits no cgroup enforces.  The supervisor makes
    the plan and holds the files open; the child only writes and calls setrlimit."""

    def __init__(self):
        self.containment = _Containment()
        self.entries: List[int] = []  # cgroup.procs descriptors
        self.rlimits: List[Tuple[int, Tuple[int, int]]] = []
        self.setrlimit: Optional[Callable] = None

    def enter(self) -> None:
        for fd in self.entries:
            os.write(fd, b"0")
        for resource_id, values in self.rlimits:
            self.setrlimit(resource_id, values)

    def needs_preexec(self) -> bool:
        return bool(self.entries or self.rlimits)

    def close(self) -> None:
        for fd in self.entries:
            os.close(fd)
        self.entries = []

    def abandon(self) -> None:
        """The child could not enter: remove the cgroups we made for it."""
        self.close()
        for path in self.containment.cgroups():
            _remove_cgroup_tree(path)


def _plan_child(job_id: str, limits: Dict[str, float], contain: bool, rlimits: bool = True) -> _ChildPlan:
    """Decide how the child starts: in the job's cgroup where we may make one
    (else in a process group), each limit by a cgroup v2 controller, else a
    cgroup v1 hierarchy, else an rlimit of the main process, else not at all."""
    plan = _ChildPlan()
    # The child enters its cgroups and sets its rlimits from preexec_fn, which
    # is only safe in a process without other threads: a supervisor starts its
    # child before it starts any.
    single = threading.active_count() == 1
    if contain and single and _LINUX and os.environ.get("JOBSTATE_CONTAINMENT", "").lower() not in (
            "off", "0", "no", "none"):
        _plan_cgroups(plan, job_id, limits)
    for name, value in limits.items():
        if name not in plan.containment.limits:
            enforcer = _plan_rlimit(plan, name, value) if single and rlimits else "none"
            plan.containment.limits[name] = {"value": value, "enforced_by": enforcer}
    return plan


def _plan_cgroups(plan: _ChildPlan, job_id: str, limits: Dict[str, float]) -> None:
    home = _cgroup_home("")
    if home is not None:
        try:
            path = _make_job_cgroup(home, job_id)
            plan.entries.append(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY))
            plan.containment.kind, plan.containment.cgroup = "cgroup", path
        except OSError:  # not ours to make after all (a read-only or foreign hierarchy)
            pass
    for name, value in limits.items():
        if plan.containment.cgroup and _set_v2_limit(plan.containment.cgroup, name, value):
            plan.containment.limits[name] = {"value": value, "enforced_by": "cgroup"}
        elif _plan_v1_limit(plan, job_id, name, value):
            plan.containment.limits[name] = {"value": value, "enforced_by": "cgroup-v1"}
    # A previous run's cgroup that old processes kept has counted already.
    plan.containment.baselines = _containment_counters(plan.containment)


def _set_v2_limit(path: str, name: str, value: float) -> bool:
    """Set a limit on the job's v2 cgroup, enabling its controller from our `jobstate`
    parent where the cgroup above that gives it; False where it cannot hold."""
    controller, filename = _CGROUP_LIMIT_FILES[name][0]
    parent = os.path.dirname(path)
    try:
        if controller is not None:
            with open(os.path.join(parent, "cgroup.controllers")) as f:
                if controller not in f.read().split():
                    return False
            with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                if controller not in f.read().split():
                    _write_cgroup_file(parent, "cgroup.subtree_control", "+" + controller)
            _write_cgroup_file(path, filename, str(int(value)))
        if name == "memory_max":
            # The limit is memory, not memory plus swap, and one OOM kill ends the whole job.
            for extra, setting in (("memory.swap.max", "0"), ("memory.oom.group", "1")):
                try:
                    _write_cgroup_file(path, extra, setting)
                except OSError:  # no swap accounting, or an older kernel: the limit holds regardless
                    pass
        return os.path.exists(os.path.join(path, filename))
    except OSError:
        return False


def _plan_v1_limit(plan: _ChildPlan, job_id: str, name: str, value: float) -> bool:
    """Enforce a limit in a cgroup v1 hierarchy (hybrid machines); the child enters it too."""
    controller, filename = _CGROUP_LIMIT_FILES[name][1]
    home = _cgroup_home(controller)
    if home is None:
        return False
    path = os.path.join(home, _CGROUP_PARENT, job_id)
    try:
        if path not in plan.containment.cgroups_v1:  # controllers mounted together share one
            _make_job_cgroup(home, job_id)
            plan.entries.append(os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY))
            plan.containment.cgroups_v1.append(path)
        if name != "cpu_time_s":
            _write_cgroup_file(path, filename, str(int(value)))
        if name == "memory_max":
            try:  # memory plus swap, where swap is accounted
                _write_cgroup_file(path, "memory.memsw.limit_in_bytes", str(int(value)))
            except OSError:
                pass
        return os.path.exists(os.path.join(path, filename))
    except OSError:
        return False


def _plan_rlimit(plan: _ChildPlan, name: str, value: float) -> str:
    """The limit as an rlimit of the main process (binding each process, not the
    tree; its children inherit it); 'none' for the process count: RLIMIT_NPROC
    counts every process of the user, not the job's (and root is exempt from it)."""
    import math
    import resource
    if name == "max_processes" or name == "memory_max" and not _LINUX:  # macOS does not enforce RLIMIT_AS
        return "none"
    if name == "memory_max":
        resource_id, soft, hard = resource.RLIMIT_AS, int(value), int(value)
    else:  # SIGXCPU at the limit (it says which limit ended the job), SIGKILL a second later
        resource_id = resource.RLIMIT_CPU
        soft = max(1, math.ceil(value))
        hard = soft + 1
    current_hard = resource.getrlimit(resource_id)[1]
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    plan.rlimits.append((resource_id, (soft, hard)))
    plan.setrlimit = resource.setrlimit
    return "rlimit"


class _PosixProcessLayer:
    """Linux and macOS: sessions, process groups, signals, flock, /proc or ps."""

    # Linux finds a finished job's leftovers again through the environment
    # marker; macOS cannot read other processes' environments, so the
    # supervisor writes them down when the main process exits.
    records_leftovers = not _LINUX
    # The launcher's flock passes to the supervisor with the descriptor.
    hands_over_lock = True

    def default_root(self) -> str:
        return os.path.join(os.path.expanduser("~"), ".local", "share", "jobstate", "jobs")

    def cache_dir(self) -> str:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "jobstate")

    def shell_argv(self, command: str) -> List[str]:
        return ["/bin/sh", "-c", command]

    def signal_numbers(self) -> Dict[str, int]:
        return {n: int(getattr(_signal, "SIG" + n)) for n in _SIGNAL_NAMES if hasattr(_signal, "SIG" + n)}

    def unsafe_dir_reason(self, path: str) -> Optional[str]:
        st = os.stat(path)
        if st.st_uid != os.getuid():
            return "it is owned by uid %d, not by you (uid %d)" % (st.st_uid, os.getuid())
        if st.st_mode & 0o022:
            return "it is writable by other users (mode %o)" % (st.st_mode & 0o777)
        return None

    # -- files ---------------------------------------------------------------

    def lock(self, fd: int, *, exclusive: bool, blocking: bool) -> bool:
        import fcntl
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, op)
            return True
        except BlockingIOError:
            return False

    def share_lock(self, fd: int) -> bool:
        """Turn our exclusive lock into a shared one; False when another process
        took the lock meanwhile (flock converts by unlocking first)."""
        return self.lock(fd, exclusive=False, blocking=False)

    def read_bytes(self, path: str) -> bytes:
        with open(os.open(path, os.O_RDONLY | _FILE_FLAGS), "rb") as f:
            return f.read()

    def unlock(self, fd: int) -> None:
        # Nothing to do before the close: and an explicit LOCK_UN would be
        # wrong, since the launcher shares its lock's open file description
        # with the supervisor it hands the lock to.
        return None

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- supervisor ------------------------------------------------------------

    def spawn_supervisor(self, argv: List[str], *, stdout, stderr, lock_fd: int) -> subprocess.Popen:
        """Start the supervisor in a new session, handing it the job lock we hold."""
        import subprocess
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                close_fds=True, pass_fds=(lock_fd,), start_new_session=True)

    def release_supervisor(self, popen: subprocess.Popen) -> None:
        # The supervisor double-forks at once (prepare_supervisor): reap the
        # intermediate so an API caller does not collect zombies.
        popen.wait()

    def prepare_supervisor(self) -> None:
        """Detach for good: survive terminal signals, leave the launcher, adopt orphans."""
        self.supervisor_signals()
        if os.fork() > 0:
            os._exit(0)
        if _LINUX:
            self._become_subreaper()

    # What a supervisor must survive although it has no terminal: a stray
    # `kill -INT` at the launcher's group, the hang-up of a session.
    _SURVIVED = ("SIGHUP", "SIGINT", "SIGTTOU", "SIGTTIN")

    def supervisor_signals(self) -> None:
        """Shape this process's signals so that the job it starts begins clean (SPEC 10).

        A child inherits every SIG_IGN across exec, and the signal mask of the
        thread that forks it; a caught signal, though, is reset to SIG_DFL by
        the exec.  So the signals we must survive are caught by a no-op, never
        ignored; whatever else the launcher ignored or caught (a CI shell
        ignoring SIGINT, nohup, a launcher's own handlers, a SIGCHLD ignored so
        the kernel would reap our child) goes back to SIG_DFL; and the mask is
        emptied here, before this process has any thread (threads inherit it).
        SIGPIPE and SIGXFSZ stay ignored, as Python keeps them: subprocess
        resets exactly those two in the child (restore_signals).
        """
        survived = {getattr(_signal, name) for name in self._SURVIVED}
        ignored = {_signal.SIGPIPE, _signal.SIGXFSZ}
        for signum in _signal.valid_signals() - {_signal.SIGKILL, _signal.SIGSTOP}:
            wanted = (_survive_signal if signum in survived
                      else _signal.SIG_IGN if signum in ignored else _signal.SIG_DFL)
            if _signal.getsignal(signum) != wanted:
                try:
                    _signal.signal(signum, wanted)
                except (OSError, ValueError):  # one the C library reserves: nobody can ignore it
                    pass
        _signal.pthread_sigmask(_signal.SIG_SETMASK, ())

    def can_fork_supervisor(self) -> bool:
        # Linux only: macOS system libraries are not fork-safe and could not be
        # tested here.  Never with other threads running: one of them could
        # hold a lock the forked copy needs.
        return _LINUX and threading.active_count() == 1

    def fork_supervisor(self, body: Callable[[], NoReturn], *, stdout: int, stderr: int,
                        reaper: bool = False) -> None:
        """Run body() in a forked process in a new session, stdio on /dev/null,
        stdout and stderr.  body never returns (os._exit or exec).  The process
        is double-forked (so it is nobody's child to reap) unless the caller is
        a reaper that collects its children itself."""
        pid = os.fork()
        if pid:
            try:
                if not reaper:
                    os.waitpid(pid, 0)
            except ChildProcessError:  # SIGCHLD ignored here: the kernel reaped it already
                pass
            return
        try:
            os.setsid()
            if reaper or os.fork() == 0:
                null = os.open(os.devnull, os.O_RDONLY)
                for fd, target in ((null, 0), (stdout, 1), (stderr, 2)):
                    os.dup2(fd, target)
                for fd in {null, stdout, stderr} - {0, 1, 2}:
                    os.close(fd)
                self.supervisor_signals()
                if _LINUX:
                    self._become_subreaper()
                body()
        finally:
            os._exit(0)  # the intermediate, and body if it ever returned or raised

    def exec_keeping(self, argv: List[str], fds: List[int]) -> NoReturn:
        """exec argv with only stdio and fds open (raises OSError if exec fails)."""
        keep = set(fds) | {0, 1, 2}
        for fd in map(int, os.listdir("/proc/self/fd")):  # the forked launcher may hold anything
            if fd not in keep:
                try:
                    os.close(fd)
                except OSError:  # the descriptor of that listing itself, closed already
                    pass
        for fd in fds:
            os.set_inheritable(fd, True)
        # The exec resets our no-op handlers to SIG_DFL: until the new image
        # catches them again (supervisor_signals), those signals wait blocked
        # instead of ending it.  The mask survives the exec; the job, started
        # already, never sees it.
        survived = [getattr(_signal, name) for name in self._SURVIVED]
        mask = _signal.pthread_sigmask(_signal.SIG_BLOCK, survived)
        try:
            os.execv(argv[0], argv)
        except OSError:
            _signal.pthread_sigmask(_signal.SIG_SETMASK, mask)
            raise

    def _become_subreaper(self) -> None:
        # PR_SET_CHILD_SUBREAPER: double-forked daemons of the job re-parent to
        # us instead of init, so they stay inside the tree we can find.
        prctl = self._prctl()
        if prctl is not None:
            prctl(36, 1, 0, 0, 0)

    def warm_up(self) -> None:
        """Load now what every supervisor forked from this process will need."""
        if _LINUX:
            self._prctl()

    @functools.lru_cache(maxsize=None)
    def _prctl(self):
        """libc's prctl, or None (no prctl: the marker scan still finds escapees)."""
        import ctypes
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            return None
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        return prctl

    def tune_pipe(self, fd: int) -> None:
        # Bigger pipes mean fewer wake-ups for chatty jobs (Linux F_SETPIPE_SZ).
        if _LINUX:
            import fcntl
            try:
                fcntl.fcntl(fd, 1031, 1 << 20)
            except OSError:  # over /proc/sys/fs/pipe-max-size: the default still works
                pass

    def pipe_has_input(self, fd: int) -> bool:
        """Data waiting in the pipe, or its writer gone: a read would not block."""
        import select
        return bool(select.select([fd], [], [], 0)[0])

    def spawn_child(self, argv, *, job_id, cwd, env, stdin, stdout, stderr, limits=None) -> _Child:
        """Start the job's main process in a new session, in its cgroup where we
        may make one, and with its limits (see _plan_child)."""
        import subprocess
        limits = dict(limits or {})
        # The child that cannot enter its cgroup (a delegation rule we could not
        # foresee) or set its rlimits runs nothing of the job: it is started
        # again without them, and the state says which limits do not hold.
        for contain, rlimits in ((True, True), (False, True), (False, False)):
            plan = _plan_child(job_id, limits, contain=contain, rlimits=rlimits)
            try:
                popen = self._popen_child(argv, plan, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr)
                break
            except subprocess.SubprocessError:
                plan.abandon()
            except OSError:  # it could not be executed: no process, so no cgroup either
                plan.abandon()
                raise
            finally:
                plan.close()
        return _Child(popen, popen.pid, self.process_token(popen.pid), containment=plan.containment)

    @staticmethod
    def _popen_child(argv, plan: _ChildPlan, **kwargs) -> subprocess.Popen:
        # The child puts itself in its cgroup between fork and exec (preexec_fn),
        # so it runs no code of the job outside it; its children inherit it.  The
        # alternatives are worse: the supervisor moving itself into the job's
        # cgroup around the fork would write to its own cgroup, outside
        # `jobstate`, to move back (and would stay in the job's if that failed);
        # an exec shim costs an exec and turns exec errors into exit codes;
        # clone3(CLONE_INTO_CGROUP) is out of Python's reach.  preexec_fn is
        # unsafe only where other threads run (one may hold a lock the forked
        # copy needs): _plan_child asks for it only in a single-threaded process.
        import subprocess
        return subprocess.Popen(argv, close_fds=True, start_new_session=True,
                                preexec_fn=plan.enter if plan.needs_preexec() else None, **kwargs)

    def spawn_sink(self, argv, *, env) -> subprocess.Popen:
        """A notification command, in a session of its own so that stop_sink can end its whole tree."""
        import subprocess
        return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, close_fds=True, start_new_session=True)

    def stop_sink(self, popen: subprocess.Popen) -> None:
        """KILL the sink's process group.  It is not reaped yet, so its pid
        (the group's id) cannot have been reused."""
        try:
            os.killpg(popen.pid, _signal.SIGKILL)
        except (ProcessLookupError, PermissionError):  # no member left (macOS: only zombies)
            pass

    def wait_child(self, child: _Child) -> Tuple[Optional[int], Optional[int]]:
        """Block until the child exits, reaping adopted orphans on the way; (code, signum)."""
        while True:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                return None, None
            if pid != child.pid:
                continue
            if child.popen is not None:
                child.popen.returncode = status  # keeps Popen from waiting on it again
            if os.WIFSIGNALED(status):
                return None, os.WTERMSIG(status)
            return os.WEXITSTATUS(status), None

    # -- process identity and trees -------------------------------------------

    def process_token(self, pid: int) -> Optional[str]:
        info = self._stat(pid)
        return info[3] if info else None

    def is_alive(self, proc: _Proc) -> bool:
        info = self._stat(proc.pid)
        return bool(info) and info[3] == proc.token and info[2] != "Z"

    def _stat(self, pid: int) -> Optional[Tuple[int, int, str, str]]:
        """(ppid, pgid, state, token) of one process, or None."""
        if _LINUX:
            return self._linux_stat(pid)
        table = self._ps_table(pid)
        return table.get(pid)

    _boot_id: Optional[str] = None

    def _linux_stat(self, pid: int):
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                data = f.read()
        except OSError:
            return None
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = data[data.rindex(b")") + 2:].split()
        if self._boot_id is None:
            try:
                with open("/proc/sys/kernel/random/boot_id") as f:
                    self._boot_id = f.read().strip()
            except OSError:
                self._boot_id = "?"
        return int(fields[1]), int(fields[2]), fields[0].decode(), "%s:%s" % (self._boot_id, fields[19].decode())

    def _ps_table(self, pid: Optional[int] = None) -> Dict[int, Tuple[int, int, str, str]]:
        """macOS and other POSIX: ps gives ppid, pgid, state and the start time."""
        import subprocess
        argv = ["ps", "-o", "pid=,ppid=,pgid=,stat=,lstart="] + (["-p", str(pid)] if pid else ["-ax"])
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 env=dict(os.environ, LC_ALL="C"), timeout=10).stdout
        except (OSError, subprocess.TimeoutExpired):
            return {}
        table = {}
        for line in out.decode(errors="replace").splitlines():
            parts = line.split(None, 4)
            if len(parts) == 5 and parts[0].isdigit():
                table[int(parts[0])] = (int(parts[1]), int(parts[2]), parts[3][:1], parts[4].strip())
        return table

    def _all_processes(self) -> Dict[int, Tuple[int, int, str, str]]:
        if not _LINUX:
            return self._ps_table()
        table = {}
        for name in os.listdir("/proc"):
            if name.isdigit():
                info = self._linux_stat(int(name))
                if info:
                    table[int(name)] = info
        return table

    def _carries_marker(self, pid: int, marker: bytes) -> bool:
        try:
            with open("/proc/%d/environ" % pid, "rb") as f:
                return marker in f.read().split(b"\0")
        except OSError:  # another user's process, or gone: not ours to find
            return False

    def find_tree(self, ref: _TreeRef) -> List[_Proc]:
        """Live processes of the job: its process group, descendants, and marker carriers."""
        table = self._all_processes()
        live = {pid: info for pid, info in table.items() if info[2] != "Z"}
        found = set()
        root_ok = ref.pid is not None and ref.pid in live and live[ref.pid][3] == ref.pid_token
        # A group id cannot be reused while the group has members, so members of
        # group `pid` are ours when the leader is ours or no process has that pid.
        if ref.pid is not None and (root_ok or ref.pid not in table):
            found.update(pid for pid, info in live.items() if info[1] == ref.pid)
        if root_ok:
            found.add(ref.pid)
        found.update(p.pid for p in ref.descendants if live.get(p.pid, (0, 0, "", None))[3] == p.token)
        if _LINUX:
            marker = ("%s=%s" % (JOB_ID_ENV, ref.job_id)).encode()
            found.update(pid for pid in live if self._carries_marker(pid, marker))
        if ref.supervisor_pid in live:
            found.update(pid for pid, info in live.items() if info[0] == ref.supervisor_pid)
        found.update(pid for pid in self._cgroup_members(ref) if pid in live)
        found |= self._descendants(live, found)
        found -= {os.getpid(), ref.supervisor_pid, 1}
        return [_Proc(pid, live[pid][3]) for pid in sorted(found) if pid in live]

    def _descendants(self, live, roots) -> set:
        children: Dict[int, List[int]] = {}
        for pid, info in live.items():
            children.setdefault(info[0], []).append(pid)
        seen, todo = set(), list(roots)
        while todo:
            for kid in children.get(todo.pop(), ()):
                if kid not in seen:
                    seen.add(kid)
                    todo.append(kid)
        return seen

    def _cgroup_members(self, ref: _TreeRef) -> List[int]:
        """Processes in the job's cgroups: all of its tree, however it left its group."""
        return [pid for path in ref.cgroups if _is_job_cgroup(path, ref.job_id) for pid in _cgroup_tree_pids(path)]

    def signal_tree(self, ref: _TreeRef, signum: int) -> int:
        """Signal every verified process of the tree; returns how many were signalled."""
        procs = self.find_tree(ref)
        if signum == _signal.SIGKILL:
            self._kill_cgroups(ref)
        return sum(self._signal_verified(p, signum) for p in procs)

    def _kill_cgroups(self, ref: _TreeRef) -> None:
        """KILL everything in the job's cgroups: one write to `cgroup.kill` (Linux 5.14+),
        else rounds of signals until they are empty, which a fork race cannot outrun for long."""
        for path in ref.cgroups:
            if not _is_job_cgroup(path, ref.job_id):
                continue
            try:
                with open(os.path.join(path, "cgroup.kill"), "wb", buffering=0) as f:
                    f.write(b"1")
                continue
            except OSError:  # no cgroup.kill (v1, or an older kernel): signal the members
                pass
            for _ in range(50):
                members = [_Proc(pid, self.process_token(pid)) for pid in _cgroup_tree_pids(path)]
                if not [p for p in members if self._signal_verified(p, _signal.SIGKILL)]:
                    break

    # A job ended by a limit dies of a signal here (OOM kill, SIGXCPU, our KILL).
    limit_exit_code = None

    def limit_counters(self, child: _Child) -> Dict[str, float]:
        """What counts towards each limit a cgroup enforces: OOM kills (memory_max),
        refused forks (max_processes), CPU seconds used (cpu_time_s)."""
        return _containment_counters(child.containment)

    def let_go_of_child(self, child: _Child) -> None:
        return None  # nothing held: a cgroup is found again by its path

    def unrecorded_cgroups(self, job_id: str) -> List[str]:
        """The cgroups a supervisor started from here would make for the job: one
        killed before it recorded them in state.json leaves them unnamed."""
        if not (_LINUX and job_id):
            return []
        homes = (_cgroup_home(c) for c in ("", "memory", "pids", "cpuacct"))
        return [os.path.join(home, _CGROUP_PARENT, job_id) for home in homes if home]

    def remove_containment(self, ref: _TreeRef) -> bool:
        """Remove the job's cgroups once empty (the recorded ones and the
        unrecorded ones); False while processes live in one."""
        paths = set(ref.cgroups) | set(self.unrecorded_cgroups(ref.job_id))
        return all(_remove_cgroup_tree(path) for path in paths if _is_job_cgroup(path, ref.job_id))

    def _signal_verified(self, proc: _Proc, signum: int) -> bool:
        """Signal proc only if its start time still matches (a recycled pid is never hit).

        With a pidfd (Linux, Python 3.9+) the check and the signal refer to the
        same process, so there is no window for reuse at all.
        """
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(proc.pid)  # novm (guarded by hasattr above)
            except OSError:
                return False
        try:
            if self.process_token(proc.pid) != proc.token:
                return False
            if pidfd is not None:
                _signal.pidfd_send_signal(pidfd, signum)  # novm (pidfd is only set on 3.9+)
            else:
                os.kill(proc.pid, signum)
            return True
        except ProcessLookupError:  # exited meanwhile: nothing to stop
            return False
        except PermissionError:
            return False
        finally:
            if pidfd is not None:
                os.close(pidfd)


# Win32 constants, from the Windows SDK headers (the values checked against mingw-w64's headers).
_WIN_CREATE_SUSPENDED = 0x00000004
_WIN_DETACHED_PROCESS = 0x00000008
_WIN_CREATE_NEW_PROCESS_GROUP = 0x00000200
_WIN_CREATE_BREAKAWAY_FROM_JOB = 0x01000000
_WIN_CREATE_NO_WINDOW = 0x08000000
_WIN_JOB_OBJECT_QUERY = 0x0004
_WIN_JOB_OBJECT_TERMINATE = 0x0008
_WIN_JOB_OBJECT_LIMIT_JOB_TIME = 0x0004
_WIN_JOB_OBJECT_LIMIT_ACTIVE_PROCESS = 0x0008
_WIN_JOB_OBJECT_LIMIT_JOB_MEMORY = 0x0200
_WIN_JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION = 0x0400
_WIN_JOB_INFO_BASIC_ACCOUNTING = 1
_WIN_JOB_INFO_BASIC_PROCESS_ID_LIST = 3
_WIN_JOB_INFO_EXTENDED_LIMIT = 9
_WIN_PROCESS_TERMINATE = 0x0001
_WIN_PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
_WIN_SYNCHRONIZE = 0x00100000
_WIN_THREAD_SUSPEND_RESUME = 0x0002
_WIN_TH32CS_SNAPPROCESS = 0x2
_WIN_TH32CS_SNAPTHREAD = 0x4
_WIN_WAIT_TIMEOUT = 0x102
_WIN_LOCKFILE_FAIL_IMMEDIATELY = 0x1
_WIN_LOCKFILE_EXCLUSIVE_LOCK = 0x2
_WIN_ERROR_ACCESS_DENIED = 5
_WIN_ERROR_NO_MORE_FILES = 18
_WIN_ERROR_LOCK_VIOLATION = 33
_WIN_ERROR_NOT_LOCKED = 158
_WIN_ERROR_ALREADY_EXISTS = 183
_WIN_ERROR_MORE_DATA = 234
_WIN_ERROR_NOT_ENOUGH_QUOTA = 1816
# Exit code of every process jobstate terminates (what Popen.terminate() uses).
# The kill-request record, not this code, is what marks a job `killed`.
_WIN_KILLED_EXIT_CODE = 1


@functools.lru_cache(maxsize=None)
def _win_types():
    """Build the Win32 structs (and, through _win_prototypes, the prototypes).

    Fields are fixed-width on purpose: ctypes.wintypes has 8-byte DWORD/LONG and
    4-byte WCHAR on Linux, and these classes must have their 64-bit Windows
    sizes everywhere so the Linux tests can check them.
    """
    import ctypes
    import types

    DWORD, LONG = ctypes.c_uint32, ctypes.c_int32
    SIZE_T = ULONG_PTR = ctypes.c_size_t
    HANDLE = ctypes.c_void_p
    LARGE_INTEGER, ULONGLONG = ctypes.c_int64, ctypes.c_uint64

    class FILETIME(ctypes.Structure):
        _fields_ = [("dwLowDateTime", DWORD), ("dwHighDateTime", DWORD)]

    class IO_COUNTERS(ctypes.Structure):                        # 48 bytes
        _fields_ = [(n, ULONGLONG) for n in (
            "ReadOperationCount", "WriteOperationCount", "OtherOperationCount",
            "ReadTransferCount", "WriteTransferCount", "OtherTransferCount")]

    class JOBOBJECT_BASIC_LIMIT_INFORMATION(ctypes.Structure):  # 64 bytes
        _fields_ = [("PerProcessUserTimeLimit", LARGE_INTEGER), ("PerJobUserTimeLimit", LARGE_INTEGER),
                    ("LimitFlags", DWORD), ("MinimumWorkingSetSize", SIZE_T),
                    ("MaximumWorkingSetSize", SIZE_T), ("ActiveProcessLimit", DWORD),
                    ("Affinity", ULONG_PTR), ("PriorityClass", DWORD), ("SchedulingClass", DWORD)]

    class JOBOBJECT_EXTENDED_LIMIT_INFORMATION(ctypes.Structure):  # 144 bytes
        _fields_ = [("BasicLimitInformation", JOBOBJECT_BASIC_LIMIT_INFORMATION),
                    ("IoInfo", IO_COUNTERS), ("ProcessMemoryLimit", SIZE_T),
                    ("JobMemoryLimit", SIZE_T), ("PeakProcessMemoryUsed", SIZE_T),
                    ("PeakJobMemoryUsed", SIZE_T)]

    class JOBOBJECT_BASIC_ACCOUNTING_INFORMATION(ctypes.Structure):  # 48 bytes; times in 100 ns
        _fields_ = [(n, LARGE_INTEGER) for n in (
            "TotalUserTime", "TotalKernelTime", "ThisPeriodTotalUserTime", "ThisPeriodTotalKernelTime")] + [
            (n, DWORD) for n in (
                "TotalPageFaultCount", "TotalProcesses", "ActiveProcesses", "TotalTerminatedProcesses")]

    class PROCESSENTRY32W(ctypes.Structure):                    # 568 bytes; set dwSize
        _fields_ = [("dwSize", DWORD), ("cntUsage", DWORD), ("th32ProcessID", DWORD),
                    ("th32DefaultHeapID", ULONG_PTR), ("th32ModuleID", DWORD),
                    ("cntThreads", DWORD), ("th32ParentProcessID", DWORD),
                    ("pcPriClassBase", LONG), ("dwFlags", DWORD),
                    ("szExeFile", ctypes.c_uint16 * 260)]       # UTF-16 units, unused

    class THREADENTRY32(ctypes.Structure):                      # 28 bytes; set dwSize
        _fields_ = [("dwSize", DWORD), ("cntUsage", DWORD), ("th32ThreadID", DWORD),
                    ("th32OwnerProcessID", DWORD), ("tpBasePri", LONG),
                    ("tpDeltaPri", LONG), ("dwFlags", DWORD)]

    class OVERLAPPED(ctypes.Structure):                         # 32 bytes; Offset = lock start
        _fields_ = [("Internal", ULONG_PTR), ("InternalHigh", ULONG_PTR),
                    ("Offset", DWORD), ("OffsetHigh", DWORD), ("hEvent", HANDLE)]

    @functools.lru_cache(maxsize=None)
    def pid_list(n):
        """JOBOBJECT_BASIC_PROCESS_ID_LIST with room for n pids (8 + 8 * n bytes)."""
        return type("JOBOBJECT_BASIC_PROCESS_ID_LIST", (ctypes.Structure,), {"_fields_": [
            ("NumberOfAssignedProcesses", DWORD), ("NumberOfProcessIdsInList", DWORD),
            ("ProcessIdList", ULONG_PTR * max(1, n))]})

    kernel32, ntdll = _win_prototypes(ctypes, FILETIME, PROCESSENTRY32W, THREADENTRY32, OVERLAPPED)
    return types.SimpleNamespace(
        byref=ctypes.byref, sizeof=ctypes.sizeof, pid_list=pid_list,
        INVALID_HANDLE_VALUE=ctypes.c_void_p(-1).value,
        FILETIME=FILETIME, IO_COUNTERS=IO_COUNTERS,
        JOBOBJECT_BASIC_LIMIT_INFORMATION=JOBOBJECT_BASIC_LIMIT_INFORMATION,
        JOBOBJECT_EXTENDED_LIMIT_INFORMATION=JOBOBJECT_EXTENDED_LIMIT_INFORMATION,
        JOBOBJECT_BASIC_ACCOUNTING_INFORMATION=JOBOBJECT_BASIC_ACCOUNTING_INFORMATION,
        PROCESSENTRY32W=PROCESSENTRY32W, THREADENTRY32=THREADENTRY32, OVERLAPPED=OVERLAPPED,
        kernel32=kernel32, ntdll=ntdll)


def _win_prototypes(ctypes, FILETIME, PROCESSENTRY32W, THREADENTRY32, OVERLAPPED):
    """kernel32's and ntdll's prototypes, as name: (restype, argtypes, failure test)."""
    DWORD, LONG, BOOL, UINT = ctypes.c_uint32, ctypes.c_int32, ctypes.c_int32, ctypes.c_uint32
    HANDLE = LPVOID = ctypes.c_void_p
    LPCWSTR = ctypes.c_wchar_p
    P = ctypes.POINTER
    # name: (restype, argtypes, failure test for the errcheck; None = checked by the caller)
    kernel32 = {
        # No errcheck: "created" and "opened an existing job" are both success and
        # differ only in the last error (0 vs 183), read right after the call.
        "CreateJobObjectW": (HANDLE, [LPVOID, LPCWSTR], None),
        "OpenJobObjectW": (HANDLE, [DWORD, BOOL, LPCWSTR], "null"),
        "AssignProcessToJobObject": (BOOL, [HANDLE, HANDLE], "zero"),
        "SetInformationJobObject": (BOOL, [HANDLE, ctypes.c_int, LPVOID, DWORD], "zero"),
        "QueryInformationJobObject": (BOOL, [HANDLE, ctypes.c_int, LPVOID, DWORD, P(DWORD)], "zero"),
        "TerminateJobObject": (BOOL, [HANDLE, UINT], "zero"),
        "CreateToolhelp32Snapshot": (HANDLE, [DWORD, DWORD], "invalid"),
        # The walkers end with FALSE + ERROR_NO_MORE_FILES, which is not a failure.
        "Process32FirstW": (BOOL, [HANDLE, P(PROCESSENTRY32W)], None),
        "Process32NextW": (BOOL, [HANDLE, P(PROCESSENTRY32W)], None),
        "Thread32First": (BOOL, [HANDLE, P(THREADENTRY32)], None),
        "Thread32Next": (BOOL, [HANDLE, P(THREADENTRY32)], None),
        "OpenProcess": (HANDLE, [DWORD, BOOL, DWORD], "null"),
        "OpenThread": (HANDLE, [DWORD, BOOL, DWORD], "null"),
        "ResumeThread": (DWORD, [HANDLE], "minus1"),
        "GetProcessTimes": (BOOL, [HANDLE, P(FILETIME), P(FILETIME), P(FILETIME), P(FILETIME)], "zero"),
        "WaitForSingleObject": (DWORD, [HANDLE, DWORD], "minus1"),
        "TerminateProcess": (BOOL, [HANDLE, UINT], "zero"),
        # No errcheck: it runs in `finally` blocks, where raising would hide the
        # real error, and a failed close of a handle we own is not actionable.
        "CloseHandle": (BOOL, [HANDLE], None),
        "LockFileEx": (BOOL, [HANDLE, DWORD, DWORD, DWORD, DWORD, P(OVERLAPPED)], "zero"),
        "UnlockFileEx": (BOOL, [HANDLE, DWORD, DWORD, DWORD, P(OVERLAPPED)], "zero"),
    }
    # NTSTATUS result (0 = success), no last error: checked by the caller.
    ntdll = {"NtResumeProcess": (LONG, [HANDLE], None)}
    return kernel32, ntdll


def _win_failed(failure, result):
    """Tell whether a Win32 return value means failure, per the prototype table's test."""
    if failure in ("zero", "null"):
        return not result
    if failure == "invalid":             # snapshots fail with INVALID_HANDLE_VALUE, not NULL
        return result is None or result == _win_types().INVALID_HANDLE_VALUE
    if failure == "minus1":
        return result == 0xFFFFFFFF
    raise ValueError("unknown failure test %r" % (failure,))


@functools.lru_cache(maxsize=None)
def _kernel32():
    """Load a private kernel32 with every prototype declared (Windows only).

    A private WinDLL, not the shared ctypes.windll, so other code's prototypes
    cannot clash with ours. ntdll's NtResumeProcess and the last-error accessors
    ride on the same object so that _WindowsProcessLayer has a single seam
    (`kernel32=`) for tests to replace.
    """
    import ctypes

    def errcheck_for(failure):
        def errcheck(result, func, args):
            if _win_failed(failure, result):
                raise ctypes.WinError(ctypes.get_last_error())
            return result
        return errcheck

    types = _win_types()
    dll = ctypes.WinDLL("kernel32", use_last_error=True)
    ntdll = ctypes.WinDLL("ntdll")
    for lib, table in ((dll, types.kernel32), (ntdll, types.ntdll)):
        for name, (restype, argtypes, failure) in table.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            if failure:
                fn.errcheck = errcheck_for(failure)
    dll.NtResumeProcess = ntdll.NtResumeProcess
    dll.get_last_error = ctypes.get_last_error
    dll.set_last_error = ctypes.set_last_error
    return dll


def _win_token_int(token):
    """Parse a recorded token; None for missing or corrupt ones (never matches)."""
    try:
        return int(token)
    except (TypeError, ValueError):
        return None


class _WindowsProcessLayer:
    """Process control on Windows: Job Objects first, Toolhelp32 walks as the fallback."""

    def __init__(self, kernel32=None):
        self._k32_loaded = kernel32      # None: load the real one on first use

    @property
    def _k32(self):
        if self._k32_loaded is None:
            self._k32_loaded = _kernel32()
        return self._k32_loaded

    # -- launching --------------------------------------------------------

    def default_root(self) -> str:
        return os.path.join(self._local_app_data(), "jobstate", "jobs")

    def cache_dir(self) -> str:
        return os.path.join(self._local_app_data(), "jobstate", "cache")

    @staticmethod
    def _local_app_data() -> str:
        return os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")

    def shell_argv(self, command: str):
        # A string, not a list: Popen quotes a list with the MSVCRT rules
        # (list2cmdline turns " into \"), which cmd.exe does not understand, so
        # `echo "a b"` would arrive as `echo \"a b\"`. With /s, cmd strips exactly
        # the first and the last quote after /c and runs the rest verbatim, so
        # the command survives byte for byte. /d skips AutoRun registry hooks,
        # which would make a job depend on the machine's cmd configuration.
        comspec = os.environ.get("ComSpec") or os.path.join(
            os.environ.get("SystemRoot", r"C:\Windows"), "System32", "cmd.exe")
        return '"%s" /d /s /c "%s"' % (comspec, command)

    def signal_numbers(self) -> Dict[str, int]:
        # Windows has no signals; each of these ends the tree the same way.
        return {"TERM": 15, "INT": 2, "KILL": 9}

    def spawn_supervisor(self, argv, *, stdout, stderr, lock_fd: int = -1) -> subprocess.Popen:
        # DETACHED_PROCESS: no console, so closing the terminal or Ctrl-C there
        # never reaches the supervisor. Breakaway: the caller's job (a terminal
        # tool, an IDE) must not take the supervisor down with it.
        flags = (_WIN_DETACHED_PROCESS | _WIN_CREATE_NEW_PROCESS_GROUP
                 | _WIN_CREATE_NO_WINDOW | _WIN_CREATE_BREAKAWAY_FROM_JOB)
        try:
            return self._popen_detached(argv, flags, stdout, stderr)
        except OSError as exc:
            if getattr(exc, "winerror", None) != _WIN_ERROR_ACCESS_DENIED:
                raise
        # The caller's job forbids breakaway (CI runners, actions/runner#595):
        # the supervisor then lives inside that job, which is the best we can do.
        return self._popen_detached(argv, flags & ~_WIN_CREATE_BREAKAWAY_FROM_JOB, stdout, stderr)

    @staticmethod
    def _popen_detached(argv, flags, stdout, stderr):
        import subprocess
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                close_fds=True, creationflags=flags)

    # The launcher cannot hand its LockFileEx lock to the supervisor, so the
    # supervisor takes the job lock itself.
    hands_over_lock = False
    # Once the supervisor, the only holder of a handle to the job object, has
    # exited, the job's name cannot be relied on to open it (Wine 8 keeps it while
    # processes remain in the job; Windows need not), so the supervisor writes
    # down what is still running when the main process exits.
    records_leftovers = True

    def release_supervisor(self, popen: subprocess.Popen) -> None:
        return None  # no zombies on Windows; the handle closes with the Popen object

    def unsafe_dir_reason(self, path: str) -> Optional[str]:
        return None  # %LOCALAPPDATA% is per user; ACLs are not checked

    def tune_pipe(self, fd: int) -> None:
        return None

    def pipe_has_input(self, fd: int) -> bool:
        # select() takes only sockets on Windows; PeekNamedPipe answers the same question.
        import _winapi
        import msvcrt
        try:
            available = _winapi.PeekNamedPipe(msvcrt.get_osfhandle(fd), 0)[0]
        except BrokenPipeError:
            return True  # the writer is gone: a read returns EOF at once
        return available > 0

    def fsync_dir(self, path: str) -> None:
        return None  # NTFS renames are journaled; directories cannot be fsynced

    def can_fork_supervisor(self) -> bool:
        return False  # no fork: the supervisor is always a new process

    def prepare_supervisor(self) -> None:
        # Nothing to do: detachment happened at creation (spawn_supervisor), and
        # Windows has no SIGHUP/SIGINT to ignore in a console-less process.
        return None

    def supervisor_signals(self) -> None:
        return None  # no signal dispositions or masks to pass on to the child

    def spawn_child(self, argv, *, job_id, cwd, env, stdin, stdout, stderr, limits=None) -> _Child:
        import subprocess
        name = "jobstate-" + job_id
        limits = dict(limits or {})
        job, limited = self._create_job(name, limits)
        try:
            # Suspended: the child runs no code, so spawns nothing, before it is
            # in the job. CREATE_NO_WINDOW: the supervisor has no console, and a
            # console child would otherwise pop up a new visible window.
            # It starts clean (SPEC 10): with all three std handles given and
            # close_fds at its default (True), Popen (3.7+) passes an explicit
            # PROC_THREAD_ATTRIBUTE_HANDLE_LIST of those three, so no other
            # handle of ours is inherited.  (The new process group turns Ctrl+C
            # off for it, but with no console none could come, and INT ends
            # the tree through the Job Object anyway.)
            popen = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr,
                creationflags=_WIN_CREATE_SUSPENDED | _WIN_CREATE_NEW_PROCESS_GROUP | _WIN_CREATE_NO_WINDOW)
        except BaseException:
            self._close(job)             # cleanup only; the caller records Popen's OSError
            raise
        started = False
        try:
            try:
                job = self._assign(job, popen)
            finally:
                self._resume(popen)      # whatever happened: never leave a suspended child
            token = self._handle_ctime(int(popen._handle))
            started = True
        finally:
            if not started:
                self._discard(popen, job)
        enforcer = "job-object" if job and limited else "none"
        held = _Containment("job-object" if job else "process-group",
                            limits={n: {"value": v, "enforced_by": enforcer} for n, v in limits.items()})
        return _Child(popen=popen, pid=popen.pid, token=str(token),
                      windows_job_name=name if job else None, handle=job, containment=held)

    def spawn_sink(self, argv, *, env) -> subprocess.Popen:
        """A notification command; stop_sink ends its tree with a walk from it."""
        import subprocess
        return subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL,
                                creationflags=_WIN_CREATE_NEW_PROCESS_GROUP | _WIN_CREATE_NO_WINDOW)

    def stop_sink(self, popen: subprocess.Popen) -> None:
        # Popen's open handle pins the pid, so the walk starts from this very process.
        token = str(self._handle_ctime(int(popen._handle)))
        self.signal_tree(_TreeRef("", popen.pid, token, None, None), self.signal_numbers()["KILL"])

    def _create_job(self, name, limits):
        """Create our named job with its limits: (job, whether the limits hold);
        job None when the name is taken (fall back to walks)."""
        k = self._k32
        for attempt in range(40):
            k.set_last_error(0)          # 183 on success is the only sign of a collision
            job = k.CreateJobObjectW(None, name)
            err = k.get_last_error()
            if not job:
                return None, False       # e.g. 6: another object type holds the name
            if err != _WIN_ERROR_ALREADY_EXISTS:
                return job, self._limit_job(job, limits)
            # An empty job of that name is the previous run's, going away as its
            # last holders let go (Wine keeps one for half a second): wait for it.
            # One with processes is someone else's: unknown limits and holders.
            try:
                empty = not self._job_pids(job)
            except OSError:
                empty = False
            k.CloseHandle(job)
            if not empty or attempt == 39:
                return None, False
            time.sleep(0.05)

    def _limit_job(self, job, limits):
        """Set the job's limits (memory of the whole job, live processes, user-mode
        CPU time) and make crashes end the process instead of opening a dialog
        nobody sees; set before the child is resumed, so they hold from its start.
        True when they hold.

        No KILL_ON_JOB_CLOSE: the workload must outlive a dead supervisor, as
        on POSIX (the stale lock then records supervisor_lost). No breakaway flags.
        """
        t = _win_types()
        info = t.JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
        basic = info.BasicLimitInformation
        basic.LimitFlags = _WIN_JOB_OBJECT_LIMIT_DIE_ON_UNHANDLED_EXCEPTION
        if limits.get("memory_max"):
            basic.LimitFlags |= _WIN_JOB_OBJECT_LIMIT_JOB_MEMORY
            info.JobMemoryLimit = int(limits["memory_max"])
        if limits.get("max_processes"):
            basic.LimitFlags |= _WIN_JOB_OBJECT_LIMIT_ACTIVE_PROCESS
            basic.ActiveProcessLimit = int(limits["max_processes"])
        if limits.get("cpu_time_s"):
            basic.LimitFlags |= _WIN_JOB_OBJECT_LIMIT_JOB_TIME
            basic.PerJobUserTimeLimit = int(limits["cpu_time_s"] * 10_000_000)  # 100 ns units
        try:
            self._k32.SetInformationJobObject(job, _WIN_JOB_INFO_EXTENDED_LIMIT,
                                              t.byref(info), t.sizeof(info))
        except OSError:
            if limits:  # keep the crash setting at least; the state says the limits do not hold
                self._limit_job(job, {})
            return False  # without limits, only crash-dialog suppression is lost, containment is not
        return not limits or self._job_keeps(job, basic.LimitFlags)

    def _job_keeps(self, job, flags) -> bool:
        """The job reads back the limit flags we set (Wine 8 accepts limits, then
        keeps none: the state must not say they hold)."""
        t = _win_types()
        info = t.JOBOBJECT_EXTENDED_LIMIT_INFORMATION()
        try:
            self._k32.QueryInformationJobObject(job, _WIN_JOB_INFO_EXTENDED_LIMIT, t.byref(info),
                                                t.sizeof(info), None)
        except OSError:
            return True  # cannot ask: the kernel took them, which is all Windows promises
        return info.BasicLimitInformation.LimitFlags & flags == flags

    def _assign(self, job, popen):
        """Put the suspended child in the job; None (job closed) when refused."""
        if job is None:
            return None
        try:
            # Popen keeps its all-access process handle only in the private
            # _handle (3.8 to 3.12); it also pins the pid against reuse.
            self._k32.AssignProcessToJobObject(job, int(popen._handle))
            return job
        except OSError:
            # Windows 7 cannot nest jobs (5); any refusal means the Toolhelp
            # walk takes over, which is what the missing job name tells readers.
            self._close(job)
            return None

    def _resume(self, popen):
        """Resume the child's threads (Popen closed the thread handle it got)."""
        try:
            if self._resume_threads(popen.pid):
                return
        except OSError:
            pass  # fall through: NtResumeProcess needs no thread ids
        status = self._k32.NtResumeProcess(int(popen._handle))
        if status != 0:
            raise OSError(None, "cannot resume the child: NTSTATUS 0x%08X" % (status & 0xFFFFFFFF))

    def _resume_threads(self, pid):
        """Resume pid's suspended threads via a thread snapshot; count them."""
        k, resumed = self._k32, 0
        for tid in self._toolhelp(_WIN_TH32CS_SNAPTHREAD, pid):
            thread = k.OpenThread(_WIN_THREAD_SUSPEND_RESUME, False, tid)
            try:
                if k.ResumeThread(thread) > 0:   # previous suspend count
                    resumed += 1
            finally:
                k.CloseHandle(thread)
        return resumed

    def _discard(self, popen, job):
        """Kill and reap a child we could not start properly; close the job."""
        import subprocess
        try:
            popen.kill()
            popen.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            pass  # best effort while an earlier exception propagates
        self._close(job)

    def wait_child(self, child) -> Tuple[Optional[int], Optional[int]]:
        # Windows has no signals; the code is the unsigned DWORD from Popen.
        return child.popen.wait(), None

    # -- identities ----------------------------------------------------------

    def process_token(self, pid: int) -> Optional[str]:
        probe = self._probe(pid, check_running=False)
        return None if probe is None else str(probe[0])

    def is_alive(self, proc: _Proc) -> bool:
        probe = self._probe(proc.pid)
        return bool(probe and probe[1] and probe[0] == _win_token_int(proc.token))

    def _probe(self, pid, check_running=True):
        """(creation time, is running) of pid, or None when not ours to see.

        Without check_running, only the creation time is asked for (no
        SYNCHRONIZE right needed) and "is running" is always False.
        """
        access = _WIN_PROCESS_QUERY_LIMITED_INFORMATION | (_WIN_SYNCHRONIZE if check_running else 0)
        try:
            handle = self._k32.OpenProcess(access, False, pid)
        except OSError:
            return None                  # 87: no such pid; 5: not ours
        try:
            ctime = self._handle_ctime(handle)
            running = check_running and self._k32.WaitForSingleObject(handle, 0) == _WIN_WAIT_TIMEOUT
            return ctime, running
        except OSError:
            return None
        finally:
            self._k32.CloseHandle(handle)

    def _handle_ctime(self, handle):
        """Creation time of a process as FILETIME ticks (100 ns since 1601)."""
        t = _win_types()
        times = [t.FILETIME() for _ in range(4)]  # creation, exit, kernel, user
        self._k32.GetProcessTimes(handle, *(t.byref(ft) for ft in times))
        return (times[0].dwHighDateTime << 32) | times[0].dwLowDateTime

    # -- trees ------------------------------------------------------------------

    def find_tree(self, ref: _TreeRef) -> List[_Proc]:
        members = self._job_members(ref)
        return members if members is not None else self._walk_tree(ref)

    def signal_tree(self, ref: _TreeRef, signum: int) -> int:
        if signum not in self.signal_numbers().values():
            raise ValueError("signal %r is not supported on Windows" % (signum,))
        procs = self.find_tree(ref)
        if procs and self._terminate_job(ref):
            return len(procs)
        # Per process: children may spawn while we walk, so walk again from
        # everything seen so far until nothing new turns up (bounded).
        seen = {}
        for _ in range(5):
            fresh = [p for p in procs if (p.pid, p.token) not in seen]
            if not fresh:
                break
            for proc in fresh:
                self._terminate_verified(proc)
                seen[(proc.pid, proc.token)] = proc
            procs = self._walk_tree(ref, also=list(seen.values()))
        return len(seen)

    def remove_containment(self, ref: _TreeRef) -> bool:
        return True  # a Job Object goes with its last handle and process

    def unrecorded_cgroups(self, job_id: str) -> List[str]:
        return []

    def let_go_of_child(self, child: _Child) -> None:
        """Close our handle on the job's Job Object before the job lock goes: a
        restart's supervisor, which may start the moment it is free, must be able
        to create the job's name afresh (our open handle would keep the old one)."""
        job, child.handle = child.handle, None
        self._close(job)

    # What Windows ends every process of a job with when its CPU time is up.
    limit_exit_code = _WIN_ERROR_NOT_ENOUGH_QUOTA

    def limit_counters(self, child: _Child) -> Dict[str, float]:
        """From the job's accounting: user-mode CPU seconds, and processes ended by a
        limit (a process over the count).  A memory limit fails allocations instead."""
        if not child.handle or not child.containment.limits:
            return {}
        t = _win_types()
        info = t.JOBOBJECT_BASIC_ACCOUNTING_INFORMATION()
        try:
            self._k32.QueryInformationJobObject(child.handle, _WIN_JOB_INFO_BASIC_ACCOUNTING,
                                                t.byref(info), t.sizeof(info), None)
        except OSError:
            return {}
        counters = {"cpu_time_s": info.TotalUserTime / 1e7, "max_processes": float(info.TotalTerminatedProcesses)}
        return {name: value for name, value in counters.items() if name in child.containment.limits}

    def _excluded_pids(self, ref):
        return {0, os.getpid(), ref.supervisor_pid}

    def _open_job(self, name, access):
        try:
            return self._k32.OpenJobObjectW(access, False, name)
        except OSError:
            return None  # 2: no holder alive any more; 5: other session or elevation

    def _job_members(self, ref):
        """Live processes of the job, or None when the job cannot be used."""
        if not ref.windows_job_name:
            return None
        job = self._open_job(ref.windows_job_name, _WIN_JOB_OBJECT_QUERY)
        if job is None:
            return None
        try:
            pids = self._job_pids(job)
        except OSError:
            return None
        finally:
            self._close(job)
        if ref.pid is not None and ref.pid not in pids and self.is_alive(_Proc(ref.pid, ref.pid_token)):
            return None  # our child lives outside this job: the name is not ours
        skip = self._excluded_pids(ref)
        procs = (self._live_proc(pid) for pid in pids if pid not in skip)
        return [p for p in procs if p is not None]

    def _job_pids(self, job):
        """The job's pid list, growing the buffer on ERROR_MORE_DATA."""
        t, n = _win_types(), 32
        while True:
            buf = t.pid_list(n)()
            try:
                self._k32.QueryInformationJobObject(
                    job, _WIN_JOB_INFO_BASIC_PROCESS_ID_LIST, t.byref(buf), t.sizeof(buf), None)
            except OSError as exc:
                if getattr(exc, "winerror", None) != _WIN_ERROR_MORE_DATA or n >= 65536:
                    raise
                n = max(2 * n, buf.NumberOfAssignedProcesses + 16)
                continue
            return [int(buf.ProcessIdList[i]) for i in range(buf.NumberOfProcessIdsInList)]

    def _live_proc(self, pid):
        probe = self._probe(pid)
        return _Proc(pid, str(probe[0])) if probe and probe[1] else None

    def _walk_tree(self, ref, also=()):
        """Toolhelp32 parent walk from the recorded, still verified identities.

        `also` adds identities seen alive moments ago (signal_tree's earlier
        rounds): they may be dead now, yet their children are still ours.
        """
        skip = self._excluded_pids(ref)
        recorded = [_Proc(ref.pid, ref.pid_token)] if ref.pid is not None else []
        recorded += list(ref.descendants)
        found = {p.pid: p for p in recorded if p.pid not in skip and self.is_alive(p)}
        parents = self._process_parents()
        frontier = [(p.pid, int(p.token)) for p in list(found.values()) + list(also)
                    if p.pid not in skip]
        while frontier:
            parent, parent_ctime = frontier.pop()
            for child in self._children(parents, parent, parent_ctime, skip):
                if child.pid not in found:
                    found[child.pid] = child
                    frontier.append((child.pid, int(child.token)))
        return list(found.values())

    def _children(self, parents, parent, parent_ctime, skip):
        """Live children of (parent, parent_ctime), rejecting pid-reuse look-alikes.

        th32ParentProcessID is never updated, so it may name a recycled pid. A
        real child is never older than its parent; and if the parent's pid now
        belongs to a newer process, a real child predates that process.
        """
        holder = self._probe(parent, check_running=False)
        reused_at = holder[0] if holder and holder[0] != parent_ctime else None
        for pid, ppid in parents.items():
            if ppid != parent or pid == parent or pid in skip:
                continue
            child = self._live_proc(pid)
            if child is None:
                continue
            ctime = int(child.token)
            if ctime >= parent_ctime and (reused_at is None or ctime < reused_at):
                yield child

    def _process_parents(self):
        """{pid: parent pid} from a Toolhelp32 process snapshot."""
        return dict(self._toolhelp(_WIN_TH32CS_SNAPPROCESS))

    def _toolhelp(self, flags, owner=None):
        """Process snapshot: (pid, ppid) pairs; thread snapshot: owner's thread ids."""
        t, k = _win_types(), self._k32
        threads = flags == _WIN_TH32CS_SNAPTHREAD
        entry = t.THREADENTRY32() if threads else t.PROCESSENTRY32W()
        entry.dwSize = t.sizeof(entry)
        first, step = ((k.Thread32First, k.Thread32Next) if threads
                       else (k.Process32FirstW, k.Process32NextW))
        snap = k.CreateToolhelp32Snapshot(flags, 0)  # 0: all processes (threads ignore it)
        out = []
        try:
            ok = first(snap, t.byref(entry))
            while ok:
                if not threads:
                    out.append((entry.th32ProcessID, entry.th32ParentProcessID))
                elif entry.th32OwnerProcessID == owner:
                    out.append(entry.th32ThreadID)
                ok = step(snap, t.byref(entry))
            err = k.get_last_error()
            if err not in (0, _WIN_ERROR_NO_MORE_FILES):
                raise OSError(None, "Toolhelp32 walk failed (winerror %d)" % err, None, err)
        finally:
            k.CloseHandle(snap)
        return out

    def _terminate_job(self, ref):
        """TerminateJobObject when we can and may; False means go per process."""
        if not ref.windows_job_name:
            return False
        job = self._open_job(ref.windows_job_name, _WIN_JOB_OBJECT_QUERY | _WIN_JOB_OBJECT_TERMINATE)
        if job is None:
            return False
        try:
            if os.getpid() in self._job_pids(job):
                return False             # we are inside the job: it would end us too
            self._k32.TerminateJobObject(job, _WIN_KILLED_EXIT_CODE)
            return True
        except OSError:
            return False
        finally:
            self._close(job)

    def _terminate_verified(self, proc):
        """TerminateProcess through the very handle whose creation time matched."""
        k = self._k32
        access = _WIN_PROCESS_TERMINATE | _WIN_PROCESS_QUERY_LIMITED_INFORMATION | _WIN_SYNCHRONIZE
        try:
            handle = k.OpenProcess(access, False, proc.pid)
        except OSError:
            return False                 # gone already, or not ours to end
        try:
            if self._handle_ctime(handle) != _win_token_int(proc.token):
                return False             # the pid was recycled since find_tree
            k.TerminateProcess(handle, _WIN_KILLED_EXIT_CODE)
            return True
        except OSError:
            return False                 # exited between the check and the call
        finally:
            k.CloseHandle(handle)

    def _close(self, handle):
        if handle:
            self._k32.CloseHandle(handle)

    # -- files ------------------------------------------------------------------

    def lock(self, fd: int, *, exclusive: bool, blocking: bool) -> bool:
        import msvcrt
        t = _win_types()
        flags = (_WIN_LOCKFILE_EXCLUSIVE_LOCK if exclusive else 0) | (
            0 if blocking else _WIN_LOCKFILE_FAIL_IMMEDIATELY)
        overlapped = t.OVERLAPPED()      # Offset 0: the lock is the file's first byte
        try:
            self._k32.LockFileEx(msvcrt.get_osfhandle(fd), flags, 0, 1, 0, t.byref(overlapped))
        except OSError as exc:
            if not blocking and getattr(exc, "winerror", None) == _WIN_ERROR_LOCK_VIOLATION:
                return False
            raise
        return True

    def share_lock(self, fd: int) -> bool:
        # A shared lock cannot overlap an exclusive one, even of the same handle: unlock first.
        self.unlock(fd)
        return self.lock(fd, exclusive=False, blocking=False)

    def unlock(self, fd: int) -> None:
        import msvcrt
        t = _win_types()
        overlapped = t.OVERLAPPED()
        try:
            self._k32.UnlockFileEx(msvcrt.get_osfhandle(fd), 0, 1, 0, t.byref(overlapped))
        except OSError as exc:
            # Unlocking an unlocked range is a no-op on POSIX (flock); match it.
            # Windows reports ERROR_NOT_LOCKED, Wine 8 ERROR_LOCK_VIOLATION.
            if getattr(exc, "winerror", None) not in (_WIN_ERROR_NOT_LOCKED, _WIN_ERROR_LOCK_VIOLATION):
                raise

    def read_bytes(self, path: str) -> bytes:
        # While a writer's os.replace swaps the file in, opening it can fail
        # with access denied for a moment: retry briefly (about 1 s at most).
        for attempt in range(40):
            try:
                with open(os.open(path, os.O_RDONLY | _FILE_FLAGS), "rb") as f:
                    return f.read()
            except PermissionError:
                if attempt == 39:
                    raise
                time.sleep(min(0.05, 0.002 * (attempt + 1)))

    def replace(self, src: str, dst: str) -> None:
        # A reader that has dst open without FILE_SHARE_DELETE makes the rename
        # fail with PermissionError; readers hold files only briefly, so retry
        # for up to about 2 s (a busy poller can hold the file at every try).
        for attempt in range(50):
            try:
                os.replace(src, dst)
                return
            except PermissionError:
                if attempt == 49:
                    raise
                time.sleep(min(0.05, 0.005 * (attempt + 1)))


_process_layer = _WindowsProcessLayer() if _WINDOWS else _PosixProcessLayer()

# ---------------------------------------------------------------------------
# 4. Helpers: time, ids, paths, parsing
# ---------------------------------------------------------------------------


def _format_time(t: float) -> str:
    """RFC 3339 UTC with exactly three fractional digits and a Z."""
    ms = int(t * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + ".%03dZ" % (ms % 1000)


def _utc_now() -> str:
    return _format_time(time.time())


def _parse_time(text: Optional[str]) -> Optional[float]:
    """Inverse of _format_time; None for anything unparseable."""
    import calendar
    try:
        base = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
        frac = text[19:].rstrip("Z")
        return base + (float(frac) if frac.startswith(".") else 0.0)
    except (TypeError, ValueError):
        return None


def _deadline(timeout_s: Optional[float]) -> Optional[float]:
    return None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)


def _remaining(deadline: Optional[float]) -> Optional[float]:
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def new_job_id() -> str:
    """A new job id: 32 hex digits in the UUIDv7 layout, so ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
    return "%032x" % (ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b)


def _is_job_id(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def _normalize_job_ref(ref) -> str:
    """Validate a job id or prefix before it touches the filesystem."""
    if not isinstance(ref, str) or not 1 <= len(ref) <= 32 or \
            not all(c in "0123456789abcdefABCDEF" for c in ref):
        raise InvalidJobIdError(str(ref))
    return ref.lower()


def resolve_root(root: Optional[str] = None) -> str:
    """The jobs root: `root` > $JOBSTATE_ROOT > $XDG_DATA_HOME/jobstate/jobs > platform default."""
    if root:
        return _abspath(os.path.expanduser(root))
    if os.environ.get("JOBSTATE_ROOT"):
        return _abspath(os.path.expanduser(os.environ["JOBSTATE_ROOT"]))
    if os.environ.get("XDG_DATA_HOME"):
        return os.path.join(_abspath(os.environ["XDG_DATA_HOME"]), "jobstate", "jobs")
    return _process_layer.default_root()


def _abspath(path: str) -> str:
    """os.path.abspath, with a clear error where the current directory was deleted."""
    try:
        return os.path.abspath(path)
    except FileNotFoundError:  # os.getcwd() of a removed directory
        raise InvalidArgumentError(
            "the current directory no longer exists, so %r cannot be resolved" % (path,),
            hint="cd to an existing directory, or give absolute paths (--cwd DIR, --root DIR; list --all)") from None


class JobPaths:
    """Where each file of one job lives."""

    def __init__(self, root: str, job_id: str):
        self.root, self.job_id = root, job_id
        self.dir = os.path.join(root, job_id)
        d = self.dir + os.sep  # plain concatenation: os.path.join's checks, 11 per job, showed in listings
        self.meta, self.state, self.lock = d + "meta.json", d + "state.json", d + "lock"
        self.stdout_log, self.stderr_log, self.full_log = d + "stdout.log", d + "stderr.log", d + "full.log"
        self.stdin, self.supervisor_log = d + "stdin.bin", d + "supervisor.log"
        self.event, self.kill_request = d + "completion_event.json", d + "kill_request.json"
        self.reserve = d + "space.reserve"


def _duration_seconds(text: str) -> float:
    """Seconds, signed, from '90', '1.5', '250ms', '90s', '5m', '2h', '7d'; ValueError otherwise."""
    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*(ms|s|m|h|d)?\s*", text)
    if not match:
        raise ValueError("not a duration: %r" % (text,))
    unit = {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    return float(match.group(1)) * unit


def _size_bytes(text: str) -> int:
    """Bytes, signed, from '4096', '64k', '10M', '1GiB'; ValueError otherwise."""
    match = re.fullmatch(r"\s*([-+]?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError("not a size: %r" % (text,))
    return int(match.group(1)) * 1024 ** "_kmgt".index(match.group(2).lower() or "_")


def _parse_duration(value, name: str) -> float:
    """Seconds from a number or '90s', '5m', '2h', '7d', '250ms', from 0 to 1e9."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        try:
            seconds = _duration_seconds(str(value))
        except ValueError:
            raise InvalidArgumentError("%s: %r is not a duration" % (name, value),
                                       hint="use seconds or a suffix: 500ms, 90s, 5m, 2h, 7d") from None
    if not 0 <= seconds < 1e9:
        raise InvalidArgumentError("%s: %r is out of range" % (name, value),
                                   hint="a duration is at least 0 and under 1e9 seconds")
    return seconds


def _parse_size(value, name: str) -> int:
    """Bytes from a number or '64k', '10M', '1GiB'; never negative."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        try:
            size = _size_bytes(str(value))
        except ValueError:
            raise InvalidArgumentError("%s: %r is not a size" % (name, value),
                                       hint="use bytes or a suffix: 64k, 10M, 1G") from None
    if size < 0:
        raise InvalidArgumentError("%s: %r is negative" % (name, value), hint="a size is 0 or more bytes")
    return size


def _parse_limit(value, name: str) -> Optional[float]:
    """A JobSpec limit from the caller: memory_max as a size, max_processes as a
    count, cpu_time_s as a duration; 0 or None means no limit."""
    if value is None:
        return None
    if name == "memory_max":
        limit = _parse_size(value, name)
        return limit if limit < 1 << 62 else _out_of_range(name, value)
    if name == "cpu_time_s":
        return _parse_duration(value, name) or None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 31:
        raise InvalidArgumentError("%s: %r is not a process count" % (name, value),
                                   hint="a whole number of processes, from 1 (0 = no limit)")
    return value or None


def _out_of_range(name: str, value) -> NoReturn:
    raise InvalidArgumentError("%s: %r is out of range" % (name, value))


def _parse_signal(value) -> Tuple[int, str]:
    """(number, 'SIGNAME') for 'TERM', 'SIGTERM', 'term' or '15'; else InvalidSignalError."""
    known = _process_layer.signal_numbers()
    text = str(value).strip().upper()
    if text.isdigit():
        names = [n for n, num in known.items() if num == int(text)]
        name = names[0] if names else None
    else:
        name = text[3:] if text.startswith("SIG") else text
    if name not in known:
        raise InvalidSignalError("unknown signal %r" % (value,),
                                 hint="use one of: " + ", ".join(sorted(known)))
    return known[name], "SIG" + name


def _validate_tags(tags: Sequence[str]) -> List[str]:
    """Check tag syntax and drop duplicates, keeping the first occurrence's order."""
    out: List[str] = []
    for tag in tags:
        if not isinstance(tag, str) or not _TAG_RE.match(tag):
            raise InvalidTagError("invalid tag %r" % (tag,),
                                  hint="tags are dot-separated segments of letters, digits and '-'")
        if tag not in out:
            out.append(tag)
    return out


def _tag_matches(pattern: str, tags: Sequence[str]) -> bool:
    """`a.b` matches exactly; `a.*` matches `a` and anything under `a.`."""
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return any(t == base or t.startswith(base + ".") for t in tags)
    return pattern in tags


def _validate_tag_filter(pattern: str) -> str:
    body = pattern[:-2] if pattern.endswith(".*") else pattern
    if not _TAG_RE.match(body):
        raise InvalidTagError("invalid tag filter %r" % (pattern,),
                              hint="filters are tags, optionally ending in '.*'")
    return pattern


def _read_env_file(path: str) -> Dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped; optional 'export '; no quoting."""
    env = {}
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[7:].lstrip()
            key, sep, value = line.partition("=")
            if not sep or not key.strip():
                raise ValueError("%s:%d: expected KEY=VALUE" % (path, number))
            if "\0" in line:  # no environment can hold it: refuse it here, not deep in the spawn
                raise ValueError("%s:%d: a NUL byte in KEY=VALUE" % (path, number))
            env[key.strip()] = value
    return env


def _parse_env_pairs(pairs: Sequence[str]) -> Dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or "\0" in pair:
            raise InvalidArgumentError("--env %r is not KEY=VALUE" % (pair,))
        env[key] = value
    return env

# ---------------------------------------------------------------------------
# 5. Store: atomic files, locks, job directories
# ---------------------------------------------------------------------------


def _write_json_atomic(path: str, doc: dict) -> None:
    """Write a JSON file so that readers see the old or the new content, never a mix.

    Temp file in the same directory, fsync, replace, fsync of the directory.
    ensure_ascii keeps argv bytes that are not UTF-8 (surrogate escapes) round-trippable.
    """
    data = json.dumps(doc, separators=(",", ":")).encode("ascii")
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(4).hex())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600)
    try:
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        _process_layer.replace(tmp, path)
    except BaseException:  # clean up the temp file whatever stopped us, then re-raise
        _unlink_quietly(tmp)
        raise
    _process_layer.fsync_dir(os.path.dirname(path))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _allocate(fd: int, size: int) -> None:
    """Claim size bytes of disk for fd now (raises OSError when there is no room)."""
    if hasattr(os, "posix_fallocate"):  # blocks allocated, nothing written
        try:
            os.posix_fallocate(fd, 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
    _write_all(fd, bytes(size))
    os.fsync(fd)


def _rmtree(path: str, ignore_errors: bool = False) -> None:
    import shutil  # only deleting needs it; supervisors never load it
    shutil.rmtree(path, ignore_errors=ignore_errors)


def _write_parts(fd: int, parts: List[bytes]) -> None:
    """Write several buffers in order, with one system call where the platform has writev."""
    if not hasattr(os, "writev"):
        for part in parts:
            _write_all(fd, part)
        return
    views = [memoryview(p) for p in parts if p]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:  # already gone or never made: nothing to clean
        pass


def _read_json(path: str):
    return json.loads(_process_layer.read_bytes(path).decode("utf-8"))


def _unreadable(path: str, exc: OSError) -> StateFileError:
    """The error for a job file that exists but cannot be read (a planted symlink among others)."""
    if exc.errno == errno.ELOOP or os.path.islink(path):
        return StateFileError(path, "it is a symbolic link, and jobstate never follows one inside the root")
    return StateFileError(path, exc.strerror or str(exc))


def _open_job_file(path: str) -> Optional[int]:
    """A descriptor on a job's file for reading, never through a symlink; None if it does not exist."""
    try:
        return os.open(path, os.O_RDONLY | _FILE_FLAGS)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _read_state(paths: JobPaths) -> JobState:
    """Parse state.json; StateFileError when it is missing or corrupt."""
    try:
        state = JobState.from_dict(_read_json(paths.state))
    except FileNotFoundError:
        if not os.path.isdir(paths.dir):
            raise JobNotFoundError(paths.job_id, paths.root) from None
        raise StateFileError(paths.state, "missing") from None
    except OSError as exc:
        raise _unreadable(paths.state, exc) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(paths.state, str(exc)) from None
    if state.job_id != paths.job_id:
        raise StateFileError(paths.state, "it names job %s" % state.job_id)
    return state


def _write_state(paths: JobPaths, state: JobState) -> None:
    state.updated_at = _utc_now()
    _write_json_atomic(paths.state, state.to_dict())


def _read_spec(paths: JobPaths) -> JobSpec:
    try:
        return JobSpec.from_dict(_read_json(paths.meta))
    except FileNotFoundError:
        if not os.path.isdir(paths.dir):
            raise JobNotFoundError(paths.job_id, paths.root) from None
        raise StateFileError(paths.meta, "missing") from None
    except OSError as exc:
        raise _unreadable(paths.meta, exc) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(paths.meta, str(exc)) from None


def _ensure_root(root: str) -> None:
    """Create the root (0700) and refuse one that another user could tamper with."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise JobIOError("cannot create the jobs root %s: %s" % (root, exc.strerror),
                         hint="pass --root or set JOBSTATE_ROOT to a writable directory") from None
    problem = _process_layer.unsafe_dir_reason(root)
    if problem:
        raise JobIOError("refusing the jobs root %s: %s" % (root, problem),
                         hint="use a directory owned by you and not writable by others")


def _resolve_job_id(root: str, ref) -> str:
    """Full job id for an id or unique prefix (validated before any filesystem access)."""
    prefix = _normalize_job_ref(ref)
    if len(prefix) == 32:
        if _is_real_dir(os.path.join(root, prefix)):
            return prefix
        raise JobNotFoundError(prefix, root)
    matches = [n for n in _list_job_ids(root) if n.startswith(prefix)]
    if not matches:
        raise JobNotFoundError(prefix, root)
    if len(matches) > 1:
        raise AmbiguousJobIdError(prefix, matches)
    return matches[0]


def _list_job_ids(root: str) -> List[str]:
    """Job ids under root, newest first (ids are time-ordered); a missing root has none.

    Only real directories count: a symlink planted in the root is never a job,
    so nothing is ever read, written or deleted through it.
    """
    try:
        with os.scandir(root) as entries:
            names = [e.name for e in entries if _is_job_id(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JobIOError("cannot read the jobs root %s: %s" % (root, exc.strerror)) from None
    return sorted(names, reverse=True)


def _is_real_dir(path: str) -> bool:
    import stat
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class _JobLock:
    """The job's `lock` file: held exclusively by the live supervisor for its whole life.

    Readers take it to prove the supervisor is gone (no pid guessing), and `wait`
    blocks on it to wake the moment the supervisor exits.
    """

    def __init__(self, paths: JobPaths):
        self.paths, self.path = paths, paths.lock
        self.fd: Optional[int] = None

    @classmethod
    def handed_over(cls, paths: JobPaths, fd: int) -> "_JobLock":
        """The lock a launcher took and passed on to us already held, as fd."""
        lock = cls(paths)
        lock.fd = fd
        return lock

    def acquire(self, *, exclusive: bool = True, blocking: bool = False, create: bool = True) -> bool:
        """Take the lock; False if someone holds it.  With create (to run the job),
        JobNotFoundError when the job was deleted before or while we took it."""
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | _FILE_FLAGS
        try:
            self.fd = os.open(self.path, flags, 0o600)
        except FileNotFoundError:
            if create:  # only a vanished job directory makes O_CREAT fail so
                raise JobNotFoundError(self.paths.job_id, self.paths.root) from None
            return self._gone()
        if not _process_layer.lock(self.fd, exclusive=exclusive, blocking=blocking):
            self.release()
            return False
        # A delete renames the job directory away while it holds the lock: a
        # lock file opened just before that is no longer the job's once we get it.
        if create and not os.path.lexists(self.path):
            self.release()
            raise JobNotFoundError(self.paths.job_id, self.paths.root)
        return True

    def _gone(self) -> bool:
        # A job directory without a lock file never had a supervisor: it is free.
        self.fd = None
        return True

    def release(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            _process_layer.unlock(fd)
            os.close(fd)  # closing drops the lock

    def share(self) -> bool:
        """Keep holding the lock, shared: readers (wait) pass, writers (restart,
        delete) wait.  False, and released, when another process took it in the
        moment the conversion leaves it free."""
        if self.fd is not None and _process_layer.share_lock(self.fd):
            return True
        self.release()
        return False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


class _MetaLock:
    """Serializes read-modify-write of meta.json (tags) between processes."""

    def __init__(self, paths: JobPaths):
        self.path = os.path.join(paths.dir, "meta.lock")
        self.fd: Optional[int] = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _FILE_FLAGS, 0o600)
        _process_layer.lock(self.fd, exclusive=True, blocking=True)
        return self

    def __exit__(self, *exc):
        _process_layer.unlock(self.fd)
        os.close(self.fd)


def _reconcile(paths: JobPaths, state: JobState) -> JobState:
    """Turn a `running` state whose supervisor is gone into `failed` (supervisor_lost).

    The supervisor holds the lock for its whole life, so a free lock is proof; the
    re-read under the lock avoids racing a supervisor that just finished.
    """
    if state.status is not JobStatus.RUNNING:
        return state
    with _JobLock(paths) as lock:
        if not lock.acquire(create=False):
            return state
        state = _read_state(paths)
        if state.status is JobStatus.RUNNING:
            state.job.status = JobStatus.FAILED
            state.error = Failure("supervisor_lost",
                                  "the supervisor exited without recording the job's end")
            state.finished_at = _utc_now()
            _write_state(paths, state)
        return state


def _read_state_reconciled(paths: JobPaths) -> JobState:
    return _reconcile(paths, _read_state(paths))


def _read_kill_request(paths: JobPaths) -> Optional[str]:
    """The signal name a killer asked for, if any ('SIGTERM')."""
    try:
        value = _read_json(paths.kill_request).get("signal")
        return value if isinstance(value, str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _populate_job_dir(final: JobPaths, staging: str, spec: JobSpec, stdin: Optional[bytes]) -> None:
    """Write meta.json, state.json (created), stdin.bin and the lock file into the staging dir."""
    def at(path):
        return os.path.join(staging, os.path.basename(path))
    if stdin is not None:
        fd = os.open(at(final.stdin), os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, 0o600)
        try:
            _write_all(fd, stdin)
        finally:
            os.close(fd)
    os.close(os.open(at(final.lock), os.O_WRONLY | os.O_CREAT | _FILE_FLAGS, 0o600))
    _write_json_atomic(at(final.meta), spec.to_dict())
    state = JobState(JobInfo(final.job_id, JobStatus.CREATED), updated_at=_utc_now())
    _write_json_atomic(at(final.state), state.to_dict())


def _delete_job(paths: JobPaths) -> None:
    """Remove a job directory that no supervisor holds (never through a symlink).

    The directory is first renamed out of the way, so the job disappears at
    once for every reader instead of going through half-deleted states.
    """
    if not _is_real_dir(paths.dir):
        raise JobNotFoundError(paths.job_id, paths.root)
    with _JobLock(paths) as lock:
        if not lock.acquire(create=False):
            _refuse_busy_delete(paths)
        try:
            tree: Optional[_TreeRef] = _TreeRef.from_state(_read_state(paths))
        except JobError:  # no state to name its cgroup: nothing of ours to remove
            tree = None
        tomb = os.path.join(paths.root, ".deleted-%s-%s" % (paths.job_id, os.urandom(4).hex()))
        try:
            os.rename(paths.dir, tomb)
        except FileNotFoundError:
            raise JobNotFoundError(paths.job_id, paths.root) from None
        except OSError:  # Windows cannot rename a directory holding an open file (our lock)
            tomb = None
        if tree is not None:  # its cgroup, once empty; one with live processes stays for them
            _process_layer.remove_containment(tree)
        try:
            if tomb is None:
                _empty_job_dir(paths)
            lock.release()
            _rmtree(tomb or paths.dir)
        except FileNotFoundError:
            raise JobNotFoundError(paths.job_id, paths.root) from None
        except OSError as exc:
            raise JobIOError("cannot delete %s: %s" % (paths.dir, exc)) from None


def _refuse_busy_delete(paths: JobPaths) -> NoReturn:
    """A held lock: the job runs, or its finished run's descendants still write to its logs."""
    try:
        state = _read_state(paths)
    except JobError:
        state = JobState(JobInfo(paths.job_id, JobStatus.RUNNING))
    if state.status.is_terminal:
        raise InvalidStateError(paths.job_id, state.status, "processes it left still write to its logs: stop "
                                "them first ('jobstate kill %s')" % paths.job_id)
    raise InvalidStateError(paths.job_id, JobStatus.RUNNING, "stop it first ('jobstate kill')")


def _empty_job_dir(paths: JobPaths) -> None:
    """Everything but the lock, which we hold: Windows cannot delete an open file."""
    for name in os.listdir(paths.dir):
        path = os.path.join(paths.dir, name)
        if path == paths.lock:
            continue
        if _is_real_dir(path):
            _rmtree(path)
        else:
            os.unlink(path)

# ---------------------------------------------------------------------------
# 6. Supervisor: one job's life, from start to notifications
# ---------------------------------------------------------------------------


class _SpawnFailure(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage, self.message = stage, message


class _FullLog:
    """full.log: both streams interleaved in arrival order, each line prefixed.

    One timestamp per chunk; a chunk that continues a line of the same stream
    gets no prefix, one that interrupts another stream's line starts a new line.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.lock = threading.Lock()
        self.at_line_start = True
        self.last_label = b""

    def append(self, label: bytes, chunk: bytes) -> None:
        with self.lock:
            ends_line = chunk.endswith(b"\n")
            one_line = chunk.find(b"\n", 0, len(chunk) - 1) < 0  # no line starts inside the chunk
            if one_line and not self.at_line_start and label == self.last_label:
                parts = [chunk]  # the middle of a long line: no prefix, no copy, no clock
            else:
                prefix = b"%s [%s] " % (_utc_now().encode(), label)
                parts = []
                if self.at_line_start:
                    parts.append(prefix)
                elif label != self.last_label:
                    parts += [b"\n", prefix]
                if one_line:
                    parts.append(chunk)  # no line starts inside: write it as it is, without a copy
                else:
                    body = chunk[:-1] if ends_line else chunk
                    parts += [body.replace(b"\n", b"\n" + prefix), b"\n" if ends_line else b""]
            self.at_line_start, self.last_label = ends_line, label
            _write_parts(self.fd, parts)


@dataclass
class _Running:
    """A started job, handed from the supervisor's start to its watch: in one
    process, or across the exec of a forked launch (see _supervise_in_fork)."""

    state: JobState
    spec: JobSpec
    child: _Child
    pipes: Tuple[int, int]
    logs: List[int]
    started: float  # time.monotonic(): one clock for the whole system, so it survives exec

    def fds(self) -> List[int]:
        return [*self.pipes, *self.logs]

    def encode(self) -> str:
        """One argv word for the exec'd watcher; the rest it reads back from the job directory."""
        baselines = json.dumps(self.child.containment.baselines, separators=(",", ":"))
        return ",".join(str(fd) for fd in self.fds()) + "@%r@%s" % (self.started, baselines)

    @classmethod
    def decode(cls, word: str, paths: JobPaths) -> "_Running":
        fds, started, baselines = word.split("@", 2)
        out_r, err_r, *logs = (int(fd) for fd in fds.split(","))
        state = _read_state(paths)
        held = _Containment.from_state(state)
        held.baselines = json.loads(baselines)
        child = _Child(None, state.pid, state.pid_token, state.windows_job_name, containment=held)
        return cls(state, _read_spec(paths), child, (out_r, err_r), logs, float(started))


class _Supervisor:
    """Runs inside the detached supervisor process: one job, start to finish."""

    def __init__(self, paths: JobPaths):
        self.paths = paths
        self.exited = threading.Event()
        self.timed_out = False
        self.limit_reached: Optional[str] = None  # the limit the watcher stopped the tree for
        self.last_signal: Optional[str] = None
        self.write_error: Optional[str] = None
        self.child: Optional[_Child] = None
        self.notification: Optional[Tuple[JobSpec, dict]] = None  # what notify() delivers
        self.pumps: List[threading.Thread] = []
        self.log_guard = threading.Lock()  # held by the pumps for each write to the logs
        self.logs_ours = True  # False once another run may own the log files: read, never write
        self.lock_shared = False  # the job lock, held shared while descendants' output is still copied

    def log(self, message: str) -> None:
        sys.stderr.write("%s supervisor[%d]: %s\n" % (_utc_now(), os.getpid(), message))
        sys.stderr.flush()

    def run(self) -> None:
        """The whole life of the job in this process."""
        running = self.start()
        if running is not None:
            self.watch(running)

    def start(self) -> Optional["_Running"]:
        """Start the child, record `running` and acknowledge; None when there is
        nothing to watch (the job was not `created`, or it `failed` to start)."""
        state = _read_state(self.paths)
        if state.status is not JobStatus.CREATED:
            self.log("job is %s, not created; nothing to do" % state.status.value)
            return None
        spec = _read_spec(self.paths)
        state.supervisor_pid = os.getpid()
        self._reserve_space()
        try:
            logs = self._open_logs()
            child, pipes = self._spawn(spec)
        except _SpawnFailure as failure:
            self.log("cannot start the command: %s" % failure.message)
            state.job.status, state.error = JobStatus.FAILED, Failure(failure.stage, failure.message)
            state.finished_at, state.logs_drained = _utc_now(), True
            self._release_space()
            _write_state(self.paths, state)
            _acknowledge()
            self.announce(spec, state)
            return None
        started = time.monotonic()
        state.job.status, state.job.started_at = JobStatus.RUNNING, _utc_now()
        state.pid, state.pid_token, state.windows_job_name = child.pid, child.token, child.windows_job_name
        held = child.containment
        state.containment, state.cgroup, state.cgroups_v1, state.limits = (
            held.kind, held.cgroup, held.cgroups_v1, held.limits)
        _write_state(self.paths, state)
        _acknowledge()
        return _Running(state, spec, child, pipes, logs, started)

    def watch(self, running: "_Running") -> None:
        """Copy the output, enforce the timeout, record the end: the rest of the job's life."""
        state, spec = running.state, running.spec
        self.child = running.child
        pumps = self.pumps = self._start_pumps(running.pipes, running.logs)
        if spec.timeout_s:
            timeout_s = spec.timeout_s - (time.monotonic() - running.started)
            threading.Thread(target=self._enforce_timeout, args=(spec, timeout_s), daemon=True).start()
        if _process_layer.limit_counters(running.child):
            threading.Thread(target=self._enforce_limits, args=(running.child,), daemon=True).start()
        code, signum = _process_layer.wait_child(running.child)
        self.exited.set()
        self._record_end(state, code, signum, int((time.monotonic() - running.started) * 1000))
        if not _joined(pumps, QUICK_DRAIN_S):
            # Something still holds the pipes (a descendant): publish the end now,
            # then drain.  Usually the output ends with the child and one write does.
            _write_state(self.paths, state)
        if spec.kill_orphans:
            self._stop_tree(spec.kill_after_s)
        state.logs_drained = _joined(pumps, DRAIN_TIMEOUT_S)
        if self.write_error and state.error is None:
            state.error = Failure("output", self.write_error)
        self._release_space()
        _write_state(self.paths, state)
        # The job's cgroup goes with its last process; one that daemons still
        # live in stays, for `kill` to find them, until `delete` or `gc`.
        _process_layer.remove_containment(self._tree_ref())
        self.announce(spec, state)

    def announce(self, spec: JobSpec, state: JobState) -> None:
        """Record the job.finished event now, under the job lock; its sinks run
        in notify(), once the lock is released."""
        record = _record_event(self.paths, spec, state)
        if record is not None:
            self.notification = (spec, record)

    def notify(self) -> None:
        """Deliver the announced event to its sinks (the job lock is released or shared by now)."""
        if self.notification is None:
            return
        spec, record = self.notification
        try:
            _deliver_notifications(self.paths, spec, record, self.log, lock_shared=self.lock_shared)
        except OSError as exc:  # the sinks ran; only their record could not be written
            self.log("cannot record the notification deliveries: %s" % exc)

    # The end is on disk: `wait` must return, yet descendants may still hold the
    # output pipes, and a pipe nobody reads would kill them (SIGPIPE) at their
    # next write.  So the supervisor keeps copying their output, holding the job
    # lock shared: readers (`wait`, `run`, `status`) pass, while `restart`,
    # `delete` and `start` wait, so no new run can reset the logs under our
    # writes (restart stops such leftovers first; delete asks for a kill).  When
    # the last of them closes the pipes, `logs_drained` turns true.

    def let_waiters_go(self, lock: "_JobLock") -> None:
        """Release the job lock, or keep it shared while descendants still write."""
        if not self.pumps or _joined(self.pumps, 0):
            self._release(lock)
            return
        with self.log_guard:  # no write to the logs while the lock is converted
            self.lock_shared = lock.share()
            self.logs_ours = self.lock_shared  # someone took it in the gap: the logs may be theirs now

    def drain_to_the_end(self, lock: "_JobLock") -> None:
        """Copy descendants' output until they close the pipes, then say so and let go."""
        _joined(self.pumps, None)  # never leave a pipe unread: that is what would kill them
        if not self.lock_shared:
            return
        try:
            state = _read_state(self.paths)
            state.logs_drained = True
            _write_state(self.paths, state)
            _process_layer.remove_containment(self._tree_ref())
        finally:
            self._release(lock)

    def _release(self, lock: "_JobLock") -> None:
        if self.child is not None:
            _process_layer.let_go_of_child(self.child)
        lock.release()

    def _spawn(self, spec: JobSpec):
        """Start the child with its output on pipes; _SpawnFailure says why it could not start."""
        import subprocess
        if not os.path.isdir(spec.cwd):
            raise _SpawnFailure("cwd", "working directory %s does not exist" % spec.cwd)
        try:
            env = _job_environment(spec, self.paths.job_id)
        except (OSError, ValueError) as exc:
            raise _SpawnFailure("env", "cannot read env file: %s" % exc) from None
        argv = _process_layer.shell_argv(spec.argv[0]) if len(spec.argv) == 1 else spec.argv
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            _process_layer.tune_pipe(fd)
        stdin = open(self.paths.stdin, "rb") if spec.has_stdin else subprocess.DEVNULL
        try:
            child = _process_layer.spawn_child(argv, job_id=self.paths.job_id, cwd=spec.cwd, env=env,
                                               stdin=stdin, stdout=out_w, stderr=err_w, limits=spec.limits())
        except OSError as exc:
            os.close(out_r)
            os.close(err_r)
            raise _SpawnFailure("spawn", _describe_spawn_error(exc, spec.argv)) from None
        finally:
            os.close(out_w)
            os.close(err_w)
            if stdin is not subprocess.DEVNULL:
                stdin.close()
        return child, (out_r, err_r)

    def _open_logs(self) -> List[int]:
        """Open (and reset) the three logs before the child exists, so a failure
        here leaves no process behind."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS
        logs: List[int] = []
        try:
            for path in (self.paths.stdout_log, self.paths.stderr_log, self.paths.full_log):
                logs.append(os.open(path, flags, 0o600))
        except OSError as exc:
            for fd in logs:
                os.close(fd)
            raise _SpawnFailure("logs", "cannot open %s: %s" % (exc.filename, exc.strerror)) from None
        return logs

    def _start_pumps(self, pipes, logs: List[int]) -> List[threading.Thread]:
        full = _FullLog(logs[2])
        pumps = [threading.Thread(target=self._pump, args=(pipes[0], logs[0], b"STDOUT", full), daemon=True),
                 threading.Thread(target=self._pump, args=(pipes[1], logs[1], b"STDERR", full), daemon=True)]
        for pump in pumps:
            pump.start()
        return pumps

    def _pump(self, read_fd: int, log_fd: int, label: bytes, full: _FullLog) -> None:
        """Copy one pipe to its log and full.log until EOF.  After a write error
        (disk full) keep reading, so the child never blocks on a full pipe."""
        while True:
            try:
                chunk = os.read(read_fd, _CHUNK_BYTES)
            except OSError:
                break
            if not chunk:
                break
            with self.log_guard:
                if self.write_error or not self.logs_ours:
                    continue
                try:
                    _write_all(log_fd, chunk)
                    full.append(label, chunk)
                except OSError as exc:
                    self.write_error = "output could not be saved: %s" % exc
                    self._release_space()
                    self.log(self.write_error)
        os.close(read_fd)

    _RESERVE_BYTES = 256 * 1024

    def _reserve_space(self) -> None:
        """Hold some disk space so that, if the job's output fills the disk, the
        final state and the reason can still be written (we free it then)."""
        try:
            fd = os.open(self.paths.reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o600)
            try:
                _allocate(fd, self._RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:  # already short of space: go on without a reserve
            _unlink_quietly(self.paths.reserve)

    def _release_space(self) -> None:
        _unlink_quietly(self.paths.reserve)

    def _enforce_timeout(self, spec: JobSpec, timeout_s: float) -> None:
        if self.exited.wait(max(timeout_s, 0.0)):
            return
        self.timed_out = True
        self.log("timeout of %gs reached; stopping the process tree" % spec.timeout_s)
        self._stop_tree(spec.kill_after_s)

    _LIMIT_CHECK_S = 0.25

    def _enforce_limits(self, child: _Child) -> None:
        """End the job when one of its limits is reached: an OOM kill or a refused
        process in its cgroup, or its CPU time used up.  The kernel caps memory and
        processes by itself; jobstate ends the whole job, so the limit is the verdict."""
        delay = 0.0
        while not self.exited.wait(delay):
            counters = _process_layer.limit_counters(child)
            reached = _limit_reached(child.containment, counters)
            if reached:
                self.limit_reached = reached
                self.log("limit %s reached; stopping the process tree" % reached)
                self._stop_tree(0)
                return
            delay = self._LIMIT_CHECK_S
            if "cpu_time_s" in counters:  # no sooner than the CPUs could use up what is left
                left = child.containment.limits["cpu_time_s"]["value"] - (
                    counters["cpu_time_s"] - child.containment.baselines.get("cpu_time_s", 0.0))
                delay = min(delay, max(0.01, left / (os.cpu_count() or 1)))

    def _tree_ref(self) -> _TreeRef:
        return _TreeRef(self.paths.job_id, self.child.pid, self.child.token, os.getpid(),
                        self.child.windows_job_name, cgroups=self.child.containment.cgroups())

    def _stop_tree(self, kill_after_s: float) -> None:
        """TERM the tree, then KILL whatever is left after kill_after_s (0 = KILL at once)."""
        ref = self._tree_ref()
        for name, grace in (("TERM", kill_after_s), ("KILL", 0.0)):
            if name == "TERM" and kill_after_s == 0:
                continue
            self.last_signal = "SIG" + name
            if not _process_layer.signal_tree(ref, _process_layer.signal_numbers()[name]):
                return
            if grace and _wait_tree_gone(ref, grace):
                return

    def _record_end(self, state: JobState, code, signum, duration_ms: int) -> None:
        requested = _read_kill_request(self.paths)
        state.result.duration_ms, state.result.timed_out = duration_ms, self.timed_out
        state.finished_at = _utc_now()
        reached = self.limit_reached or self._limit_at_the_end(code, signum)
        if signum is not None:
            state.job.status, state.result.signal = JobStatus.KILLED, _signal_name(signum)
        elif requested or self.timed_out or reached:
            # Ended after jobstate asked it to (it may have trapped the signal), or by a limit.
            state.job.status = JobStatus.KILLED
            state.result.signal = (self.last_signal or "SIGKILL") if self.timed_out or reached else requested
        else:
            state.job.status, state.result.exit_code = JobStatus.EXITED, code
        if reached:
            value = self.child.containment.limits[reached]["value"]
            state.error = Failure("limit", _LIMIT_MESSAGES[reached] % value, limit=reached)
        if _process_layer.records_leftovers:
            state.leftovers = _process_layer.find_tree(self._tree_ref())


    def _limit_at_the_end(self, code, signum) -> Optional[str]:
        """The limit that ended the main process before the watcher saw it reached:
        an OOM kill, a CPU time rlimit (SIGXCPU), Windows ending a job out of time."""
        limits = self.child.containment.limits
        if signum is not None and _signal_name(signum) == "SIGXCPU" and \
                limits.get("cpu_time_s", {}).get("enforced_by") == "rlimit":
            return "cpu_time_s"
        if signum is None and (code is None or code != _process_layer.limit_exit_code):
            return None  # it ended by itself
        return _limit_reached(self.child.containment, _process_layer.limit_counters(self.child))


_LIMIT_MESSAGES = {
    "memory_max": "the job reached its memory limit of %s bytes (the kernel's OOM killer ended a process)",
    "max_processes": "the job reached its limit of %s processes (a new process was refused)",
    "cpu_time_s": "the job used up its CPU time limit of %gs",
}


def _limit_reached(held: _Containment, counters: Dict[str, float]) -> Optional[str]:
    """The first limit the counters say was reached (any OOM kill or refused
    process since the start; CPU seconds at the limit), or None."""
    for name in ("memory_max", "max_processes", "cpu_time_s"):
        if name not in counters:
            continue
        used = counters[name] - held.baselines.get(name, 0.0)
        if used >= held.limits[name]["value"] if name == "cpu_time_s" else used > 0:
            return name
    return None


def _joined(threads: List[threading.Thread], timeout_s: float) -> bool:
    """Wait up to timeout_s in all for the threads to end; True if they all did."""
    deadline = _deadline(timeout_s)
    for thread in threads:
        thread.join(_remaining(deadline))
    return not any(thread.is_alive() for thread in threads)


def _signal_name(signum: int) -> str:
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return "SIG%d" % signum


def _wait_tree_gone(ref: _TreeRef, timeout_s: float) -> bool:
    """Poll until no process of the tree is left; True if that happened in time."""
    deadline = _deadline(timeout_s)
    delay = 0.005
    while _process_layer.find_tree(ref):
        if _remaining(deadline) <= 0:
            return False
        time.sleep(min(delay, _remaining(deadline)))
        delay = min(delay * 2, 0.1)
    return True


def _job_environment(spec: JobSpec, job_id: str) -> Dict[str, str]:
    env = dict(os.environ) if spec.inherit_env else {}
    for path in spec.env_files:
        env.update(_read_env_file(path))
    env.update(spec.env)
    env[JOB_ID_ENV] = job_id
    return env


def _describe_spawn_error(exc: OSError, argv: List[str]) -> str:
    if isinstance(exc, FileNotFoundError):
        return "command not found: %s" % argv[0]
    if isinstance(exc, PermissionError):
        return "permission denied: %s is not executable" % argv[0]
    return "cannot execute %s: %s" % (argv[0], exc.strerror or exc)


def _acknowledge() -> None:
    """Tell the launcher we are up (one line on the inherited stdout pipe), then let go of it."""
    try:
        os.write(1, b"ok\n")
    except OSError:  # the launcher is gone (killed): the job goes on regardless
        pass
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.close(null)


# The job.finished event goes to its sinks after the supervisor has released
# the job lock.  `wait` and `run` return when the lock is free, and must not
# wait for a sink that may take JOBSTATE_NOTIFY_TIMEOUT: by then the job is
# complete on disk (terminal state, logs drained or given up on), and the
# sinks are jobstate's own errand.  Without the lock a `restart` or `delete`
# may overtake them, so their results are written back under the lock, and
# only while the state still names this process as the job's supervisor: a
# restart removes the old record and writes a new state first, so the file
# never mixes two runs.  The record is written first with "pending": true.

def _record_event(paths: JobPaths, spec: JobSpec, state: JobState) -> Optional[dict]:
    """Write completion_event.json with no deliveries yet; the record, or None without sinks."""
    if not spec.notify_command and not spec.notify_file:
        return None
    record = {"event": _finished_event(paths, spec, state), "deliveries": [], "pending": True}
    _write_json_atomic(paths.event, record)
    return record


def _deliver_notifications(paths: JobPaths, spec: JobSpec, record: dict, log: Callable[[str], None],
                           lock_shared: bool = False) -> None:
    """Emit the event to the configured sinks; failures never touch the state.
    lock_shared: we still hold the job lock (shared, see let_waiters_go), so no
    restart or delete can have overtaken us."""
    line = json.dumps(record["event"], separators=(",", ":")) + "\n"
    if spec.notify_file:
        record["deliveries"].append(_notify_file(spec.notify_file, line))
    if spec.notify_command:
        timeout_s = _notify_timeout_s(log)
        record["deliveries"].append(_notify_command(paths, spec.notify_command, line, timeout_s))
    record["pending"] = False
    if lock_shared:
        _write_json_atomic(paths.event, record)
    elif not _record_deliveries(paths, record):
        log("the job was restarted or deleted during its notifications: their results are not recorded")


def _record_deliveries(paths: JobPaths, record: dict, timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
    """Write the final record under the job lock if the job is still the run we
    notified for; False when it has moved on (or its lock stayed taken)."""
    deadline = _deadline(timeout_s)
    with _JobLock(paths) as lock:
        while not lock.acquire():  # readers hold it for an instant; a new supervisor for good
            if _remaining(deadline) == 0 or not _supervised_here(paths):
                return False
            time.sleep(0.01)
        if not _supervised_here(paths):
            return False
        _write_json_atomic(paths.event, record)
        return True


def _supervised_here(paths: JobPaths) -> bool:
    """The job's state still names this process as its supervisor (not restarted, not deleted)."""
    try:
        return _read_state(paths).supervisor_pid == os.getpid()
    except JobError:
        return False


def _finished_event(paths: JobPaths, spec: JobSpec, state: JobState) -> dict:
    return {"schema_version": SCHEMA_VERSION, "event_type": "job.finished", "job_id": state.job_id,
            "state": state.status.value, "command": spec.argv, "cwd": spec.cwd,
            "started_at": state.started_at, "finished_at": state.finished_at,
            "duration_ms": state.duration_ms, "exit_code": state.exit_code, "signal": state.signal,
            "stdout_log_path": paths.stdout_log, "stderr_log_path": paths.stderr_log}


def _notify_file(path: str, line: str) -> dict:
    result = {"sink": "file", "target": path, "delivered_at": _utc_now()}
    # Non-blocking: a FIFO nobody reads fails at once (ENXIO) instead of
    # holding the supervisor forever; regular files ignore the flag.
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags, 0o600)
        try:
            _write_all(fd, line.encode("utf-8"))
        finally:
            os.close(fd)
        result.update(ok=True, error=None)
    except OSError as exc:
        result.update(ok=False, error=str(exc))
    return result


_NOTIFY_TIMEOUT_S = 30.0


def _notify_timeout_s(log: Callable[[str], None]) -> float:
    """JOBSTATE_NOTIFY_TIMEOUT, or the default when it is not a positive duration
    (said once in supervisor.log: a typo must not cost the notification)."""
    text = os.environ.get("JOBSTATE_NOTIFY_TIMEOUT")
    if text is None:
        return _NOTIFY_TIMEOUT_S
    try:
        timeout_s = _parse_duration(text, "JOBSTATE_NOTIFY_TIMEOUT")
    except InvalidArgumentError:
        timeout_s = 0.0
    if timeout_s > 0:
        return timeout_s
    log("JOBSTATE_NOTIFY_TIMEOUT=%r is not a positive duration; using %gs" % (text, _NOTIFY_TIMEOUT_S))
    return _NOTIFY_TIMEOUT_S


def _notify_command(paths: JobPaths, command: str, line: str, timeout_s: float) -> dict:
    """Run the notify command with the event on stdin; at timeout_s its whole tree is stopped.

    It carries JOBSTATE_JOB_ID, which tells it the job and is also the job's
    tree marker: a running notifier is part of the job, so `kill` on the job
    stops it too, and so does any kill after the supervisor died; nothing
    jobstate started for a job can outlive a kill of that job.
    """
    import subprocess
    result = {"sink": "command", "target": command, "delivered_at": _utc_now()}
    env = dict(os.environ, JOBSTATE_EVENT_PATH=paths.event, JOBSTATE_JOB_ID=paths.job_id)
    try:
        popen = _process_layer.spawn_sink(_process_layer.shell_argv(command), env=env)
    except OSError as exc:
        result.update(ok=False, exit_code=None, error=str(exc))
        return result
    # Fed from a thread: a sink that never reads a large event must not hold
    # us past the timeout (Popen.communicate writes stdin first on Windows).
    threading.Thread(target=_feed, args=(popen.stdin, line.encode("utf-8")), daemon=True).start()
    try:
        code = popen.wait(timeout_s)
    except subprocess.TimeoutExpired:
        _process_layer.stop_sink(popen)
        popen.wait()
        result.update(ok=False, exit_code=None, error="timed out after %gs" % timeout_s)
        return result
    result.update(ok=code == 0, exit_code=code, error=None)
    return result


def _feed(stream, data: bytes) -> None:
    """Write the event to the sink's stdin and close it."""
    try:
        stream.write(data)
    except OSError:  # the sink exited or closed its stdin without reading it all: its choice
        pass
    finally:
        try:
            stream.close()
        except OSError:  # the same broken pipe, on flushing what was left
            pass


def _supervise_to_the_end(supervisor: "_Supervisor", lock: _JobLock, body: Callable[[], None]) -> NoReturn:
    try:
        body()
    except Exception as exc:  # record why, so the job reads `failed` with a reason, not a bare crash
        supervisor.log("internal error: %s: %s" % (type(exc).__name__, exc))  # needs no import (no fds left?)
        import traceback
        supervisor.log("internal error:\n" + traceback.format_exc())
        _record_supervisor_crash(supervisor.paths, exc)
        supervisor.pumps = []  # a supervisor that failed copies nothing more, as it always did
    # Everything is on disk: release the lock now (or share it, while
    # descendants still write), which wakes every waiter, then notify (see
    # _record_event), then copy what the descendants still write, and skip
    # interpreter teardown.
    supervisor.let_waiters_go(lock)
    try:
        supervisor.notify()
    except Exception:  # a bug in delivery: the job is recorded, say what went wrong
        import traceback
        supervisor.log("internal error while notifying:\n" + traceback.format_exc())
    try:
        supervisor.drain_to_the_end(lock)
    except Exception:  # the output is copied; only its record failed
        import traceback
        supervisor.log("internal error after draining:\n" + traceback.format_exc())
    sys.stderr.flush()
    os._exit(0)


def _record_supervisor_crash(paths: JobPaths, exc: Exception) -> None:
    try:
        state = _read_state(paths)
        if not state.status.is_terminal:
            state.job.status = JobStatus.FAILED
            state.error = Failure("supervisor", "%s: %s" % (type(exc).__name__, exc))
            state.finished_at = _utc_now()
            _write_state(paths, state)
        _acknowledge()
    except (JobError, OSError):  # nothing more we can record; supervisor.log has the traceback
        pass

# ---------------------------------------------------------------------------
# 7. Launch: every way a supervisor starts
# ---------------------------------------------------------------------------


def _supervisor_argv(*args: str) -> List[str]:
    """The command line that runs this file's main(args) as a supervisor.

    It imports this file through the import system rather than running it as
    a script: a script is compiled from source on every start (~70 ms here),
    an imported module reuses its cached bytecode.  Where bytecode writing is
    turned off (PYTHONDONTWRITEBYTECODE), the cache goes to our own cache
    directory instead of being skipped, so the source tree stays clean and
    supervisors stay fast.  No site (-S): it needs only the standard library,
    and skipping .pth hooks saves most of the start-up.
    """
    return [sys.executable, "-S", "-c", _SUPERVISOR_BOOT, _THIS_FILE, _process_layer.cache_dir(), *args]


_SUPERVISOR_BOOT = (
    "import sys, importlib.util as u\n"
    "if sys.dont_write_bytecode:\n"
    "    sys.pycache_prefix, sys.dont_write_bytecode = sys.argv[2], False\n"
    "s = u.spec_from_file_location('_jobstate_supervisor', sys.argv[1])\n"
    "m = sys.modules[s.name] = u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "sys.exit(m.main(sys.argv[3:]))\n")


def _take_lock_after_launcher(paths: JobPaths, lock: _JobLock, timeout_s: float = 3.0) -> bool:
    """Where the lock cannot be handed over (Windows), take it ourselves.

    Readers probe the lock for an instant (stale checks, waits), so a first
    refusal means little: retry while the job is still waiting to be started.
    """
    deadline = _deadline(timeout_s)
    while not lock.acquire(blocking=False):
        if _remaining(deadline) == 0 or _read_state(paths).status is not JobStatus.CREATED:
            return False
        time.sleep(0.01)
    return True


def _supervise_main(args: List[str]) -> int:
    """Entry point of the re-executed supervisor: `_supervise ROOT JOB_ID LOCK_FD [RUNNING]`.

    With RUNNING, a forked launch has already started the job (see
    _supervise_in_fork) and this process only watches it.
    """
    root, job_id, lock_fd = args[0], args[1], int(args[2])
    paths = JobPaths(root, job_id)
    supervisor = _Supervisor(paths)
    if len(args) > 3:
        _process_layer.supervisor_signals()  # catch again what the exec reset (see exec_keeping)
        lock = _JobLock.handed_over(paths, lock_fd)
        _supervise_to_the_end(supervisor, lock, lambda: supervisor.watch(_Running.decode(args[3], paths)))
    _process_layer.prepare_supervisor()
    # With a descriptor, the lock is inherited from the launcher, already held: no gap.
    lock = _JobLock.handed_over(paths, lock_fd) if lock_fd >= 0 else _JobLock(paths)
    if lock_fd < 0 and not _take_lock_after_launcher(paths, lock):
        sys.stderr.write("%s: the job lock stays taken: another supervisor runs this job\n" % _utc_now())
        return 1
    _supervise_to_the_end(supervisor, lock, supervisor.run)


def _supervise_in_fork(paths: JobPaths, lock: _JobLock) -> None:
    """The supervisor of a forked launch (POSIX), still in the launcher's image.

    Starting the child and acknowledging from here saves the launcher the
    start-up of a second interpreter; the watching is then handed to a fresh,
    small interpreter by exec (same pid, so the child stays ours), which also
    drops the launcher's memory.  If that exec fails, we watch from here.
    """
    supervisor = _Supervisor(paths)

    def start_then_hand_over():
        running = supervisor.start()
        if running is not None:
            argv = _supervisor_argv("_supervise", paths.root, paths.job_id, str(lock.fd), running.encode())
            try:
                _process_layer.exec_keeping(argv, [lock.fd, *running.fds()])
            except OSError as exc:
                supervisor.log("cannot exec the watcher (%s); watching from the launch image" % exc)
            supervisor.watch(running)

    _supervise_to_the_end(supervisor, lock, start_then_hand_over)


def _send_request(sock, data: bytes, fds: List[int]) -> None:
    """A length-prefixed message on a stream socket, descriptors riding on its
    first bytes (socket.send_fds, which 3.8 lacks, is this sendmsg)."""
    import array
    import socket
    message = b"%010d" % len(data) + data
    sent = sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    sock.sendall(message[sent:])


def _recv_request(sock) -> Tuple[bytes, List[int]]:
    """The next message and its descriptors; (b"", []) once the sender is gone."""
    import array
    import socket
    fds = array.array("i")
    header, ancillary, _flags, _addr = sock.recvmsg(10, socket.CMSG_SPACE(8 * fds.itemsize))
    for level, kind, payload in ancillary:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    header += _recv_exactly(sock, 10 - len(header)) if header else b""
    data = _recv_exactly(sock, int(header)) if len(header) == 10 else b""
    return data, list(fds)


def _recv_exactly(sock, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(size)
        if not chunk:
            raise ConnectionError("the launcher went away mid-request")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _reap_children(*_signal_args) -> None:
    """The forkserver's SIGCHLD handler: its supervisors are its direct children."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _supervise_for_forkserver(paths: JobPaths, lock_fd: int, request: dict, sock) -> NoReturn:
    sock.close()
    # What a spawned supervisor would inherit from the launcher at launch time.
    if os.environ != request["env"]:  # usually equal: we started with the launcher's environment
        os.environ.clear()
        os.environ.update(request["env"])
    if request["umask"] is not None:
        os.umask(request["umask"])
    supervisor = _Supervisor(paths)
    _supervise_to_the_end(supervisor, _JobLock.handed_over(paths, lock_fd), supervisor.run)


def _forkserver_main(sock_fd: int) -> NoReturn:
    """Serve launch requests from one launcher process until it closes the socket.

    Each request is the job and the launcher's environment, with three
    descriptors: the job lock (held: the hand-over has no gap), the
    acknowledgement pipe and supervisor.log.  The supervisor is a fork of
    this small warm process, so it starts in about a millisecond and shares
    its memory with its siblings.
    """
    import gc
    import socket
    import subprocess  # noqa: F401  (loaded here once, for every supervisor forked from us)
    sock = socket.socket(fileno=sock_fd)
    _process_layer.warm_up()
    _process_layer.supervisor_signals()  # a launcher's mask must not block our SIGCHLD
    _signal.signal(_signal.SIGCHLD, _reap_children)
    gc.freeze()  # forked supervisors then never copy these pages to collect them
    while True:
        try:
            message, fds = _recv_request(sock)
        except (OSError, ValueError):
            message, fds = b"", []
        if not message:
            os._exit(0)  # the launcher is gone; its jobs are not ours to end
        try:
            request = json.loads(message)
            lock_fd, ack_w, log = fds
            paths = JobPaths(request["root"], request["job_id"])
            body = functools.partial(_supervise_for_forkserver, paths, lock_fd, request, sock)
            _process_layer.fork_supervisor(body, stdout=ack_w, stderr=log, reaper=True)
        except (ValueError, KeyError, OSError):  # a bad request: its launcher sees no ack
            pass
        for fd in fds:
            os.close(fd)


def _current_umask() -> Optional[int]:
    """This process's umask, read without changing it (os.umask would, for all threads)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return None


class _Forkserver:
    """The forkserver of a process that launches more than one job (API, MCP, HTTP).

    Its first launch forks directly (or spawns); from the second on, a small
    warm process started for the purpose forks each supervisor (see
    _forkserver_main), so a launch costs about a millisecond of fork instead
    of an interpreter start, whatever threads or memory this process has.
    The one-shot CLI never starts one.
    """

    launches = 0
    _guard = threading.Lock()
    _sock = None
    _popen: Optional[subprocess.Popen] = None
    _owner_pid: Optional[int] = None

    @classmethod
    def serves_this_process(cls) -> bool:
        return cls.launches > 0 and _LINUX

    @classmethod
    def request(cls, paths: JobPaths, lock_fd: int, ack_w: int, log: int) -> None:
        message = json.dumps({"root": paths.root, "job_id": paths.job_id, "env": dict(os.environ),
                              "umask": _current_umask()}).encode()
        with cls._guard:
            for attempt in (1, 2):  # a forkserver that died (killed) is replaced once
                if cls._owner_pid != os.getpid():
                    cls._start()
                try:
                    _send_request(cls._sock, message, [lock_fd, ack_w, log])
                    return
                except OSError:
                    cls._stop()
                    if attempt == 2:
                        raise

    @classmethod
    def _start(cls) -> None:
        import socket
        import subprocess
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with theirs:
            argv = _supervisor_argv("_forkserver", str(theirs.fileno()))
            cls._popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, pass_fds=(theirs.fileno(),),
                                          close_fds=True, start_new_session=True)
        cls._sock, cls._owner_pid = ours, os.getpid()

    @classmethod
    def _stop(cls) -> None:
        """Close our end (the forkserver exits on EOF) and reap it."""
        if cls._sock is not None:
            cls._sock.close()
        if cls._popen is not None and cls._owner_pid == os.getpid():
            cls._popen.wait()
        cls._sock = cls._popen = cls._owner_pid = None


def _read_ack(stream, timeout_s: float) -> Optional[bool]:
    """True on 'ok', False on EOF (the supervisor died), None on timeout."""
    box: List[bytes] = []
    reader = threading.Thread(target=lambda: box.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not box:
        return None
    return box[0].startswith(b"ok")


def _launch_by_fork(fork: Callable[[int], None]) -> Optional[bool]:
    """fork(ack_w) makes a supervisor that acknowledges on ack_w; wait for that."""
    ack_r, ack_w = os.pipe()
    with open(ack_r, "rb", buffering=0) as ack:
        try:
            fork(ack_w)
        finally:
            os.close(ack_w)
        return _read_ack(ack, LAUNCH_ACK_TIMEOUT_S)


def _launch_by_spawn(paths: JobPaths, lock: _JobLock, log: int) -> Optional[bool]:
    """The supervisor is a new interpreter from the start (Windows, or a launcher with threads)."""
    import subprocess
    hand_over = _process_layer.hands_over_lock
    argv = _supervisor_argv("_supervise", paths.root, paths.job_id, str(lock.fd if hand_over else -1))
    if not hand_over:
        lock.release()
    popen = _process_layer.spawn_supervisor(argv, stdout=subprocess.PIPE, stderr=log, lock_fd=lock.fd)
    acknowledged = _read_ack(popen.stdout, LAUNCH_ACK_TIMEOUT_S)
    if acknowledged is not None:
        popen.stdout.close()
        _process_layer.release_supervisor(popen)
    return acknowledged


def _start_supervisor(paths: JobPaths, lock: _JobLock, log: int) -> Optional[bool]:
    """Start the supervisor the fastest way this process can; its acknowledgement (see _read_ack)."""
    if _Forkserver.serves_this_process():  # launching again: a ~1 ms fork of a small warm process
        return _launch_by_fork(lambda ack_w: _Forkserver.request(paths, lock.fd, ack_w, log))
    if _process_layer.can_fork_supervisor():  # no other thread here: fork, start the job, exec the watcher
        return _launch_by_fork(lambda ack_w: _process_layer.fork_supervisor(
            functools.partial(_supervise_in_fork, paths, lock), stdout=ack_w, stderr=log))
    return _launch_by_spawn(paths, lock, log)  # a new interpreter from the start


def _launch(paths: JobPaths, lock: _JobLock) -> None:
    """Start the supervisor of a created job whose lock we hold; return after its acknowledgement."""
    log = os.open(paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | _FILE_FLAGS, 0o600)
    try:
        acknowledged = _start_supervisor(paths, lock, log)
    except OSError as exc:
        raise LaunchError("cannot start the supervisor: %s" % exc,
                          hint="check process limits (ulimit -u) and that %s runs" % sys.executable) from None
    finally:
        os.close(log)
        _Forkserver.launches += 1
    if acknowledged is False and _read_state(paths).status is not JobStatus.CREATED:
        return  # it died after starting the child: a job (readers will see supervisor_lost)
    if not acknowledged:
        raise LaunchError("the supervisor did not acknowledge within %gs" % LAUNCH_ACK_TIMEOUT_S
                          if acknowledged is None else "the supervisor exited before starting the job",
                          hint="see %s" % paths.supervisor_log,
                          details={"supervisor_log": paths.supervisor_log})

# ---------------------------------------------------------------------------
# 8. Jobs API: observe, list, collect, define, launch
# ---------------------------------------------------------------------------


def _lock_is_free(paths: JobPaths) -> bool:
    with _JobLock(paths) as lock:
        return lock.acquire(exclusive=False, create=False)


class _ReleaseWaiter:
    """Wakes when the job's supervisor releases the lock: a thread blocks on the
    lock itself, so the wake-up comes from the kernel, not from polling.

    One waiter thread per Job object is reused across timed-out waits, so a
    caller that waits in short slices does not pile up threads.
    """

    def __init__(self, paths: JobPaths):
        self.paths = paths
        self.guard = threading.Lock()
        self.event: Optional[threading.Event] = None

    def wait(self, timeout_s: Optional[float]) -> bool:
        with self.guard:
            if self.event is None or self.event.is_set():
                self.event = threading.Event()
                threading.Thread(target=self._block, args=(self.event,), daemon=True).start()
            event = self.event
        return event.wait(timeout_s)

    def _block(self, event: threading.Event) -> None:
        try:
            with _JobLock(self.paths) as lock:
                lock.acquire(exclusive=False, blocking=True, create=False)
        except OSError:  # the job directory went away: nothing left to wait for
            pass
        event.set()


def _start_of_last_lines(data: bytes, lines: int) -> int:
    """Offset in data where its last `lines` lines begin (a final line without newline counts)."""
    if lines == 0:
        return len(data)
    cut = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(lines):
        cut = data.rfind(b"\n", 0, cut)
        if cut < 0:
            return 0
    return cut + 1


def _read_tail(path: str, lines: Optional[int], max_bytes: int) -> Tuple[str, Tuple[int, int], int]:
    """Last `lines` lines (at most max_bytes) of a log, read from the end with a seek.

    The range holds exactly the excerpt's bytes and ends at the total, so a
    reader can resume from range[1].
    """
    fd = _open_job_file(path)
    if fd is None:
        return "", (0, 0), 0
    try:
        with open(fd, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - max_bytes)
            f.seek(start)
            data = f.read(end - start)
    except OSError as exc:  # a directory planted under the log's name, say
        raise _unreadable(path, exc) from None
    total = start + len(data)  # the end we read up to, even if the log was truncated meanwhile
    if lines is not None:
        keep = _start_of_last_lines(data, lines)
        data, start = data[keep:], start + keep
    # Do not start in the middle of a UTF-8 character.
    skip = 0
    while skip < min(3, len(data)) and start > 0 and 0x80 <= data[skip] < 0xC0:
        skip += 1
    data, start = data[skip:], start + skip
    return data.decode("utf-8", errors="replace"), (start, start + len(data)), total


def _tail(paths: JobPaths, lines: Optional[int], max_bytes: int) -> Tail:
    out, out_range, out_total = _read_tail(paths.stdout_log, lines, max_bytes)
    err, err_range, err_total = _read_tail(paths.stderr_log, lines, max_bytes)
    return Tail(out, err, out_range, err_range, out_total, err_total)


def _follow(paths: JobPaths, start: Tuple[int, int], sinks, poll_s: float = 0.05) -> None:
    """Copy new bytes of stdout.log and stderr.log to the sinks until the job ends."""
    offsets = list(start)
    logs = (paths.stdout_log, paths.stderr_log)
    while True:
        finished = _read_state_reconciled(paths).status.is_terminal and _lock_is_free(paths)
        for i, path in enumerate(logs):
            fd = _open_job_file(path)
            if fd is None:
                continue
            with open(fd, "rb") as f:
                f.seek(offsets[i])
                while True:
                    chunk = f.read(_CHUNK_BYTES)
                    if not chunk:
                        break
                    offsets[i] += len(chunk)
                    sinks[i](chunk)
        if finished:
            return
        time.sleep(poll_s)


def _check_state_name(state: Optional[str]) -> None:
    if state is not None and state not in {s.value for s in JobStatus}:
        raise InvalidArgumentError("unknown state %r" % (state,),
                                   hint="one of: " + ", ".join(s.value for s in JobStatus))


def _list_summaries(root: str, *, cwd: Optional[str], all_jobs: bool, state: Optional[str],
                    tags: Sequence[str], limit: Optional[int]) -> Tuple[List[JobSummary], bool, int]:
    """Jobs newest first with filters; reads files only until `limit` matches are found.

    The definition (meta.json) decides scope and tags, so a job outside them
    costs one small read; its state is read only for the jobs that pass.
    Returns (jobs, truncated, skipped): skipped counts the job directories
    passed over because their meta.json is missing or unreadable.
    """
    want = JobStatus(state) if state else None
    filters = [_validate_tag_filter(t) for t in tags]
    realpath = functools.lru_cache(maxsize=None)(os.path.realpath)  # jobs share a few directories
    scope = None if all_jobs else realpath(_abspath(cwd or os.curdir))
    found: List[JobSummary] = []
    skipped = 0
    for job_id in _list_job_ids(root):
        paths = JobPaths(root, job_id)
        try:
            spec = _read_spec(paths)
        except JobNotFoundError:  # deleted since the directory was listed
            continue
        except JobError:  # not a job anyone can show, scope or restart: say how many
            skipped += 1
            continue
        if scope is not None and realpath(spec.cwd) != scope:
            continue
        if not all(_tag_matches(f, spec.tags) for f in filters):
            continue
        summary = _summarize(paths, spec)
        if summary is None or want is not None and summary.state.status is not want:
            continue
        if limit is not None and len(found) == limit:
            return found, True, skipped
        found.append(summary)
    return found, False, skipped


def _summarize(paths: JobPaths, spec: JobSpec) -> Optional[JobSummary]:
    """The job's row; None if it was deleted meanwhile.  An unreadable state reads as `unknown`."""
    try:
        state = _read_state_reconciled(paths)
    except JobNotFoundError:
        return None
    except JobError:
        state = JobState(JobInfo(paths.job_id, JobStatus.UNKNOWN))
    return JobSummary(paths.job_id, state, spec.argv, spec.cwd, spec.tags, spec.created_at)


def list_jobs(root: Optional[str] = None, *, cwd: Optional[str] = None, all: bool = False,
              state: Optional[str] = None, tags: Sequence[str] = (), limit: Optional[int] = DEFAULT_LIST_LIMIT
              ) -> List[JobSummary]:
    """Jobs newest first: those whose cwd is `cwd` (default: the current directory), or all.

    state: only jobs in that state ('running', ...).  tags: patterns that must all
    match ('a.b' exact, 'a.*' subtree).  limit: at most that many (None: no limit).
    """
    _check_state_name(state)
    return _list_summaries(resolve_root(root), cwd=cwd, all_jobs=all, state=state, tags=tags, limit=limit)[0]


def gc(root: Optional[str] = None, *, older_than_s=30 * 86400, max_jobs: Optional[int] = None,
       max_bytes: Optional[int] = None, dry_run: bool = False) -> GcReport:
    """Remove terminal jobs across the whole root.

    A job goes when it finished more than older_than_s ago, or when the terminal
    jobs (oldest first) exceed max_jobs or max_bytes in all.  Created and running
    jobs are never touched.  Leftovers of interrupted job creation go too.
    """
    root = resolve_root(root)
    cutoff = time.time() - _parse_duration(older_than_s, "older_than")
    terminal = sorted(_terminal_jobs(root), key=lambda job: job[1])  # oldest first
    doomed = {job_id for job_id, finished, _ in terminal if finished < cutoff}
    keep = [job for job in terminal if job[0] not in doomed]
    total = sum(size for _, _, size in keep)
    for job_id, _, size in keep:
        over_count = max_jobs is not None and len(terminal) - len(doomed) > max_jobs
        over_bytes = max_bytes is not None and total > max_bytes
        if not (over_count or over_bytes):
            break
        doomed.add(job_id)
        total -= size
    deleted = []
    for job_id, finished, size in terminal:
        if job_id in doomed:
            deleted.append(_gc_one(JobPaths(root, job_id), finished < cutoff, size, dry_run))
    _remove_abandoned_dirs(root, dry_run)
    done = [d for d in deleted if d["action"] in ("deleted", "would_delete")]
    return GcReport(deleted, len(terminal) - len(done), sum(d["bytes"] for d in done), dry_run)


def _terminal_jobs(root: str, newest_ms: Optional[int] = None):
    """(job_id, finished time, bytes) of each terminal job, oldest ids first.

    newest_ms stops the scan at ids created after that time (ids are time-ordered),
    which bounds the work of auto-gc however many jobs the root holds.
    """
    for job_id in reversed(_list_job_ids(root)):
        if newest_ms is not None and int(job_id[:12], 16) > newest_ms:
            return
        paths = JobPaths(root, job_id)
        try:
            state = _read_state_reconciled(paths)
        except JobError:
            continue  # unreadable jobs are for `delete`, not for a policy
        if state.status.is_terminal:
            finished = _parse_time(state.finished_at) or os.path.getmtime(paths.state)
            yield job_id, finished, _dir_bytes(paths.dir)


def _dir_bytes(path: str) -> int:
    try:
        return sum(e.stat(follow_symlinks=False).st_size for e in os.scandir(path) if e.is_file())
    except OSError:
        return 0


def _gc_one(paths: JobPaths, expired: bool, size: int, dry_run: bool) -> dict:
    result = {"job_id": paths.job_id, "action": "would_delete" if dry_run else "deleted",
              "reason": "older_than" if expired else "over_cap", "bytes": size}
    if not dry_run:
        try:
            _delete_job(paths)
        except JobError as exc:
            result.update(action="skipped", reason=exc.message)
    return result


def _remove_abandoned_dirs(root: str, dry_run: bool) -> None:
    """Delete `.new-<id>` and `.deleted-<id>` directories that a crashed create()
    or delete left behind for over an hour."""
    try:
        names = [n for n in os.listdir(root) if n.startswith((".new-", ".deleted-"))]
    except OSError:
        return
    for name in names:
        path = os.path.join(root, name)
        try:
            if time.time() - os.lstat(path).st_mtime > 3600 and not dry_run:
                _rmtree(path)
        except OSError:  # raced with another gc, or not ours to remove: leave it
            pass


_AUTO_GC_INTERVAL_S = 3600
_AUTO_GC_MAX_SCAN = 200


def _auto_gc(root: str) -> None:
    """Bounded housekeeping after a launch; never fails or noticeably slows the launch.

    At most once an hour per root (one stat), under a flock that dies with its
    holder (a crashed gc cannot disable it), scanning only ids old enough to
    have expired, and at most _AUTO_GC_MAX_SCAN of them.
    JOBSTATE_AUTO_GC=0 turns it off; JOBSTATE_GC_OLDER_THAN sets the age (30d).
    """
    if os.environ.get("JOBSTATE_AUTO_GC", "1") == "0":
        return
    stamp = os.path.join(root, ".gc-stamp")
    try:
        if time.time() - os.stat(stamp).st_mtime < _AUTO_GC_INTERVAL_S:
            return
    except FileNotFoundError:
        pass
    except OSError:
        return
    try:
        older_than = _parse_duration(os.environ.get("JOBSTATE_GC_OLDER_THAN", "30d"), "JOBSTATE_GC_OLDER_THAN")
        fd = os.open(os.path.join(root, ".gc.lock"), os.O_RDWR | os.O_CREAT | _FILE_FLAGS, 0o600)
    except (OSError, JobError):
        return
    try:
        if not _process_layer.lock(fd, exclusive=True, blocking=False):
            return  # another process is collecting right now
        os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o600))
        cutoff = time.time() - older_than
        scanned = 0
        for job_id, finished, _ in _terminal_jobs(root, newest_ms=int(cutoff * 1000)):
            scanned += 1
            if finished < cutoff:
                _gc_one(JobPaths(root, job_id), True, 0, False)
            if scanned >= _AUTO_GC_MAX_SCAN:
                break
    except (OSError, JobError):  # housekeeping only: the launch already succeeded
        pass
    finally:
        _process_layer.unlock(fd)
        os.close(fd)


def _deleted_is_not_found(method):
    """A job deleted while the method works on it (by a concurrent delete or gc)
    answers JobNotFoundError, never a bare FileNotFoundError from deep inside."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except FileNotFoundError:
            if _is_real_dir(self.paths.dir):
                raise
            raise JobNotFoundError(self.id, self.root) from None
    return wrapper


class Job:
    """A handle on one job directory.  Cheap to create; every method reads the disk afresh."""

    def __init__(self, job_id: str, root: str):
        self.id = job_id
        self.root = root
        self.paths = JobPaths(root, job_id)
        self._release = _ReleaseWaiter(self.paths)

    def __repr__(self) -> str:
        return "Job(%r, root=%r)" % (self.id, self.root)

    def spec(self) -> JobSpec:
        """The job's definition (meta.json)."""
        return _read_spec(self.paths)

    @_deleted_is_not_found
    def state(self) -> JobState:
        """The current JobState; a job whose supervisor died reads as failed (supervisor_lost)."""
        return _read_state_reconciled(self.paths)

    def wait(self, timeout_s: Optional[float] = None) -> JobState:
        """Block until the job is terminal and its logs are drained, or timeout_s passes.

        Returns the state at that moment (check `.status`).  None waits forever.
        A created job is waited on too: it may be started meanwhile.
        """
        deadline = _deadline(timeout_s)
        while True:
            state = self.state()
            if state.status.is_terminal and _lock_is_free(self.paths):
                return state
            remaining = _remaining(deadline)
            if remaining == 0:
                return state
            if state.status is JobStatus.CREATED:
                time.sleep(0.05 if remaining is None else min(0.05, remaining))
            else:
                self._release.wait(remaining)

    @_deleted_is_not_found
    def tail(self, lines: Optional[int] = DEFAULT_TAIL_LINES, max_bytes: int = DEFAULT_MAX_BYTES) -> Tail:
        """The last `lines` lines (None: no line limit) and at most max_bytes of each stream."""
        self.state()  # raises JobNotFoundError for a job that is gone
        return _tail(self.paths, lines, _parse_size(max_bytes, "max_bytes"))

    @_deleted_is_not_found
    def start(self) -> "Job":
        """Launch a created job; returns once its supervisor has acknowledged."""
        with _JobLock(self.paths) as lock:
            if not lock.acquire():
                raise InvalidStateError(self.id, JobStatus.RUNNING, "only a created job can be started")
            state = _read_state(self.paths)
            if state.status is not JobStatus.CREATED:
                raise InvalidStateError(self.id, state.status, "only a created job can be started")
            _launch(self.paths, lock)
        _auto_gc(self.root)
        return self

    @_deleted_is_not_found
    def restart(self, signal: str = "TERM", *, kill_after_s: float = DEFAULT_KILL_AFTER_S) -> "Job":
        """Stop the job's tree if it runs, then launch the same definition under the same id.

        Serialized through the job lock: however many restarts and kills race,
        at most one supervisor runs the job at a time.
        """
        _parse_signal(signal)
        self.state()
        with _JobLock(self.paths) as lock:
            leftovers_deadline = None
            while not lock.acquire():
                # A running job is ours to stop; so are the processes a finished
                # run left that still write to its logs (its supervisor copies
                # them, holding the lock shared), as the new run starts the logs
                # afresh.  Any other state means another restart or start holds
                # the lock for a moment: look again shortly.
                state = self.state()
                if state.status is JobStatus.RUNNING:
                    self.kill(signal, kill_after_s=kill_after_s, wait_s=kill_after_s + DRAIN_TIMEOUT_S + 1)
                elif state.status.is_terminal and state.logs_drained is False and leftovers_deadline is None:
                    self.kill(signal, kill_after_s=kill_after_s, wait_s=0)
                    leftovers_deadline = _deadline(DRAIN_TIMEOUT_S + 1)
                elif leftovers_deadline is not None and _remaining(leftovers_deadline) == 0:
                    raise InvalidStateError(self.id, state.status, "processes it left still hold its output "
                                            "and could not be stopped ('jobstate kill %s --signal KILL')" % self.id)
                else:
                    time.sleep(0.02)
            for path in (self.paths.kill_request, self.paths.event):
                _unlink_quietly(path)
            _write_state(self.paths, JobState(JobInfo(self.id, JobStatus.CREATED)))
            _launch(self.paths, lock)
        _auto_gc(self.root)
        return self

    @_deleted_is_not_found
    def kill(self, signal: str = "TERM", *, kill_after_s: Optional[float] = None,
             wait_s: float = DEFAULT_KILL_OBSERVE_S) -> KillResult:
        """Signal the job's whole process tree, then observe it for up to wait_s.

        kill_after_s: escalate to KILL for whatever is left after that many seconds.
        On a terminal job, stops leftover processes and keeps the recorded result.
        """
        signum, name = _parse_signal(signal)
        state = self.state()
        if state.status is JobStatus.CREATED:
            raise InvalidStateError(self.id, state.status, "it has no process to signal")
        ref = _TreeRef.from_state(state)
        terminating = name[3:] in _TERMINATING
        if state.status is JobStatus.RUNNING and terminating:
            _write_json_atomic(self.paths.kill_request, {"signal": name, "requested_at": _utc_now()})
        signalled = _process_layer.signal_tree(ref, signum)
        if terminating and kill_after_s is not None and not self._stopped(ref, kill_after_s):
            if state.status is JobStatus.RUNNING:
                _write_json_atomic(self.paths.kill_request, {"signal": "SIGKILL", "requested_at": _utc_now()})
            signalled += _process_layer.signal_tree(ref, _process_layer.signal_numbers()["KILL"])
        if terminating and wait_s:
            self._stopped(ref, wait_s)
        return KillResult(self.state(), name, signalled, len(_process_layer.find_tree(ref)))

    def _stopped(self, ref: _TreeRef, timeout_s: float) -> bool:
        """Wait until the supervisor has finished and no process of the tree is left."""
        deadline = _deadline(timeout_s)
        self.wait(timeout_s)
        return _wait_tree_gone(ref, _remaining(deadline))

    def delete(self) -> None:
        """Remove the job's directory; refuses a running job (InvalidStateError)."""
        _delete_job(self.paths)

    @_deleted_is_not_found
    def set_tags(self, tags: Sequence[str]) -> List[str]:
        """Replace the job's tags (deduplicated, in order); returns the new list."""
        tags = _validate_tags(tags)
        with _MetaLock(self.paths):
            spec = _read_spec(self.paths)
            spec.tags = tags
            _write_json_atomic(self.paths.meta, spec.to_dict())
        return tags


def _build_spec(argv, *, cwd=None, env=None, env_files=(), inherit_env=True, masks=(), has_stdin=False,
                timeout_s=None, kill_after_s=None, kill_orphans=False, tags=(), notify_command=None,
                notify_file=None, memory_max=None, max_processes=None, cpu_time_s=None) -> JobSpec:
    """Validate a definition and make it absolute, so the job means the same from anywhere."""
    if isinstance(argv, str):
        argv = [argv]
    argv = list(argv or [])
    if not argv or not all(isinstance(a, str) for a in argv) or any("\0" in a for a in argv) or not argv[0]:
        raise InvalidArgumentError("the command must be a non-empty list of strings without NUL",
                                   hint="python jobstate.py run -- echo hello")
    env = dict(env or {})
    for key, value in env.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key \
                or "\0" in key + value:
            raise InvalidArgumentError("invalid environment variable %r" % (key,))
    cwd = _abspath(cwd or os.curdir)
    return JobSpec(
        argv=argv, cwd=cwd, env=env, env_files=[_abspath(p) for p in env_files],
        inherit_env=bool(inherit_env), masks=list(masks), has_stdin=has_stdin,
        timeout_s=_parse_duration(timeout_s or 0, "timeout"),
        kill_after_s=_parse_duration(DEFAULT_KILL_AFTER_S if kill_after_s is None else kill_after_s,
                                     "kill_after"),
        kill_orphans=bool(kill_orphans), tags=_validate_tags(tags),
        notify_command=notify_command,
        notify_file=_abspath(notify_file) if notify_file else None,
        created_at=_utc_now(), memory_max=_parse_limit(memory_max, "memory_max"),
        max_processes=_parse_limit(max_processes, "max_processes"),
        cpu_time_s=_parse_limit(cpu_time_s, "cpu_time_s"))


def create(argv, *, root: Optional[str] = None, cwd: Optional[str] = None,
           env: Optional[Dict[str, str]] = None, env_files: Sequence[str] = (), inherit_env: bool = True,
           masks: Sequence[str] = (), stdin=None, timeout_s=None, kill_after_s=None,
           kill_orphans: bool = False, tags: Sequence[str] = (), notify_command: Optional[str] = None,
           notify_file: Optional[str] = None, memory_max=None, max_processes: Optional[int] = None,
           cpu_time_s=None) -> Job:
    """Define a job (state `created`) without starting it.

    argv: a list (run directly) or a one-element list / string (run by the shell).
    stdin: bytes or str given to the job as its standard input.
    timeout_s / kill_after_s: seconds (or '90s', '5m'); TERM at the timeout, KILL after the grace.
    kill_orphans: when the main process exits, stop whatever it left running.
    memory_max (bytes or '64M'), max_processes, cpu_time_s (seconds or '5m'): limits of
    the whole tree where the platform can (a Job Object, a cgroup), else of the main
    process (an rlimit); state.json `limits` says how each one is enforced, and a job
    ended by one is `killed` with error.stage "limit".
    The job directory appears atomically: readers never see a half-made job.
    """
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8", errors="surrogateescape")
    spec = _build_spec(argv, cwd=cwd, env=env, env_files=env_files, inherit_env=inherit_env, masks=masks,
                       has_stdin=stdin is not None, timeout_s=timeout_s, kill_after_s=kill_after_s,
                       kill_orphans=kill_orphans, tags=tags, notify_command=notify_command,
                       notify_file=notify_file, memory_max=memory_max, max_processes=max_processes,
                       cpu_time_s=cpu_time_s)
    root = resolve_root(root)
    _ensure_root(root)
    job_id = new_job_id()
    staging = os.path.join(root, ".new-" + job_id)
    try:
        os.mkdir(staging, 0o700)
        _populate_job_dir(JobPaths(root, job_id), staging, spec, stdin)
        os.rename(staging, os.path.join(root, job_id))
    except OSError as exc:
        _rmtree(staging, ignore_errors=True)
        raise JobIOError("cannot create the job directory under %s: %s" % (root, exc.strerror or exc),
                         hint="check free space and permissions of the jobs root") from None
    return Job(job_id, root)


_LAUNCH_LOG_TAIL_BYTES = 4096


def _inline_supervisor_log(error: LaunchError, paths: JobPaths) -> None:
    """Carry the end of supervisor.log in the error (details.supervisor_log_tail):
    the half-made job is about to be removed, and its log with it."""
    try:
        tail = _read_tail(paths.supervisor_log, None, _LAUNCH_LOG_TAIL_BYTES)[0]
    except JobError:
        tail = ""
    details = {k: v for k, v in (error.details or {}).items() if k != "supervisor_log"}
    details["supervisor_log_tail"] = tail
    error.details = details
    if error.hint and paths.supervisor_log in error.hint:
        error.hint = ("details.supervisor_log_tail holds the supervisor's last words (the half-made job was removed)"
                      if tail else "the supervisor left no diagnostics; check the limits on processes and open "
                      "files (ulimit -u, ulimit -n)")


def run(argv, *, root: Optional[str] = None, **definition) -> Job:
    """Define and launch a job; returns once its supervisor has acknowledged.

    Takes the same keyword arguments as create().  A command that cannot be
    executed is not an error here: the job ends `failed` with `error` set.
    Raises LaunchError when the supervisor could not be started.
    """
    job = create(argv, root=root, **definition)
    try:
        job.start()
    except LaunchError as exc:
        if job.state().status is JobStatus.CREATED:
            _inline_supervisor_log(exc, job.paths)
            _discard_half_made(job)
        raise
    return job


def _discard_half_made(job: Job) -> None:
    """No half-made job left behind: not its directory, not a child its supervisor
    started before it died unrecorded, not the cgroup it made for that child."""
    ref = _TreeRef(job.id, None, None, None, None, cgroups=_process_layer.unrecorded_cgroups(job.id))
    if _process_layer.signal_tree(ref, _process_layer.signal_numbers()["KILL"]):
        _wait_tree_gone(ref, 1.0)
    _process_layer.remove_containment(ref)
    _rmtree(job.paths.dir, ignore_errors=True)


def open_job(job_id_or_prefix: str, root: Optional[str] = None) -> Job:
    """The Job for an id or unique prefix (case-insensitive)."""
    root = resolve_root(root)
    return Job(_resolve_job_id(root, job_id_or_prefix), root)

# ---------------------------------------------------------------------------
# 9. Responses: the one place that shapes each JSON document
# ---------------------------------------------------------------------------


# Each response's keys and their JSON Schema, in one table.  _envelope() checks
# every document it builds against it, and `schema` publishes it, so the
# published schema cannot drift from what the commands print.
def _json_type(*names: str) -> dict:
    return {"type": names[0] if len(names) == 1 else list(names)}


_STR, _INT, _BOOL = _json_type("string"), _json_type("integer"), _json_type("boolean")
_OPT_STR, _OPT_INT = _json_type("string", "null"), _json_type("integer", "null")
_STR_LIST = {"type": "array", "items": _STR}
_RANGE = {"type": "array", "items": _INT, "minItems": 2, "maxItems": 2}
_STATE_NAME = {"type": "string", "enum": [s.value for s in JobStatus]}
_ERROR_INFO = {"type": ["object", "null"], "properties": {"stage": _STR, "message": _STR, "limit": _STR},
               "required": ["stage", "message"]}
_JOB_FIELDS = {
    "job_id": _STR, "state": _STATE_NAME, "exit_code": _OPT_INT, "signal": _OPT_STR, "timed_out": _BOOL,
    "duration_ms": _OPT_INT, "created_at": _OPT_STR, "started_at": _OPT_STR, "finished_at": _OPT_STR,
    "pid": _OPT_INT, "error": _ERROR_INFO, "command": {"type": ["array", "null"], "items": _STR},
    "cwd": _OPT_STR, "env": {"type": ["object", "null"], "additionalProperties": _STR},
    "tags": _STR_LIST, "stdout_log_path": _STR, "stderr_log_path": _STR,
}
_OUTPUT_FIELDS = {"stdout": _STR, "stderr": _STR, "stdout_range": _RANGE, "stderr_range": _RANGE,
                  "stdout_total_bytes": _INT, "stderr_total_bytes": _INT,
                  "encoding": {"type": "string", "enum": ["utf-8-lossy"]}}
_RUN_FIELDS = dict(_JOB_FIELDS, **_OUTPUT_FIELDS, elapsed_ms=_INT)
_SUMMARY_FIELDS = {k: v for k, v in _JOB_FIELDS.items() if k != "env"}
_ACTION_ROW = {"type": "object", "required": ["job_id", "action", "reason"], "properties": {
    "job_id": _STR, "action": {"type": "string", "enum": ["deleted", "would_delete", "skipped"]},
    "reason": _OPT_STR, "bytes": _INT}}


def _object_schema(fields: Dict[str, dict], closed: bool = True) -> dict:
    schema = {"type": "object", "properties": fields, "required": list(fields)}
    if closed:
        schema["additionalProperties"] = False
    return schema


_RESPONSE_FIELDS: Dict[str, Dict[str, dict]] = {
    "run": _RUN_FIELDS, "start": _RUN_FIELDS, "restart": _RUN_FIELDS, "wait": _RUN_FIELDS,
    "status": _JOB_FIELDS, "create": _JOB_FIELDS,
    "kill": dict(_JOB_FIELDS, signal_sent=_STR, processes_signalled=_INT, processes_alive=_INT),
    "tail": dict(job_id=_STR, state=_STATE_NAME, lines=_INT, **_OUTPUT_FIELDS,
                 stdout_log_path=_STR, stderr_log_path=_STR),
    "list": {"root": _STR, "jobs": {"type": "array", "items": _object_schema(_SUMMARY_FIELDS)},
             "count": _INT, "truncated": _BOOL, "skipped": _INT},
    "delete": {"root": _STR, "dry_run": _BOOL, "jobs": {"type": "array", "items": _ACTION_ROW}, "deleted": _INT},
    "gc": {"root": _STR, "dry_run": _BOOL, "jobs": {"type": "array", "items": _ACTION_ROW}, "deleted": _INT,
           "kept": _INT, "freed_bytes": _INT},
    "tag": {"job_id": _STR, "tags": _STR_LIST},
    "schema": {"schema_format": _STR, "schemas": {"type": "object"}},
    "health": {"version": _STR, "root": _STR},
    "serve": {"url": _STR, "host": _STR, "port": _INT, "auth": _BOOL},
}


def _envelope(kind: str, body: dict) -> dict:
    """A success envelope; the body must have exactly the keys of its table."""
    fields = _RESPONSE_FIELDS[kind]
    if set(body) != set(fields):
        raise RuntimeError("response %r has keys %s, its schema %s" % (kind, sorted(body), sorted(fields)))
    doc = {"schema_version": SCHEMA_VERSION, "ok": True, "type": kind}
    doc.update(body)
    return doc


def _response_schema(kind: str) -> dict:
    header = {"schema_version": {"const": SCHEMA_VERSION}, "ok": {"const": True}, "type": {"const": kind}}
    return _object_schema(dict(header, **_RESPONSE_FIELDS[kind]))


def _error_schema() -> dict:
    error = {"type": "object", "required": ["code", "message", "retryable"], "properties": {
        "code": {"type": "string", "enum": sorted(_error_codes())}, "message": _STR, "retryable": _BOOL,
        "hint": _STR, "details": {"type": "object"}}}
    return _object_schema({"schema_version": {"const": SCHEMA_VERSION}, "ok": {"const": False},
                           "type": {"const": "error"}, "error": error})


def _error_codes() -> set:
    codes, todo = set(), [JobError]
    while todo:
        cls = todo.pop()
        codes.add(cls.code)
        todo.extend(cls.__subclasses__())
    return codes


def _dataclass_schema(cls, required: Sequence[str] = ()) -> dict:
    """JSON Schema of a dataclass from its type hints (the `extra` catch-all is left out)."""
    import typing
    hints = typing.get_type_hints(cls, localns=vars(typing))
    props = {name: _type_schema(hint) for name, hint in hints.items()
             if name != "extra" and not name.startswith("_")}
    return {"type": "object", "properties": props, "required": [r for r in required if r in props]}


def _type_schema(hint) -> dict:
    import typing
    origin, args = getattr(hint, "__origin__", None), getattr(hint, "__args__", ())
    if origin is typing.Union:
        inner = [_type_schema(a) for a in args if a is not type(None)]
        schema = dict(inner[0])
        schema["type"] = [schema.get("type", "string"), "null"]
        if "enum" in schema:
            schema["enum"] = schema["enum"] + [None]
        return schema
    if origin in (list, typing.List):
        return {"type": "array", "items": _type_schema(args[0])}
    if origin in (dict, typing.Dict):
        return {"type": "object"}
    if isinstance(hint, type) and issubclass(hint, Enum):
        return {"type": "string", "enum": [m.value for m in hint]}
    if hasattr(hint, "__dataclass_fields__"):
        return _dataclass_schema(hint, [f for f in hint.__dataclass_fields__])
    names = {str: "string", bool: "boolean", int: "integer", float: "number"}
    return {"type": names[hint]} if hint in names else {}


def _document_schemas() -> Dict[str, dict]:
    """Every document jobstate writes or prints, keyed by name (the `schema` command)."""
    state = _dataclass_schema(JobState, ["job", "result", "finished_at", "updated_at"])
    state["properties"]["job"]["required"] = ["id", "status", "started_at"]
    state["properties"]["result"]["required"] = ["exit_code", "signal", "duration_ms"]
    meta = _dataclass_schema(JobSpec, ["schema_version", "argv", "cwd"])
    meta["properties"]["schema_version"] = {"const": SCHEMA_VERSION}
    meta["required"] = ["schema_version", "argv", "cwd"]
    state["properties"]["job"]["properties"]["status"]["enum"].remove(JobStatus.UNKNOWN.value)
    state["properties"]["containment"]["enum"] = list(_CONTAINMENTS) + [None]
    state["properties"]["error"]["required"] = ["stage", "message"]
    for key in JobSpec._LIMITS:
        meta["properties"][key]["minimum"] = 0
    state["properties"]["limits"]["additionalProperties"] = {
        "type": "object", "required": ["value", "enforced_by"],
        "properties": {"value": {"type": "number"}, "enforced_by": {"type": "string", "enum": list(_ENFORCERS)}}}
    meta["properties"]["timeout_s"] = meta["properties"]["kill_after_s"] = {"type": "number", "minimum": 0}
    schemas = {"state": state, "meta": meta, "error": _error_schema()}
    for kind in _RESPONSE_FIELDS:
        schemas[kind] = _response_schema(kind)
    for doc in schemas.values():
        doc.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
    return schemas


def _error_envelope(error: JobError) -> dict:
    body = {"code": error.code, "message": error.message, "retryable": error.retryable}
    if error.hint:
        body["hint"] = error.hint
    if error.details is not None:
        body["details"] = error.details
    return {"schema_version": SCHEMA_VERSION, "ok": False, "type": "error", "error": body}


def _job_view(job: Job, state: JobState) -> dict:
    """The keys every job-shaped response carries, for every state (unknown = null)."""
    try:
        spec: Optional[JobSpec] = job.spec()
    except JobError:
        spec = None
    return {
        "job_id": job.id, "state": state.status.value,
        "exit_code": state.exit_code, "signal": state.signal, "timed_out": state.result.timed_out,
        "duration_ms": state.duration_ms, "created_at": spec.created_at if spec else None,
        "started_at": state.started_at, "finished_at": state.finished_at, "pid": state.pid,
        "error": state.error.to_dict() if state.error else None,
        "command": spec.argv if spec else None, "cwd": spec.cwd if spec else None,
        "env": spec.masked_env() if spec else None, "tags": spec.tags if spec else [],
        "stdout_log_path": job.paths.stdout_log, "stderr_log_path": job.paths.stderr_log,
    }


def _output_view(tail: Tail) -> dict:
    return {"stdout": tail.stdout, "stderr": tail.stderr,
            "stdout_range": list(tail.stdout_range), "stderr_range": list(tail.stderr_range),
            "stdout_total_bytes": tail.stdout_total_bytes, "stderr_total_bytes": tail.stderr_total_bytes,
            "encoding": tail.encoding}


def _run_view(job: Job, state: JobState, max_bytes: int, elapsed_ms: int) -> dict:
    """RunData: the job view plus the last max_bytes of each stream."""
    view = _job_view(job, state)
    view.update(_output_view(_tail(job.paths, None, max_bytes)))
    view["elapsed_ms"] = elapsed_ms
    return view


def _kill_view(job: Job, result: KillResult) -> dict:
    view = _job_view(job, result.state)
    view.update(signal_sent=result.signal_sent, processes_signalled=result.processes_signalled,
                processes_alive=result.processes_alive)
    return view


def _summary_view(root: str, summary: JobSummary) -> dict:
    state = summary.state
    return {"job_id": summary.job_id, "state": state.status.value, "exit_code": state.exit_code,
            "signal": state.signal, "timed_out": state.result.timed_out, "duration_ms": state.duration_ms,
            "created_at": summary.created_at, "started_at": state.started_at,
            "finished_at": state.finished_at, "pid": state.pid,
            "error": state.error.to_dict() if state.error else None,
            "command": summary.argv, "cwd": summary.cwd, "tags": summary.tags,
            "stdout_log_path": JobPaths(root, summary.job_id).stdout_log,
            "stderr_log_path": JobPaths(root, summary.job_id).stderr_log}


def _exit_status_of(doc: dict) -> int:
    """--exit-code for a job-shaped document: the job's own code, 128+n for a
    signal, 125 when it failed, 124 when it has not finished yet."""
    if doc["state"] == JobStatus.EXITED.value:
        code = 1 if doc["exit_code"] is None else doc["exit_code"]
        return code - (1 << 32) if code > 0x7FFFFFFF else code  # Windows codes are unsigned DWORDs
    if doc["state"] == JobStatus.KILLED.value:
        return 128 + _process_layer.signal_numbers().get((doc["signal"] or "SIGKILL")[3:], 9)
    if doc["state"] == JobStatus.FAILED.value:
        return 125
    return 124


# Documents: one function per response, taking typed arguments.  The CLI, the
# MCP server and the HTTP API all answer through these.

def _elapsed_ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _observed_doc(kind: str, job: Job, until_s: Optional[float], max_bytes: int, started: float) -> dict:
    """RunData after waiting up to until_s (0: not at all, None: until the end)."""
    state = job.state() if until_s == 0 else job.wait(until_s)
    return _envelope(kind, _run_view(job, state, max_bytes, _elapsed_ms(started)))


def _status_doc(job: Job) -> dict:
    return _envelope("status", _job_view(job, job.state()))


def _tail_doc(job: Job, lines: int, max_bytes: int) -> dict:
    tail = job.tail(lines, max_bytes)
    view = {"job_id": job.id, "state": job.state().status.value, "lines": lines}
    view.update(_output_view(tail))
    view.update(stdout_log_path=job.paths.stdout_log, stderr_log_path=job.paths.stderr_log)
    return _envelope("tail", view)


def _kill_doc(job: Job, signal: str, kill_after_s: Optional[float], wait_s: float) -> dict:
    return _envelope("kill", _kill_view(job, job.kill(signal, kill_after_s=kill_after_s, wait_s=wait_s)))


def _list_doc(root: str, *, cwd: Optional[str], all_jobs: bool, state: Optional[str],
              tags: Sequence[str], limit: int) -> dict:
    _check_state_name(state)
    summaries, truncated, skipped = _list_summaries(root, cwd=cwd, all_jobs=all_jobs, state=state, tags=tags,
                                                    limit=limit)
    return _envelope("list", {"root": root, "jobs": [_summary_view(root, s) for s in summaries],
                              "count": len(summaries), "truncated": truncated, "skipped": skipped})


def _delete_doc(root: str, job_ref: Optional[str], dry_run: bool) -> dict:
    """Delete one job, or with job_ref None every terminal job of the current directory."""
    if job_ref is not None:
        job = open_job(job_ref, root)
        if dry_run:
            state = job.state()
            if state.status is JobStatus.RUNNING:
                raise InvalidStateError(job.id, state.status, "stop it first ('jobstate kill')")
        else:
            job.delete()
        results = [{"job_id": job.id, "action": "would_delete" if dry_run else "deleted", "reason": None}]
    else:
        summaries, _, _ = _list_summaries(root, cwd=None, all_jobs=False, state=None, tags=(), limit=None)
        results = [_delete_one(root, s, dry_run) for s in summaries]
    deleted = sum(r["action"] in ("deleted", "would_delete") for r in results)
    return _envelope("delete", {"root": root, "dry_run": dry_run, "jobs": results, "deleted": deleted})


def _delete_one(root: str, summary: JobSummary, dry_run: bool) -> dict:
    """One row of `delete --all`: only terminal jobs are removed."""
    result = {"job_id": summary.job_id, "action": "skipped", "reason": None}
    if not summary.state.status.is_terminal:
        result["reason"] = "job is %s" % summary.state.status.value
        return result
    if dry_run:
        result["action"] = "would_delete"
        return result
    try:
        _delete_job(JobPaths(root, summary.job_id))
        result["action"] = "deleted"
    except JobError as exc:
        result["reason"] = exc.message
    return result

# ---------------------------------------------------------------------------
# 10. Agent surfaces: MCP server (stdio) and HTTP API
# ---------------------------------------------------------------------------


# The operations agents may call, with their JSON Schema parameters.  MCP tools
# are generated from this table, and the HTTP API checks its bodies against it.
_JOB_ID_PARAM = {"type": "string", "description": "job id or unique prefix (1-32 hex characters)"}
_UNTIL_PARAM = {"type": "number", "minimum": 0, "description": "seconds to wait for the job to finish"}
_MAX_BYTES_PARAM = {"type": "integer", "minimum": 0, "description": "output excerpt size per stream"}
_TAGS_PARAM = {"type": "array", "items": {"type": "string"}}
_OPERATIONS: Dict[str, Tuple[str, Dict[str, dict], List[str]]] = {
    "run": ("Start a command as a durable background job (it keeps running after this call), wait up "
            "to `until` seconds, and return its state and the end of its output.", {
                "command": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                            "description": "argv; a single element is run by the shell"},
                "cwd": {"type": "string"}, "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "stdin": {"type": "string", "description": "standard input for the job"},
                "timeout": {"type": "number", "minimum": 0, "description": "stop the tree after this many seconds"},
                "kill_after": {"type": "number", "minimum": 0}, "until": _UNTIL_PARAM,
                "max_bytes": _MAX_BYTES_PARAM, "tags": _TAGS_PARAM,
                "memory_max": {"type": "integer", "minimum": 0, "description": "memory limit in bytes"},
                "max_processes": {"type": "integer", "minimum": 0, "description": "most processes at once"},
                "cpu_time": {"type": "number", "minimum": 0, "description": "CPU seconds the job may use"}},
            ["command"]),
    "status": ("State, exit code, signal, times and log paths of a job.", {"job_id": _JOB_ID_PARAM}, ["job_id"]),
    "tail": ("The last lines of a job's stdout and stderr.", {
        "job_id": _JOB_ID_PARAM, "lines": {"type": "integer", "minimum": 0}, "max_bytes": _MAX_BYTES_PARAM},
        ["job_id"]),
    "wait": ("Wait up to `until` seconds for a job to finish; returns its state and output.", {
        "job_id": _JOB_ID_PARAM, "until": _UNTIL_PARAM, "max_bytes": _MAX_BYTES_PARAM}, ["job_id"]),
    "kill": ("Signal a job's whole process tree (default TERM) and report what is left.", {
        "job_id": _JOB_ID_PARAM, "signal": {"type": "string", "description": "TERM, INT, KILL, HUP, ..."},
        "kill_after": {"type": "number", "minimum": 0, "description": "then KILL what is left after S seconds"}},
        ["job_id"]),
    "list": ("Jobs newest first: by default those started in `cwd` (the server's directory), or all.", {
        "state": {"type": "string", "enum": [s.value for s in JobStatus]},
        "limit": {"type": "integer", "minimum": 0}, "all": {"type": "boolean"}, "cwd": {"type": "string"},
        "tags": _TAGS_PARAM}, []),
}
_JSON_TYPE_CHECKS = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
                     "array": list, "object": dict}


def _check_arguments(operation: str, args: dict) -> dict:
    """Reject unknown, missing and mistyped arguments before doing anything."""
    _, params, required = _OPERATIONS[operation]
    if not isinstance(args, dict):
        raise InvalidArgumentError("arguments must be a JSON object")
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise InvalidArgumentError("unknown argument(s) for %s: %s" % (operation, ", ".join(unknown)),
                                   hint="accepted: " + ", ".join(params))
    for name in required:
        if name not in args:
            raise InvalidArgumentError("%s needs %r" % (operation, name))
    for name, value in args.items():
        kind = params[name]["type"]
        ok = isinstance(value, _JSON_TYPE_CHECKS[kind]) and (kind in ("boolean",) or not isinstance(value, bool))
        if kind == "array":
            ok = ok and all(isinstance(v, str) for v in value)
        if kind == "object":
            ok = ok and all(isinstance(v, str) for v in value.values())
        if not ok:
            raise InvalidArgumentError("%s: %r must be of type %s" % (operation, name, kind))
    return args


def _call_operation(operation: str, args: dict, root: Optional[str], *, default_until: float,
                    max_until: Optional[float] = None) -> dict:
    """Run one agent operation; returns its envelope (JobError propagates)."""
    args = _check_arguments(operation, args)
    started = time.monotonic()
    until = args.get("until", default_until)
    if max_until is not None:
        until = min(until, max_until)
    max_bytes = args.get("max_bytes", DEFAULT_MAX_BYTES)
    if operation == "run":
        job = run(args["command"], root=root, cwd=args.get("cwd"), env=args.get("env"), stdin=args.get("stdin"),
                  timeout_s=args.get("timeout"), kill_after_s=args.get("kill_after"), tags=args.get("tags", ()),
                  memory_max=args.get("memory_max"), max_processes=args.get("max_processes"),
                  cpu_time_s=args.get("cpu_time"))
        return _observed_doc("run", job, until, max_bytes, started)
    if operation == "list":
        return _list_doc(resolve_root(root), cwd=args.get("cwd"), all_jobs=args.get("all", False),
                         state=args.get("state"), tags=args.get("tags", ()),
                         limit=args.get("limit", DEFAULT_LIST_LIMIT))
    job = open_job(args["job_id"], root)
    if operation == "status":
        return _status_doc(job)
    if operation == "tail":
        return _tail_doc(job, args.get("lines", DEFAULT_TAIL_LINES), max_bytes)
    if operation == "wait":
        return _observed_doc("wait", job, until, max_bytes, started)
    return _kill_doc(job, args.get("signal", "TERM"), args.get("kill_after"), DEFAULT_KILL_OBSERVE_S)


def _env_seconds(name: str, default: float) -> float:
    try:
        return _parse_duration(os.environ.get(name, default), name)
    except JobError:
        return default


# -- MCP over stdio -------------------------------------------------------------

# Handshake-era revisions we speak, newest first.  Clients of the stateless
# revision of 2026-07-28 probe `server/discover`, get "method not found", and
# fall back to `initialize` (as the official SDK does).
_MCP_VERSIONS = ("2025-11-25", "2025-06-18", "2025-03-26")
# Input bounds: a longer line is refused unread (JOBSTATE_MCP_MAX_LINE raises the
# cap for big `stdin` arguments); deeper nesting is refused before json.loads,
# whose recursion would otherwise kill the server.
_MCP_MAX_LINE = 4 << 20
_MCP_MAX_DEPTH = 256
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)  # unterminated: to the end
_NOT_A_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _json_nesting_over(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than limit: one linear pass."""
    if text.count("[") + text.count("{") <= limit:
        return False
    from itertools import accumulate
    brackets = _NOT_A_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0) > limit


# Numbers must survive the round trip back into an answer's id: 1e400 would be
# inf (written as the non-JSON Infinity), and int() of a long digit string is
# quadratic on Pythons without CPython's 4300-digit cap.
def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError("number out of range: %s" % _clip(text))
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 4300:
        raise ValueError("integer over 4300 digits")
    return int(text)


def _reject_constant(name: str):
    raise ValueError("%s is not JSON" % name)


def _env_size(name: str, default: int) -> int:
    try:
        return _parse_size(os.environ.get(name, default), name) or default
    except JobError:
        return default


def _clip(value, size: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= size else text[:size] + "..."


def _read_lines(stream, limit: int):
    """The stream's lines, None in place of one over limit bytes, whose rest
    is read and dropped in small pieces so it is never held whole."""
    while True:
        line = stream.readline(limit + 1)
        if not line:
            return
        if len(line) > limit and not line.endswith(b"\n"):
            while line and not line.endswith(b"\n"):
                line = stream.readline(1 << 16)
            line = None
        yield line


@dataclass(frozen=True)
class _McpRequest:
    id: object
    method: str
    params: dict


def _rpc_error(msg_id, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}}


def _parse_json_line(text: str, max_depth: int):
    """Strict JSON, or ValueError for a line we will not parse."""
    if _json_nesting_over(text, max_depth):
        raise ValueError("nesting deeper than %d" % max_depth)
    try:
        return json.loads(text, parse_float=_finite_float, parse_int=_bounded_int, parse_constant=_reject_constant)
    except RecursionError:  # the depth check runs first; this is for a smaller stack than ours
        raise ValueError("nesting too deep") from None


def _mcp_request(line: bytes, max_depth: int = _MCP_MAX_DEPTH):
    """The request on one line, or the error response to send for it, or None
    when nothing may be answered: notifications (no id, however malformed)
    and responses (we send no requests; answering one could start a ping-pong)."""
    try:
        message = _parse_json_line(line.decode("utf-8-sig"), max_depth)  # RFC 8259 lets us skip a BOM
    except ValueError as exc:  # UnicodeDecodeError is one
        return _rpc_error(None, -32700, "parse error: %s" % _clip(str(exc), 120))
    if isinstance(message, list):
        return _rpc_error(None, -32600, "invalid request: batches are not supported; send one object per line")
    if not isinstance(message, dict):
        return _rpc_error(None, -32600, "invalid request: expected one JSON-RPC 2.0 object")
    if "id" not in message or ("method" not in message and ("result" in message or "error" in message)):
        return None
    msg_id = message["id"]
    if isinstance(msg_id, bool) or not isinstance(msg_id, (str, int, float)):
        return _rpc_error(None, -32600, "invalid request: id must be a string or a number")
    if message.get("jsonrpc") != "2.0":
        return _rpc_error(msg_id, -32600, 'invalid request: "jsonrpc" must be "2.0"')
    method = message.get("method")
    if not isinstance(method, str):
        return _rpc_error(msg_id, -32600, 'invalid request: "method" must be a string')
    params = message.get("params")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        return _rpc_error(msg_id, -32602, "invalid params: params must be an object")
    return _McpRequest(msg_id, method, params)


class _McpServer:
    """Newline-delimited JSON-RPC 2.0 on a pair of binary streams."""

    def __init__(self, root: Optional[str], output):
        self.root = root
        self.output = output
        self.write_lock = threading.Lock()
        self.calls: List[threading.Thread] = []
        self.default_until = _env_seconds("JOBSTATE_MCP_DEFAULT_UNTIL", DEFAULT_RUN_UNTIL_S)
        self.max_until = _env_seconds("JOBSTATE_MCP_MAX_UNTIL", 55.0)
        self.max_line = _env_size("JOBSTATE_MCP_MAX_LINE", _MCP_MAX_LINE)

    def serve(self, stream) -> int:
        for line in _read_lines(stream, self.max_line):
            if line is None:
                self.error(None, -32700, "parse error: line over %d bytes (JOBSTATE_MCP_MAX_LINE)" % self.max_line)
            elif line.strip():
                self.handle(line)
        for call in self.calls:  # let bounded tool calls answer before we go
            call.join()
        return 0

    def send(self, message: dict) -> None:
        data = json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"
        with self.write_lock:
            try:
                self.output.write(data)
                self.output.flush()
            except (OSError, ValueError):  # the client went away; jobs go on regardless
                pass

    def error(self, msg_id, code: int, message: str) -> None:
        self.send(_rpc_error(msg_id, code, message))

    def handle(self, line: bytes) -> None:
        request = _mcp_request(line)
        if isinstance(request, dict):
            return self.send(request)
        if request is None:
            return None
        if request.method != "tools/call":
            return self.guarded(request.id, self.answer, request)
        # Tool calls may wait: each in a thread, so pings and other calls go on meanwhile.
        call = threading.Thread(target=self.guarded, args=(request.id, self.call_tool, request.id, request.params),
                                daemon=True)
        self.guarded(request.id, call.start)
        self.calls = [c for c in self.calls + [call] if c.is_alive()]
        return None

    def answer(self, request: _McpRequest) -> None:
        handlers = {"initialize": self.initialize, "ping": lambda p: {}, "tools/list": self.list_tools}
        if request.method not in handlers:
            return self.error(request.id, -32601, "method not found: %s" % _clip(request.method))
        return self.send({"jsonrpc": "2.0", "id": request.id, "result": handlers[request.method](request.params)})

    def guarded(self, msg_id, action, *args) -> None:
        try:
            action(*args)
        except Exception as exc:  # a bug must not leave the client waiting, nor end the server
            self.error(msg_id, -32603, "internal error: %s: %s" % (type(exc).__name__, _clip(str(exc), 200)))

    def initialize(self, params: dict) -> dict:
        asked = params.get("protocolVersion")
        return {"protocolVersion": asked if asked in _MCP_VERSIONS else _MCP_VERSIONS[0],
                "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": {"name": "jobstate", "version": __version__},
                "instructions": "Run commands as durable background jobs: `run` starts one and waits up to "
                                "`until` seconds; poll long jobs with `wait` or `status`, read output with "
                                "`tail`, stop whole process trees with `kill`. Jobs outlive this server."}

    def list_tools(self, params: dict) -> dict:
        tools = []
        for name, (description, props, required) in _OPERATIONS.items():
            tools.append({"name": name, "description": description, "inputSchema": {
                "type": "object", "properties": props, "required": required, "additionalProperties": False}})
        return {"tools": tools}

    def call_tool(self, msg_id, params: dict) -> None:
        name, args = params.get("name"), params.get("arguments")
        if not isinstance(name, str) or name not in _OPERATIONS:
            problem = "unknown tool %r" % _clip(name) if isinstance(name, str) else "the tool name must be a string"
            return self.error(msg_id, -32602, "invalid params: %s; tools: %s" % (problem, ", ".join(_OPERATIONS)))
        if args is None:  # absent, or null as the official SDK sends it
            args = {}
        try:
            doc = _call_operation(name, args, self.root, default_until=self.default_until,
                                  max_until=self.max_until)
        except JobError as exc:
            doc = _error_envelope(exc)
        except Exception as exc:  # a bug must not kill the server: report it as a tool error
            doc = _error_envelope(JobError("%s: %s" % (type(exc).__name__, exc)))
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        self.send({"jsonrpc": "2.0", "id": msg_id, "result": {
            "content": [{"type": "text", "text": text}], "structuredContent": doc, "isError": not doc["ok"]}})


def _serve_mcp(root: Optional[str]) -> int:
    """MCP on stdio.  Our real stdout carries only protocol: fd 1 is pointed at
    stderr so nothing else (a stray print, a child) can corrupt the stream."""
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return _McpServer(root, protocol).serve(sys.stdin.buffer)


# -- HTTP --------------------------------------------------------------------------

_HTTP_MAX_BODY = 1 << 20
_HTTP_STATUS = {"job_not_found": 404, "invalid_state": 409, "unauthorized": 401, "payload_too_large": 413,
                "not_found": 404, "launch_failed": 500, "io_error": 500, "state_unreadable": 500,
                "internal_error": 500}


class _UnauthorizedError(JobError):
    code = "unauthorized"


class _EndpointNotFoundError(JobError):
    code = "not_found"


class _PayloadTooLargeError(JobError):
    code = "payload_too_large"


def _http_status(error: JobError) -> int:
    return _HTTP_STATUS.get(error.code, 400)


def _make_http_handler(root: Optional[str], token: Optional[str]):
    import hmac
    from http.server import BaseHTTPRequestHandler

    class Handler(BaseHTTPRequestHandler):
        server_version = "jobstate/" + __version__
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.answer("GET")

        def do_POST(self):
            self.answer("POST")

        def do_DELETE(self):
            self.answer("DELETE")

        def log_message(self, format, *args):
            sys.stderr.write("%s %s\n" % (_utc_now(), format % args))

        def answer(self, method: str) -> None:
            try:
                self.authorize()
                status, doc = 200, self.route(method)
            except JobError as exc:
                status, doc = _http_status(exc), _error_envelope(exc)
            except Exception as exc:  # a bug: answer 500 with an envelope, keep serving
                status, doc = 500, _error_envelope(JobError("%s: %s" % (type(exc).__name__, exc)))
            body = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            self.end_headers()
            self.wfile.write(body)

        def authorize(self) -> None:
            if token is None:
                return
            given = self.headers.get("Authorization", "")
            expected = "Bearer " + token
            if not hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8")):
                raise _UnauthorizedError("missing or wrong bearer token",
                                        hint="send 'Authorization: Bearer $JOBSTATE_SERVE_TOKEN'")

        def body(self) -> dict:
            try:
                length = int(self.headers.get("Content-Length") or 0)
            except ValueError:
                length = -1
            if length < 0 or length > _HTTP_MAX_BODY:
                # Read (a bounded amount of) what the client is sending, so it
                # gets our 413 instead of a broken pipe; then hang up.
                self.rfile.read(min(max(length, 0), 8 * _HTTP_MAX_BODY))
                self.close_connection = True
                raise _PayloadTooLargeError("request body over %d bytes" % _HTTP_MAX_BODY)
            raw = self.rfile.read(length) if length else b"{}"
            try:
                doc = json.loads(raw.decode("utf-8"))
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgumentError("request body is not JSON") from None
            if not isinstance(doc, dict):
                raise InvalidArgumentError("request body must be a JSON object")
            return doc

        def route(self, method: str) -> dict:
            return _route_http(method, self.path, self.body, root)

    return Handler


def _route_http(method: str, target: str, read_body, root: Optional[str]) -> dict:
    """Answer one request: `target` is the path with its query, read_body() the JSON body."""
    from urllib.parse import parse_qs, unquote, urlsplit
    url = urlsplit(target)
    parts = [unquote(p) for p in url.path.split("/") if p]
    params = parse_qs(url.query)
    query = {k: v[-1] for k, v in params.items()}
    tags = params.get("tag", [])
    if method == "GET" and parts == ["health"]:
        return _envelope("health", {"version": __version__, "root": resolve_root(root)})
    if parts[:1] != ["jobs"] or len(parts) > 3:
        raise _EndpointNotFoundError("no endpoint %s %s" % (method, url.path))
    if len(parts) == 1 and method == "POST":
        return _call_operation("run", read_body(), root, default_until=DEFAULT_RUN_UNTIL_S)
    if len(parts) == 1 and method == "GET":
        args = _query_args(query, {"state": str, "limit": int, "all": bool, "cwd": str})
        if tags:
            args["tags"] = tags
        return _call_operation("list", args, root, default_until=0)
    job_id, action = parts[1], (parts[2] if len(parts) == 3 else None)
    if method == "GET" and action in (None, "tail", "wait"):
        types = {None: {}, "tail": {"lines": int, "max_bytes": int},
                 "wait": {"until": float, "max_bytes": int}}[action]
        args = dict(_query_args(query, types), job_id=job_id)
        return _call_operation(action or "status", args, root, default_until=DEFAULT_WAIT_UNTIL_S)
    if method == "POST" and action == "kill":
        return _call_operation("kill", dict(read_body(), job_id=job_id), root, default_until=0)
    if method == "DELETE" and action is None:
        return _delete_doc(resolve_root(root), job_id, False)
    raise _EndpointNotFoundError("no endpoint %s %s" % (method, url.path))


def _query_args(query: Dict[str, str], types: Dict[str, type]) -> dict:
    """Typed arguments from a query string; unknown parameters are rejected."""
    unknown = sorted(set(query) - set(types) - {"tag"})
    if unknown:
        raise InvalidArgumentError("unknown query parameter(s): %s" % ", ".join(unknown))
    args = {}
    for name, value in query.items():
        if name == "tag":
            continue
        kind = types[name]
        try:
            args[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise InvalidArgumentError("query parameter %r: %r is not a %s" % (name, value, kind.__name__)) from None
    return args


def _parse_bind(bind: str) -> Tuple[str, int]:
    host, sep, port = bind.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not host or not 0 <= number <= 65535:
        raise InvalidArgumentError("--bind %r is not HOST:PORT" % (bind,), hint="e.g. 127.0.0.1:19263")
    return host.strip("[]"), number


def _is_loopback(host: str) -> bool:
    import ipaddress
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve_http(root: Optional[str], bind: str, ready) -> int:
    """Serve the HTTP API until interrupted; `ready` receives the serve envelope once listening."""
    from http.server import ThreadingHTTPServer
    import socket
    host, port = _parse_bind(bind)
    token = os.environ.get("JOBSTATE_SERVE_TOKEN") or None
    if token is None and not _is_loopback(host):
        raise InvalidArgumentError("refusing to serve on %s without a token" % host,
                                   hint="set JOBSTATE_SERVE_TOKEN, or bind a loopback address")

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        server = Server((host, port), _make_http_handler(root, token))
    except OSError as exc:
        raise JobIOError("cannot listen on %s: %s" % (bind, exc.strerror or exc)) from None
    bound_port = server.server_address[1]
    url = "http://%s:%d" % ("[%s]" % host if ":" in host else host, bound_port)
    ready(_envelope("serve", {"url": url, "host": host, "port": bound_port, "auth": token is not None}))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0

# ---------------------------------------------------------------------------
# 11. Text rendering: --format text
# ---------------------------------------------------------------------------


def _use_color(stream) -> bool:
    """Colours only on a terminal, and never when NO_COLOR is set (no-color.org)."""
    return not os.environ.get("NO_COLOR") and hasattr(stream, "isatty") and stream.isatty()


_COLORS = {"exited": "32", "running": "33", "created": "36", "killed": "31", "failed": "31",
           "unknown": "2", "bad": "31", "dim": "2"}


def _paint(text: str, key: str, color: bool) -> str:
    return "\x1b[%sm%s\x1b[0m" % (_COLORS[key], text) if color and key in _COLORS else text


def _format_duration(ms: Optional[float]) -> str:
    if ms is None:
        return "-"
    if ms < 1000:
        return "%dms" % ms
    seconds = ms / 1000
    if seconds < 60:
        return "%.1fs" % seconds
    if seconds < 3600:
        return "%dm%02ds" % divmod(int(seconds), 60)
    if seconds < 86400:
        return "%dh%02dm" % (seconds // 3600, seconds % 3600 // 60)
    return "%dd%02dh" % (seconds // 86400, seconds % 86400 // 3600)


def _format_age(timestamp: Optional[str], now: float) -> str:
    then = _parse_time(timestamp)
    if then is None:
        return "-"
    seconds = max(0, int(now - then))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return "%d%s ago" % (seconds // size, unit)
    return "%ds ago" % seconds


def _outcome(view: dict) -> str:
    """The short result column: exit code, signal, or nothing yet."""
    if view["signal"]:
        return view["signal"]
    return "-" if view["exit_code"] is None else str(view["exit_code"])


_LIMIT_LABELS = {"memory_max": "memory limit", "max_processes": "process limit", "cpu_time_s": "CPU time limit"}


def _verdict(view: dict, color: bool) -> str:
    """One line saying how the job ended (or where it stands)."""
    state, short = view["state"], view["job_id"][:12]
    took = _format_duration(view["duration_ms"])
    if state == "exited":
        key = "exited" if view["exit_code"] == 0 else "bad"
        text = "job %s exited with code %s after %s" % (short, view["exit_code"], took)
    elif state == "killed":
        key = "killed"
        limit = (view["error"] or {}).get("limit")
        text = "job %s was killed by %s after %s%s" % (short, view["signal"], took,
                                                      " (timeout)" if view["timed_out"] else
                                                      " (%s reached)" % _LIMIT_LABELS.get(limit, limit)
                                                      if limit else "")
    elif state == "failed":
        key, error = "failed", view["error"] or {}
        text = "job %s failed (%s): %s" % (short, error.get("stage"), error.get("message"))
    else:
        key = state
        text = "job %s is %s%s" % (short, state, " (pid %s)" % view["pid"] if view["pid"] else "")
    return _paint(text, key, color)


def _render_table(rows: List[List[str]], header: List[str]) -> List[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]


def _render_text(doc: dict, color: bool, now: float) -> str:
    """A document as people read it: tables, labelled lines, output and a verdict."""
    kind = doc["type"]
    if kind == "list":
        if not doc["jobs"]:
            return "\n".join(["no jobs"] + _skipped_note(doc))
        rows = [[j["job_id"][:12], j["state"], _outcome(j), _format_age(j["created_at"], now),
                 _format_duration(j["duration_ms"]), _shorten(" ".join(j["command"] or []), 60),
                 ",".join(j["tags"])] for j in doc["jobs"]]
        lines = _render_table(rows, ["ID", "STATE", "EXIT", "CREATED", "DURATION", "COMMAND", "TAGS"])
        lines = [lines[0]] + [line.replace(row[1], _paint(row[1], row[1], color), 1)
                              for line, row in zip(lines[1:], rows)]
        return "\n".join(lines + (["(more: raise --limit)"] if doc["truncated"] else []) + _skipped_note(doc))
    if kind in ("run", "start", "restart", "wait"):
        parts = [doc["stdout"].rstrip("\n"), doc["stderr"].rstrip("\n")]
        return "\n".join([p for p in parts if p] + [_verdict(doc, color)])
    if kind == "tail":
        return "\n".join(p for p in (doc["stdout"].rstrip("\n"), doc["stderr"].rstrip("\n")) if p)
    if kind in ("status", "create", "kill"):
        fields = [("job", doc["job_id"]), ("state", _paint(doc["state"], doc["state"], color)),
                  ("result", _outcome(doc)), ("command", " ".join(doc["command"] or [])),
                  ("cwd", doc["cwd"]), ("created", _format_age(doc["created_at"], now)),
                  ("duration", _format_duration(doc["duration_ms"])), ("pid", doc["pid"]),
                  ("tags", ",".join(doc["tags"]) or "-"), ("stdout", doc["stdout_log_path"]),
                  ("stderr", doc["stderr_log_path"])]
        if doc["error"]:
            fields.append(("error", "%s: %s" % (doc["error"]["stage"], doc["error"]["message"])))
        if kind == "kill":
            fields.append(("signalled", "%s to %d process(es), %d left" % (
                doc["signal_sent"], doc["processes_signalled"], doc["processes_alive"])))
        return "\n".join("%-10s %s" % (label + ":", "-" if value is None else value) for label, value in fields)
    return "\n".join("%s: %s" % (k, v if not isinstance(v, (list, dict)) else json.dumps(v))
                     for k, v in doc.items() if k not in ("schema_version", "ok", "type"))


def _skipped_note(doc: dict) -> List[str]:
    count = doc["skipped"]
    if not count:
        return []
    return ["(%d job director%s skipped: no readable meta.json)" % (count, "y" if count == 1 else "ies")]


# C0 and C1 control characters (and DEL) as visible escapes: job data shown on
# a terminal (commands, output, error messages) must not drive it.
_CONTROL_ESCAPES = {c: "\\x%02x" % c for c in list(range(0x20)) + list(range(0x7F, 0xA0))}
_CONTROL_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})
_OUTPUT_ESCAPES = {c: e for c, e in _CONTROL_ESCAPES.items() if chr(c) not in "\n\t"}


def _printable_doc(value, key: Optional[str] = None):
    """A document with every string made safe to print; output excerpts keep newlines and tabs."""
    if isinstance(value, str):
        return value.translate(_OUTPUT_ESCAPES if key in ("stdout", "stderr") else _CONTROL_ESCAPES)
    if isinstance(value, dict):
        return {k: _printable_doc(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_doc(v) for v in value]
    return value


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


def _render_error(doc: dict, color: bool) -> str:
    error = doc["error"]
    line = "%s %s (%s)" % (_paint("error:", "bad", color), error["message"], error["code"])
    return line + ("\nhint: %s" % error["hint"] if error.get("hint") else "")


def _write_text(stream, text: str) -> None:
    try:
        stream.write(text)
        stream.flush()
    except BrokenPipeError:  # the reader went away; nothing left to tell it
        pass
    except UnicodeEncodeError:  # a terminal that cannot show some characters
        stream.buffer.write(text.encode("utf-8", "replace"))

# ---------------------------------------------------------------------------
# 12. CLI
# ---------------------------------------------------------------------------


class _UsageError(Exception):
    pass


class _ParserExit(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


def _make_parser_class():
    import argparse

    class Parser(argparse.ArgumentParser):
        """argparse that raises instead of exiting, so main() prints a JSON error."""

        def error(self, message):
            raise _UsageError("%s: %s" % (self.prog, message))

        def exit(self, status=0, message=None):
            if message:
                sys.stderr.write(message)
            raise _ParserExit(status)

    return argparse, Parser


def _option_value(parse, text: str, what: str):
    """An option's value as its type, or a usage error (exit 2) naming what was expected.

    Only the syntax is checked here; whether a value that parses is allowed
    (negative, out of range, an unknown signal or tag) is for the command to
    say, as a validation error (exit 1).
    """
    try:
        return parse(text)
    except ValueError:
        import argparse
        raise argparse.ArgumentTypeError("%r is not %s" % (text, what)) from None


def _duration_option(text: str) -> float:
    return _option_value(_duration_seconds, text, "a duration (seconds, or 500ms, 90s, 5m, 2h, 7d)")


def _size_option(text: str) -> int:
    return _option_value(_size_bytes, text, "a size (bytes, or 64k, 10M, 1G)")


def _count_option(text: str) -> int:
    return _option_value(int, text, "an integer")


def _add_global_options(parser, suppress: bool) -> None:
    default = (lambda value: __import__("argparse").SUPPRESS) if suppress else (lambda value: value)
    parser.add_argument("--root", default=default(None), help="jobs root (default: $JOBSTATE_ROOT, "
                        "$XDG_DATA_HOME/jobstate/jobs, ~/.local/share/jobstate/jobs)")
    parser.add_argument("--pretty", action="store_true", default=default(False), help="indent the JSON output")
    parser.add_argument("--format", choices=("json", "text"), default=default(None),
                        help="json (default, or $JOBSTATE_FORMAT) or text for people at a terminal")


def _add_definition_options(p) -> None:
    p.add_argument("--cwd", help="working directory of the job (default: the current one)")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="set a variable (repeatable)")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="KEY=VALUE lines read when the job starts (repeatable)")
    p.add_argument("--no-inherit-env", action="store_true", help="start from an empty environment")
    p.add_argument("--mask", action="append", default=[], metavar="KEY",
                   help="show this variable's value as *** in responses and events")
    p.add_argument("--stdin", metavar="TEXT|-", help="standard input for the job ('-' reads ours)")
    p.add_argument("--stdin-file", metavar="PATH", help="file to give the job as standard input")
    p.add_argument("--stdin-max-bytes", default=str(DEFAULT_STDIN_MAX_BYTES), metavar="B", type=_size_option,
                   help="largest accepted standard input (default 64M)")
    p.add_argument("--timeout", default="0", metavar="S", type=_duration_option,
                   help="stop the tree after S seconds (0 = never)")
    p.add_argument("--kill-after", default=str(DEFAULT_KILL_AFTER_S), metavar="S", type=_duration_option,
                   help="KILL what is left S seconds after TERM (default 5; 0 = KILL at once)")
    p.add_argument("--kill-orphans", action="store_true",
                   help="when the main process exits, stop what it left running")
    p.add_argument("--memory-max", metavar="BYTES", type=_size_option,
                   help="memory limit of the whole job (64M, 1G); see state.json limits")
    p.add_argument("--max-processes", metavar="N", type=_count_option, help="most processes the job may have at once")
    p.add_argument("--cpu-time", metavar="S", type=_duration_option, help="CPU time the job may use (90s, 5m)")
    p.add_argument("--tag", action="append", default=[], help="tag such as ci.lint (repeatable)")
    p.add_argument("--notify-command", metavar="CMD", help="shell command run with the job.finished event on stdin")
    p.add_argument("--notify-file", metavar="PATH", help="append the job.finished event to this NDJSON file")


def _add_observe_options(p, default_until: float) -> None:
    p.add_argument("--until", default=str(default_until), metavar="S", type=_duration_option,
                   help="wait at most S seconds for the job to finish (default %g)" % default_until)
    p.add_argument("--forever", action="store_true", help="wait until the job finishes")
    p.add_argument("--no-wait", action="store_true", help="return as soon as the job is launched")
    p.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), metavar="B", type=_size_option,
                   help="output excerpt size per stream (default 64k)")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with the job's exit code (128+n for signal n, 125 failed, 124 unfinished)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the job's output live until it ends (instead of a JSON document)")


def _run_options(p) -> None:
    _add_definition_options(p)
    _add_observe_options(p, DEFAULT_RUN_UNTIL_S)
    p.add_argument("argv", nargs="...", metavar="-- CMD ...")


def _create_options(p) -> None:
    _add_definition_options(p)
    p.add_argument("argv", nargs="...", metavar="-- CMD ...")


def _start_options(p) -> None:
    p.add_argument("job")
    _add_observe_options(p, DEFAULT_RUN_UNTIL_S)


def _restart_options(p) -> None:
    p.add_argument("job")
    p.add_argument("--signal", default="TERM", help="signal that stops the running tree (default TERM)")
    p.add_argument("--kill-after", default=str(DEFAULT_KILL_AFTER_S), metavar="S", type=_duration_option,
                   help="then KILL what is left after S seconds (default 5)")
    _add_observe_options(p, DEFAULT_RUN_UNTIL_S)


def _job_only_options(p) -> None:
    p.add_argument("job")


def _wait_options(p) -> None:
    p.add_argument("job")
    p.add_argument("--until", default=str(DEFAULT_WAIT_UNTIL_S), metavar="S", type=_duration_option,
                   help="wait at most S seconds (default 30)")
    p.add_argument("--forever", action="store_true", help="no deadline")
    p.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), metavar="B", type=_size_option,
                   help="output excerpt size per stream (default 64k)")
    p.add_argument("--exit-code", action="store_true", help="exit with the job's exit code")


def _tail_options(p) -> None:
    p.add_argument("job")
    p.add_argument("--lines", default=str(DEFAULT_TAIL_LINES), metavar="N", type=_count_option,
                   help="lines per stream (default 50)")
    p.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), metavar="B", type=_size_option,
                   help="bytes per stream (default 64k)")
    p.add_argument("--follow", "-f", action="store_true", help="stream raw output until the job ends")
    p.add_argument("--exit-code", action="store_true", help="with --follow: exit with the job's exit code")


def _kill_options(p) -> None:
    p.add_argument("job")
    p.add_argument("--signal", "-s", default="TERM", help="TERM (default), INT, KILL, HUP, QUIT, USR1, ...")
    p.add_argument("--kill-after", metavar="S", type=_duration_option, help="then KILL whatever is left after S seconds")
    p.add_argument("--no-wait", action="store_true", help="do not observe the result")


def _list_options(p, with_state: bool = True) -> None:
    if with_state:
        p.add_argument("--state", choices=[s.value for s in JobStatus])
    p.add_argument("--limit", default=str(DEFAULT_LIST_LIMIT), metavar="N", type=_count_option,
                   help="at most N jobs (default 50)")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--cwd", help="jobs started in this directory (default: the current one)")
    scope.add_argument("--all", action="store_true", help="jobs of every directory")
    p.add_argument("--tag", action="append", default=[], metavar="PATTERN", help="a.b or a.* (repeat = AND)")


def _delete_options(p) -> None:
    p.add_argument("job", nargs="?")
    p.add_argument("--all", action="store_true", help="every finished job of the current directory")
    p.add_argument("--dry-run", action="store_true", help="report, delete nothing")


def _gc_options(p) -> None:
    p.add_argument("--older-than", default="30d", metavar="AGE", type=_duration_option,
                   help="finished longer ago than AGE (default 30d)")
    p.add_argument("--max-jobs", metavar="N", type=_count_option, help="keep at most N finished jobs (oldest go first)")
    p.add_argument("--max-bytes", metavar="B", type=_size_option, help="keep at most B bytes of finished jobs")
    p.add_argument("--dry-run", action="store_true", help="report, delete nothing")


def _serve_options(p) -> None:
    p.add_argument("--bind", default="127.0.0.1:19263", metavar="HOST:PORT", help="default 127.0.0.1:19263")


def _tag_options(p) -> None:
    tag_commands = p.add_subparsers(dest="tag_command", metavar="set", parser_class=type(p))
    tag_commands.required = True
    p = tag_commands.add_parser("set", help="replace a job's tags")
    _add_global_options(p, suppress=True)
    p.add_argument("job")
    p.add_argument("--tag", action="append", default=[], help="a tag (repeatable; none clears them)")
    p.set_defaults(handler=_cmd_tag)


def _no_options(p) -> None:
    return None


class _SkippedParser:
    """Stands in for the subparsers of commands not being run: argparse spends
    most of its set-up time on parsers and options, so only the wanted command
    gets them."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: self


def _command_in_argv(argv: Sequence[str]) -> Optional[str]:
    """The subcommand named in argv (skipping global options), if any."""
    i = 0
    while i < len(argv):
        if argv[i] in ("--root", "--format"):
            i += 2
        elif argv[i].startswith("-"):
            i += 1
        else:
            return argv[i]
    return None


def _build_parser(wanted: Optional[str] = None):
    """The CLI parser; with `wanted`, only that command's options are built."""
    argparse, Parser = _make_parser_class()
    parser = Parser(prog="jobstate", formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Run commands as durable background jobs. Every command prints one JSON "
                    "object (--format text for people).",
                    epilog="examples:\n  python3 jobstate.py run -- make test\n"
                    "  python3 jobstate.py --format text list --all\n"
                    "  python3 jobstate.py COMMAND --help")
    parser.add_argument("--version", action="version", version="jobstate " + __version__)
    _add_global_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    commands.required = True
    known = any(wanted == name or wanted in aliases for name, _, _, aliases, _ in _COMMANDS)

    def command(name, handler, help, aliases=()):
        if wanted is not None and wanted != name and wanted not in aliases:
            if not known:  # listed, for the "invalid choice" message and --help
                commands.add_parser(name, help=help, aliases=list(aliases))
            return _SkippedParser()
        examples = "\n".join("  python3 jobstate.py " + e for e in _EXAMPLES.get(name, ()))
        p = commands.add_parser(name, help=help, description=help, aliases=list(aliases),
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n" + examples if examples else None)
        _add_global_options(p, suppress=True)
        p.set_defaults(handler=handler)
        return p

    for name, handler, text, aliases, add_options in _COMMANDS:
        add_options(command(name, handler, text, aliases))
    return parser


def _observe_deadline(ns) -> Optional[float]:
    if getattr(ns, "no_wait", False):
        return 0.0
    if ns.forever:
        return None
    return _parse_duration(ns.until, "--until")


def _observe_limits(ns) -> Tuple[Optional[float], int]:
    """The deadline and excerpt size asked for; run/start/restart check them before launching."""
    return _observe_deadline(ns), _parse_size(ns.max_bytes, "--max-bytes")


def _observe(job: Job, ns, started: float, kind: str) -> Tuple[dict, int]:
    """Shared tail of run/start/restart/wait: wait as asked (or stream with --follow), then RunData.

    Ctrl-C stops the observing, never the job: the answer is then the job as
    it stands (exit 130), so the caller still learns its id and its output so far.
    """
    if getattr(ns, "follow", False):
        return _follow_to_end(job, (0, 0), ns)
    until_s, max_bytes = _observe_limits(ns)
    try:
        doc = _observed_doc(kind, job, until_s, max_bytes, started)
    except KeyboardInterrupt:
        _tell_interrupted(job)
        return _observed_doc(kind, job, 0, max_bytes, started), 130
    return doc, _exit_status_of(doc) if ns.exit_code else 0


def _tell_interrupted(job: Job) -> None:
    _write_text(sys.stderr, "jobstate: interrupted: stopped watching job %s; the job itself goes on "
                "('jobstate wait %s' watches it again)\n" % (job.id, job.id))


def _follow_to_end(job: Job, start: Tuple[int, int], ns) -> Tuple[Optional[dict], int]:
    """Stream raw output until the job ends.  Ctrl-C stops following, never the job.
    In text mode a one-line verdict follows on stderr."""
    try:
        _follow(job.paths, start, [_raw_sink(sys.stdout), _raw_sink(sys.stderr)])
    except KeyboardInterrupt:
        _tell_interrupted(job)
        return None, 130
    view = _job_view(job, job.state())
    if _output_format(ns) == "text":
        sys.stderr.write(_verdict(_printable_doc(view), _use_color(sys.stderr)) + "\n")
    return None, _exit_status_of(view) if ns.exit_code else 0


def _cli_command(ns) -> List[str]:
    argv = list(ns.argv)
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise _UsageError("%s: a command is required: jobstate %s -- CMD ..." % (ns.command, ns.command))
    return argv


def _cli_stdin(ns, auto: bool) -> Optional[bytes]:
    """Standard input for the job from --stdin/--stdin-file, or our own piped stdin for run."""
    limit = _parse_size(ns.stdin_max_bytes, "--stdin-max-bytes")
    if ns.stdin is not None and ns.stdin_file is not None:
        raise InvalidArgumentError("give either --stdin or --stdin-file, not both")
    if ns.stdin == "-" or (ns.stdin is None and ns.stdin_file is None and auto and _stdin_is_piped()):
        if sys.stdin is None or sys.stdin.isatty():
            raise StdinRequiredError("--stdin - needs piped standard input",
                                     hint="pipe data in, or use --stdin TEXT / --stdin-file PATH")
        data = sys.stdin.buffer.read(limit + 1)
    elif ns.stdin is not None:
        data = ns.stdin.encode("utf-8", errors="surrogateescape")
    elif ns.stdin_file is not None:
        try:
            with open(ns.stdin_file, "rb") as f:
                data = f.read(limit + 1)
        except OSError as exc:
            raise InvalidArgumentError("cannot read --stdin-file %s: %s" % (ns.stdin_file, exc.strerror)) from None
    else:
        return None
    if len(data) > limit:
        raise StdinTooLargeError("standard input is larger than %d bytes" % limit,
                                 hint="raise --stdin-max-bytes or pass a smaller input")
    return data


def _stdin_is_piped() -> bool:
    """Our stdin is a file, or a pipe that already holds data or its end.

    A pipe that is open but idle (an agent harness that never closes our stdin)
    is not forwarded: reading it would block `run` forever.  `--stdin -` waits
    for a slow producer on purpose.
    """
    import stat
    try:
        mode = os.fstat(0).st_mode
        if stat.S_ISREG(mode):
            return True
        return stat.S_ISFIFO(mode) and _process_layer.pipe_has_input(0)
    except (OSError, ValueError):  # closed stdin, or a pipe we cannot watch
        return False


def _cli_definition(ns, auto_stdin: bool) -> dict:
    env = _parse_env_pairs(ns.env)
    return dict(cwd=ns.cwd, env=env, env_files=ns.env_file, inherit_env=not ns.no_inherit_env,
                masks=ns.mask, stdin=_cli_stdin(ns, auto_stdin), timeout_s=_parse_duration(ns.timeout, "--timeout"),
                kill_after_s=_parse_duration(ns.kill_after, "--kill-after"), kill_orphans=ns.kill_orphans,
                tags=ns.tag, notify_command=ns.notify_command, notify_file=ns.notify_file,
                memory_max=ns.memory_max, max_processes=ns.max_processes, cpu_time_s=ns.cpu_time)


def _raw_sink(stream):
    def write(chunk: bytes) -> None:
        stream.buffer.write(chunk)
        stream.buffer.flush()
    return write


def _parse_count(value, name: str) -> int:
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise InvalidArgumentError("%s: %r is not a non-negative integer" % (name, value))
    return count


def _cmd_run(ns):
    started = time.monotonic()
    argv = _cli_command(ns)
    _observe_limits(ns)  # a bad value is reported before a job exists, not after
    job = run(argv, root=ns.root, **_cli_definition(ns, auto_stdin=True))
    return _observe(job, ns, started, "run")


def _cmd_create(ns):
    job = create(_cli_command(ns), root=ns.root, **_cli_definition(ns, auto_stdin=False))
    return _envelope("create", _job_view(job, job.state())), 0


def _cmd_start(ns):
    started = time.monotonic()
    job = open_job(ns.job, ns.root)
    _observe_limits(ns)  # validate before launching
    job.start()
    return _observe(job, ns, started, "start")


def _cmd_restart(ns):
    started = time.monotonic()
    job = open_job(ns.job, ns.root)
    _observe_limits(ns)
    job.restart(ns.signal, kill_after_s=_parse_duration(ns.kill_after, "--kill-after"))
    return _observe(job, ns, started, "restart")


def _cmd_status(ns):
    return _status_doc(open_job(ns.job, ns.root)), 0


def _cmd_wait(ns):
    started = time.monotonic()
    return _observe(open_job(ns.job, ns.root), ns, started, "wait")


def _cmd_tail(ns):
    job = open_job(ns.job, ns.root)
    lines = _parse_count(ns.lines, "--lines")
    max_bytes = _parse_size(ns.max_bytes, "--max-bytes")
    if not ns.follow:
        return _tail_doc(job, lines, max_bytes), 0
    tail = job.tail(lines, max_bytes)
    return _follow_to_end(job, (tail.stdout_range[0], tail.stderr_range[0]), ns)


def _cmd_kill(ns):
    kill_after = None if ns.kill_after is None else _parse_duration(ns.kill_after, "--kill-after")
    return _kill_doc(open_job(ns.job, ns.root), ns.signal, kill_after,
                     0 if ns.no_wait else DEFAULT_KILL_OBSERVE_S), 0


def _cmd_list(ns, state: Optional[str] = None):
    return _list_doc(resolve_root(ns.root), cwd=ns.cwd, all_jobs=ns.all, state=state or ns.state,
                     tags=ns.tag, limit=_parse_count(ns.limit, "--limit")), 0


def _cmd_ps(ns):
    return _cmd_list(ns, state=JobStatus.RUNNING.value)


def _cmd_delete(ns):
    if ns.job is not None:
        _normalize_job_ref(ns.job)  # '' included: a malformed id is invalid_job_id on every command
    if (ns.job is not None) == bool(ns.all):
        raise InvalidArgumentError("give a job id or --all", hint="jobstate delete JOB | --all [--dry-run]")
    return _delete_doc(resolve_root(ns.root), ns.job, ns.dry_run), 0


def _cmd_gc(ns):
    root = resolve_root(ns.root)
    report = gc(root, older_than_s=_parse_duration(ns.older_than, "--older-than"),
                max_jobs=None if ns.max_jobs is None else _parse_count(ns.max_jobs, "--max-jobs"),
                max_bytes=None if ns.max_bytes is None else _parse_size(ns.max_bytes, "--max-bytes"),
                dry_run=ns.dry_run)
    return _envelope("gc", {"root": root, "dry_run": report.dry_run, "jobs": report.deleted,
                            "deleted": sum(d["action"] != "skipped" for d in report.deleted),
                            "kept": report.kept, "freed_bytes": report.freed_bytes}), 0


def _cmd_schema(ns):
    return _envelope("schema", {"schema_format": "json-schema-2020-12", "schemas": _document_schemas()}), 0


def _cmd_mcp(ns):
    return None, _serve_mcp(ns.root)


def _cmd_serve(ns):
    return None, _serve_http(ns.root, ns.bind, lambda doc: _emit(doc, ns.pretty))


def _cmd_tag(ns):
    job = open_job(ns.job, ns.root)
    tags = job.set_tags(ns.tag)
    return _envelope("tag", {"job_id": job.id, "tags": tags}), 0


# name, handler, one-line purpose, aliases, options
_COMMANDS = (
    ("run", _cmd_run, "define and launch a job, then observe it", (), _run_options),
    ("create", _cmd_create, "define a job without starting it", (), _create_options),
    ("start", _cmd_start, "launch a created job", (), _start_options),
    ("restart", _cmd_restart, "stop the job if it runs, then run it again under the same id", (), _restart_options),
    ("status", _cmd_status, "show a job's state", (), _job_only_options),
    ("wait", _cmd_wait, "wait until a job finishes", (), _wait_options),
    ("tail", _cmd_tail, "show the end of a job's output", (), _tail_options),
    ("kill", _cmd_kill, "signal a job's whole process tree", (), _kill_options),
    ("list", _cmd_list, "list jobs, newest first", (), _list_options),
    ("ps", _cmd_ps, "list running jobs", (), lambda p: _list_options(p, with_state=False)),
    ("delete", _cmd_delete, "remove finished jobs", ("rm",), _delete_options),
    ("gc", _cmd_gc, "remove old finished jobs across the whole root", (), _gc_options),
    ("schema", _cmd_schema, "print the JSON Schemas of every file and response", (), _no_options),
    ("mcp", _cmd_mcp, "serve the Model Context Protocol on stdio (tools run, status, tail, wait, kill, list)",
     (), _no_options),
    ("serve", _cmd_serve, "serve the HTTP API (loopback by default; JOBSTATE_SERVE_TOKEN guards it)", (),
     _serve_options),
    ("tag", _cmd_tag, "manage tags", (), _tag_options),
)


_EXAMPLES = {
    "run": ("run -- make test", "run --no-wait --timeout 30m --tag dev.server -- npm run dev"),
    "create": ("create --tag nightly -- ./backup.sh", "create --env-file .env -- python3 worker.py"),
    "start": ("start 01a2f3", "start 01a2f3 --no-wait"),
    "restart": ("restart 01a2f3", "restart 01a2f3 --signal INT --kill-after 10"),
    "status": ("status 01a2f3", "--format text status 01a2f3"),
    "wait": ("wait 01a2f3 --until 5m", "wait 01a2f3 --forever --exit-code"),
    "tail": ("tail 01a2f3 --lines 20", "tail 01a2f3 --follow"),
    "kill": ("kill 01a2f3", "kill 01a2f3 --signal INT --kill-after 5"),
    "list": ("--format text list", "list --all --state running --tag ci.*"),
    "ps": ("--format text ps --all", "ps --tag dev.*"),
    "delete": ("delete 01a2f3", "delete --all --dry-run"),
    "gc": ("gc --dry-run", "gc --older-than 7d --max-bytes 1G"),
    "schema": ("schema", "--pretty schema"),
    "mcp": ("mcp", "--root /tmp/agent-jobs mcp"),
    "serve": ("serve", "serve --bind 0.0.0.0:19263   # needs JOBSTATE_SERVE_TOKEN"),
    "tag": ("tag set 01a2f3 --tag ci.lint", "tag set 01a2f3   # clears the tags"),
}


# -- Human output (--format text) ---------------------------------------------

def _output_format(ns) -> str:
    fmt = getattr(ns, "format", None) or os.environ.get("JOBSTATE_FORMAT") or "json"
    return fmt if fmt in ("json", "text") else "json"


def _emit_doc(doc: dict, ns) -> None:
    """Print a document in the chosen format; errors in text mode go to stderr."""
    if _output_format(ns) == "json":
        return _emit(doc, getattr(ns, "pretty", False))
    doc = _printable_doc(doc)
    if doc["ok"]:
        text = _render_text(doc, _use_color(sys.stdout), time.time())
        _write_text(sys.stdout, text + "\n")
    else:
        _write_text(sys.stderr, _render_error(doc, _use_color(sys.stderr)) + "\n")


def _emit(doc: dict, pretty: bool) -> None:
    """Print one JSON document on stdout (the only place the CLI writes JSON)."""
    indent = 2 if pretty else None
    separators = None if pretty else (",", ":")
    try:
        data = json.dumps(doc, ensure_ascii=False, indent=indent, separators=separators).encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes in paths or argv: fall back to \u escapes
        data = json.dumps(doc, indent=indent, separators=separators).encode("ascii")
    try:
        sys.stdout.buffer.write(data + b"\n")
        sys.stdout.flush()
    except BrokenPipeError:  # the reader went away; nothing left to tell it
        pass


def _format_in_argv(argv: List[str]) -> Optional[str]:
    """--format as given, for errors found before parsing succeeded."""
    for i, arg in enumerate(argv):
        if arg == "--format" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--format="):
            return arg.split("=", 1)[1]
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the CLI; returns the process exit status (0 ok, 1 error envelope, 2 usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_supervise"]:
        return _supervise_main(argv[1:])
    if argv[:1] == ["_forkserver"]:
        _forkserver_main(int(argv[1]))
    try:
        ns = _build_parser(_command_in_argv(argv)).parse_args(argv)
    except _ParserExit as exc:
        return exc.status
    except _UsageError as exc:
        import argparse
        early = argparse.Namespace(pretty="--pretty" in argv, format=_format_in_argv(argv))
        _emit_doc(_error_envelope(InvalidArgumentError(str(exc), hint="run 'jobstate --help'")), early)
        return 2
    try:
        doc, status = ns.handler(ns)
    except _UsageError as exc:
        doc, status = _error_envelope(InvalidArgumentError(str(exc), hint="run 'jobstate --help'")), 2
    except JobError as exc:
        doc, status = _error_envelope(exc), 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: answer with an envelope, never a traceback
        if os.environ.get("JOBSTATE_DEBUG"):
            raise
        doc, status = _error_envelope(JobError("%s: %s" % (type(exc).__name__, exc),
                                               hint="set JOBSTATE_DEBUG=1 for a traceback")), 1
    if doc is not None:
        _emit_doc(doc, ns)
    return status


def _exit_now(status: int) -> None:
    """Flush our streams and exit without interpreter teardown (a few ms per call;
    only the CLI does this, never library code)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing left to flush
            pass
    os._exit(status)


if __name__ == "__main__":
    _exit_now(main())

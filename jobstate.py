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
    set_queue(name, ...), list_queues() -> [QueueInfo]   queues' limits, pause, jobs
    Job                          .state() .wait() .tail() .kill() .start() .restart() .delete() .set_tags()
                                 .set_notifications()
    JobState, JobStatus, JobSpec, JobPaths, Tail, KillResult, JobSummary, GcReport
    Readiness, LineMatch         what Job.wait(match=REGEX) and run(ready=REGEX) found
    JobError and its subclasses (each has a stable .code)
    main(argv) -> int            the CLI
    SCHEMA_VERSION, JOB_ID_ENV   the documents' version; the variable every job carries
    DEFAULT_*                    the defaults the CLI documents (read them, do not rely on more)

CLI:
    python jobstate.py [--root PATH] [--pretty] [--format json|text] COMMAND ...
    commands: run create start restart status wait tail kill list ps delete (rm) gc tag notify queue schema
              doctor mcp serve skill completions
    Every command prints one JSON object on stdout (skill and completions print text).
    `python jobstate.py --help`.

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

# The documents users get (JobState, JobSpec, ...) are dataclasses.  Internal
# records are dataclasses without __repr__ and __eq__, which nothing uses:
# each generated method is source compiled at every start-up (about 0.15 ms
# each), in every CLI call and every supervisor.  Every dataclass has a
# docstring: for one without, dataclass() makes one with inspect.signature.
_record = functools.partial(dataclass, repr=False, eq=False)

__version__ = "0.1.0"
__all__ = [
    "run", "create", "open_job", "list_jobs", "gc", "resolve_root", "new_job_id", "main",
    "Job", "JobPaths", "JobState", "JobStatus", "JobSpec", "Tail", "KillResult", "JobSummary", "GcReport",
    "set_queue", "list_queues", "QueueInfo",
    "Readiness", "LineMatch",
    "JobError", "JobNotFoundError", "AmbiguousJobIdError", "InvalidJobIdError", "InvalidStateError",
    "InvalidArgumentError", "InvalidSignalError", "InvalidTagError", "StdinRequiredError",
    "StdinTooLargeError", "StateFileError", "LaunchError", "JobIOError", "KillFailedError",
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
_TREE_END_RECORD_S = 1.0  # how long kill waits for the record of a tree its signal ended
DEFAULT_STDIN_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_LIST_LIMIT = 50
LAUNCH_ACK_TIMEOUT_S = 5.0
DRAIN_TIMEOUT_S = 2.0
DEFAULT_QUEUE_PARALLEL = 1
MAX_QUEUE_PARALLEL = 1024  # the head of a queue's line watches each slot with a thread
DEFAULT_MAX_RESTARTS = 5
DEFAULT_RESTART_DELAY_S = 1.0
MAX_RESTART_DELAY_S = 60.0  # the doubling stops here; a run longer than this resets it
RESTART_POLICIES = ("never", "on-failure", "always")
QUICK_DRAIN_S = 0.05  # how long the end waits for the output to end too, before being published alone

_MAX_CANDIDATES = 20
# Every file jobstate opens inside the root: binary on Windows, and never
# through a symlink someone planted (a log path pointing at ~/.bashrc must not
# be truncated).
_FILE_FLAGS = getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
_CHUNK_BYTES = 1 << 20
# The supervisor reads the job's output in smaller pieces: each read is a new
# buffer, and freed 1 MiB buffers (with the copy full.log needs) go back to the
# kernel, so the next ones fault in every page again (glibc, in a thread:
# 100,000-250,000 page faults and about 60% more CPU per GiB captured).  Below
# the allocators' mmap threshold (128 KiB) a freed buffer is reused.
_PUMP_READ_BYTES = 64 * 1024
# Output lines are matched (wait --match, run --ready, --output-pattern) on at
# most their first _MAX_LINE_BYTES: a longer line is cut there and its rest
# skipped, so a job printing megabytes without a newline costs bounded memory.
# Reads are at most _CHUNK_BYTES, so only a line continued across reads can be longer.
_MAX_LINE_BYTES = 1 << 20
_STREAM_CHOICES = ("stdout", "stderr", "either")
_MATCH_TYPES = ("contains", "regex")  # of --output-pattern: a literal, or Python re
# Signals a user may name; each platform layer says which of them exist.
_SIGNAL_NAMES = ("TERM", "INT", "KILL", "HUP", "QUIT", "USR1", "USR2", "STOP", "CONT")
# Signals whose purpose is to end the job: a kill with one of these leaves a
# kill request, so the job is recorded as `killed` however the child reacts.
_TERMINATING = frozenset({"TERM", "INT", "KILL", "HUP", "QUIT"})
# Patterns are compiled where first used (re caches them), not at every start-up.
_TAG_RE = r"[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\Z"
_QUEUE_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z"  # a file name on every platform
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

    def __init__(self, job_id: str, state: "JobStatus", wanted: str, hint: Optional[str] = None):
        self.job_id, self.state = job_id, state
        super().__init__("job %s is %s; %s" % (job_id, state.value, wanted),
                         hint=hint or "'jobstate status %s' shows what it is doing" % job_id,
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


class KillFailedError(JobError):
    """A kill that could signal no process of a job that is still running."""

    code = "kill_failed"
    retryable = True


# What a response may warn of (its `warnings`): the answer holds, with this caveat.
_WARNING_CODES = ("state_not_updated", "pids_unverifiable", "kill_request_not_written", "launcher_is_pid_1",
                  "dies_with_launcher")


def _warning(code: str, message: str) -> dict:
    assert code in _WARNING_CODES, code
    return {"code": code, "message": message}


@dataclass
class JobInfo:
    """The `job` object of state.json: the job's id, status and start."""

    id: str
    status: JobStatus
    started_at: Optional[str] = None


@dataclass
class JobResult:
    """The `result` object of state.json: how the job's last run ended."""

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
    supervisor_token: Optional[str] = None  # its start-time token: proof it lives when its lock cannot say
    leftovers: List[_Proc] = field(default_factory=list)  # where trees cannot be found again later
    # Why a job has no child right now: {"for": "queue" | "jobs" | "restart", ...}
    # (created while it waits for a slot or for jobs; running between restarts).
    waiting: Optional[Dict[str, object]] = None
    restarts: Optional[int] = None  # runs started again by the restart policy
    last_exit: Optional[Dict[str, object]] = None  # the previous run's result, once restarted
    queue_slot: Optional[Dict[str, object]] = None  # {"queue", "slot", "at"}: the slot this job took
    containment: Optional[str] = None  # one of _CONTAINMENTS: what holds the job's tree
    cgroup: Optional[str] = None  # the job's cgroup v2 directory (Linux)
    cgroups_v1: List[str] = field(default_factory=list)  # cgroup v1 directories enforcing limits
    limits: Dict[str, Dict[str, object]] = field(default_factory=dict)  # name: {"value", "enforced_by"}
    extra: Dict[str, object] = field(default_factory=dict)  # keys of other versions, kept on rewrite
    # Not in state.json: what the reader that produced this state could not do (see _warning).
    _warnings: List[dict] = field(default_factory=list, repr=False, compare=False)

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
        for key in ("supervisor_pid", "pid_token", "logs_drained", "supervisor_token"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
        if self.leftovers:
            doc["leftovers"] = [{"pid": p.pid, "token": p.token} for p in self.leftovers]
        for key in ("waiting", "restarts", "last_exit", "queue_slot"):
            if getattr(self, key) is not None:
                doc[key] = getattr(self, key)
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
                 "supervisor_pid", "pid_token", "logs_drained", "supervisor_token", "leftovers", "waiting",
                 "restarts", "last_exit", "queue_slot", "containment", "cgroup", "cgroups_v1", "limits"}
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
            supervisor_token=_typed(doc.get("supervisor_token"), str, "supervisor_token"),
            leftovers=[_Proc(_typed(p.get("pid"), int, "leftovers.pid", required=True),
                             _typed(p.get("token"), str, "leftovers.token", required=True)) for p in leftovers],
            waiting=_typed(doc.get("waiting"), dict, "waiting"),
            restarts=_typed(doc.get("restarts"), int, "restarts"),
            last_exit=_typed(doc.get("last_exit"), dict, "last_exit"),
            queue_slot=_typed(doc.get("queue_slot"), dict, "queue_slot"),
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
    output_pattern: Optional[str] = None  # output-match notifications (job.output_matched)
    output_match_type: str = "contains"
    output_stream: str = "either"
    output_command: Optional[str] = None
    output_file: Optional[str] = None
    created_at: Optional[str] = None
    queue: Optional[str] = None  # the queue whose slots it runs in
    after: List[str] = field(default_factory=list)  # full ids of the jobs it starts after
    after_any: bool = False  # start after them whatever their result
    restart: str = "never"  # one of RESTART_POLICIES
    max_restarts: int = 0
    restart_delay_s: float = DEFAULT_RESTART_DELAY_S
    memory_max: Optional[int] = None  # bytes, for the whole tree where the platform can
    max_processes: Optional[int] = None
    cpu_time_s: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    _KEYS = ("argv", "cwd", "env", "env_files", "inherit_env", "masks", "has_stdin", "timeout_s",
             "kill_after_s", "kill_orphans", "tags", "notify_command", "notify_file", "output_pattern",
             "output_match_type", "output_stream", "output_command", "output_file", "created_at",
             "queue", "after", "after_any", "restart", "max_restarts", "restart_delay_s",
             "memory_max", "max_processes", "cpu_time_s")
    # What `notify set` may change after creation.
    _SINK_KEYS = ("notify_command", "notify_file", "output_pattern", "output_match_type", "output_stream",
                 "output_command", "output_file")
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
class LineMatch:
    """A line of a job's output that matched a pattern (`matched` in responses)."""

    stream: str  # "stdout" or "stderr"
    line: str  # decoded as UTF-8 (invalid bytes replaced), without its line ending
    offset: int  # byte offset of the line's start in that stream's log


@dataclass
class Readiness:
    """What Job.wait(match=...) saw: the job's state then, and the first matching line or None."""

    state: JobState
    match: Optional[LineMatch]

    @property
    def ready(self) -> bool:
        return self.match is not None


@dataclass
class KillResult:
    """What Job.kill() did: the state it left, the signal, the processes it reached and those still alive."""

    state: JobState
    signal_sent: str
    processes_signalled: int
    processes_alive: Optional[int]  # None where processes cannot be counted (no /proc)
    warnings: List[dict] = field(default_factory=list)


@dataclass
class JobSummary:
    """One row of `list_jobs`: the state plus the parts of the definition people filter on."""

    job_id: str
    state: JobState
    argv: List[str]
    cwd: Optional[str]
    tags: List[str]
    created_at: Optional[str]
    queue: Optional[str] = None


@dataclass
class QueueInfo:
    """One queue: its settings, the jobs running in its slots and those waiting in line (in order)."""

    name: str
    parallel: int
    paused: bool
    running: List[str]
    waiting: List[str]


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


@_record
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


@_record
class _Child:
    """The job's main process, as seen by its supervisor."""

    popen: Optional[subprocess.Popen]  # None once a forked launch has exec'd its watcher
    pid: int
    token: Optional[str]
    windows_job_name: Optional[str] = None
    handle: object = None  # platform-private (the Job Object handle on Windows)
    # Held while the child is reaped and while the supervisor signals it: an
    # unreaped child's pid, and so its group's id, cannot have been reused.
    guard: threading.Lock = field(default_factory=threading.Lock, repr=False)
    reaped: bool = False
    containment: _Containment = field(default_factory=_Containment)


@_record
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


class _ProcessLayer:
    """What each platform layer provides; the rest of the file talks only to `_process_layer`.

    _PosixProcessLayer and _WindowsProcessLayer define exactly these public
    members, in this order, under these sub-banners (StaticTests checks it).
    Where a member means nothing on a platform, that layer still defines it,
    as a no-op or a refusal that says why.  The members, by sub-banner:

    where things live
        default_root                    the jobs root when neither --root nor the environment names one
        cache_dir                       where supervisors keep the bytecode of this file
        unsafe_dir_reason               why another user could tamper with path, or None
    files and locks
        lock                            lock a whole file; False when not blocking and it is taken
        unlock                          let go of it (the close that follows drops it anyway)
        share_lock                      turn our exclusive lock into a shared one (False if another took it meanwhile)
        lock_kind                       what `lock` uses (flock, LockFileEx), for doctor
        lock_problem                    why locks on this directory's filesystem do not exclude, or None
        read_bytes                      a file's bytes, never through a symlink
        replace                         os.replace, riding out readers that hold dst open
        fsync_dir                       make a rename inside path durable
        mounts                          the mount table, where the platform has one
        filesystem_of                   the mount (type, mount point) a path lives on, or None
    supervisor
        hands_over_lock                 the launcher's job lock passes to the supervisor with its descriptor
        has_forkserver                  a process that launches again may start a forkserver (_Forkserver)
        spawn_supervisor                start a detached supervisor (or the forkserver) as a new interpreter
        release_supervisor              let go of a spawned supervisor once it has acknowledged
        prepare_supervisor              detach for good, first thing in a spawned supervisor
        supervisor_signals              the signal dispositions and mask a supervisor and its job start with
        can_fork_supervisor             this process may fork its supervisor instead of spawning one
        fork_supervisor                 run body() in a detached, forked process
        exec_keeping                    exec argv keeping only stdio and fds open
        warm_up                         load now what every supervisor forked from here will need
        dies_with_launcher              this process is the init of its PID namespace: its jobs die with it
    child
        shell_argv                      the argv that runs one command string through the platform shell
        tune_pipe                       size a pipe that carries the job's output
        pipe_has_input                  a read of the pipe would not block
        spawn_child                     start the job's main process in a tree that can be found again
        wait_child                      block until it exits: (exit code, signal number)
        reaps_every_child               waiting for the child also reaps the supervisor's other children
        signal_child_group              from the supervisor, signal its unreaped child's group (no pid check needed)
        spawn_sink                      start a notification command, stdin a pipe
        stop_sink                       end a notification command's whole tree
        let_go_of_child                 drop what the supervisor held of a run's container (the Job Object handle)
    identity and trees
        records_leftovers               the supervisor writes down what runs on when the main process exits
        can_verify_pids                 pids can be checked against their start time here
        signal_numbers                  {'TERM': 15, ...}: the signals this platform can send
        process_token                   the start-time token that tells this pid's process from a recycled one
        is_alive                        the process runs, and is the one its token names
        find_tree                       the live processes of a job's tree
        signal_tree                     signal each of them; how many were signalled
    containment and limits
        limit_counters                  what counts towards each limit the container enforces
        limit_exit_code                 the exit code a run gets when a limit refuses it (None: none such)
        unrecorded_cgroups              the cgroups a supervisor killed before recording them would have left
        remove_containment              remove a job's container once empty; False while processes live in it
        remove_forsaken_containment     remove the empty containers of every job that nobody else will remove
    what this machine gives
        missing_facilities              the optional facilities this machine lacks, and what each costs
        capabilities                    what this machine gives jobstate (doctor, GET /health)
    """


def _survive_signal(signum, frame) -> None:
    """The supervisor's handler for signals it must survive (see supervisor_signals)."""


# What jobstate loses without each optional facility: never the job, at most this.
_MISSING_COSTS = {
    "ctypes": "no child subreaper (prctl is reached through ctypes): a job's double-forked daemons re-parent "
              "to init, and are found only by their JOBSTATE_JOB_ID marker",
    "prctl": "no child subreaper: a job's double-forked daemons re-parent to init, and are found only by "
             "their JOBSTATE_JOB_ID marker",
    "proc": "no process can be identified: kill and timeouts go through the job's supervisor, which signals "
            "its own child's process group; processes that leave that group (setsid), --kill-orphans and "
            "leftovers of a finished job cannot be found",
    "pidfd": "signals go by pid after a start-time check: a window of microseconds in which a recycled pid "
             "could be hit",
    "pipe_size": "64 KiB output pipes instead of 1 MiB: more wake-ups of the supervisor for chatty jobs",
    "clone3": "a job's child is not born in its cgroup but moves there before it execs: each launch waits for "
              "the kernel's cgroup migration lock (an RCU grace period, milliseconds) unless another launch "
              "has just paid for one",
    "fallocate": "the disk reserve that keeps room for the final state is written as zeros (256 KiB a start)",
    "o_nofollow": "job files are opened without the guard against a symbolic link planted in the root",
    "bytecode_cache": "every supervisor compiles jobstate.py from source: tens of milliseconds more per launch",
}


def _missing(facility: str, detail: str, costs: Optional[str] = None) -> dict:
    return {"facility": facility, "detail": detail, "costs": costs or _MISSING_COSTS[facility]}


def _missing_file_facilities(cache_dir: str) -> List[dict]:
    """The file-level facilities both platforms may lack."""
    missing = []
    if not hasattr(os, "posix_fallocate"):
        missing.append(_missing("fallocate", "os.posix_fallocate does not exist on this platform"))
    if not hasattr(os, "O_NOFOLLOW"):
        missing.append(_missing("o_nofollow", "os.O_NOFOLLOW does not exist on this platform"))
    problem = _bytecode_cache_problem(cache_dir)
    if problem:
        missing.append(_missing("bytecode_cache", problem))
    return missing


def _supervisor_code_path(cache_dir: str) -> str:
    """Where supervisors cache their compiled part of this file (see _SUPERVISOR_BOOT):
    one file per copy of jobstate.py and per Python."""
    import binascii
    name = "jobstate.%08x.%s.code" % (binascii.crc32(os.fsencode(_THIS_FILE)), sys.implementation.cache_tag)
    return os.path.join(cache_dir, name)


def _supervisor_code_key() -> tuple:
    """What that cached code was compiled from, as _SUPERVISOR_BOOT checks it."""
    st = os.stat(_THIS_FILE)
    return (_THIS_FILE, st.st_mtime_ns, st.st_size, sys.hexversion)


def _bytecode_cache_problem(cache_dir: str) -> Optional[str]:
    """Why supervisors could neither reuse nor write their compiled part of this file, or None."""
    import marshal
    path = _supervisor_code_path(cache_dir)
    try:
        with open(path, "rb") as f:
            if marshal.load(f) == _supervisor_code_key():
                return None
    except (OSError, EOFError, ValueError, TypeError):
        pass
    existing = cache_dir
    while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    return None if os.access(existing, os.W_OK) else "%s is missing or stale, and cannot be written" % path


# Filesystems that other machines may mount too, where flock (if it works at
# all) excludes only between processes of one machine: a lock held there by a
# supervisor on another host proves nothing here.  FUSE passes flock to the
# kernel of each machine unless the filesystem implements it, so every FUSE
# filesystem counts, but those known to be local (fuse-overlayfs: rootless
# containers) or read-only.
_NETWORK_FILESYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "ncpfs", "9p", "afs", "coda", "glusterfs",
                        "lustre", "virtiofs", "vboxsf", "vmhgfs", "fuse", "fuseblk")
_LOCAL_FUSE = ("fuse.fuse-overlayfs", "fuse.squashfuse", "fuse.lxcfs", "fuse.portal")


def _is_network_filesystem(fstype: Optional[str]) -> bool:
    if not fstype or fstype in _LOCAL_FUSE:
        return False
    return fstype in _NETWORK_FILESYSTEMS or fstype.startswith("fuse.")


def _capability_report(**facts) -> dict:
    """The capabilities object (`doctor`, `GET /health`): the platform's facts plus the interpreter."""
    report = {"platform": sys.platform, "python": "%d.%d.%d" % sys.version_info[:3],
              "implementation": sys.implementation.name, "executable": sys.executable}
    report.update(facts)
    return report


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


class _PlanRefused(Exception):
    """The child could not follow its _ChildPlan (subprocess's SubprocessError
    from plan.enter), so it ran nothing: start it again with less."""


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
        """Runs in the forked child.  preexec_fn is unsafe in general where other
        threads run (one may hold a lock the forked copy needs), but this body
        takes none: the interpreter's own state is reset after the fork
        (PyOS_AfterFork_Child), it imports nothing, writes only to descriptors
        opened beforehand and calls a setrlimit bound beforehand; glibc's malloc
        is fork-safe.  An error here is a SubprocessError (_PlanRefused, to
        spawn_child), which starts the child again without containment."""
        for fd in self.entries:
            os.write(fd, b"0")
        self.set_rlimits()

    def set_rlimits(self) -> None:
        for resource_id, values in self.rlimits:
            self.setrlimit(resource_id, values)

    def needs_preexec(self) -> bool:
        return bool(self.entries or self.rlimits)

    def enters_one_v2_cgroup(self) -> bool:
        """The child's only cgroup is the job's v2 one: it can be born there (see _clone_into_cgroup)."""
        return self.containment.cgroup is not None and len(self.entries) == 1

    def close(self) -> None:
        for fd in self.entries:
            os.close(fd)
        self.entries = []

    def abandon(self) -> None:
        """The child could not enter: remove the cgroups we made for it."""
        self.close()
        for path in self.containment.cgroups():
            _remove_cgroup_tree(path)


_CONTAINMENT_OFF = ("off", "0", "no", "none")
_CONTAINMENT_ON = ("", "on", "1", "yes")


def _cgroups_wanted() -> bool:
    """Linux, and not turned off by JOBSTATE_CONTAINMENT=off."""
    return _LINUX and os.environ.get("JOBSTATE_CONTAINMENT", "").lower() not in _CONTAINMENT_OFF


def _check_containment_setting() -> None:
    """Refuse a launch under a JOBSTATE_CONTAINMENT that is neither on nor off:
    a typo of "off" would otherwise quietly leave cgroups on."""
    value = os.environ.get("JOBSTATE_CONTAINMENT", "")
    if value.lower() not in _CONTAINMENT_OFF + _CONTAINMENT_ON:
        raise InvalidArgumentError("JOBSTATE_CONTAINMENT=%r is neither on nor off" % (value,),
                                   hint="JOBSTATE_CONTAINMENT=off (or 0, no, none) turns cgroups off;"
                                        " unset it (or on, 1, yes) for them")


def _cgroup_enforcers() -> List[str]:
    """The cgroup hierarchies a job's limits could use here: 'cgroup' (v2), 'cgroup-v1'."""
    if not _cgroups_wanted():
        return []
    found = ["cgroup"] if _cgroup_home("") is not None else []
    if any(_cgroup_home(files[1][0]) is not None for files in _CGROUP_LIMIT_FILES.values()):
        found.append("cgroup-v1")
    return found


def _plan_child(job_id: str, limits: Dict[str, float], contain: bool, rlimits: bool = True) -> _ChildPlan:
    """Decide how the child starts: in the job's cgroup where we may make one
    (else in a process group), each limit by a cgroup v2 controller, else a
    cgroup v1 hierarchy, else an rlimit of the main process, else not at all."""
    plan = _ChildPlan()
    # The child enters its cgroups and sets its rlimits from preexec_fn (see
    # _ChildPlan.enter for why that holds with other threads too: a restart
    # policy's later runs, a queued job, start from a supervisor that has some).
    if contain and _cgroups_wanted():
        _plan_cgroups(plan, job_id, limits)
    for name, value in limits.items():
        if name not in plan.containment.limits:
            enforcer = _plan_rlimit(plan, name, value) if rlimits else "none"
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


_SYS_CLONE3 = 435
_CLONE_INTO_CGROUP = 0x200000000
_CLONE3_MACHINES = frozenset({"x86_64", "aarch64", "riscv64", "ppc64le", "ppc64", "s390x", "loongarch64"})


def _exec_arguments(argv, env) -> Tuple[List[bytes], List[bytes], Dict[bytes, bytes]]:
    """The paths to try, argv and the environment for execve, checked as Popen
    checks them (ValueError for a NUL or a bad name), before any child exists."""
    def encoded(value) -> bytes:
        value = os.fsencode(value)
        if b"\0" in value:
            raise ValueError("embedded null byte")
        return value
    args = [encoded(a) for a in argv]
    environment = {}
    for key, value in env.items():
        key = encoded(key)
        if not key or b"=" in key:
            raise ValueError("illegal environment variable name")
        environment[key] = encoded(value)
    if os.path.dirname(args[0]):
        return [args[0]], args, environment
    return [os.path.join(os.fsencode(d), args[0]) for d in os.get_exec_path(env)], args, environment


def _exec_child(executables: List[bytes], argv: List[bytes], env: Dict[bytes, bytes], cwd: str,
                stdio: Tuple[int, int, int], report: int, top: int, plan: _ChildPlan) -> NoReturn:
    """The child of _clone_into_cgroup, from clone to exec: what Popen's child
    does for spawn_child (a new session, cwd, stdio, SIGPIPE and SIGXFSZ back to
    the default, only fds 0-2), then the exec.  Only system calls: nothing here
    takes a lock.  A failure goes to the parent as "errno:stage" on report."""
    stage = b"setup"
    try:
        os.setsid()
        stage = b"chdir"
        os.chdir(cwd)
        stage = b"setup"
        for target, fd in enumerate(stdio):  # every fd given is 3 or above (the supervisor holds 0-2)
            os.dup2(fd, target)
        for signum in (_signal.SIGPIPE, _signal.SIGXFSZ):
            _signal.signal(signum, _signal.SIG_DFL)
        plan.set_rlimits()
        os.closerange(3, report)
        os.closerange(report + 1, top)
        stage, failure = b"exec", None
        for path in executables:  # as Popen does: the first error that is not "not here" wins
            try:
                os.execve(path, argv, env)
            except OSError as exc:
                if failure is None or failure.errno in (errno.ENOENT, errno.ENOTDIR):
                    failure = exc
        raise failure or OSError(errno.ENOENT, "no path to try")
    except BaseException as exc:
        number = exc.errno if isinstance(exc, OSError) and exc.errno else errno.EINVAL
        try:
            os.write(report, b"%d:%s" % (number, stage))
        except OSError:
            pass
    finally:
        os._exit(127)


def _open_regular(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open of one of a job's own files: never through a symlink, never blocked
    by a FIFO planted in its place (O_NONBLOCK, which regular files ignore), and
    only a regular file: OSError EINVAL, with filename, for anything else."""
    import stat
    not_regular = OSError(errno.EINVAL, "it is not a regular file (a FIFO or device planted in its place?), "
                          "and jobstate uses only regular files in a job directory", path)
    try:
        fd = os.open(path, flags | _FILE_FLAGS | getattr(os, "O_NONBLOCK", 0), mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO (or device) opened for writing, with nobody at the other end
            raise not_regular from None
        raise
    try:
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        os.close(fd)
        raise
    if not regular:
        os.close(fd)
        raise not_regular
    return fd


class _PosixProcessLayer(_ProcessLayer):
    """Linux and macOS: sessions, process groups, signals, flock, /proc or ps."""

    # -- where things live ----------------------------------------------------

    def default_root(self) -> str:
        return os.path.join(os.path.expanduser("~"), ".local", "share", "jobstate", "jobs")

    def cache_dir(self) -> str:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return os.path.join(base, "jobstate")

    def unsafe_dir_reason(self, path: str) -> Optional[str]:
        st = os.stat(path)
        if st.st_uid != os.getuid():
            return "it is owned by uid %d, not by you (uid %d)" % (st.st_uid, os.getuid())
        if st.st_mode & 0o022:
            return "it is writable by other users (mode %o)" % (st.st_mode & 0o777)
        return None

    # -- files and locks ------------------------------------------------------

    def lock(self, fd: int, *, exclusive: bool, blocking: bool) -> bool:
        import fcntl
        op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if blocking else fcntl.LOCK_NB)
        try:
            fcntl.flock(fd, op)
            return True
        except BlockingIOError:
            return False

    def unlock(self, fd: int) -> None:
        # Nothing to do before the close: and an explicit LOCK_UN would be
        # wrong, since the launcher shares its lock's open file description
        # with the supervisor it hands the lock to.
        return None

    def share_lock(self, fd: int) -> bool:
        """Turn our exclusive lock into a shared one; False when another process
        took the lock meanwhile (flock converts by unlocking first)."""
        return self.lock(fd, exclusive=False, blocking=False)

    lock_kind = "flock"

    def lock_problem(self, directory: str) -> Optional[str]:
        """Why flock does not exclude on this directory's filesystem, or None.

        Two descriptors on the directory: while the first holds a shared lock,
        an exclusive one through the second must be refused.  (Shared first, so
        that two processes probing at once cannot fail each other.)
        """
        try:
            first, second = os.open(directory, os.O_RDONLY), os.open(directory, os.O_RDONLY)
        except OSError as exc:
            return "cannot open %s to test its locks: %s" % (directory, exc.strerror or exc)
        try:
            if (self.lock(first, exclusive=False, blocking=False)
                    and self.lock(second, exclusive=True, blocking=False)):
                return "flock granted two conflicting locks on one file at once"
            return None
        except OSError as exc:  # ENOLCK, EOPNOTSUPP, EBADF (NFS wants a writable file): no flock here
            return "flock fails there: %s" % (exc.strerror or exc)
        finally:
            os.close(first)
            os.close(second)

    def read_bytes(self, path: str) -> bytes:
        with open(_open_regular(path, os.O_RDONLY), "rb") as f:
            return f.read()

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def fsync_dir(self, path: str) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def mounts(self) -> List[dict]:
        """Linux mount table of this process's namespace: mount point, filesystem
        type and super-block options of each mount; [] where it cannot be read."""
        try:
            with open("/proc/self/mountinfo", "rb") as f:
                lines = f.read().decode("utf-8", "surrogateescape").splitlines()
        except OSError:
            return []
        mounts = []
        for line in lines:
            head, sep, tail = line.partition(" - ")
            fields, rest = head.split(), tail.split()
            if sep and len(fields) >= 5 and len(rest) >= 3:
                unescape = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)))
                mounts.append({"mount_point": unescape(fields[4]), "fstype": rest[0],
                               "options": rest[2] + "," + fields[5] if len(fields) > 5 else rest[2]})
        return mounts

    def filesystem_of(self, path: str) -> Optional[dict]:
        """The mount that holds path (the last one mounted over its longest prefix), or None."""
        real, best = os.path.realpath(path), None
        for mount in self.mounts():
            point = mount["mount_point"]
            if real == point or real.startswith(point.rstrip("/") + "/"):
                if best is None or len(point) >= len(best["mount_point"]):
                    best = mount
        return best

    # -- supervisor -----------------------------------------------------------

    # The launcher's flock passes to the supervisor with the descriptor.
    hands_over_lock = True

    # Linux only: macOS system libraries are not fork-safe (see can_fork_supervisor).
    has_forkserver = _LINUX

    def spawn_supervisor(self, argv: List[str], *, stdout, stderr, lock_fd: int) -> subprocess.Popen:
        """Start the supervisor in a new session, handing it the job lock we hold
        (or the forkserver its end of the socket)."""
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
        try:
            open_fds = [int(fd) for fd in os.listdir("/proc/self/fd")]  # the forked launcher may hold anything
        except OSError:  # no /proc: close every number but ours, a range at a time (close_range)
            open_fds = None
            bounds = sorted(keep)
            for low, high in zip(bounds, bounds[1:] + [max(os.sysconf("SC_OPEN_MAX"), bounds[-1] + 1)]):
                os.closerange(low + 1, high)
        for fd in open_fds or ():
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
        # us instead of init, so they stay inside the tree we can find.  A
        # refusal (seccomp: EPERM) is survivable: the marker scan still finds
        # them, and capabilities() says what was lost.
        prctl = self._prctl()[0]
        if prctl is not None:
            prctl(36, 1, 0, 0, 0)

    def warm_up(self) -> None:
        """Load and probe now what every supervisor forked from this process will need."""
        self.missing_facilities()
        _cgroup_mounts()
        self._clone3()

    @functools.lru_cache(maxsize=None)
    def _prctl(self):
        """(libc's prctl, None), or (None, (facility, why)) where it cannot be had.

        ctypes is only a nicety on POSIX: a Python built without _ctypes, or a
        libc without prctl, costs the child subreaper and nothing else.
        """
        if not _LINUX:
            return None, None
        try:
            import ctypes
        except ImportError as exc:
            return None, ("ctypes", "%s: %s" % (type(exc).__name__, exc))
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError) as exc:
            return None, ("prctl", "libc has no prctl: %s" % exc)
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
        return prctl, None

    def dies_with_launcher(self) -> bool:
        """This process is the init of its PID namespace (`docker run image python
        jobstate.py ...`, `unshare --pid --fork`): when it exits, the kernel kills
        every process of the namespace, jobs and supervisors included."""
        return os.getpid() == 1

    # -- child ----------------------------------------------------------------

    def shell_argv(self, command: str) -> List[str]:
        return ["/bin/sh", "-c", command]

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
        may make one, and with its limits (see _plan_child).  stdin None: /dev/null."""
        limits = dict(limits or {})
        # The child that cannot enter its cgroup (a delegation rule we could not
        # foresee) or set its rlimits runs nothing of the job: it is started
        # again without them, and the state says which limits do not hold.
        for contain, rlimits in ((True, True), (False, True), (False, False)):
            plan = _plan_child(job_id, limits, contain=contain, rlimits=rlimits)
            try:
                popen, pid = self._start_child(argv, plan, cwd=cwd, env=env, stdin=stdin, stdout=stdout,
                                               stderr=stderr)
                break
            except _PlanRefused:
                plan.abandon()
            except OSError:  # it could not be executed: no process, so no cgroup either
                plan.abandon()
                raise
            finally:
                plan.close()
        return _Child(popen, pid, self.process_token(pid), containment=plan.containment)

    def _start_child(self, argv, plan: _ChildPlan, **kwargs) -> Tuple[Optional[subprocess.Popen], int]:
        """(Popen or None, pid): born in its cgroup where clone3 can, else entering it itself."""
        if plan.enters_one_v2_cgroup():
            pid = self._clone_into_cgroup(argv, plan, **kwargs)
            if pid is not None:
                return None, pid
        popen = self._popen_child(argv, plan, **kwargs)
        return popen, popen.pid

    def _clone_into_cgroup(self, argv, plan: _ChildPlan, *, cwd, env, stdin, stdout, stderr) -> Optional[int]:
        """Start the child inside the job's cgroup from its first instant
        (clone3 with CLONE_INTO_CGROUP, Linux 5.7): nothing migrates, so the
        launch never waits for the kernel's migration lock, which first waits
        for an RCU grace period (6 to 17 ms here) unless another migration
        just paid for one.  None where that cannot be done here: the caller
        starts the child the other way (_popen_child).

        The clone is a raw system call, so the interpreter is not told of the
        fork as os.fork tells it.  That is sound with no other thread (none can
        hold a lock the child needs, and the child's one thread is the one that
        called) and the collector off (no finalizer of the parent's runs in the
        child), as the child only makes system calls until it execs or exits
        (_exec_child).  The pid it returns is ours to reap (wait_child).
        """
        import gc
        clone = self._clone3()[0]
        if clone is None or threading.active_count() != 1 or threading.current_thread() != threading.main_thread():
            return None
        executables, args, environment = _exec_arguments(argv, env)  # a ValueError here, as Popen's
        opened: List[int] = []
        collecting = gc.isenabled()
        gc.disable()
        try:
            opened.append(os.open(plan.containment.cgroup, os.O_RDONLY | os.O_DIRECTORY))
            if stdin is None:
                stdin = os.open(os.devnull, os.O_RDONLY)
                opened.append(stdin)
            elif not isinstance(stdin, int):
                stdin = stdin.fileno()
            report_r, report_w = os.pipe()  # close-on-exec: EOF once the exec succeeded
            opened += [report_r, report_w]
            top = max(int(fd) for fd in os.listdir("/proc/self/fd")) + 1
            pid = clone(opened[0])
            if pid == 0:  # the child: it never comes back from here, nor turns the collector on
                _exec_child(executables, args, environment, cwd, (stdin, stdout, stderr), report_w, top, plan)
        except OSError:  # no /proc, or clone3 refused (seccomp, an older kernel, the cgroup's rules)
            for fd in opened:
                os.close(fd)
            return None
        finally:
            if collecting:
                gc.enable()
        for fd in opened:
            if fd != report_r:
                os.close(fd)
        with open(report_r, "rb") as report:
            failure = report.read()
        if failure:
            os.waitpid(pid, 0)
            number, _, stage = failure.partition(b":")
            raise OSError(int(number), os.strerror(int(number)), cwd if stage == b"chdir" else argv[0])
        return pid

    @functools.lru_cache(maxsize=None)
    def _clone3(self) -> Tuple[Optional[Callable[[int], int]], Optional[str]]:
        """(clone(cgroup_fd) -> pid, 0 in the child, None) through libc's syscall(),
        or (None, why not here).  clone3 is 435 on the 64-bit ABIs listed (MIPS
        and x32, say, number it otherwise); an empty call tells whether the
        kernel has it and a seccomp profile lets it through (EINVAL: it does)."""
        if not _LINUX:
            return None, None
        if os.uname().machine not in _CLONE3_MACHINES or sys.maxsize < 2 ** 32:
            return None, "clone3 is not known by number on %s" % os.uname().machine
        try:
            import ctypes
            # PyDLL keeps the GIL across the call: the child comes back holding it, as the parent does.
            syscall = ctypes.PyDLL(None, use_errno=True).syscall
        except (ImportError, OSError, AttributeError) as exc:
            return None, "no libc syscall() through ctypes: %s" % exc
        syscall.restype = ctypes.c_long
        syscall.argtypes = [ctypes.c_long, ctypes.c_void_p, ctypes.c_size_t]
        if syscall(_SYS_CLONE3, None, 0) < 0 and ctypes.get_errno() != errno.EINVAL:
            return None, "clone3: %s" % os.strerror(ctypes.get_errno())

        def clone(cgroup_fd: int) -> int:
            # struct clone_args as of 5.7: flags, pidfd, child_tid, parent_tid,
            # exit_signal, stack, stack_size, tls, set_tid, set_tid_size, cgroup.
            args = (ctypes.c_uint64 * 11)(_CLONE_INTO_CGROUP, 0, 0, 0, _signal.SIGCHLD, 0, 0, 0, 0, 0, cgroup_fd)
            pid = syscall(_SYS_CLONE3, args, ctypes.sizeof(args))
            if pid < 0:
                number = ctypes.get_errno()
                raise OSError(number, os.strerror(number))
            return pid
        return clone, None

    @staticmethod
    def _popen_child(argv, plan: _ChildPlan, **kwargs) -> subprocess.Popen:
        # The child puts itself in its cgroup between fork and exec (preexec_fn),
        # so it runs no code of the job outside it; its children inherit it.
        # Where it can, _clone_into_cgroup starts it there instead; this is the
        # way without clone3, with cgroup v1 hierarchies to enter too, or with
        # other threads running.  The alternatives are worse: the supervisor moving itself into the job's
        # cgroup around the fork would write to its own cgroup, outside
        # `jobstate`, to move back (and would stay in the job's if that failed);
        # an exec shim costs an exec and turns exec errors into exit codes.
        # preexec_fn is unsafe where other threads run only if it needs a lock
        # one of them may hold: plan.enter needs none (see _ChildPlan.enter).
        import subprocess
        if kwargs["stdin"] is None:
            kwargs["stdin"] = subprocess.DEVNULL
        try:
            return subprocess.Popen(argv, close_fds=True, start_new_session=True,
                                    preexec_fn=plan.enter if plan.needs_preexec() else None, **kwargs)
        except subprocess.SubprocessError as exc:  # raised in the child by plan.enter: no process
            raise _PlanRefused(str(exc)) from None

    def wait_child(self, child: _Child, reaped: Optional[Callable[[int, int], None]] = None
                   ) -> Tuple[Optional[int], Optional[int]]:
        """Block until the child exits, reaping adopted orphans on the way; (code, signum).
        reaped(pid, status) hears of every other process reaped meanwhile (sinks among them)."""
        while True:
            try:
                pid, status = self._reap_next(child)
            except ChildProcessError:
                return None, None
            if pid != child.pid:
                if reaped is not None:
                    reaped(pid, status)
                continue
            if child.popen is not None:
                child.popen.returncode = status  # keeps Popen from waiting on it again
            if os.WIFSIGNALED(status):
                return None, os.WTERMSIG(status)
            return os.WEXITSTATUS(status), None

    def _reap_next(self, child: _Child) -> Tuple[int, int]:
        """Reap the next child to exit.  On Linux it is first waited for without
        reaping (WNOWAIT), so that the reap itself happens under child.guard."""
        if not _LINUX:
            return os.waitpid(-1, 0)
        pid = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOWAIT).si_pid
        with child.guard:
            pid, status = os.waitpid(pid, 0)
            child.reaped = child.reaped or pid == child.pid
        return pid, status

    reaps_every_child = True  # wait_child reaps any child of the supervisor, not only the job's

    def signal_child_group(self, child: _Child, signum: int) -> int:
        """From the supervisor: signal the job's main process and its process group
        while the child is not reaped, so neither id can have been reused (this
        needs no /proc).  1 when signalled, 0 once the child is gone."""
        with child.guard:
            if child.reaped:
                return 0
            try:
                if os.getpgid(child.pid) != child.pid:  # it left its own group: reach it by its pid too
                    os.kill(child.pid, signum)
                # The group it leads (or led): it and what it started.  Only the
                # process with that pid can make a group of that id, and it is ours.
                os.killpg(child.pid, signum)
            except ProcessLookupError:  # exited, or its old group is empty: nothing more to stop
                pass
            except PermissionError:  # it made itself another user's (setuid): not ours to stop
                return 0
            return 1

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

    def let_go_of_child(self, child: _Child) -> None:
        return None  # nothing held: a cgroup is found again by its path

    # -- identity and trees ---------------------------------------------------

    # Linux finds a finished job's leftovers again through the environment
    # marker; macOS cannot read other processes' environments, so the
    # supervisor writes them down when the main process exits.
    records_leftovers = not _LINUX

    @functools.lru_cache(maxsize=None)
    def can_verify_pids(self) -> bool:
        """A pid can be tied to one process (its start time); without /proc it cannot."""
        return not _LINUX or os.path.exists("/proc/self/stat")

    def signal_numbers(self) -> Dict[str, int]:
        return {n: int(getattr(_signal, "SIG" + n)) for n in _SIGNAL_NAMES if hasattr(_signal, "SIG" + n)}

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
        try:
            names = os.listdir("/proc")
        except OSError:  # no /proc at all: no process can be found (capabilities() says so)
            names = []
        for name in names:
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

    # -- containment and limits -----------------------------------------------

    def limit_counters(self, child: _Child) -> Dict[str, float]:
        """What counts towards each limit a cgroup enforces: OOM kills (memory_max),
        refused forks (max_processes), CPU seconds used (cpu_time_s)."""
        return _containment_counters(child.containment)

    # A job ended by a limit dies of a signal here (OOM kill, SIGXCPU, our KILL).
    limit_exit_code = None

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

    def remove_forsaken_containment(self, min_age_s: float) -> int:
        """Remove the empty job cgroups nobody else will: a job deleted while its
        daemons lived keeps its cgroup for them (kill finds them there), and
        when the last of them ends no supervisor is left to remove it; nor is
        there one for a supervisor killed before its job's end.  Any job's of
        any root: an empty one holds nothing, and a run makes its own afresh.
        Only one unchanged for min_age_s: a supervisor makes a run's cgroup a
        moment before the child enters it.  How many were removed."""
        removed = 0
        homes = [_cgroup_home(c) for c in ("", "memory", "pids", "cpuacct")] if _LINUX else []
        for parent in {os.path.join(home, _CGROUP_PARENT) for home in homes if home}:
            try:
                names = os.listdir(parent)
            except OSError:  # none made here yet
                continue
            for name in names:
                path = os.path.join(parent, name)
                try:
                    old = time.time() - os.stat(path).st_mtime >= min_age_s
                except OSError:
                    continue
                if old and os.path.isdir(path) and _is_job_cgroup(path, name) and not _cgroup_tree_pids(path):
                    removed += _remove_cgroup_tree(path)
        return removed

    def _signal_verified(self, proc: _Proc, signum: int) -> bool:
        """Signal proc only if its start time still matches (a recycled pid is never hit).

        With a pidfd (Linux, Python 3.9+) the check and the signal refer to the
        same process, so there is no window for reuse at all.
        """
        pidfd = None
        if hasattr(os, "pidfd_open"):
            try:
                pidfd = os.pidfd_open(proc.pid)  # novm (guarded by hasattr above)
            except ProcessLookupError:
                return False
            except OSError:  # refused (seccomp: ENOSYS, EPERM) or unsupported: check, then kill by pid
                pidfd = None
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

    # -- what this machine gives ----------------------------------------------

    @functools.lru_cache(maxsize=None)
    def missing_facilities(self) -> List[dict]:
        """The optional facilities this process lacks, each with what it costs (probed once)."""
        missing = [_missing(*self._prctl()[1])] if self._prctl()[1] else []
        refused = self._prctl()[0] is not None and self._subreaper_refusal()
        if refused:
            missing.append(_missing("prctl", "prctl(PR_GET_CHILD_SUBREAPER): %s" % os.strerror(refused)))
        if not self.can_verify_pids():
            missing.append(_missing("proc", "/proc is not mounted (no /proc/self/stat)"))
        problem = self._pidfd_problem()
        if problem:
            missing.append(_missing("pidfd", problem))
        problem = self._pipe_size_problem()
        if problem:
            missing.append(_missing("pipe_size", problem))
        problem = self._clone3()[1]
        if problem and "cgroup" in _cgroup_enforcers():
            missing.append(_missing("clone3", problem))
        missing += _missing_file_facilities(self.cache_dir())
        return missing

    def _subreaper_refusal(self) -> int:
        """The errno prctl answers, 0 if it works.  PR_GET_CHILD_SUBREAPER changes
        nothing; a seccomp profile refusing prctl refuses it as it would the SET."""
        import ctypes
        value = ctypes.c_int()
        return 0 if self._prctl()[0](37, ctypes.addressof(value), 0, 0, 0) == 0 else ctypes.get_errno()

    def _pidfd_problem(self) -> Optional[str]:
        if not _LINUX:
            return None  # other POSIX systems have no pidfd to miss
        if not hasattr(os, "pidfd_open"):
            return "Python %d.%d has no os.pidfd_open (3.9+)" % sys.version_info[:2]
        try:
            os.close(os.pidfd_open(os.getpid()))  # novm (guarded by hasattr above)
        except OSError as exc:
            return "pidfd_open: %s" % (exc.strerror or exc)
        return None

    def _pipe_size_problem(self) -> Optional[str]:
        if not _LINUX:
            return None
        import fcntl
        r, w = os.pipe()
        try:
            fcntl.fcntl(r, 1031, 1 << 20)
            return None
        except OSError as exc:
            return "F_SETPIPE_SZ: %s" % (exc.strerror or exc)
        finally:
            os.close(r)
            os.close(w)

    def capabilities(self) -> dict:
        """What this machine gives jobstate: how trees are contained, found and
        signalled, how a pid is identified, and what each missing piece costs."""
        missing = self.missing_facilities()
        lost = {m["facility"] for m in missing}
        proc = self._proc_kind() if _LINUX else None
        if not _LINUX:
            discovery, identity = ["process-group", "descendants", "recorded-leftovers"], "ps-start-time"
        elif proc == "absent":
            discovery, identity = ["process-group"], "none"
        else:
            discovery, identity = ["process-group", "descendants", "env-marker"], "proc-start-time"
            if not lost & {"ctypes", "prctl"}:
                discovery.insert(2, "subreaper")
        delivery = ("supervisor" if identity == "none"
                    else "verified-kill" if "pidfd" in lost or not _LINUX else "pidfd")
        cgroups = _cgroup_enforcers()
        if "cgroup" in cgroups:  # a job's tree is held, and found, by its own cgroup v2
            discovery.insert(0, "cgroup")
        return _capability_report(containment="cgroup" if "cgroup" in cgroups else "process-group",
                                  tree_discovery=discovery, pid_identity=identity, signal_delivery=delivery,
                                  proc=proc, limits=cgroups + self._limits(), missing=missing,
                                  dies_with_launcher=self.dies_with_launcher())

    def _proc_kind(self) -> str:
        """'absent', 'hidepid' (other users' processes hidden) or 'full'."""
        if not self.can_verify_pids():
            return "absent"
        for mount in self.mounts():
            if mount["mount_point"] == "/proc" and re.search(r"(^|,)hidepid=(?!0|off)", mount["options"]):
                return "hidepid"
        return "full"

    @staticmethod
    def _limits() -> List[str]:
        try:
            import resource  # noqa: F401  (only whether it exists)
        except ImportError:
            return []
        return ["rlimit"]


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


class _WindowsProcessLayer(_ProcessLayer):
    """Process control on Windows: Job Objects first, Toolhelp32 walks as the fallback."""

    def __init__(self, kernel32=None):
        self._k32_loaded = kernel32      # None: load the real one on first use

    @property
    def _k32(self):
        if self._k32_loaded is None:
            self._k32_loaded = _kernel32()
        return self._k32_loaded

    # -- where things live ----------------------------------------------------

    def default_root(self) -> str:
        return os.path.join(self._local_app_data(), "jobstate", "jobs")

    def cache_dir(self) -> str:
        return os.path.join(self._local_app_data(), "jobstate", "cache")

    @staticmethod
    def _local_app_data() -> str:
        return os.environ.get("LOCALAPPDATA") or os.path.join(os.path.expanduser("~"), "AppData", "Local")

    def unsafe_dir_reason(self, path: str) -> Optional[str]:
        return None  # %LOCALAPPDATA% is per user; ACLs are not checked

    # -- files and locks ------------------------------------------------------

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

    def share_lock(self, fd: int) -> bool:
        # A shared lock cannot overlap an exclusive one, even of the same handle: unlock first.
        self.unlock(fd)
        return self.lock(fd, exclusive=False, blocking=False)

    lock_kind = "LockFileEx"

    def lock_problem(self, directory: str) -> Optional[str]:
        return None  # LockFileEx is enforced by the server on SMB shares too

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

    def fsync_dir(self, path: str) -> None:
        return None  # NTFS renames are journaled; directories cannot be fsynced

    def mounts(self) -> List[dict]:
        return []  # no mount table to read: a root's filesystem type is not checked

    def filesystem_of(self, path: str) -> Optional[dict]:
        return None

    # -- supervisor -----------------------------------------------------------

    # The launcher cannot hand its LockFileEx lock to the supervisor, so the
    # supervisor takes the job lock itself.
    hands_over_lock = False

    has_forkserver = False  # no fork: every supervisor is a new process

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

    def release_supervisor(self, popen: subprocess.Popen) -> None:
        return None  # no zombies on Windows; the handle closes with the Popen object

    def prepare_supervisor(self) -> None:
        # Nothing to do: detachment happened at creation (spawn_supervisor), and
        # Windows has no SIGHUP/SIGINT to ignore in a console-less process.
        return None

    def supervisor_signals(self) -> None:
        return None  # no signal dispositions or masks to pass on to the child

    def can_fork_supervisor(self) -> bool:
        return False  # no fork: the supervisor is always a new process

    def fork_supervisor(self, body, *, stdout: int, stderr: int, reaper: bool = False) -> None:
        raise OSError("Windows has no fork: spawn_supervisor starts every supervisor")

    def exec_keeping(self, argv, fds) -> NoReturn:
        raise OSError("Windows cannot hand descriptors across an exec: the supervisor is never exec'd there")

    def warm_up(self) -> None:
        return None  # no forkserver to warm

    def dies_with_launcher(self) -> bool:
        return False  # no PID namespaces; the supervisor broke away from the launcher's job

    # -- child ----------------------------------------------------------------

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
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL if stdin is None else stdin, stdout=stdout,
                stderr=stderr,
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

    def wait_child(self, child, reaped=None) -> Tuple[Optional[int], Optional[int]]:
        # Windows has no signals; the code is the unsigned DWORD from Popen.
        # Only the child is waited for: other processes (sinks) are never reaped here.
        return child.popen.wait(), None

    reaps_every_child = False

    def signal_child_group(self, child, signum: int) -> int:
        raise OSError("Windows verifies every process through its handle: the supervisor never signals for others")

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

    def let_go_of_child(self, child: _Child) -> None:
        """Close our handle on the job's Job Object before the job lock goes: a
        restart's supervisor, which may start the moment it is free, must be able
        to create the job's name afresh (our open handle would keep the old one)."""
        job, child.handle = child.handle, None
        self._close(job)

    # -- identity and trees ---------------------------------------------------

    # Once the supervisor, the only holder of a handle to the job object, has
    # exited, the job's name cannot be relied on to open it (Wine 8 keeps it while
    # processes remain in the job; Windows need not), so the supervisor writes
    # down what is still running when the main process exits.
    records_leftovers = True

    def can_verify_pids(self) -> bool:
        return True  # OpenProcess and the creation time, through kernel32

    _NO_CTYPES_COSTS = ("no job can be started or stopped: Job Objects, process identities and locks all "
                        "go through kernel32, which jobstate reaches through ctypes")

    def signal_numbers(self) -> Dict[str, int]:
        # Windows has no signals; each of these ends the tree the same way.
        return {"TERM": 15, "INT": 2, "KILL": 9}

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

    # -- containment and limits -----------------------------------------------

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

    # What Windows ends every process of a job with when its CPU time is up.
    limit_exit_code = _WIN_ERROR_NOT_ENOUGH_QUOTA

    def unrecorded_cgroups(self, job_id: str) -> List[str]:
        return []

    def remove_containment(self, ref: _TreeRef) -> bool:
        return True  # a Job Object goes with its last handle and process

    def remove_forsaken_containment(self, min_age_s: float) -> int:
        return 0  # nothing is left behind to remove

    # -- what this machine gives ----------------------------------------------

    @functools.lru_cache(maxsize=None)
    def missing_facilities(self) -> List[dict]:
        missing = []
        try:
            import ctypes  # noqa: F401  (only whether it exists)
        except ImportError as exc:
            missing.append(_missing("ctypes", "%s: %s" % (type(exc).__name__, exc), self._NO_CTYPES_COSTS))
        return missing + _missing_file_facilities(self.cache_dir())

    def capabilities(self) -> dict:
        return _capability_report(containment="job-object", tree_discovery=["job-object", "toolhelp-walk"],
                                  pid_identity="creation-time", signal_delivery="job-object", proc=None,
                                  limits=["job-object"], missing=self.missing_facilities(),
                                  dies_with_launcher=False)


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


_JOB_ID_GUARD = threading.Lock()
_last_job_id = 0


def new_job_id() -> str:
    """A new job id: 32 hex digits in the UUIDv7 layout, so ids sort by creation time.

    Within one millisecond the ids one process makes count up from the first
    (RFC 9562's monotonic random bits): a job's `after` names only older ids,
    and those must sort before its own.  (The count reaches the variant bits
    only from a random part of 2**62 - 1: never in practice.)
    """
    global _last_job_id
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a, rand_b = (rand >> 62) & 0xFFF, rand & ((1 << 62) - 1)
    value = ms << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    with _JOB_ID_GUARD:
        if value <= _last_job_id:  # the same millisecond as the last id (or the clock went back)
            value = _last_job_id + 1
        _last_job_id = value
    return "%032x" % value


def _is_job_id(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def _normalize_job_ref(ref) -> str:
    """Validate a job id or prefix before it touches the filesystem."""
    if (not isinstance(ref, str) or not 1 <= len(ref) <= 32
            or not all(c in "0123456789abcdefABCDEF" for c in ref)):
        raise InvalidJobIdError(str(ref))
    return ref.lower()


def resolve_root(root: Optional[str] = None) -> str:
    """The jobs root: `root` > $JOBSTATE_ROOT > $XDG_DATA_HOME/jobstate/jobs > platform default."""
    root = _path_argument(root, "root")
    if root == "":  # a variable that expanded to nothing: not a reason to use another root
        raise InvalidArgumentError("the root is an empty path",
                                   hint="give a directory, or leave the root out to use $JOBSTATE_ROOT or the default")
    if root:
        return _abspath(os.path.expanduser(root))
    if os.environ.get("JOBSTATE_ROOT"):
        return _abspath(os.path.expanduser(os.environ["JOBSTATE_ROOT"]))
    if os.environ.get("XDG_DATA_HOME"):
        return os.path.join(_abspath(os.environ["XDG_DATA_HOME"]), "jobstate", "jobs")
    return _process_layer.default_root()


def _path_argument(value, name: str) -> Optional[str]:
    """A path from a caller: a str or any os.PathLike (None stays None)."""
    if value is None or isinstance(value, str):
        return value
    try:
        path = os.fspath(value)
    except TypeError:
        path = None
    if not isinstance(path, str):
        raise InvalidArgumentError("%s must be a path (a string or os.PathLike), not %r" % (name, value),
                                   hint="a directory such as '/srv/app' or pathlib.Path('/srv/app')")
    return path


def _count_argument(value, name: str) -> Optional[int]:
    """A whole number from 0 given to the API (None stays None), as the CLI takes one."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise InvalidArgumentError("%s: %r is not a non-negative integer" % (name, value),
                                   hint="a whole number from 0 (an int), or None for no limit")
    return value


def _strings_argument(value, name: str) -> List[str]:
    """A list of strings given to the API; one string is a list of one
    (tags='web' is the tag 'web', not the tags 'w', 'e' and 'b')."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (bytes, dict)) or not hasattr(value, "__iter__"):
        raise InvalidArgumentError("%s must be a list of strings, not %r" % (name, value),
                                   hint="%s=['a', 'b'] (one string is one item)" % name)
    return list(value)


def _abspath(path: str) -> str:
    """os.path.abspath, with a clear error for a NUL byte or a deleted current directory."""
    if "\0" in path:
        raise InvalidArgumentError("invalid path %r: it holds a NUL byte" % (path,))
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
        self.kill_fifo, self.kill_ack = d + "kill.fifo", d + "kill_ack.json"
        self.output_events = d + "notification_events.ndjson"
        self.reserve = d + "space.reserve"
        self.bell = d + "bell"  # a FIFO its supervisor reads while it has no child (see _Bell)


def _duration_seconds(text: str) -> float:
    """Seconds, signed, from '90', '1.5', '250ms', '90s', '5m', '2h', '7d'; ValueError otherwise."""
    match = re.fullmatch(r"\s*([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms|s|m|h|d)?\s*", text)
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
        if not isinstance(tag, str) or not re.match(_TAG_RE, tag):
            raise InvalidTagError("invalid tag %r" % (tag,),
                                  hint="tags are dot-separated segments of letters, digits and '-'")
        if tag not in out:
            out.append(tag)
    return out


def _validate_queue_name(name) -> str:
    """A name for a new queue.  Queue q keeps q.json, q.lock and q/ side by side,
    so a name ending in .json or .lock (any case: macOS and Windows fold it) would
    take another queue's file, and Windows drops a trailing dot.  Jobs queued
    under such a name before it was refused keep their queue (specs are not
    checked again)."""
    if (not isinstance(name, str) or not re.match(_QUEUE_NAME_RE, name)
            or name.lower().endswith((".json", ".lock", "."))):
        raise InvalidArgumentError("invalid queue name %r" % (name,),
                                   hint="1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit,"
                                        " not ending in '.json', '.lock' or '.' (the queue's own files)")
    return name


def _tag_matches(pattern: str, tags: Sequence[str]) -> bool:
    """`a.b` matches exactly; `a.*` matches `a` and anything under `a.`."""
    if pattern.endswith(".*"):
        base = pattern[:-2]
        return any(t == base or t.startswith(base + ".") for t in tags)
    return pattern in tags


def _validate_tag_filter(pattern: str) -> str:
    body = pattern[:-2] if pattern.endswith(".*") else pattern
    if not re.match(_TAG_RE, body):
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
            raise InvalidArgumentError("--env %r is not KEY=VALUE" % (pair,),
                                       hint="--env NAME=VALUE, with a non-empty NAME (VALUE may be empty)")
        env[key] = value
    return env


# Output lines are searched with the user's regular expressions (wait --match,
# run --ready, --output-pattern), and Python's re backtracks holding the GIL,
# uninterruptibly: one line could stall a supervisor (its timeout and kills),
# the HTTP server or the MCP server for hours.  So _compile_line_pattern
# refuses a pattern whose search can take exponential time (a repeat of a part
# that matches texts of several lengths, or of an alternation whose branches
# match the same text), and caps the text one search sees by the pattern's
# degree: the longest chain of unbounded repeats that can take the same
# characters one after the other (a*a*b: 2; a search costs up to n**(degree+1)).
_REPEAT_UNBOUNDED = 4  # a repeat allowing more than this counts as unbounded
_MATCH_CHARS_BY_DEGREE = (None, 8192, 512)  # degree 3 and more is refused
_ANY_CHAR = ((0, 0x10FFFF),)
# The characters of \d, \w and \s (Unicode): \s exactly (str.isspace), \d and \w
# as every character beyond ASCII that is not a space (a superset).
_SPACE_CHARS = ((0x09, 0x0D), (0x1C, 0x20), (0x85, 0x85), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A),
                (0x2028, 0x2029), (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))
_NON_ASCII_NON_SPACE = ((0x80, 0x84), (0x86, 0x9F), (0xA1, 0x167F), (0x1681, 0x1FFF), (0x200B, 0x2027),
                        (0x202A, 0x202E), (0x2030, 0x205E), (0x2060, 0x2FFF), (0x3001, 0x10FFFF))
_CATEGORY_CHARS = {"CATEGORY_DIGIT": ((0x30, 0x39),) + _NON_ASCII_NON_SPACE,
                   "CATEGORY_WORD": ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)) + _NON_ASCII_NON_SPACE,
                   "CATEGORY_SPACE": _SPACE_CHARS}


class _LinePattern:
    """A compiled output-line pattern whose search sees at most the first
    max_chars of a line (None: all of it, for a pattern without repeats)."""

    def __init__(self, compiled, max_chars: Optional[int]):
        self.compiled, self.pattern, self.max_chars = compiled, compiled.pattern, max_chars

    def search(self, line: str):
        return self.compiled.search(line if self.max_chars is None else line[:self.max_chars])


def _sre_parser():
    try:
        from re import _parser  # 3.11+; sre_parse warns there that it is deprecated
        return _parser
    except ImportError:
        import sre_parse
        return sre_parse


def _chars_overlap(a, b) -> bool:
    return any(lo1 <= hi2 and lo2 <= hi1 for lo1, hi1 in a for lo2, hi2 in b)


class _PatternShape:
    """One walk of a parsed pattern: raises ValueError (why) for a pattern whose
    search can take exponential time, and measures its degree (see above).

    Each node becomes tokens (kind, characters): "one" a character, "opt" a
    part that may match nothing, "rep" an unbounded repeat."""

    def __init__(self, parser, ignorecase: bool):
        self.p, self.ignorecase, self.degree = parser, ignorecase, 0
        self.repeats = (parser.MAX_REPEAT, parser.MIN_REPEAT, getattr(parser, "POSSESSIVE_REPEAT", None))
        self.variable_repeats = 0  # repeats of a variable-length part around the node walked
        self.long_repeats = 0  # unbounded repeats around the node walked

    def tokens(self, items) -> list:
        found = [token for op, av in items for token in self.node_tokens(op, av)]
        self.degree = max(self.degree, self.chain_length(found))
        return found

    def node_tokens(self, op, av) -> list:
        p = self.p
        if op in self.repeats:
            return self.repeat_tokens(*av)
        if op is p.SUBPATTERN:
            return self.tokens(av[-1])
        if op is getattr(p, "ATOMIC_GROUP", None):
            return self.tokens(av)
        if op in (p.ASSERT, p.ASSERT_NOT):
            self.tokens(av[1])
            return []
        if op is p.BRANCH:
            return self.branch_tokens(av[1])
        if op is p.GROUPREF_EXISTS:
            return self.branch_tokens([av[1], av[2] or []])
        if op is p.AT:
            return []
        if op is p.GROUPREF:  # as long as its group: (a*)\1b is a*a*b
            return [("rep", _ANY_CHAR)]
        return [("one", self.node_chars(op, av))]

    def repeat_tokens(self, low, high, body) -> list:
        lo, hi = body.getwidth()
        variable = lo != hi and high > 1
        if variable and (high > _REPEAT_UNBOUNDED or self.variable_repeats):
            raise ValueError("it repeats a part that can match texts of different lengths "
                             "(like (a+)+, (a|aa)* or (a?a)*), which can take exponential time")
        long = high > _REPEAT_UNBOUNDED
        self.variable_repeats += variable
        self.long_repeats += long
        try:
            inner = self.tokens(body)
        finally:
            self.variable_repeats -= variable
            self.long_repeats -= long
        chars = tuple(r for _, token_chars in inner for r in token_chars)
        if variable and any(kind == "rep" for kind, _ in inner):
            raise ValueError("it repeats a part that holds an unbounded repeat (like (.{0,30}){3}), "
                             "which can take time n**k")
        if long or any(kind == "rep" for kind, _ in inner):
            required = [("one", chars)] if low > 0 and lo > 0 else []  # a+ is a a*: what it must take
            return required + [("rep", chars)]
        return [("opt" if low == 0 or lo == 0 else "one", chars)]

    def branch_tokens(self, branches) -> list:
        walked = [self.tokens(branch) for branch in branches]
        if self.long_repeats:
            for i, first in enumerate(walked):
                if any(self.may_match_alike(first, other) for other in walked[i + 1:]):
                    raise ValueError("it repeats an alternation whose branches can match the same text "
                                     "(like (a|a)* or (\\w|\\d)+), which can take exponential time")
        chars = tuple(r for tokens in walked for _, token_chars in tokens for r in token_chars)
        if any(kind == "rep" for tokens in walked for kind, _ in tokens):
            return [("rep", chars)]
        return [("opt" if any(kind != "one" for tokens in walked for kind, _ in tokens) or not all(walked)
                 else "one", chars)]

    @staticmethod
    def may_match_alike(a, b) -> bool:
        """False only for two runs of single characters that differ at one position."""
        if len(a) != len(b) or any(kind != "one" for kind, _ in a + b):
            return True
        return all(_chars_overlap(x, y) for (_, x), (_, y) in zip(a, b))

    def node_chars(self, op, av):
        """The characters one single-character node can match (a superset), as ranges."""
        p = self.p
        if op in (p.LITERAL, p.NOT_LITERAL):
            ranges = ((av, av),)
        elif op is p.IN:
            ranges = ()
            for item_op, item in av:
                if item_op is p.LITERAL:
                    ranges += ((item, item),)
                elif item_op is p.RANGE:
                    ranges += (tuple(item),)
                elif item_op is p.CATEGORY and str(item) in _CATEGORY_CHARS and av[0][0] is not p.NEGATE:
                    ranges += _CATEGORY_CHARS[str(item)]  # a superset: its complement would not be
                elif item_op is not p.NEGATE:
                    return _ANY_CHAR
        else:
            return _ANY_CHAR
        if op is p.NOT_LITERAL or op is p.IN and av[0][0] is p.NEGATE:
            return self.complement(ranges)
        if self.ignorecase and _chars_overlap(ranges, ((0x41, 0x7A),)):  # both cases, and the Kelvin sign
            ranges += ((0x41, 0x7A), (0x80, 0x10FFFF))
        return ranges

    @staticmethod
    def complement(ranges):
        """All characters outside ranges (a superset of what [^...] matches under IGNORECASE)."""
        gaps, start = [], 0
        for lo, hi in sorted(ranges):
            if lo > start:
                gaps.append((start, lo - 1))
            start = max(start, hi + 1)
        return tuple(gaps) + (((start, 0x10FFFF),) if start <= 0x10FFFF else ())

    @staticmethod
    def chain_length(tokens) -> int:
        """The longest chain of "rep" tokens each of which can go on taking
        the characters of the one before (what lies between may too)."""
        chain = [1 if kind == "rep" else 0 for kind, _ in tokens]
        for i, (kind, chars) in enumerate(tokens):
            if kind != "rep":
                continue
            for j in range(i + 1, len(tokens)):
                next_kind, next_chars = tokens[j]
                overlaps = _chars_overlap(chars, next_chars)
                if next_kind == "rep" and overlaps:
                    chain[j] = max(chain[j], chain[i] + 1)
                elif next_kind == "one" and not overlaps:
                    break
        return max(chain, default=0)


def _pattern_degree(compiled) -> int:
    """The degree of a compiled pattern (see above); ValueError for one refused."""
    parser = _sre_parser()
    try:
        shape = _PatternShape(parser, bool(compiled.flags & re.IGNORECASE))
        shape.tokens(parser.parse(compiled.pattern, compiled.flags))
    except RecursionError:
        raise ValueError("it nests too deeply to be checked") from None
    if shape.degree >= len(_MATCH_CHARS_BY_DEGREE):
        raise ValueError("it has %d unbounded repeats in a row that can take the same characters (like a*a*a*b), "
                         "whose search can take time n**%d on a line of n characters"
                         % (shape.degree, shape.degree + 1))
    return shape.degree


def _compile_line_pattern(pattern, name: str) -> _LinePattern:
    """A regular expression (Python re, a string or compiled) checked and
    compiled (see _PatternShape); InvalidArgumentError naming the option."""
    if isinstance(pattern, _LinePattern):
        return pattern
    if isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
        compiled, pattern = pattern, pattern.pattern
    elif not isinstance(pattern, str):
        raise InvalidArgumentError("%s must be a regular expression (a string), not %r" % (name, pattern))
    else:
        try:
            compiled = re.compile(pattern)
        except (re.error, OverflowError, RecursionError) as exc:
            raise InvalidArgumentError("%s: %r is not a valid regular expression: %s" % (name, pattern[:200], exc),
                                       hint=r"Python re syntax, searched in each line: 'listening on port \d+'") from None
    try:
        degree = _pattern_degree(compiled)
    except ValueError as exc:
        raise InvalidArgumentError("%s: %r is refused: %s" % (name, pattern[:200], exc),
                                   hint="repeat single characters or fixed-length parts, and separate repeats "
                                        r"with text they cannot take: '(\w+\s)*' -> '[\w\s]*', "
                                        r"'(a|aa)+' -> 'a+', '.*=.*=.*' -> '[^=]*=[^=]*=.*'") from None
    return _LinePattern(compiled, _MATCH_CHARS_BY_DEGREE[degree])


def _output_search(pattern, match_type, name: str = "--output-pattern"):
    """The compiled search of an output-match pattern: a literal for contains, Python re for regex."""
    if match_type not in _MATCH_TYPES:
        raise InvalidArgumentError("--output-match-type: %r is not a match type" % (match_type,),
                                   hint="contains (a literal, the default) or regex")
    if match_type == "contains":
        if not isinstance(pattern, str):
            raise InvalidArgumentError("%s must be a string, not %r" % (name, pattern))
        return re.compile(re.escape(pattern))
    return _compile_line_pattern(pattern, name)


def _check_stream(stream, name: str) -> str:
    if stream not in _STREAM_CHOICES:
        raise InvalidArgumentError("%s: %r is not a stream" % (name, stream),
                                   hint="one of: " + ", ".join(_STREAM_CHOICES))
    return stream


class _LineSplitter:
    """Cuts a byte stream into lines at b"\n", holding only its unfinished last line.

    feed() and finish() return blocks (offset in the stream, bytes of whole
    lines, each ending in b"\n").  A line longer than _MAX_LINE_BYTES comes
    as its first _MAX_LINE_BYTES (plus b"\n"), and the rest of it is skipped.
    """

    def __init__(self):
        self.offset = 0  # stream offset of the next byte to be fed
        self.partial = bytearray()  # bytearray: a long line fed in small pieces grows without copies
        self.partial_start = 0
        self.skipping = False  # inside the rest of a line cut at the cap

    def feed(self, data: bytes) -> List[Tuple[int, bytes]]:
        start = self.offset
        self.offset += len(data)
        if self.skipping:
            cut = data.find(b"\n")
            if cut < 0:
                return []
            self.skipping = False
            data, start = data[cut + 1:], start + cut + 1
        last = data.rfind(b"\n")
        if last < 0:
            if not self.partial:
                self.partial_start = start
            self.partial += data
            return self._cut_overlong()
        blocks = []
        first = 0
        if self.partial:
            first = data.find(b"\n") + 1
            line = bytes(self.partial) + data[:first - 1]
            blocks.append((self.partial_start, line[:_MAX_LINE_BYTES] + b"\n"))
        if first <= last:
            blocks.append((start + first, data[first:last + 1]))
        self.partial, self.partial_start = bytearray(data[last + 1:]), start + last + 1
        return blocks + self._cut_overlong()

    def finish(self) -> List[Tuple[int, bytes]]:
        """The unfinished last line as a line (the stream has ended)."""
        if not self.partial:
            return []
        block = (self.partial_start, bytes(self.partial) + b"\n")
        self.partial = bytearray()
        return [block]

    def _cut_overlong(self) -> List[Tuple[int, bytes]]:
        if len(self.partial) <= _MAX_LINE_BYTES:
            return []
        block = (self.partial_start, bytes(self.partial[:_MAX_LINE_BYTES]) + b"\n")
        self.partial, self.skipping = bytearray(), True
        return [block]


def _matching_lines(pattern, block: Tuple[int, bytes], first_only: bool = False) -> List[Tuple[int, str]]:
    """(offset, line) of each line of a _LineSplitter block in which the pattern
    finds something.  Lines are decoded as UTF-8 (invalid bytes replaced) and
    lose their ending (\n or \r\n).  The block is decoded and split once; each
    line costs one search."""
    offset, data = block
    lines = data.decode("utf-8", "replace").replace("\r\n", "\n").split("\n")
    lines.pop()  # after the final newline
    search = pattern.search
    if first_only:
        hits = [next((i for i, line in enumerate(lines) if search(line)), -1)]
        hits = [i for i in hits if i >= 0]
    else:
        hits = [i for i, line in enumerate(lines) if search(line)]
    # One "\n" per line on both sides of the decoding, so line i starts after the i-th b"\n".
    return [(offset + len(data) - len(data.split(b"\n", i)[-1]), lines[i]) for i in hits]

# ---------------------------------------------------------------------------
# 5. Store: atomic files, locks, job directories
# ---------------------------------------------------------------------------


def _write_json_atomic(path: str, doc: dict) -> None:
    """Write a JSON file so that readers see the old or the new content, never a mix.

    _replace_file, then fsync of the directory.  ensure_ascii keeps argv bytes
    that are not UTF-8 (surrogate escapes) round-trippable.
    """
    _replace_file(path, _file_json_bytes(doc))
    _process_layer.fsync_dir(os.path.dirname(path))


def _replace_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Put a file holding data in path's place: a temp file in the same directory,
    written and fsync'd, then renamed over it (a symlink there is replaced, never
    written through)."""
    tmp = "%s.%d.%s.tmp" % (path, os.getpid(), os.urandom(4).hex())
    try:
        _write_new_file(tmp, data, mode)
        _process_layer.replace(tmp, path)
    except BaseException:  # clean up the temp file whatever stopped us, then re-raise
        _unlink_quietly(tmp)
        raise


def _file_json_bytes(doc: dict) -> bytes:
    """A job file's JSON: ASCII, so argv bytes that are not UTF-8 (surrogate escapes) round-trip."""
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _write_new_file(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create path (it must not exist), write data and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _FILE_FLAGS, mode)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


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
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):  # not ENOSPC: that is real
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
        return _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _unreadable(path, exc) from None


def _read_job_document(paths: JobPaths, path: str, parse):
    """parse() of one of the job's JSON files: JobNotFoundError when the job is
    gone, StateFileError when the file is missing, unreadable or malformed."""
    try:
        return parse(_read_json(path))
    except FileNotFoundError:
        if not os.path.isdir(paths.dir):
            raise JobNotFoundError(paths.job_id, paths.root) from None
        raise StateFileError(path, "missing") from None
    except OSError as exc:
        raise _unreadable(path, exc) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(path, str(exc)) from None


def _read_state(paths: JobPaths) -> JobState:
    """Parse state.json; StateFileError when it is missing or corrupt."""
    state = _read_job_document(paths, paths.state, JobState.from_dict)
    if state.job_id != paths.job_id:
        raise StateFileError(paths.state, "it names job %s" % state.job_id)
    return state


def _write_state(paths: JobPaths, state: JobState) -> None:
    state.updated_at = _utc_now()
    _write_json_atomic(paths.state, state.to_dict())


def _read_spec(paths: JobPaths) -> JobSpec:
    """Parse meta.json; StateFileError when it is missing or corrupt."""
    return _read_job_document(paths, paths.meta, JobSpec.from_dict)


def _ensure_root(root: str) -> None:
    """Create the root (0700) and refuse one that another user could tamper with."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise JobIOError("cannot create the jobs root %s: %s" % (root, exc.strerror),
                         hint="pass --root or set JOBSTATE_ROOT to a writable directory") from None
    _refuse_unsafe_root(root)


def _refuse_unsafe_root(root: str) -> None:
    """Refuse a root that another user could tamper with, before anything in it is
    read or acted on: they could plant a definition for us to run, or a state that
    names their victim for us to kill.  Every entry passes here once per operation
    (_ensure_root, Job(), _list_job_ids), never cached: a root can be opened up later.
    A missing root holds no jobs; one we cannot stat fails where it is used."""
    try:
        problem = _process_layer.unsafe_dir_reason(root)
    except OSError:
        return
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
    _refuse_unsafe_root(root)
    try:
        with os.scandir(root) as entries:
            names = [e.name for e in entries if _is_job_id(e.name) and e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise JobIOError("cannot read the jobs root %s: %s" % (root, exc.strerror),
                         hint="the root must be a directory (--root DIR or $JOBSTATE_ROOT)") from None
    return sorted(names, reverse=True)


def _is_real_dir(path: str) -> bool:
    import stat
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


# Where the verdict on a root's locks is remembered, keyed by the root's device.
_LOCK_CHECK_FILE = ".lock-check.json"


def _require_trusted_locks(root: str) -> None:
    """Refuse a root whose file locks cannot be trusted: every proof jobstate
    draws from its locks (a supervisor alive, a job not started twice) would lie."""
    verdict = _lock_verdict(root)
    if verdict["trusted"]:
        return
    where = ("a %s filesystem mounted at %s" % (verdict["filesystem"], verdict["mount_point"])
             if verdict["filesystem"] else "a filesystem of unknown type")
    hint = "give a root on a local disk: --root DIR or JOBSTATE_ROOT=DIR (under /tmp or /var/tmp, say)"
    if verdict["network"]:
        hint += "; if no other machine ever uses this root, JOBSTATE_TRUST_LOCKS=1 accepts it"
    raise JobIOError("the jobs root %s is on %s, whose file locks cannot be trusted: %s"
                     % (root, where, verdict["reason"]), hint=hint,
                     details={"root": root, "filesystem": verdict["filesystem"],
                              "mount_point": verdict["mount_point"]})


def _lock_verdict(root: str) -> dict:
    """Whether a lock on the root proves what jobstate needs it to: trusted, the
    reason when not, the filesystem, and whether it is a network one."""
    facts = _lock_facts(root)
    problem, network = facts["problem"], _is_network_filesystem(facts["filesystem"])
    if problem is None and network and os.environ.get("JOBSTATE_TRUST_LOCKS") != "1":
        problem = ("%s is a network filesystem, where a lock excludes only the processes of one machine"
                   % facts["filesystem"])
    return dict(facts, trusted=problem is None, reason=problem, network=network)


@functools.lru_cache(maxsize=64)
def _lock_facts(root: str) -> dict:
    """The root's filesystem and whether flock excludes there: probed once per
    root (or its nearest existing parent), remembered in the root by device."""
    directory = root
    while not os.path.isdir(directory) and os.path.dirname(directory) != directory:
        directory = os.path.dirname(directory)
    try:
        device = os.stat(directory).st_dev
    except OSError:
        device = None
    remembered = _read_json_quietly(os.path.join(root, _LOCK_CHECK_FILE)) if directory == root else None
    if (isinstance(remembered, dict) and remembered.get("device") == device
            and set(remembered) == {"device", "filesystem", "mount_point", "problem"}):
        return {k: v for k, v in remembered.items() if k != "device"}
    mount = _process_layer.filesystem_of(directory) or {}
    facts = {"filesystem": mount.get("fstype"), "mount_point": mount.get("mount_point"),
             "problem": _process_layer.lock_problem(directory)}
    if directory == root and device is not None and facts["problem"] is None:  # a refusal is probed anew
        try:
            _write_json_atomic(os.path.join(root, _LOCK_CHECK_FILE), dict(facts, device=device))
        except OSError:  # a read-only root: the next process probes again, which is cheap
            pass
    return facts


class _LockFile:
    """A lock on a whole file (flock, or LockFileEx on Windows) that dies with its holder.

    Every lock jobstate takes is one of these: the job lock (_JobLock), the
    lock around meta.json's read-modify-write (_meta_lock), auto-gc's, and a
    queue's settings lock, slots and tickets.  Closing the descriptor drops the
    lock, so a crashed holder never leaves it taken.  As a context manager it
    releases on the way out.
    """

    def __init__(self, path: str):
        self.path = path
        self.fd: Optional[int] = None

    @classmethod
    def held(cls, path: str, fd: int) -> "_LockFile":
        """A lock already held through fd (taken earlier, or passed across an exec)."""
        lock = cls(path)
        lock.fd = fd
        return lock

    def acquire(self, *, exclusive: bool = True, blocking: bool = False, create: bool = True) -> bool:
        """Take the lock; False if someone holds it (only when not blocking).
        Without create, FileNotFoundError when the file does not exist.  Only a
        creating caller opens it for writing: flock needs no more than a
        read-only descriptor, so readers work on a read-only root."""
        flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | _FILE_FLAGS
        self.fd = os.open(self.path, flags, 0o600)
        if _process_layer.lock(self.fd, exclusive=exclusive, blocking=blocking):
            return True
        self.release()
        return False

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


class _JobLock(_LockFile):
    """The job's `lock` file: held exclusively by the live supervisor for its whole life.

    Readers take it to prove the supervisor is gone (no pid guessing), and `wait`
    blocks on it to wake the moment the supervisor exits.
    """

    def __init__(self, paths: JobPaths):
        super().__init__(paths.lock)
        self.paths = paths

    @classmethod
    def handed_over(cls, paths: JobPaths, fd: int) -> "_JobLock":
        """The lock a launcher took and passed on to us already held, as fd."""
        lock = cls(paths)
        lock.fd = fd
        return lock

    def acquire(self, *, exclusive: bool = True, blocking: bool = False, create: bool = True) -> bool:
        """Take the lock; False if someone holds it.  With create (to run the job),
        JobNotFoundError when the job was deleted before or while we took it;
        without, a job whose lock file is gone counts as free (True, nothing held)."""
        _require_trusted_locks(self.paths.root)
        try:
            taken = super().acquire(exclusive=exclusive, blocking=blocking, create=create)
        except FileNotFoundError:
            if create:  # only a vanished job directory makes O_CREAT fail so
                raise JobNotFoundError(self.paths.job_id, self.paths.root) from None
            return True  # a job directory without a lock file never had a supervisor: it is free
        except OSError as exc:
            if not create:
                raise
            raise JobIOError("cannot open %s to run the job: %s" % (self.path, exc.strerror or exc),
                             hint="the jobs root must be writable to start jobs") from None
        # A delete renames the job directory away while it holds the lock: a
        # lock file opened just before that is no longer the job's once we get it.
        if taken and create and not os.path.lexists(self.path):
            self.release()
            raise JobNotFoundError(self.paths.job_id, self.paths.root)
        return taken


def _meta_lock(paths: JobPaths) -> _LockFile:
    """Serializes read-modify-write of meta.json (tags) between processes."""
    _require_trusted_locks(paths.root)
    return _LockFile(os.path.join(paths.dir, "meta.lock"))


def _supervisor_alive(state: JobState) -> bool:
    """The recorded supervisor verifiably still runs (pid and start-time token):
    then a free lock only means its lock file was removed, not that it is lost."""
    return (state.supervisor_pid is not None and state.supervisor_token is not None
            and _process_layer.is_alive(_Proc(state.supervisor_pid, state.supervisor_token)))


def _run_may_outlive_supervisor(state: JobState) -> bool:
    """The run's processes may live on with no supervisor to stop them: it was lost,
    or it reads `running` while its lock was free (a lock file removed by hand)."""
    lost = state.error is not None and state.error.stage == "supervisor_lost"
    return state.pid is not None and (lost or _needs_supervisor(state))


def _needs_supervisor(state: JobState) -> bool:
    """Running, or waiting (a queue slot, other jobs): only a live supervisor explains it."""
    return state.status is JobStatus.RUNNING or (state.status is JobStatus.CREATED and state.waiting is not None)


def _reconcile(paths: JobPaths, state: JobState) -> JobState:
    """Turn a `running` (or waiting) state whose supervisor is gone into `failed` (supervisor_lost).

    The supervisor holds the lock for its whole life, so a free lock is proof, unless
    the lock file was removed (by hand): a supervisor that verifiably lives is not lost.
    The re-read under the lock avoids racing a supervisor that just finished.
    """
    if not _needs_supervisor(state):
        return state
    with _JobLock(paths) as lock:
        if not lock.acquire(create=False):
            return state
        state = _read_state(paths)
        if _needs_supervisor(state) and not _supervisor_alive(state):
            state.job.status, state.waiting = JobStatus.FAILED, None
            state.error = Failure("supervisor_lost",
                                  "the supervisor exited without recording the job's end")
            state.finished_at = _utc_now()
            try:
                _write_state(paths, state)
            except OSError as exc:  # a read-only root: tell the truth, and that it is not on disk
                state._warnings.append(_warning("state_not_updated", (
                    "job %s lost its supervisor, but its state.json could not be updated (%s): it is shown "
                    "failed without being recorded") % (paths.job_id, exc.strerror or exc)))
        return state


def _read_state_reconciled(paths: JobPaths) -> JobState:
    return _reconcile(paths, _read_state(paths))


def _write_kill_request(paths: JobPaths, signal_name: Optional[str], **delivery) -> None:
    """Ask for the job's end with signal_name ('SIGTERM'): its supervisor then
    records it `killed`, however the child reacts (see _read_kill_request).
    `delivery` (deliver, request_id) asks the supervisor to send a signal itself,
    where the killer cannot verify pids (see _Supervisor._make_kill_fifo)."""
    _write_json_atomic(paths.kill_request, dict(signal=signal_name, requested_at=_utc_now(), **delivery))


def _read_kill_request(paths: JobPaths) -> Optional[str]:
    """The signal name a killer asked for, if any ('SIGTERM')."""
    request = _read_json_quietly(paths.kill_request)
    value = request.get("signal") if isinstance(request, dict) else None
    return value if isinstance(value, str) else None


def _read_json_quietly(path: str):
    """A small JSON file of ours, or None when it is missing, unreadable or not JSON."""
    try:
        return _read_json(path)
    except (OSError, ValueError):
        return None


def _populate_job_dir(final: JobPaths, staging: str, spec: JobSpec, stdin: Optional[bytes]) -> None:
    """Write meta.json, state.json (created), stdin.bin and the lock file into the staging dir.

    No reader sees the staging dir before _create renames it into the root, so
    the files go straight to their names (no temp file, no rename each): each
    is fsync'd, then the directory once, for all of their entries.
    """
    def at(path):
        return os.path.join(staging, os.path.basename(path))
    if stdin is not None:
        _write_new_file(at(final.stdin), stdin)
    os.close(os.open(at(final.lock), os.O_WRONLY | os.O_CREAT | _FILE_FLAGS, 0o600))
    _write_new_file(at(final.meta), _file_json_bytes(spec.to_dict()))
    state = JobState(JobInfo(final.job_id, JobStatus.CREATED), updated_at=_utc_now())
    _write_new_file(at(final.state), _file_json_bytes(state.to_dict()))
    _process_layer.fsync_dir(staging)


def _held_error(paths: JobPaths, wanted: str) -> InvalidStateError:
    """The error for a job whose lock is held: running, or waiting for its turn."""
    try:
        state = _read_state(paths)
    except JobError:
        state = JobState(JobInfo(paths.job_id, JobStatus.RUNNING))
    if state.status is JobStatus.CREATED and state.waiting:
        return InvalidStateError(paths.job_id, state.status, "it waits for its turn (%s); 'jobstate kill' takes it "
                                 "out of the line" % state.waiting.get("for"))
    if state.status.is_terminal:  # its finished run's descendants still write to its logs
        return InvalidStateError(paths.job_id, state.status, "processes it left still write to its logs: stop "
                                 "them first ('jobstate kill %s')" % paths.job_id)
    return InvalidStateError(paths.job_id, JobStatus.RUNNING, wanted,
                             hint="'jobstate kill %s' stops it; 'jobstate wait %s' waits for its end"
                                  % (paths.job_id, paths.job_id))


def _delete_job(paths: JobPaths) -> None:
    """Remove a job directory that no supervisor holds (never through a symlink).

    The directory is first renamed out of the way, so the job disappears at
    once for every reader instead of going through half-deleted states.
    """
    if not _is_real_dir(paths.dir):
        raise JobNotFoundError(paths.job_id, paths.root)
    with _JobLock(paths) as lock:
        if not lock.acquire(create=False):
            raise _held_error(paths, "stop it first ('jobstate kill')")
        try:
            state: Optional[JobState] = _read_state(paths)
        except JobError:  # no state to name its cgroup: nothing of ours to remove
            state = None
        tree = _TreeRef.from_state(state) if state is not None else None
        if state is not None and _run_may_outlive_supervisor(state) and _process_layer.find_tree(tree):
            raise InvalidStateError(paths.job_id, state.status, "its supervisor is gone but processes of its run "
                                    "still live: stop them first ('jobstate kill %s')" % paths.job_id)
        tomb = os.path.join(paths.root, ".deleted-%s-%s" % (paths.job_id, os.urandom(4).hex()))
        try:
            os.rename(paths.dir, tomb)
        except FileNotFoundError:
            raise JobNotFoundError(paths.job_id, paths.root) from None
        except OSError:  # Windows cannot rename a directory holding an open file (our lock)
            tomb = None
        if tree is not None:  # its cgroup, once empty; one with live processes stays for them
            _process_layer.remove_containment(tree)
        if tomb is not None:
            lock.release()
            try:
                _retry_while_busy(lambda: _rmtree(tomb))
            except OSError:  # safe: the job is gone for every reader; gc removes .deleted-* later
                pass
            return
        try:
            _retry_while_busy(lambda: _empty_job_dir(paths))
            lock.release()
            _retry_while_busy(lambda: _rmtree(paths.dir))
        except FileNotFoundError:
            raise JobNotFoundError(paths.job_id, paths.root) from None
        except OSError as exc:
            raise JobIOError("cannot delete %s: %s" % (paths.dir, exc)) from None


def _retry_while_busy(remove: Callable[[], None], attempts: int = 20) -> None:
    """remove(), again for up to a second while another process still holds one
    of the files open (Windows) or has just written one (a racing reader's
    reconcile); the last failure propagates, FileNotFoundError at once."""
    for attempt in range(attempts):
        try:
            return remove()
        except FileNotFoundError:
            raise
        except OSError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05)


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


def _capabilities(root: str) -> dict:
    """The capabilities object: what this machine gives jobstate, and what it gives on this root."""
    report = _process_layer.capabilities()
    report["root"] = _root_report(root)
    return report


def _root_report(root: str) -> dict:
    """The root's filesystem, whether it can be written, and whether its locks can be trusted."""
    exists = os.path.isdir(root)
    mount = _process_layer.filesystem_of(root) or {}
    verdict = _lock_verdict(root)
    return {"path": root, "exists": exists, "writable": exists and os.access(root, os.W_OK),
            "filesystem": mount.get("fstype"), "mount_point": mount.get("mount_point"),
            "lock": {"kind": _process_layer.lock_kind, "trusted": verdict["trusted"], "reason": verdict["reason"]}}


# -- Queues: files under <root>/.queues, and no process of their own -----------
#
#   NAME.json        the settings: {"parallel": N, "paused": bool}
#   NAME/slot-K      the right to run, K < N.  A supervisor starts its child only
#                    while it holds an exclusive flock on one slot file, and drops
#                    it when the child (the last run, with a restart policy) ends.
#                    A lock dies with its process, so a crash frees the slot.
#                    At most N supervised children run at once; the child of a
#                    killed supervisor runs on outside the count (its job reads
#                    failed/supervisor_lost) until `kill` stops it by its marker.
#   NAME/tickets/ID  the line.  A waiting supervisor holds an exclusive flock on a
#                    ticket named by its job id (ids are time-ordered): a ticket
#                    whose lock is free belongs to nobody and is cleared by
#                    whoever meets it.
#
# Only the head of the line (no live ticket with a smaller id) may take a slot:
# it blocks on all N slot locks at once, a thread each, and the kernel wakes it
# the moment one is freed.  Every other waiter blocks on the lock of the live
# ticket just ahead of it, so when that one leaves the line (it took a slot, was
# killed, or died) exactly one waiter wakes and looks again.  Nothing polls: what
# no lock can announce (settings changed, a kill) rings the waiters' bells.
#
# Crashes: a killed waiter's ticket lock is free: the waiter behind it wakes, and
# removes the file on its way.  A killed runner's slot lock is free: the head
# wakes and takes the slot.  Either job reads failed/supervisor_lost (_reconcile:
# its job lock is free).  Order is by job id among the jobs in line when a slot
# is taken; a job that enters the line later with an older id (started late,
# or restarted) goes before younger ones still waiting.

class _QueuePaths:
    def __init__(self, root: str, name: str):
        self.root, self.name = root, name
        self.base = os.path.join(root, ".queues")
        self.settings = os.path.join(self.base, name + ".json")
        self.settings_lock = os.path.join(self.base, name + ".lock")
        self.dir = os.path.join(self.base, name)
        self.tickets = os.path.join(self.dir, "tickets")

    def slot(self, index: int) -> str:
        return os.path.join(self.dir, "slot-%d" % index)

    def ticket(self, job_id: str) -> str:
        return os.path.join(self.tickets, job_id)


@_record
class _QueueSettings:
    """A queue's settings file (what `queue set` changed)."""

    parallel: int = DEFAULT_QUEUE_PARALLEL
    paused: bool = False


def _read_queue_settings(qp: _QueuePaths) -> _QueueSettings:
    """The queue's settings (the defaults for a queue nobody set); StateFileError if corrupt."""
    try:
        doc = _read_json(qp.settings)
        return _QueueSettings(_typed(doc.get("parallel", DEFAULT_QUEUE_PARALLEL), int, "parallel", required=True),
                              _typed(doc.get("paused", False), bool, "paused", required=True))
    except FileNotFoundError:
        return _QueueSettings()
    except OSError as exc:
        raise _unreadable(qp.settings, exc) from None
    except (ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise StateFileError(qp.settings, str(exc)) from None


def _make_private_dirs(path: str) -> None:
    """os.makedirs with mode 0700 at every level it makes (makedirs gives the
    levels above the last one the default mode, 0755 under the usual umask)."""
    parent = os.path.dirname(path)
    if parent and parent != path and not os.path.isdir(parent):
        _make_private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass


def _update_queue_settings(qp: _QueuePaths, parallel: Optional[int], paused: Optional[bool]) -> _QueueSettings:
    """Change what is given, keep the rest; a corrupt settings file is replaced."""
    try:
        _make_private_dirs(qp.base)
        with _LockFile(qp.settings_lock) as lock:
            lock.acquire(blocking=True)
            try:
                settings = _read_queue_settings(qp)
            except StateFileError:
                settings = _QueueSettings()
            if parallel is not None:
                settings.parallel = parallel
            if paused is not None:
                settings.paused = paused
            _write_json_atomic(qp.settings, {"parallel": settings.parallel, "paused": settings.paused,
                                             "updated_at": _utc_now()})
    except OSError as exc:
        raise JobIOError("cannot write the settings of queue %s: %s" % (qp.name, exc)) from None
    return settings


def _same_file(fd: int, path: str) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.lstat(path))
    except OSError:
        return False


class _Ticket:
    """A supervisor's place in its queue's line, locked for as long as it waits."""

    def __init__(self, qp: _QueuePaths, job_id: str):
        self.qp, self.path = qp, qp.ticket(job_id)
        self.lock: Optional[_LockFile] = None

    @property
    def fd(self) -> Optional[int]:
        return None if self.lock is None else self.lock.fd

    def adopt(self, fd: int) -> None:
        """Hold the ticket through fd, locked already (passed across an exec)."""
        self.lock = _LockFile.held(self.path, fd)

    def enter(self) -> None:
        _make_private_dirs(self.qp.tickets)
        tmp = os.path.join(self.qp.tickets, ".%s.%s" % (os.path.basename(self.path), os.urandom(4).hex()))
        lock = _LockFile(tmp)
        lock.acquire()  # a fresh random name: nobody else holds it
        try:
            # Renamed into place already locked: nobody can take it for a dead one.
            os.replace(tmp, self.path)
        except OSError:  # Windows cannot rename an open file: make it in place
            lock.release()
            _unlink_quietly(tmp)
            lock = _LockFile(self.path)
            lock.acquire(blocking=True)
        self.lock = lock

    def leave(self) -> None:
        if self.lock is None:
            return
        lock, self.lock = self.lock, None
        # Removed while still locked (POSIX), so that no one meets it free and
        # mistakes it for the ticket of a dead waiter; Windows removes it after.
        try:
            os.unlink(self.path)
            removed = True
        except OSError:
            removed = False
        lock.release()
        if not removed:
            _unlink_quietly(self.path)


def _queue_line(qp: _QueuePaths) -> List[str]:
    """Ids holding a ticket (dead waiters' too, until someone clears them), oldest first."""
    try:
        return sorted(name for name in os.listdir(qp.tickets) if _is_job_id(name))
    except OSError:  # no line yet
        return []


def _ticket_is_live(path: str) -> bool:
    """Whether a waiter holds this ticket; a dead waiter's ticket is removed on the way."""
    lock = _LockFile(path)
    try:
        if not lock.acquire(create=False):
            return True
    except OSError:  # gone: its waiter left the line
        lock.release()
        return False
    try:
        if _same_file(lock.fd, path):  # not a newer ticket of the same job, made since we opened this one
            _unlink_quietly(path)
        return False
    finally:
        lock.release()


def _ticket_ahead(qp: _QueuePaths, job_id: str) -> Optional[str]:
    """The id of the nearest live ticket before job_id's, or None when job_id heads the line."""
    for other in reversed([name for name in _queue_line(qp) if name < job_id]):
        if _ticket_is_live(qp.ticket(other)):
            return other
    return None


def _try_slot(qp: _QueuePaths, index: int) -> Optional[int]:
    """A descriptor holding slot `index`, or None if another job holds it."""
    lock = _LockFile(qp.slot(index))
    return lock.fd if lock.acquire() else None


def _lock_in_thread(path: str, *, exclusive: bool, create: bool, then: Callable[[Optional[int]], None]) -> None:
    """A thread blocks until it holds the lock on path, then calls then(fd) (it owns
    fd from there); then(None) when path is gone: there is nothing to wait for."""
    def block():
        lock = _LockFile(path)
        try:
            lock.acquire(exclusive=exclusive, blocking=True, create=create)
        except OSError:  # gone, or no lock to wait on here: let the caller look again
            lock.release()
            return then(None)
        then(lock.fd)
    threading.Thread(target=block, daemon=True).start()


class _Bell:
    """A FIFO in a job directory that wakes its supervisor while it has no child
    to wait on (queued, waiting for jobs, between restarts): a kill or a queue
    change writes a byte to it.  Where there are no FIFOs (Windows), the
    supervisor looks again every POLL_S seconds instead."""

    POLL_S = 0.25

    @staticmethod
    def listen(path: str, on_ring: Callable[[], None]) -> bool:
        """Call on_ring() at each ring, from a thread; False if this platform has no bell."""
        import stat
        if not hasattr(os, "mkfifo"):
            return False
        try:
            os.mkfifo(path, 0o600)
        except FileExistsError:  # an earlier run's
            pass
        except OSError:  # a file system without FIFOs: look again every POLL_S
            return False
        try:
            # Read and write: we are a writer too, so a read never sees EOF, and the open never blocks.
            fd = os.open(path, os.O_RDWR | _FILE_FLAGS)
        except OSError:
            return False
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # something else planted under its name
            os.close(fd)
            return False

        def listen():
            while os.read(fd, 512):
                on_ring()
        threading.Thread(target=listen, daemon=True).start()
        return True

    @staticmethod
    def ring(path: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | getattr(os, "O_NONBLOCK", 0) | _FILE_FLAGS)
        except OSError:  # no bell, or nobody listening (ENXIO): nobody to wake
            return
        try:
            os.write(fd, b"!")
        except OSError:  # full: it rings already
            pass
        finally:
            os.close(fd)

# ---------------------------------------------------------------------------
# 6. Supervisor: one job's life, from start to notifications
# ---------------------------------------------------------------------------


class _SpawnFailure(Exception):
    def __init__(self, stage: str, message: str):
        super().__init__(message)
        self.stage, self.message = stage, message


class _Mailbox:
    """Wake-ups of a supervisor that has no child to wait on: the threads that
    block on locks for it, and its bell, post here; it takes them one at a time."""

    def __init__(self):
        self.cond = threading.Condition()
        self.items: List[tuple] = []
        self.closed = False

    def post(self, item: tuple) -> bool:
        """False once closed: the poster keeps what it brought (and closes it)."""
        with self.cond:
            if self.closed:
                return False
            self.items.append(item)
            self.cond.notify()
            return True

    def take(self, timeout_s: Optional[float] = None) -> Optional[tuple]:
        with self.cond:
            self.cond.wait_for(lambda: self.items, timeout_s)
            return self.items.pop(0) if self.items else None

    def close(self) -> List[tuple]:
        """Refuse further posts; returns what was never taken."""
        with self.cond:
            self.closed = True
            items, self.items = self.items, []
            return items


def _post_slot(mailbox: _Mailbox, index: int) -> Callable[[Optional[int]], None]:
    """What a slot thread does with the slot it got: hand it over, or give it back."""
    def then(fd: Optional[int]) -> None:
        if not mailbox.post(("slot", index, fd)) and fd is not None:
            os.close(fd)
    return then


def _post_free(mailbox: _Mailbox, item: tuple) -> Callable[[Optional[int]], None]:
    """What a thread waiting for a lock to be free does: let it go, and say so."""
    def then(fd: Optional[int]) -> None:
        if fd is not None:
            os.close(fd)
        mailbox.post(item)
    return then


class _EndedWhileWaiting(Exception):
    """The job ended before its child started: killed, or a dependency did not succeed."""

    def __init__(self, status: JobStatus, signal: Optional[str] = None, failure: Optional[Failure] = None):
        super().__init__(status.value)
        self.status, self.signal, self.failure = status, signal, failure


def _describe_end(status: str, exit_code: Optional[int], signal: Optional[str], timed_out: bool = False,
                  error: Optional[Failure] = None) -> str:
    """'exited with code 1', 'was killed (SIGTERM, timeout)', 'failed (spawn: ...)'."""
    if status == JobStatus.EXITED.value:
        return "exited with code %s" % exit_code
    if status == JobStatus.KILLED.value:
        return "was killed (%s%s)" % (signal, ", timeout" if timed_out else "")
    return "failed (%s)" % ("%s: %s" % (error.stage, error.message) if error else "no reason recorded")


def _dependency_outcome(paths: JobPaths) -> Tuple[Optional[bool], Optional[str]]:
    """(ended, why it does not count as a success).  ended is None while the job
    runs or waits (its lock is held: block on it), False while nobody started it."""
    with _JobLock(paths) as lock:
        if not lock.acquire(exclusive=False, create=False):
            return None, None
    try:
        state = _read_state_reconciled(paths)
    except JobNotFoundError:
        return True, "job %s was deleted" % paths.job_id
    except JobError as exc:
        return True, "job %s cannot be read: %s" % (paths.job_id, exc.message)
    if not state.status.is_terminal:
        return False, None
    if state.status is JobStatus.EXITED and state.exit_code == 0:
        return True, None
    return True, "job %s %s" % (paths.job_id, _describe_end(state.status.value, state.exit_code, state.signal,
                                                            state.result.timed_out, state.error))


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


@_record
class _Running:
    """A started job, handed from the supervisor's start to its watch: in one
    process, or across the exec of a forked launch (see _supervise_forked)."""

    state: JobState
    spec: JobSpec
    child: _Child
    pipes: Tuple[int, int]
    logs: List[int]
    started: float  # time.monotonic(): one clock for the whole system, so it survives exec
    slot: Optional[int] = None  # the held queue slot's descriptor

    def fds(self) -> List[int]:
        return [*self.pipes, *self.logs] + ([] if self.slot is None else [self.slot])

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
        slot = logs.pop() if len(logs) > 3 else None
        return cls(state, _read_spec(paths), child, (out_r, err_r), logs, float(started), slot)


def _record_containment(state: JobState, child: _Child) -> None:
    """What holds this run's tree and which limits hold, as state.json says it."""
    held = child.containment
    state.containment, state.cgroup, state.cgroups_v1, state.limits = (
        held.kind, held.cgroup, held.cgroups_v1, held.limits)


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
        self.mailbox = _Mailbox()  # wake-ups while there is no child to wait on
        self.has_bell: Optional[bool] = None  # None until listened for
        self.slot: Optional[int] = None  # the queue slot held (a locked descriptor)
        self.backoff_s: Optional[float] = None  # the next restart delay
        # Called once the job shows as waiting (a forked launch execs a small
        # interpreter there: see _supervise_forked), with the held ticket's fd.
        self.on_wait: Optional[Callable[[Optional[int]], None]] = None
        self.ticket_fd: Optional[int] = None  # a ticket held already, handed over across that exec
        self.sink_exits = _SinkExits(reaping=_process_layer.reaps_every_child)
        self.output: Optional[_OutputWatch] = None  # output-match notifications, while watching
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
        state.supervisor_pid, state.supervisor_token = os.getpid(), _process_layer.process_token(os.getpid())
        if spec.after or spec.queue:
            state = self._wait_turn(state, spec)
            if state is None:
                return None
        try:
            logs = self._open_logs()
            child, pipes = self._spawn(spec)
        except _SpawnFailure as failure:
            self.log("cannot start the command: %s" % failure.message)
            state.job.status, state.error = JobStatus.FAILED, Failure(failure.stage, failure.message)
            state.finished_at, state.logs_drained = _utc_now(), True
            self._release_slot()
            _write_state(self.paths, state)
            _acknowledge()
            self.announce(spec, state)
            return None
        started = time.monotonic()
        if not _process_layer.can_verify_pids():
            self._make_kill_fifo()
        state.job.status, state.job.started_at = JobStatus.RUNNING, _utc_now()
        state.pid, state.pid_token, state.windows_job_name = child.pid, child.token, child.windows_job_name
        _record_containment(state, child)
        _write_state(self.paths, state)
        _acknowledge()
        # Only the pumps (in watch, after this) write the output to disk: a
        # reserve taken here still keeps the room for the final state, and
        # the launcher does not wait for it.
        self._reserve_space()
        self.child = child
        self._log_missing_facilities()
        if (spec.after or spec.queue) and _read_kill_request(self.paths):
            # A kill that came while we were leaving the line, too late to be seen there.
            self._stop_tree(0 if _read_kill_request(self.paths) == "SIGKILL" else spec.kill_after_s)
        return _Running(state, spec, child, pipes, logs, started, self.slot)

    def _log_missing_facilities(self) -> None:
        """Say once, in supervisor.log, what this machine lacks and what that costs the job."""
        for item in _process_layer.missing_facilities():
            self.log("missing %s (%s): %s" % (item["facility"], item["detail"], item["costs"]))

    def watch(self, running: "_Running") -> None:
        """Copy the output, enforce the timeout, record the end, restart as the
        policy says: the rest of the job's life."""
        state, spec = running.state, running.spec
        self.slot = running.slot
        full = _FullLog(running.logs[2])
        # One watch for every run: the logs go on across restarts, and so do the lines matched.
        self.output = _OutputWatch(self.paths, spec, self.log, self.sink_exits)
        while running is not None and self._watch_run(running, full):
            running = self._run_again(running, full)
        self._release_space()
        _write_state(self.paths, state)
        # The job's cgroup goes with its last process; one that daemons still
        # live in stays, for `kill` to find them, until `delete` or `gc`.
        if self.child is not None:
            _process_layer.remove_containment(self._tree_ref())
        self.announce(self._latest_spec(spec), state)

    def _latest_spec(self, spec: JobSpec) -> JobSpec:
        """The definition as it is now: `notify set` may have changed its sinks while the job ran."""
        try:
            return _read_spec(self.paths)
        except JobError:
            return spec

    def _watch_run(self, running: "_Running", full: "_FullLog") -> bool:
        """One run, from its start to its recorded end; whether the policy starts it again."""
        state, spec = running.state, running.spec
        self.child, self.timed_out, self.last_signal = running.child, False, None
        self.limit_reached = None
        self.exited = exited = threading.Event()
        pumps = self.pumps = self._start_pumps(running.pipes, running.logs, full)
        if not _process_layer.can_verify_pids():
            self._listen_for_kills(running.child)
        if spec.timeout_s:  # per run
            timeout_s = spec.timeout_s - (time.monotonic() - running.started)
            threading.Thread(target=self._enforce_timeout, args=(spec, timeout_s, exited), daemon=True).start()
        if _process_layer.limit_counters(running.child):  # per run: each run's child gets the job's limits
            threading.Thread(target=self._enforce_limits, args=(running.child, exited), daemon=True).start()
        self.sink_exits.resume()
        code, signum = _process_layer.wait_child(running.child, self.sink_exits.reaped)
        self.sink_exits.stop()
        exited.set()
        self._record_end(state, code, signum, int((time.monotonic() - running.started) * 1000))
        again = self._restarts_after(spec, state)
        if not again:
            self._release_slot()  # at once: the next job of the queue may start
        if not _joined(pumps, QUICK_DRAIN_S):
            # Something still holds the pipes (a descendant): publish the end now,
            # then drain.  Usually the output ends with the child and one write does.
            _write_state(self.paths, state)
        if spec.kill_orphans:
            self._stop_tree(spec.kill_after_s)
        state.logs_drained = _joined(pumps, DRAIN_TIMEOUT_S)
        if self.write_error and state.error is None:
            state.error = Failure("output", self.write_error)
        return again

    def _release_slot(self) -> None:
        if self.slot is not None:
            fd, self.slot = self.slot, None
            _LockFile.held("", fd).release()  # letting go needs only the descriptor

    # -- waiting: for other jobs, then for a queue slot -------------------------

    def _wait_turn(self, state: JobState, spec: JobSpec) -> Optional[JobState]:
        """Wait for the jobs it comes after, then for a slot of its queue (the
        launcher is acknowledged once the job shows as waiting).  None when the
        job ended meanwhile (killed, a dependency failed): that end is recorded."""
        self._listen_for_bell()
        try:
            if spec.after:
                self._wait_for_jobs(state, spec)
            if spec.queue:
                self._wait_for_slot(state, spec)
            self._check_kill()
        except _EndedWhileWaiting as ended:
            self._release_slot()
            self._end_unstarted(state, spec, ended)
            return None
        state.waiting = None
        return state

    def _listen_for_bell(self) -> None:
        if self.has_bell is None:
            self.has_bell = _Bell.listen(self.paths.bell, lambda: self.mailbox.post(("bell",)))

    def _next_wakeup(self, timeout_s: Optional[float] = None) -> Optional[tuple]:
        """Block until something may have changed; without a bell, look again every _Bell.POLL_S."""
        if not self.has_bell:
            timeout_s = _Bell.POLL_S if timeout_s is None else min(timeout_s, _Bell.POLL_S)
        return self.mailbox.take(timeout_s)

    def _check_kill(self) -> None:
        requested = _read_kill_request(self.paths)
        if requested:
            raise _EndedWhileWaiting(JobStatus.KILLED, signal=requested)

    def _set_waiting(self, state: JobState, waiting: dict, ticket: Optional["_Ticket"] = None) -> None:
        """Record what the job waits for, then let the launcher go (it sees the job waiting)."""
        state.waiting = waiting
        _write_state(self.paths, state)
        _acknowledge()
        if self.on_wait is not None:
            on_wait, self.on_wait = self.on_wait, None
            on_wait(ticket.fd if ticket else None)

    def _end_unstarted(self, state: JobState, spec: JobSpec, ended: _EndedWhileWaiting) -> None:
        state.job.status, state.result.signal, state.error = ended.status, ended.signal, ended.failure
        state.waiting, state.finished_at, state.logs_drained = None, _utc_now(), True
        self.log("the job ended before it started: %s" % (ended.failure.message if ended.failure else
                                                             "killed (%s)" % ended.signal))
        _write_state(self.paths, state)
        _acknowledge()
        self.announce(self._latest_spec(spec), state)

    # Dependencies have no bell: the kernel wakes us through each one's job lock,
    # released when its supervisor has recorded the end.  Only a dependency that
    # nobody has started yet has no lock to block on: it is looked at again
    # every _UNSTARTED_POLL_S.
    _UNSTARTED_POLL_S = 0.5

    def _wait_for_jobs(self, state: JobState, spec: JobSpec) -> None:
        """Until every job of spec.after has ended; _EndedWhileWaiting when one did
        not succeed (unless after_any) or when the job is killed."""
        pending, watched = list(spec.after), set()
        self.mailbox = mailbox = _Mailbox()
        try:
            while True:
                self._check_kill()
                unstarted, before = False, len(pending)
                for job_id in list(pending):
                    paths = JobPaths(self.paths.root, job_id)
                    ended, problem = _dependency_outcome(paths)
                    if ended is None and job_id not in watched:
                        watched.add(job_id)
                        _lock_in_thread(paths.lock, exclusive=False, create=False,
                                        then=_post_free(mailbox, ("job", job_id)))
                    unstarted |= ended is False
                    if not ended:
                        continue
                    if problem and not spec.after_any:
                        raise _EndedWhileWaiting(JobStatus.FAILED, failure=Failure("dependency", problem))
                    pending.remove(job_id)
                if not pending:
                    return
                if state.waiting is None:  # they had not all ended at once: the job shows as waiting
                    self._set_waiting(state, {"for": "jobs", "jobs": list(pending), "since": _utc_now()})
                elif len(pending) != before:
                    state.waiting["jobs"] = list(pending)
                    _write_state(self.paths, state)
                item = self._next_wakeup(self._UNSTARTED_POLL_S if unstarted else None)
                if item and item[0] == "job":
                    watched.discard(item[1])
        finally:
            mailbox.close()

    def _wait_for_slot(self, state: JobState, spec: JobSpec) -> None:
        """Take a place in the queue's line, then a slot when it is our turn (see
        the Queues notes in section 5); self.slot holds it from then on."""
        qp = _QueuePaths(self.paths.root, spec.queue)
        ticket = _Ticket(qp, self.paths.job_id)
        self.mailbox = mailbox = _Mailbox()
        if self.ticket_fd is None:
            ticket.enter()
        else:  # our launch image entered the line for us, and shows the job waiting already
            ticket.adopt(self.ticket_fd)
            self.ticket_fd = None
        try:
            slot = self._free_slot_now(qp)
            if slot is None:  # the job shows as waiting only when it has to
                if (state.waiting or {}).get("for") != "queue":
                    self._set_waiting(state, {"for": "queue", "queue": spec.queue, "since": _utc_now()}, ticket)
                slot = self._wait_for_our_turn(qp, mailbox)
            # Noted before the ticket goes: the next in line takes its slot after this.
            state.queue_slot = {"queue": spec.queue, "slot": slot, "at": _utc_now()}
        finally:
            ticket.leave()
            for item in mailbox.close():
                if item[0] == "slot" and item[2] is not None:
                    os.close(item[2])

    def _wait_for_our_turn(self, qp: _QueuePaths, mailbox: _Mailbox) -> int:
        """Block until we head the line and hold a slot; returns its index."""
        job_id, watched, asked = self.paths.job_id, None, set()
        while True:
            self._check_kill()
            ahead = _ticket_ahead(qp, job_id)
            if ahead is not None and ahead != watched:
                watched = ahead
                _lock_in_thread(qp.ticket(ahead), exclusive=False, create=False,
                                then=_post_free(mailbox, ("ahead", ahead)))
            if ahead is None:
                settings = self._queue_settings(qp)
                if not settings.paused:
                    index = self._take_free_slot(qp, settings.parallel, skip=asked)
                    if index is not None:
                        return index
                    for index in set(range(settings.parallel)) - asked:
                        asked.add(index)
                        _lock_in_thread(qp.slot(index), exclusive=True, create=True, then=_post_slot(mailbox, index))
            item = self._next_wakeup()
            if item is None:
                continue
            if item[0] == "ahead":
                watched = None
            elif item[0] == "slot":
                index, fd = item[1], item[2]
                asked.discard(index)
                if fd is not None and self._may_take(qp, index):
                    self.slot = fd
                    return index
                if fd is not None:
                    os.close(fd)

    def _free_slot_now(self, qp: _QueuePaths) -> Optional[int]:
        """A slot taken at once if we head the line and one is free: the index, or None."""
        settings = self._queue_settings(qp)
        if settings.paused or _ticket_ahead(qp, self.paths.job_id) is not None:
            return None
        return self._take_free_slot(qp, settings.parallel)

    def _take_free_slot(self, qp: _QueuePaths, parallel: int, skip=()) -> Optional[int]:
        """Try each slot below the limit (but those a thread of ours waits for); the index taken, or None."""
        for index in range(parallel):
            fd = None if index in skip else _try_slot(qp, index)
            if fd is not None:
                self.slot = fd
                return index
        return None

    def _may_take(self, qp: _QueuePaths, index: int) -> bool:
        settings = self._queue_settings(qp)
        return not settings.paused and index < settings.parallel and _ticket_ahead(qp, self.paths.job_id) is None

    def _queue_settings(self, qp: _QueuePaths) -> _QueueSettings:
        try:
            return _read_queue_settings(qp)
        except JobError as exc:  # a corrupt settings file must not stop the queue: say so, use the defaults
            self.log("%s; using the defaults" % exc.message)
            return _QueueSettings()

    # -- restart policy -----------------------------------------------------------

    def _restarts_after(self, spec: JobSpec, state: JobState) -> bool:
        """Whether the policy starts the job again after the run just recorded."""
        if spec.restart not in ("on-failure", "always") or (state.restarts or 0) >= spec.max_restarts:
            return False
        if _read_kill_request(self.paths):  # a kill ends the policy too
            return False
        return spec.restart == "always" or not (state.status is JobStatus.EXITED and state.exit_code == 0)

    def _restart_delay_s(self, spec: JobSpec, last_run_ms: Optional[int]) -> float:
        """From restart_delay_s, doubling up to MAX_RESTART_DELAY_S; back to the
        start after a run that lasted longer than that (it was healthy a while)."""
        if self.backoff_s is None or (last_run_ms or 0) > MAX_RESTART_DELAY_S * 1000:
            self.backoff_s = spec.restart_delay_s
        delay = self.backoff_s
        self.backoff_s = min(delay * 2, max(MAX_RESTART_DELAY_S, spec.restart_delay_s))
        return delay

    def _run_again(self, running: "_Running", full: "_FullLog") -> Optional["_Running"]:
        """Wait the restart delay, then start the child again in this same job;
        None when the job ended instead (killed meanwhile, or it cannot start)."""
        state, spec = running.state, running.spec
        delay_s = self._restart_delay_s(spec, state.duration_ms)
        state.last_exit = {"state": state.status.value, "exit_code": state.exit_code, "signal": state.signal,
                           "timed_out": state.result.timed_out, "duration_ms": state.duration_ms,
                           "started_at": state.started_at, "finished_at": state.finished_at}
        state.job.status, state.result, state.finished_at = JobStatus.RUNNING, JobResult(), None
        state.pid = state.pid_token = state.logs_drained = None
        if state.error is not None and state.error.stage == "limit":  # that run's verdict, in last_exit
            state.last_exit["limit"], state.error = state.error.limit, None
        state.waiting = {"for": "restart", "restart": (state.restarts or 0) + 1,
                         "at": _format_time(time.time() + delay_s)}
        _write_state(self.paths, state)
        try:
            self._sleep_unless_killed(delay_s)
        except _EndedWhileWaiting as ended:
            self._release_slot()
            state.job.status, state.result.signal = ended.status, ended.signal
            state.waiting, state.finished_at, state.logs_drained = None, _utc_now(), True
            return None
        self._stop_leftovers(spec)
        state.restarts = (state.restarts or 0) + 1
        last = state.last_exit
        full.append(b"JOBSTATE", ("restart %d of %d: the previous run %s\n" % (
            state.restarts, spec.max_restarts,
            _describe_end(last["state"], last["exit_code"], last["signal"], last["timed_out"]))).encode())
        return self._spawn_again(state, spec, running.logs)

    def _stop_leftovers(self, spec: JobSpec) -> None:
        """Before a new run: stop what the previous run left (they would share its
        cgroup and write into the new run's output), then take their last output."""
        if self.pumps and not _joined(self.pumps, 0) or _process_layer.find_tree(self._tree_ref()):
            self._stop_tree(spec.kill_after_s)
        _joined(self.pumps, DRAIN_TIMEOUT_S)
        # The new run's Job Object takes the same name: ours on the old one would keep it.
        _process_layer.let_go_of_child(self.child)

    def _sleep_unless_killed(self, delay_s: float) -> None:
        self._listen_for_bell()
        self.mailbox = mailbox = _Mailbox()
        deadline = _deadline(delay_s)
        try:
            self._check_kill()
            while _remaining(deadline) > 0:
                self._next_wakeup(_remaining(deadline))
                self._check_kill()
        finally:
            mailbox.close()

    def _spawn_again(self, state: JobState, spec: JobSpec, logs: List[int]) -> Optional["_Running"]:
        try:
            child, pipes = self._spawn(spec)
        except _SpawnFailure as failure:
            self._release_slot()
            self.log("cannot start the command again: %s" % failure.message)
            state.job.status, state.error = JobStatus.FAILED, Failure(failure.stage, failure.message)
            state.waiting, state.finished_at, state.logs_drained = None, _utc_now(), True
            return None
        state.waiting, state.job.started_at = None, _utc_now()
        state.pid, state.pid_token, state.windows_job_name = child.pid, child.token, child.windows_job_name
        _record_containment(state, child)
        _write_state(self.paths, state)
        return _Running(state, spec, child, pipes, logs, time.monotonic(), self.slot)

    def announce(self, spec: JobSpec, state: JobState) -> None:
        """Record the job.finished event now, under the job lock; its sinks run
        in notify(), once the lock is released."""
        record = _record_event(self.paths, spec, state)
        if record is not None:
            self.notification = (spec, record)

    def notify(self) -> None:
        """Deliver what is left of the output-match events, then the announced
        job.finished event, to their sinks (the job lock is released or shared by now)."""
        if self.output is not None:
            self.output.finish()
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
        if not os.path.isdir(spec.cwd):
            raise _SpawnFailure("cwd", "working directory %s does not exist" % spec.cwd)
        try:
            env = _job_environment(spec, self.paths.job_id)
        except (OSError, ValueError) as exc:
            raise _SpawnFailure("env", "cannot read env file: %s" % exc) from None
        argv = _process_layer.shell_argv(spec.argv[0]) if len(spec.argv) == 1 else spec.argv
        try:  # None: /dev/null
            stdin = open(_open_regular(self.paths.stdin, os.O_RDONLY), "rb") if spec.has_stdin else None
        except OSError as exc:
            raise _SpawnFailure("spawn", "cannot open %s: %s" % (self.paths.stdin, exc.strerror or exc)) from None
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        for fd in (out_r, err_r):
            _process_layer.tune_pipe(fd)
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
            if stdin is not None:
                stdin.close()
        return child, (out_r, err_r)

    def _open_logs(self) -> List[int]:
        """Open (and reset) the three logs before the child exists, so a failure
        here leaves no process behind."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        logs: List[int] = []
        try:
            for path in (self.paths.stdout_log, self.paths.stderr_log, self.paths.full_log):
                logs.append(_open_regular(path, flags))
        except OSError as exc:
            for fd in logs:
                os.close(fd)
            raise _SpawnFailure("logs", "cannot open %s: %s" % (exc.filename, exc.strerror)) from None
        return logs

    def _start_pumps(self, pipes, logs: List[int], full: "_FullLog") -> List[threading.Thread]:
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
                chunk = os.read(read_fd, _PUMP_READ_BYTES)
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
                    continue
            self._watch_output(label, chunk)
        self._watch_output(label, None)
        os.close(read_fd)

    def _watch_output(self, label: bytes, chunk: Optional[bytes]) -> None:
        """Hand the output to the output-match notifications (None: the stream ended).
        A bug there must never stop the copying: the child would block on a full pipe."""
        output = self.output
        if output is None:
            return
        try:
            output.feed(label, chunk)
        except Exception as exc:  # see above; the job goes on without output-match notifications
            self.output = None
            self.log("output-match notifications stopped by an internal error: %s: %s" % (type(exc).__name__, exc))

    _RESERVE_BYTES = 256 * 1024

    def _reserve_space(self) -> None:
        """Hold some disk space so that, if the job's output fills the disk, the
        final state and the reason can still be written (we free it then)."""
        try:
            fd = _open_regular(self.paths.reserve, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                _allocate(fd, self._RESERVE_BYTES)
            finally:
                os.close(fd)
        except OSError:  # already short of space: go on without a reserve
            _unlink_quietly(self.paths.reserve)

    def _release_space(self) -> None:
        _unlink_quietly(self.paths.reserve)

    def _enforce_timeout(self, spec: JobSpec, timeout_s: float, exited: threading.Event) -> None:
        if exited.wait(max(timeout_s, 0.0)):
            return
        self.timed_out = True
        self.log("timeout of %gs reached; stopping the process tree" % spec.timeout_s)
        self._stop_tree(spec.kill_after_s)

    # Where no pid can be verified (no /proc), a killer cannot safely signal the
    # job's processes, but we can: our child is not reaped while we signal it
    # (see signal_child_group).  The killer writes kill_request.json and wakes us
    # with a byte on kill.fifo; only a process that has the FIFO open for
    # reading gets that byte, so no pid, ours included, is ever trusted; and a
    # killer finds at once (ENXIO) that nobody listens.  The answer goes to
    # kill_ack.json under the request's id.

    def _make_kill_fifo(self) -> None:
        _unlink_quietly(self.paths.kill_fifo)
        try:
            os.mkfifo(self.paths.kill_fifo, 0o600)
        except OSError as exc:  # a filesystem without FIFOs: kills will say they could not be delivered
            self.log("cannot make %s: %s" % (self.paths.kill_fifo, exc))

    def _listen_for_kills(self, child: _Child) -> None:
        import stat
        try:
            # Read and write: the FIFO then never reads as closed between two killers.
            fd = os.open(self.paths.kill_fifo, os.O_RDWR | _FILE_FLAGS)
        except OSError as exc:
            self.log("cannot listen for kill requests on %s: %s" % (self.paths.kill_fifo, exc))
            return
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.close(fd)
            self.log("%s is not a FIFO: kill requests cannot reach this supervisor" % self.paths.kill_fifo)
            return
        threading.Thread(target=self._serve_kills, args=(fd, child), daemon=True).start()

    def _serve_kills(self, fd: int, child: _Child) -> None:
        """Deliver each new kill request's signal to our child's group, and answer it."""
        answered = None
        while os.read(fd, 512):
            request = _read_json_quietly(self.paths.kill_request)
            request_id = request.get("request_id") if isinstance(request, dict) else None
            if request_id is None or request_id == answered:
                continue
            answered = request_id
            try:
                signum, name = _parse_signal(request.get("deliver"))
            except InvalidSignalError:
                continue
            count = _process_layer.signal_child_group(child, signum)
            try:
                _write_json_atomic(self.paths.kill_ack, {"request_id": request_id, "signal": name,
                                                         "processes_signalled": count, "at": _utc_now()})
            except OSError as exc:  # the killer then reports that nothing was confirmed
                self.log("cannot answer kill request %s: %s" % (request_id, exc))

    _LIMIT_CHECK_S = 0.25

    def _enforce_limits(self, child: _Child, exited: threading.Event) -> None:
        """End the job when one of its limits is reached: an OOM kill or a refused
        process in its cgroup, or its CPU time used up.  The kernel caps memory and
        processes by itself; jobstate ends the whole job, so the limit is the verdict."""
        delay = 0.0
        while not exited.wait(delay):
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
        """TERM the tree, then KILL whatever is left after kill_after_s (0 = KILL at once).

        Without /proc only our unreaped child's group can be reached, and
        "gone" can only mean that the child has exited.
        """
        ref, verified = self._tree_ref(), _process_layer.can_verify_pids()
        for name, grace in (("TERM", kill_after_s), ("KILL", 0.0)):
            if name == "TERM" and kill_after_s == 0:
                continue
            self.last_signal = "SIG" + name
            signum = _process_layer.signal_numbers()[name]
            if not (_process_layer.signal_tree(ref, signum) if verified
                    else _process_layer.signal_child_group(self.child, signum)):
                return
            if grace and (_wait_tree_gone(ref, grace) if verified else self.exited.wait(grace)):
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
        """The limit reached before the watcher saw it.  The main process may have
        died of it (an OOM kill, SIGXCPU from a CPU time rlimit, Windows ending a
        job out of time) or ended by itself right after: a shell exits at once
        when a fork is refused, a parent may exit 0 when the OOM killer ended its
        child.  Either way the limit is the verdict (see _enforce_limits)."""
        limits = self.child.containment.limits
        if (signum is not None and _signal_name(signum) == "SIGXCPU"
                and limits.get("cpu_time_s", {}).get("enforced_by") == "rlimit"):
            return "cpu_time_s"
        ending = _process_layer.limit_exit_code
        if signum is None and ending is not None and code != ending:
            return None  # Windows: a limit ends its process with that code; any other is the job's own
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


def _notify_command(paths: JobPaths, command: str, line: str, timeout_s: float, event_type: str = "job.finished",
                    event_path: Optional[str] = None, exits: Optional["_SinkExits"] = None) -> dict:
    """Run the notify command with the event on stdin; at timeout_s its whole tree is stopped.

    It carries JOBSTATE_JOB_ID, which tells it the job and is also the job's
    tree marker: a running notifier is part of the job, so `kill` on the job
    stops it too, and so does any kill after the supervisor died; nothing
    jobstate started for a job can outlive a kill of that job.
    JOBSTATE_EVENT_TYPE and JOBSTATE_EVENT_PATH name the event and the file
    that records it.  exits: see _SinkExits (for sinks run while the job runs).
    """
    import subprocess
    result = {"sink": "command", "target": command, "delivered_at": _utc_now()}
    env = dict(os.environ, JOBSTATE_EVENT_PATH=event_path or paths.event, JOBSTATE_JOB_ID=paths.job_id,
               JOBSTATE_EVENT_TYPE=event_type)
    exits = exits or _SinkExits(reaping=False)
    try:
        popen = exits.spawn(lambda: _process_layer.spawn_sink(_process_layer.shell_argv(command), env=env))
    except OSError as exc:
        result.update(ok=False, exit_code=None, error=str(exc))
        return result
    # Fed from a thread: a sink that never reads a large event must not hold
    # us past the timeout (Popen.communicate writes stdin first on Windows).
    threading.Thread(target=_feed, args=(popen.stdin, line.encode("utf-8")), daemon=True).start()
    try:
        code = exits.wait(popen, timeout_s)
    except subprocess.TimeoutExpired:
        _process_layer.stop_sink(popen)
        exits.wait(popen, None)
        result.update(ok=False, exit_code=None, error="timed out after %gs" % timeout_s)
        return result
    result.update(ok=code == 0, exit_code=code, error=None)
    return result


class _SinkExits:
    """Exit codes of the sink commands a supervisor runs while its job runs.

    On POSIX the supervisor's wait for the job (wait_child) reaps every child
    of the supervisor, adopted orphans and these sinks alike, so until that
    wait is over (stop()) a sink's code comes through reaped(), never through
    Popen.wait, which would find nothing left to wait for and report 0.  With a
    restart policy the next run's wait reaps again (resume()).
    """

    def __init__(self, reaping: bool):
        self.cond = threading.Condition()
        self.reaps = self.reaping = reaping
        self.codes: Dict[int, Optional[int]] = {}  # pid of each sink -> its exit code once reaped
        self.popen_waits = 0  # sinks waited for by their Popen (between runs)

    def spawn(self, start: Callable[[], object]):
        with self.cond:  # a sink that exits at once is known by the time its status comes
            popen = start()
            self.codes[popen.pid] = None
            return popen

    def reaped(self, pid: int, status: int) -> None:
        with self.cond:
            if pid in self.codes:
                self.codes[pid] = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                self.cond.notify_all()

    def stop(self) -> None:
        """The wait for the job is over: from now on each sink's Popen waits for it."""
        with self.cond:
            self.reaping = False
            self.cond.notify_all()

    def resume(self) -> None:
        """A run's wait is about to reap every child again: first let the sinks
        that their Popen waits for end (each is bounded by its timeout), or
        that wait would find them reaped and report 0."""
        with self.cond:
            while self.popen_waits:
                self.cond.wait()
            self.reaping = self.reaps

    def wait(self, popen, timeout_s: Optional[float]) -> int:
        """popen.wait(timeout_s), whoever reaps the sink; subprocess.TimeoutExpired at the timeout."""
        import subprocess
        deadline = _deadline(timeout_s)
        with self.cond:
            while self.reaping and self.codes.get(popen.pid) is None:
                if _remaining(deadline) == 0:
                    raise subprocess.TimeoutExpired(popen.args, timeout_s)
                self.cond.wait(_remaining(deadline))
            code = self.codes.pop(popen.pid, None)
            if code is None:
                self.popen_waits += 1
        if code is None:
            try:
                return popen.wait(_remaining(deadline))
            finally:
                with self.cond:
                    self.popen_waits -= 1
                    self.cond.notify_all()
        popen.returncode = code  # reaped already: Popen must not wait for it again
        return code


# Output-match notifications (--output-pattern): while the job runs, each line
# of its output that the pattern finds something in becomes one
# job.output_matched event.  The pumps only match and queue; one thread of
# the supervisor delivers the events in order to the sinks (the same
# _notify_file and _notify_command, bounds and timeout as job.finished) and
# appends each one with its deliveries to notification_events.ndjson.  At
# most _OUTPUT_EVENTS_PENDING events wait for delivery: more are dropped
# (counted in supervisor.log), so sinks slower than the output never hold the
# job.  At the job's end, what is left is delivered for at most
# JOBSTATE_NOTIFY_TIMEOUT after the lock is released, then job.finished.
_OUTPUT_EVENTS_PENDING = 1000
_META_CHECK_S = 0.2  # how often, while output flows, meta.json is looked at for `notify set`


@dataclass(frozen=True)
class _OutputRule:
    """A definition's output-match settings, with the compiled search."""

    pattern: str
    match_type: str
    stream: str
    command: Optional[str]
    file: Optional[str]
    search: object

    @classmethod
    def of(cls, spec: JobSpec) -> Optional["_OutputRule"]:
        """The rule of spec; None without a pattern (or with settings edited
        into meta.json by hand that do not parse: no notifications, no crash)."""
        if not spec.output_pattern or spec.output_stream not in _STREAM_CHOICES:
            return None
        try:
            search = _output_search(spec.output_pattern, spec.output_match_type)
        except InvalidArgumentError:
            return None
        return cls(spec.output_pattern, spec.output_match_type, spec.output_stream, spec.output_command,
                   spec.output_file, search)


class _StreamLines:
    """One output stream, cut into lines only while a rule looks at it."""

    def __init__(self, name: str):
        self.name = name
        self.offset = 0
        self.at_line_start = True
        self.lines: Optional[_LineSplitter] = None

    def blocks(self, chunk: Optional[bytes], watched: bool) -> List[Tuple[int, bytes]]:
        """The whole lines chunk ends (None: the stream ended), when watched."""
        if not watched:
            self.lines = None  # a rule that comes later starts at the next line
            if chunk:
                self.offset += len(chunk)
                self.at_line_start = chunk.endswith(b"\n")
            return []
        if self.lines is None:
            self.lines = _LineSplitter()
            self.lines.offset, self.lines.skipping = self.offset, not self.at_line_start
        if chunk is None:  # a restart's next run starts a new line
            blocks, self.lines, self.at_line_start = self.lines.finish(), None, True
            return blocks
        self.offset += len(chunk)
        self.at_line_start = chunk.endswith(b"\n")
        return self.lines.feed(chunk)


class _OutputWatch:
    """The output-match notifications of one run (see the comment above).

    `notify set` may change the settings while the job runs: meta.json is
    looked at again at most every _META_CHECK_S while output flows, and the
    new settings apply to the lines that end from then on.
    """

    def __init__(self, paths: JobPaths, spec: JobSpec, log: Callable[[str], None], exits: _SinkExits):
        self.paths, self.log, self.exits = paths, log, exits
        self.timeout: Optional[float] = None  # JOBSTATE_NOTIFY_TIMEOUT, read when first needed
        self.guard = threading.Condition()  # the rule, the queue and the deliverer: two pumps feed us
        self.rule = _OutputRule.of(spec)
        self.meta_stamp = self._meta_stamp()
        self.checked = time.monotonic()
        self.streams = {b"STDOUT": _StreamLines("stdout"), b"STDERR": _StreamLines("stderr")}
        self.pending: List[Tuple[_OutputRule, dict]] = []
        self.dropped = 0
        self.delivering = self.closing = False
        self.deliverer: Optional[threading.Thread] = None

    def feed(self, label: bytes, chunk: Optional[bytes]) -> None:
        """Match the lines a chunk of one stream ends (None: the stream ended)."""
        rule = self._current_rule()
        lines = self.streams[label]
        watched = rule is not None and rule.stream in (lines.name, "either")
        for block in lines.blocks(chunk, watched):
            for offset, line in _matching_lines(rule.search, block):
                self._enqueue(rule, self._event(rule, lines.name, offset, line))

    def _current_rule(self) -> Optional[_OutputRule]:
        now = time.monotonic()
        if now - self.checked < _META_CHECK_S:
            return self.rule
        with self.guard:
            if now - self.checked >= _META_CHECK_S:
                self.checked = now
                stamp = self._meta_stamp()
                if stamp != self.meta_stamp:
                    self.meta_stamp = stamp
                    self._reload()
            return self.rule

    def _reload(self) -> None:
        try:
            rule = _OutputRule.of(_read_spec(self.paths))
        except JobError:  # meta.json unreadable for a moment: keep what we have
            return
        if rule != self.rule:
            self.rule = rule
            self.log("output-match notifications now: %s" % (
                "none" if rule is None else "%s %r on %s" % (rule.match_type, rule.pattern, rule.stream)))

    def _meta_stamp(self):
        try:
            st = os.stat(self.paths.meta)
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size  # every write replaces the file: a new inode

    def _event(self, rule: _OutputRule, stream: str, offset: int, line: str) -> dict:
        return {"schema_version": SCHEMA_VERSION, "event_type": "job.output_matched", "job_id": self.paths.job_id,
                "pattern": rule.pattern, "match_type": rule.match_type, "stream": stream, "line": line,
                "offset": offset, "matched_at": _utc_now(), "stdout_log_path": self.paths.stdout_log,
                "stderr_log_path": self.paths.stderr_log}

    def _enqueue(self, rule: _OutputRule, event: dict) -> None:
        with self.guard:
            if self.closing or len(self.pending) >= _OUTPUT_EVENTS_PENDING:
                self.dropped += 1
                return
            self.pending.append((rule, event))
            if self.deliverer is None:
                self.deliverer = threading.Thread(target=self._deliver_all, daemon=True)
                self.deliverer.start()
            self.guard.notify_all()

    def _deliver_all(self) -> None:
        while True:
            with self.guard:
                while not self.pending and not self.closing:
                    self.guard.wait()
                if not self.pending:
                    return
                rule, event = self.pending.pop(0)
                self.delivering = True
            try:
                self._deliver(rule, event)
            except Exception as exc:  # one event lost, said in supervisor.log; the next ones still go
                self.log("cannot deliver an output-match event: %s: %s" % (type(exc).__name__, exc))
            finally:
                with self.guard:
                    self.delivering = False
                    self.guard.notify_all()

    def _deliver(self, rule: _OutputRule, event: dict) -> None:
        line = json.dumps(event, separators=(",", ":")) + "\n"
        deliveries = []
        if rule.file:
            deliveries.append(_notify_file(rule.file, line))
        if rule.command:
            deliveries.append(_notify_command(self.paths, rule.command, line, self._timeout_s(), "job.output_matched",
                                              self.paths.output_events, self.exits))
        record = json.dumps({"event": event, "deliveries": deliveries}, separators=(",", ":")) + "\n"
        if _supervised_here(self.paths):  # a restart started a new record: this run's late events stay out
            fd = _open_regular(self.paths.output_events, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            try:
                _write_all(fd, record.encode("utf-8"))
            finally:
                os.close(fd)

    def _timeout_s(self) -> float:
        if self.timeout is None:
            self.timeout = _notify_timeout_s(self.log)
        return self.timeout

    def finish(self) -> None:
        """Deliver what is still pending, for at most the notify timeout; drop the
        rest (said in supervisor.log), and let the delivery under way end (it is
        bounded by its own timeout)."""
        if self.deliverer is None and not self.dropped:
            return  # nothing ever matched
        deadline = _deadline(self._timeout_s())
        with self.guard:
            while (self.pending or self.delivering) and _remaining(deadline) > 0:
                self.guard.wait(_remaining(deadline))
            left, self.pending, self.closing = len(self.pending), [], True
            self.guard.notify_all()
            while self.delivering:
                self.guard.wait()
        if left or self.dropped:
            self.log("%d output-match events not delivered: %d were dropped while %d waited for delivery, %d were "
                     "left at the end after %gs (JOBSTATE_NOTIFY_TIMEOUT)" % (
                         left + self.dropped, self.dropped, _OUTPUT_EVENTS_PENDING, left, self._timeout_s()))


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


def _finish_supervising(supervisor: "_Supervisor", lock: _JobLock, body: Callable[[], None]) -> NoReturn:
    """Where every supervisor ends: run body (its part of the job's life), record
    a crash as the job's failure, release the job lock, notify, and exit."""
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
    supervisor._release_slot()
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
    """The command line of a new interpreter that runs _supervisor_main(args):
    a supervisor, or the forkserver.

    It runs only sections 1 to 7 of this file (see _SUPERVISOR_BOOT), from
    bytecode cached under our cache directory: compiling them takes ~85 ms
    here, and a supervisor lives as long as its job, holding every function it
    loaded.  No site (-S): it needs only the standard library, and skipping
    .pth hooks saves most of the start-up.
    """
    cache = _supervisor_code_path(_process_layer.cache_dir())
    return [sys.executable, "-S", "-c", _SUPERVISOR_BOOT, _THIS_FILE, cache, *args]


# A supervisor needs sections 1 to 7 and nothing after them: calls point
# backwards (StaticTests), and the supervisors' entry points are in section 7.
# So it compiles the file only up to section 8's banner, and caches that code
# itself (the import system would cache the whole file, under the whole file's
# name): about 0.7 MiB less per running job, and a faster start.  The cache is
# used only if it is ours and only we may write it (it is code we run), and
# only for the file it was compiled from (the key _supervisor_code_key()
# computes); it is written by _cache_supervisor_code once the code runs.
# dataclasses imports inspect, which brings ast, dis and tokenize (1.4 MiB per
# supervisor, 5 ms of its start), only to write a docstring for a class that
# has none; ours all have one (StaticTests), so a supervisor loads inspect the
# first time something asks it for a name, and otherwise never.
_SUPERVISOR_BOOT = r"""
import marshal, os, sys, types

class Later(types.ModuleType):  # see _SUPERVISOR_BOOT's comment
    def __getattr__(self, name):
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        return getattr(__import__(self.__name__), name)

sys.modules.setdefault("inspect", Later("inspect"))
path, cache = sys.argv[1:3]
st = os.stat(path)
key = (path, st.st_mtime_ns, st.st_size, sys.hexversion)
try:
    with open(cache, "rb") as f:
        held = os.fstat(f.fileno())
        ours = not hasattr(os, "getuid") or (held.st_uid == os.getuid() and not held.st_mode & 0o022)
        code = marshal.load(f) if ours and marshal.load(f) == key else None
except (OSError, EOFError, ValueError, TypeError):
    code = None
compiled = code is None
if compiled:
    with open(path, "rb") as f:
        source = f.read()
    code = compile(source[:source.index(b"\n# 8. Jobs API")], path, "exec", dont_inherit=True)
module = sys.modules["_jobstate_supervisor"] = types.ModuleType("_jobstate_supervisor")
module.__file__ = path
exec(code, vars(module))
if compiled:
    module._cache_supervisor_code(cache, key, code)
sys.exit(module._supervisor_main(sys.argv[3:]))
"""


def _cache_supervisor_code(cache: str, key: tuple, code) -> None:
    """Write what _SUPERVISOR_BOOT compiled for the next supervisors: two marshal
    records, the key and the code, written whole under another name first, so a
    reader sees the old cache or the new one."""
    import marshal
    part = "%s.%d" % (cache, os.getpid())
    try:
        os.makedirs(os.path.dirname(cache), 0o700, exist_ok=True)
        with open(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o600), "wb") as f:
            marshal.dump(key, f)
            marshal.dump(code, f)
        os.replace(part, cache)
    except OSError:  # no cache: the next supervisor compiles again (doctor says so)
        _unlink_quietly(part)
        return
    _forget_gone_copies(os.path.dirname(cache))


def _forget_gone_copies(cache_dir: str) -> None:
    """Remove the cached code of copies of jobstate.py that are gone (a temporary
    checkout, a test's copy): nothing else would, and each is 0.4 MB."""
    import marshal
    for name in os.listdir(cache_dir):
        if name.startswith("jobstate.") and name.endswith(".code"):
            path = os.path.join(cache_dir, name)
            try:
                with open(path, "rb") as f:
                    source = marshal.load(f)[0]
            except (OSError, EOFError, ValueError, TypeError, IndexError):
                continue  # being replaced, or not ours to judge
            if isinstance(source, str) and not os.path.exists(source):
                _unlink_quietly(path)


def _supervisor_main(argv: List[str]) -> int:
    """main() of an interpreter that _supervisor_argv started: `_supervise ...`
    (see _supervisor_entry) or `_forkserver SOCKET_FD`."""
    if argv[:1] == ["_forkserver"]:
        _forkserver_main(int(argv[1]))
    return _supervisor_entry(argv[1:])


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


def _supervisor_entry(args: List[str]) -> int:
    """Entry point of a supervisor that is a new interpreter: `_supervise ROOT JOB_ID LOCK_FD [RUNNING]`.

    Without RUNNING, a spawned supervisor (_launch_by_spawn) that runs the
    whole job; with it, the watcher a forked launch exec'd after starting the
    job (see _supervise_forked), which only watches it; with "waiting" (or
    "waiting:TICKET_FD", its place in a queue's line, held), a forked launch
    handed us a job that waits its turn, to start and watch.
    """
    root, job_id, lock_fd = args[0], args[1], int(args[2])
    paths = JobPaths(root, job_id)
    supervisor = _Supervisor(paths)
    if args[3:4] and args[3].startswith("waiting"):  # "waiting" or "waiting:TICKET_FD"
        _process_layer.supervisor_signals()  # catch again what the exec reset (see exec_keeping)
        supervisor.ticket_fd = int(args[3][8:]) if args[3][7:8] == ":" else None
        _finish_supervising(supervisor, _JobLock.handed_over(paths, lock_fd), supervisor.run)
    if len(args) > 3:
        _process_layer.supervisor_signals()  # catch again what the exec reset (see exec_keeping)
        lock = _JobLock.handed_over(paths, lock_fd)
        _finish_supervising(supervisor, lock, lambda: supervisor.watch(_Running.decode(args[3], paths)))
    _process_layer.prepare_supervisor()
    # With a descriptor, the lock is inherited from the launcher, already held: no gap.
    lock = _JobLock.handed_over(paths, lock_fd) if lock_fd >= 0 else _JobLock(paths)
    if lock_fd < 0 and not _take_lock_after_launcher(paths, lock):
        sys.stderr.write("%s: the job lock stays taken: another supervisor runs this job\n" % _utc_now())
        return 1
    _finish_supervising(supervisor, lock, supervisor.run)


def _supervise_forked(paths: JobPaths, lock: _JobLock) -> None:
    """The supervisor of a forked launch (POSIX), still in the launcher's image.

    Starting the child and acknowledging from here saves the launcher the
    start-up of a second interpreter; the watching is then handed to a fresh,
    small interpreter by exec (same pid, so the child stays ours), which also
    drops the launcher's memory.  If that exec fails, we watch from here.
    """
    supervisor = _Supervisor(paths)

    def wait_elsewhere(ticket_fd: Optional[int]) -> None:
        # The job may wait for hours: not in a copy of the launcher's memory
        # (tens of MB), but in a fresh small interpreter, handed the job lock and
        # its place in the queue's line.  The launcher has its answer already.
        mode = "waiting" if ticket_fd is None else "waiting:%d" % ticket_fd
        argv = _supervisor_argv("_supervise", paths.root, paths.job_id, str(lock.fd), mode)
        try:
            _process_layer.exec_keeping(argv, [lock.fd] + ([] if ticket_fd is None else [ticket_fd]))
        except OSError as exc:
            supervisor.log("cannot exec the waiting supervisor (%s); waiting from the launch image" % exc)

    def start_then_hand_over():
        supervisor.on_wait = wait_elsewhere
        running = supervisor.start()
        if running is not None:
            argv = _supervisor_argv("_supervise", paths.root, paths.job_id, str(lock.fd), running.encode())
            try:
                _process_layer.exec_keeping(argv, [lock.fd, *running.fds()])
            except OSError as exc:
                supervisor.log("cannot exec the watcher (%s); watching from the launch image" % exc)
            supervisor.watch(running)

    _finish_supervising(supervisor, lock, start_then_hand_over)


def _send_request(sock, data: bytes, fds: List[int]) -> None:
    """A length-prefixed message on a stream socket, descriptors riding on its
    first bytes (socket.send_fds, which 3.8 lacks, is this sendmsg)."""
    import array
    import socket
    message = b"%010d" % len(data) + data
    sent = sock.sendmsg([message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    if sent < len(message):  # never an empty send: to a peer that read it all and closed, that is EPIPE
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


def _supervise_from_forkserver(paths: JobPaths, lock_fd: int, request: dict) -> NoReturn:
    """A supervisor forked by the forkserver for one request: it takes on the
    launcher's environment and umask, then runs the whole job."""
    # What a spawned supervisor would inherit from the launcher at launch time.
    if os.environ != request["env"]:  # usually equal: we started with the launcher's environment
        os.environ.clear()
        os.environ.update(request["env"])
    if request["umask"] is not None:
        os.umask(request["umask"])
    supervisor = _Supervisor(paths)
    _finish_supervising(supervisor, _JobLock.handed_over(paths, lock_fd), supervisor.run)


def _spare_supervisor(launcher_sock, forkserver_end, conn) -> NoReturn:
    """A supervisor forked before its job was asked for (see _forkserver_main):
    detached already, it waits for the one request the forkserver hands it on
    conn, then runs that job.  It exits when the forkserver goes first."""
    launcher_sock.close()  # a launcher must see the forkserver's death, not a spare that still listens
    forkserver_end.close()
    try:
        if not _request_waits(conn):  # launches in quick succession: the job first, not the rehearsal
            _rehearse_start()
    except Exception:  # it only warms memory: what failed in it, the real start meets and records
        pass
    try:
        message, fds = _recv_request(conn)
    except (OSError, ValueError):
        message, fds = b"", []
    conn.close()
    if not message:
        os._exit(0)
    # A bad request ends us here (fork_supervisor exits): its launcher reads EOF, not "ok".
    request = json.loads(message)
    lock_fd, ack_w, log = fds
    for fd, target in ((ack_w, 1), (log, 2)):
        os.dup2(fd, target)
        os.close(fd)
    _supervise_from_forkserver(JobPaths(request["root"], request["job_id"]), lock_fd, request)


def _request_waits(conn) -> bool:
    import select
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0))


def _rehearse_start() -> None:
    """What a spare does before it waits: run the code of a start on a job that
    does not exist (no file opened, no process made).  A spare is a fork of the
    forkserver, so each page of memory is copied when it is first written; the
    hundreds of pages a start touches (the objects whose counts it changes)
    are copied now instead of while the launcher waits (1.5 ms of a launch
    here).  The job would have copied the same pages anyway."""
    job_id = "0" * 32
    request = json.loads(json.dumps({"root": os.sep, "job_id": job_id, "env": dict(os.environ), "umask": None}))
    _Supervisor(JobPaths(request["root"], request["job_id"]))
    state = JobState.from_dict(json.loads(_file_json_bytes(JobState(JobInfo(job_id, JobStatus.CREATED)).to_dict())))
    spec = JobSpec.from_dict(json.loads(_file_json_bytes(JobSpec(["true"], os.sep).to_dict())))
    state.job.status, state.job.started_at, state.pid = JobStatus.RUNNING, _utc_now(), os.getpid()
    state.pid_token = _process_layer.process_token(os.getpid())
    _file_json_bytes(state.to_dict())
    _exec_arguments(spec.argv, _job_environment(spec, job_id))


def _fork_spare(launcher_sock, null: int):
    """Fork the next spare supervisor; our end of its socket, or None when no
    process can be forked now (the next request tries again)."""
    import socket
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        body = functools.partial(_spare_supervisor, launcher_sock, ours, theirs)
        _process_layer.fork_supervisor(body, stdout=null, stderr=null, reaper=True)
        return ours
    except OSError:
        ours.close()
        return None
    finally:
        theirs.close()


def _forkserver_main(sock_fd: int) -> NoReturn:
    """Serve launch requests from one launcher process until it closes the socket.

    Each request is the job and the launcher's environment, with three
    descriptors: the job lock (held: the hand-over has no gap), the
    acknowledgement pipe and supervisor.log.  The supervisor is a fork of
    this small warm process, shares its memory with its siblings, and is
    forked before its request comes: a spare that has its session, signals
    and subreaper set already, and starts the job the moment it is handed
    the request.  The next spare is forked while that job starts.
    """
    import gc
    import socket
    import subprocess  # noqa: F401  (loaded here once, for every supervisor forked from us)
    sock = socket.socket(fileno=sock_fd)
    _process_layer.warm_up()
    _process_layer.supervisor_signals()  # a launcher's mask must not block our SIGCHLD
    _signal.signal(_signal.SIGCHLD, _reap_children)
    gc.freeze()  # forked supervisors then never copy these pages to collect them
    null = os.open(os.devnull, os.O_WRONLY)
    spare = _fork_spare(sock, null)
    while True:
        try:
            message, fds = _recv_request(sock)
        except (OSError, ValueError):
            message, fds = b"", []
        if not message:
            os._exit(0)  # the launcher is gone; its jobs are not ours to end (the spare sees us go)
        for _attempt in (1, 2):  # a spare that died (killed) is replaced once
            spare = spare or _fork_spare(sock, null)
            if spare is None:
                break  # no process to run it: its launcher reads EOF
            try:
                _send_request(spare, message, fds)
                break
            except OSError:
                pass
            finally:
                spare.close()
                spare = None
        for fd in fds:
            os.close(fd)
        spare = _fork_spare(sock, null)


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
    warm process started for the purpose hands each launch to a supervisor it
    forked ahead (see _forkserver_main), so a launch costs no interpreter
    start and no fork, whatever threads or memory this process has.
    The one-shot CLI never starts one.
    """

    launches = 0
    _guard = threading.Lock()
    _sock = None
    _popen: Optional[subprocess.Popen] = None
    _owner_pid: Optional[int] = None

    @classmethod
    def serves_this_process(cls) -> bool:
        return cls.launches > 0 and _process_layer.has_forkserver

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
            # Started as a supervisor is: a new session, holding only its end of the socket.
            cls._popen = _process_layer.spawn_supervisor(argv, stdout=subprocess.DEVNULL,
                                                         stderr=subprocess.DEVNULL, lock_fd=theirs.fileno())
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


def _poll_ack(fd: int, timeout_s: float) -> Optional[bool]:
    """_read_ack without its thread, where a pipe can be polled (the fork paths: POSIX)."""
    import select
    poller, deadline, line = select.poll(), _deadline(timeout_s), b""
    poller.register(fd, select.POLLIN)
    while not line.endswith(b"\n"):
        if not poller.poll(_remaining(deadline) * 1000):
            return None
        chunk = os.read(fd, 64)
        if not chunk:
            break
        line += chunk
    return line.startswith(b"ok")


def _launch_by_fork(fork: Callable[[int], None]) -> Optional[bool]:
    """fork(ack_w) makes a supervisor that acknowledges on ack_w; wait for that."""
    ack_r, ack_w = os.pipe()
    try:
        try:
            fork(ack_w)
        finally:
            os.close(ack_w)
        return _poll_ack(ack_r, LAUNCH_ACK_TIMEOUT_S)
    finally:
        os.close(ack_r)


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
            functools.partial(_supervise_forked, paths, lock), stdout=ack_w, stderr=log))
    return _launch_by_spawn(paths, lock, log)  # a new interpreter from the start


def _launch(paths: JobPaths, lock: _JobLock) -> None:
    """Start the supervisor of a created job whose lock we hold; return after its acknowledgement."""
    _check_containment_setting()
    try:
        log = _open_regular(paths.supervisor_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    except OSError as exc:
        raise LaunchError("cannot open %s: %s" % (paths.supervisor_log, exc.strerror or exc),
                          hint="remove it; jobstate writes it anew") from None
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


_UNVERIFIABLE = ("this system has no /proc, so no pid can be verified: the job's supervisor signalled its main "
                 "process and that process's group; processes that left the group (setsid), and leftovers of a "
                 "finished job, cannot be found or counted")


class _CallArgumentsError(InvalidArgumentError, TypeError):
    """Arguments a public function does not take (a TypeError too, as Python's own)."""


def _api_arguments(function):
    """An argument the function does not take (an unknown keyword, one too many)
    raises InvalidArgumentError like every other bad input, not a bare TypeError."""
    @functools.wraps(function)
    def checked(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except TypeError as exc:
            if exc.__traceback__.tb_next is not None:  # raised inside the function, not by the call
                raise
            raise _CallArgumentsError(str(exc), hint="see help(jobstate.%s)" % function.__qualname__) from None
    return checked


def _lock_is_free(paths: JobPaths) -> bool:
    with _JobLock(paths) as lock:
        return lock.acquire(exclusive=False, create=False)


def _restart_lock(paths: JobPaths) -> _LockFile:
    """Held shared by each restart from before it stops the run until the next one
    is launched: a run that ended `killed` while it is held is about to run again,
    which a free job lock alone cannot tell (the restart takes that lock only after
    the old supervisor lets go of it).  A crashed restart's hold dies with it."""
    _require_trusted_locks(paths.root)
    return _LockFile(os.path.join(paths.dir, "restart.lock"))


def _restart_announced(paths: JobPaths) -> bool:
    try:
        with _restart_lock(paths) as lock:
            return not lock.acquire(create=False)
    except FileNotFoundError:  # never restarted
        return False


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
        except (OSError, JobError):  # the job directory went away, or its locks cannot be trusted
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


def _follow(paths: JobPaths, start: Tuple[int, int], sinks, poll_s: float = 0.05,
            wanted: Optional[Callable[[], bool]] = None) -> None:
    """Copy new bytes of stdout.log and stderr.log to the sinks until the job
    ends (or, with wanted, until wanted() says the follower has gone)."""
    offsets = list(start)
    logs = (paths.stdout_log, paths.stderr_log)
    while wanted is None or wanted():
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


# What `list --state` accepts: a status, or `waiting` (created, waiting for a
# queue slot or for other jobs) and `queued` (waiting for a queue slot).
_LIST_STATES = tuple(s.value for s in JobStatus) + ("waiting", "queued")


# A wait for a line looks at the logs this often: a new line is seen within it.
# The logs are files written by another process; a look is one fstat per log
# (and a read of what is new), so polling costs next to nothing and works the
# same on every platform.
_MATCH_POLL_S = 0.01


class _LogReader:
    """One log read forward from where the last look stopped, never twice, cut into lines."""

    def __init__(self, stream: str, path: str):
        self.stream, self.path = stream, path
        self.fd: Optional[int] = None
        self.lines = _LineSplitter()

    def find(self, pattern, final: bool, deadline: Optional[float]) -> Optional[LineMatch]:
        """The first new line the pattern finds something in.  With final (the job
        has ended) the unfinished last line counts too.  Stops at the deadline
        even if the job writes faster than we read; the next look goes on from there."""
        if self.fd is None:
            self.fd = _open_job_file(self.path)
            if self.fd is None:
                return None
        try:
            if os.fstat(self.fd).st_size < self.lines.offset:  # reset by a restart: a new run
                self.lines = _LineSplitter()
            os.lseek(self.fd, self.lines.offset, os.SEEK_SET)
            while True:
                chunk = os.read(self.fd, _CHUNK_BYTES)
                blocks = self.lines.feed(chunk) if chunk else self.lines.finish() if final else []
                for block in blocks:
                    hits = _matching_lines(pattern, block, first_only=True)
                    if hits:
                        return LineMatch(self.stream, hits[0][1], hits[0][0])
                if not chunk or _remaining(deadline) == 0:
                    return None
        except OSError as exc:  # a directory planted under the log's name, say
            raise _unreadable(self.path, exc) from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class _LineScanner:
    """The first line matching a pattern in a job's stdout, stderr or either
    (stdout looked at first), lines written before the wait included."""

    def __init__(self, paths: JobPaths, pattern, stream: str):
        self.paths, self.pattern, self.stream = paths, pattern, stream
        self.readers: List[_LogReader] = []
        self.reset()

    def reset(self) -> None:
        """Start again from the beginning of the logs (the job was restarted)."""
        self.close()
        logs = (("stdout", self.paths.stdout_log), ("stderr", self.paths.stderr_log))
        self.readers = [_LogReader(name, path) for name, path in logs if self.stream in (name, "either")]

    def find(self, final: bool, deadline: Optional[float]) -> Optional[LineMatch]:
        for reader in self.readers:
            found = reader.find(self.pattern, final, deadline)
            if found is not None:
                return found
        return None

    def close(self) -> None:
        for reader in self.readers:
            reader.close()


def _check_state_name(state: Optional[str]) -> None:
    if state is not None and state not in _LIST_STATES:
        raise InvalidArgumentError("unknown state %r" % (state,), hint="one of: " + ", ".join(_LIST_STATES))


def _state_matches(wanted: Optional[str], state: JobState) -> bool:
    if wanted is None:
        return True
    if wanted in ("waiting", "queued"):
        waits_for = (state.waiting or {}).get("for") if state.status is JobStatus.CREATED else None
        return waits_for == "queue" if wanted == "queued" else waits_for in ("queue", "jobs")
    return state.status.value == wanted


def _list_summaries(root: str, *, cwd: Optional[str], all_jobs: bool, state: Optional[str],
                    tags: Sequence[str], limit: Optional[int]) -> Tuple[List[JobSummary], bool, int]:
    """Jobs newest first with filters; reads files only until `limit` matches are found.

    The definition (meta.json) decides scope and tags, so a job outside them
    costs one small read; its state is read only for the jobs that pass.
    Returns (jobs, truncated, skipped): skipped counts the job directories
    passed over because their meta.json is missing or unreadable.
    """
    filters = [_validate_tag_filter(t) for t in tags]
    if os.path.isdir(root):
        _require_trusted_locks(root)
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
        if summary is None or not _state_matches(state, summary.state):
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
    return JobSummary(paths.job_id, state, spec.argv, spec.cwd, spec.tags, spec.created_at, spec.queue)


@_api_arguments
def list_jobs(root: Optional[str] = None, *, cwd: Optional[str] = None, all: bool = False,
              state: Optional[str] = None, tags: Sequence[str] = (), limit: Optional[int] = DEFAULT_LIST_LIMIT
              ) -> List[JobSummary]:
    """Jobs newest first: those whose cwd is `cwd` (default: the current directory), or all.

    state: only jobs in that state ('running', ...; 'waiting' and 'queued' for jobs
    waiting their turn, for a slot or other jobs, or for a slot).  tags: patterns that must all
    match ('a.b' exact, 'a.*' subtree).  limit: at most that many (None: no limit).
    """
    _check_state_name(state)
    return _list_summaries(resolve_root(root), cwd=_path_argument(cwd, "cwd"), all_jobs=all, state=state,
                           tags=_strings_argument(tags, "tags"), limit=_count_argument(limit, "limit"))[0]


@_api_arguments
def gc(root: Optional[str] = None, *, older_than_s=30 * 86400, max_jobs: Optional[int] = None,
       max_bytes: Optional[int] = None, dry_run: bool = False) -> GcReport:
    """Remove terminal jobs across the whole root.

    A job goes when it finished more than older_than_s ago, or when the terminal
    jobs (oldest first) exceed max_jobs or max_bytes in all.  Created and running
    jobs are never touched.  Leftovers of interrupted job creation go too.
    """
    return _gc(resolve_root(root), older_than_s=older_than_s, max_jobs=max_jobs, max_bytes=max_bytes,
               dry_run=dry_run)


# How long an empty job cgroup stays before gc removes it (see remove_forsaken_containment).
_FORSAKEN_CGROUP_AGE_S = 60.0


def _gc(root: str, *, older_than_s, max_jobs: Optional[int], max_bytes: Optional[int], dry_run: bool) -> GcReport:
    """gc() under a resolved root."""
    cutoff = time.time() - _parse_duration(older_than_s, "older_than")
    if os.path.isdir(root):
        _require_trusted_locks(root)
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
            reason = "older_than" if finished < cutoff else "over_cap"
            deleted.append(_delete_row(JobPaths(root, job_id), dry_run, reason, bytes=size))
    _remove_abandoned_dirs(root, dry_run)
    if not dry_run:
        _process_layer.remove_forsaken_containment(_FORSAKEN_CGROUP_AGE_S)
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


def _delete_row(paths: JobPaths, dry_run: bool, reason: Optional[str], **extra) -> dict:
    """Delete one job, unless dry_run, and return its row (gc, delete --all):
    `deleted` or `would_delete` with reason, or `skipped` with why it could not go."""
    row = {"job_id": paths.job_id, "action": "would_delete" if dry_run else "deleted", "reason": reason, **extra}
    if not dry_run:
        try:
            _delete_job(paths)
        except JobError as exc:
            row.update(action="skipped", reason=exc.message)
    return row


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


def _auto_gc(root: str, older_than_s=None) -> None:
    """Bounded housekeeping after a launch; never fails or noticeably slows the launch.

    At most once an hour per root (one stat), under a flock that dies with its
    holder (a crashed gc cannot disable it), scanning only ids old enough to
    have expired, and at most _AUTO_GC_MAX_SCAN of them.
    JOBSTATE_AUTO_GC=0 turns it off; JOBSTATE_GC_OLDER_THAN sets the age (30d);
    older_than_s, given by the caller, sets it for this launch (and overrides both).
    """
    if older_than_s is None and os.environ.get("JOBSTATE_AUTO_GC", "1") == "0":
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
        older_than = _parse_duration(os.environ.get("JOBSTATE_GC_OLDER_THAN", "30d") if older_than_s is None
                                     else older_than_s, "JOBSTATE_GC_OLDER_THAN")
    except JobError:
        return
    with _LockFile(os.path.join(root, ".gc.lock")) as lock:
        try:
            if not lock.acquire():
                return  # another process is collecting right now
            os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _FILE_FLAGS, 0o600))
            cutoff = time.time() - older_than
            scanned = 0
            for job_id, finished, _ in _terminal_jobs(root, newest_ms=int(cutoff * 1000)):
                scanned += 1
                if finished < cutoff:
                    _delete_row(JobPaths(root, job_id), False, "older_than")
                if scanned >= _AUTO_GC_MAX_SCAN:
                    break
            _process_layer.remove_forsaken_containment(_FORSAKEN_CGROUP_AGE_S)
        except (OSError, JobError):  # housekeeping only: the launch already succeeded
            pass


def _auto_gc_after_launch(root: str, auto_gc) -> None:
    """auto_gc: True (as the environment says), False (skip), or the age to collect at."""
    if auto_gc is True:
        _auto_gc(root)
    elif auto_gc is not False:
        _auto_gc(root, _parse_duration(auto_gc, "auto_gc"))


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
        _refuse_unsafe_root(root)
        self.id = job_id
        self.root = root
        self.paths = JobPaths(root, job_id)
        self._release = _ReleaseWaiter(self.paths)
        self.readiness: Optional[Readiness] = None  # what run(ready=...) found

    def __repr__(self) -> str:
        return "Job(%r, root=%r)" % (self.id, self.root)

    def spec(self) -> JobSpec:
        """The job's definition (meta.json)."""
        return _read_spec(self.paths)

    @_deleted_is_not_found
    def state(self) -> JobState:
        """The current JobState; a job whose supervisor died reads as failed (supervisor_lost)."""
        return _read_state_reconciled(self.paths)

    @_api_arguments
    def wait(self, timeout_s: Optional[float] = None, *, match=None, stream: str = "either",
             cancel: Optional[threading.Event] = None):
        """Block until the job is terminal and its logs are drained, or timeout_s passes.

        Returns the state at that moment (check `.status`).  None waits forever.
        A created job is waited on too: it may be started meanwhile.

        match: a regular expression (Python re, a string or compiled), searched
        in each line of the job's output; the wait then also ends as soon as a
        line it finds something in has been written (lines written before the
        call count), and returns a Readiness: the state and the LineMatch, or
        None when the job ended or the time ran out first.  The job runs on.
        stream: which output match looks at: 'stdout', 'stderr' or 'either'.
        cancel: a threading.Event another thread may set to end the wait at
        once (within 50 ms), as if the time had run out.
        Raises InvalidArgumentError for an invalid pattern or stream.
        """
        if timeout_s is not None:  # as the CLI's --until: a duration from 0, never NaN
            timeout_s = _parse_duration(timeout_s, "timeout_s")
        if match is not None:
            return self._wait_for_line(_compile_line_pattern(match, "match"), _check_stream(stream, "stream"),
                                       timeout_s, cancel)
        if stream != "either":
            raise InvalidArgumentError("stream %r is for a match, and no match pattern was given" % (stream,),
                                       hint="wait(match=REGEX, stream=...); CLI: wait JOB --match REGEX --stream S")
        deadline = _deadline(timeout_s)
        while True:
            state = self.state()
            if state.status.is_terminal and _lock_is_free(self.paths):
                return state
            remaining = _remaining(deadline)
            if remaining == 0 or cancel is not None and cancel.is_set():
                return state
            if cancel is not None:  # look at it every 50 ms
                remaining = 0.05 if remaining is None else min(0.05, remaining)
            if state.status is JobStatus.CREATED and state.waiting is None:  # nobody runs it (yet)
                time.sleep(0.05 if remaining is None else min(0.05, remaining))
            else:
                self._release.wait(remaining)

    def _wait_for_line(self, pattern, stream: str, timeout_s: Optional[float],
                       cancel: Optional[threading.Event] = None) -> Readiness:
        """Job.wait(match=...): look at the new output every _MATCH_POLL_S; the
        state is read again only when the supervisor lets go of the lock (the
        job ended, or was restarted) or while the job is still `created`."""
        deadline = _deadline(timeout_s)
        scanner = _LineScanner(self.paths, pattern, stream)
        try:
            state = self.state()
            run_started = state.started_at
            while True:
                ended = state.status.is_terminal and _lock_is_free(self.paths)
                restarting = ended and _restart_announced(self.paths)
                ended = ended and not restarting and self._same_state(state)
                found = scanner.find(ended, deadline)
                if found is not None:
                    return Readiness(self.state(), found)
                remaining = _remaining(deadline)
                if ended or remaining == 0 or cancel is not None and cancel.is_set():
                    return Readiness(state, None)
                pause = _MATCH_POLL_S if remaining is None else min(_MATCH_POLL_S, remaining)
                if restarting or state.status is JobStatus.CREATED and state.waiting is None:  # no run (yet)
                    time.sleep(pause)
                elif not self._release.wait(pause):
                    continue
                state = self.state()
                if state.started_at != run_started:  # restarted meanwhile: its logs are new
                    scanner.reset()
                    run_started = state.started_at
        finally:
            scanner.close()

    def _same_state(self, state: JobState) -> bool:
        """No restart launched a new run since `state` was read: one that ran its
        course between that read and the look at the restart lock did."""
        again = self.state()
        return (again.status, again.started_at, again.updated_at) == (state.status, state.started_at, state.updated_at)

    @_deleted_is_not_found
    @_api_arguments
    def tail(self, lines: Optional[int] = DEFAULT_TAIL_LINES, max_bytes: int = DEFAULT_MAX_BYTES) -> Tail:
        """The last `lines` lines (None: no line limit) and at most max_bytes of each stream."""
        self.state()  # raises JobNotFoundError for a job that is gone
        return _tail(self.paths, _count_argument(lines, "lines"), _parse_size(max_bytes, "max_bytes"))

    @_deleted_is_not_found
    def start(self, *, auto_gc=True) -> "Job":
        """Launch a created job; returns once its supervisor has acknowledged.

        auto_gc: True (the default: see JOBSTATE_AUTO_GC), False to skip the
        housekeeping after this launch, or the age (seconds, '30d') it collects at.
        """
        with _JobLock(self.paths) as lock:
            if not lock.acquire():
                raise _held_error(self.paths, "only a created job can be started")
            state = _read_state(self.paths)
            if state.status is not JobStatus.CREATED:
                raise InvalidStateError(self.id, state.status, "only a created job can be started")
            _read_spec(self.paths)  # a damaged definition is refused here, not by a supervisor
            _launch(self.paths, lock)
        _auto_gc_after_launch(self.root, auto_gc)
        return self

    @_deleted_is_not_found
    @_api_arguments
    def restart(self, signal: str = "TERM", *, kill_after_s: float = DEFAULT_KILL_AFTER_S, auto_gc=True) -> "Job":
        """Stop the job's tree if it runs, then launch the same definition under the same id.

        Serialized through the job lock: however many restarts and kills race,
        at most one supervisor runs the job at a time.  auto_gc: as for start().
        """
        _parse_signal(signal)
        self.state()
        _read_spec(self.paths)  # a damaged definition is refused before anything is stopped or reset
        with _restart_lock(self.paths) as announced, _JobLock(self.paths) as lock:
            announced.acquire(exclusive=False, blocking=True)  # so that a wait --match keeps waiting
            leftovers_deadline = None
            while not lock.acquire():
                # A running (or waiting) job is ours to stop; so are the processes a
                # finished run left that still write to its logs (its supervisor
                # copies them, holding the lock shared), as the new run starts the
                # logs afresh.  Any other state means another restart or start holds
                # the lock for a moment: look again shortly.
                state = self.state()
                if _needs_supervisor(state):
                    self.kill(signal, kill_after_s=kill_after_s, wait_s=kill_after_s + DRAIN_TIMEOUT_S + 1)
                elif state.status.is_terminal and state.logs_drained is False and leftovers_deadline is None:
                    self.kill(signal, kill_after_s=kill_after_s, wait_s=0)
                    leftovers_deadline = _deadline(DRAIN_TIMEOUT_S + 1)
                elif leftovers_deadline is not None and _remaining(leftovers_deadline) == 0:
                    raise InvalidStateError(self.id, state.status, "processes it left still hold its output "
                                            "and could not be stopped ('jobstate kill %s --signal KILL')" % self.id)
                else:
                    time.sleep(0.02)
            _read_spec(self.paths)  # again under the lock: damaged meanwhile
            self._stop_unsupervised_run(_read_state(self.paths), signal, kill_after_s)
            for path in (self.paths.kill_request, self.paths.kill_ack, self.paths.event, self.paths.output_events):
                _unlink_quietly(path)
            _write_state(self.paths, JobState(JobInfo(self.id, JobStatus.CREATED)))
            _launch(self.paths, lock)
        _auto_gc_after_launch(self.root, auto_gc)
        return self

    def _stop_unsupervised_run(self, state: JobState, signal: str, kill_after_s: float) -> None:
        """Before a new run starts, stop a previous one the lock did not stand for: its
        supervisor was lost (its tree lives on), or its lock file was removed (the
        supervisor lives on, and must finish first: it would write over the new run's
        state).  Else two copies would run.  Under the job lock; InvalidStateError
        when it will not stop."""
        if not _run_may_outlive_supervisor(state) or not _process_layer.can_verify_pids():
            return
        signum, name = _parse_signal(signal)
        supervisor = _Proc(state.supervisor_pid, state.supervisor_token) if _supervisor_alive(state) else None
        if supervisor is not None:
            self._request_kill(name, [])  # so that it records the end, and starts no other run
        ref = _TreeRef.from_state(state)
        stopped = False
        for sent, wait_s in ((signum, kill_after_s), (_process_layer.signal_numbers()["KILL"], DRAIN_TIMEOUT_S)):
            if _wait_tree_gone(ref, 0):
                stopped = True
                break
            _process_layer.signal_tree(ref, sent)
            if _wait_tree_gone(ref, wait_s):
                stopped = True
                break
        deadline = _deadline(DRAIN_TIMEOUT_S + 1)
        while stopped and supervisor is not None and _process_layer.is_alive(supervisor) and _remaining(deadline):
            time.sleep(0.02)
        if not stopped or (supervisor is not None and _process_layer.is_alive(supervisor)):
            raise InvalidStateError(self.id, state.status, "its previous run could not be stopped "
                                    "('jobstate kill %s --signal KILL')" % self.id)

    @_deleted_is_not_found
    @_api_arguments
    def kill(self, signal: str = "TERM", *, kill_after_s: Optional[float] = None,
             wait_s: float = DEFAULT_KILL_OBSERVE_S) -> KillResult:
        """Signal the job's whole process tree, then observe it for up to wait_s.

        kill_after_s: escalate to KILL for whatever is left after that many seconds.
        On a terminal job, stops leftover processes and keeps the recorded result.
        """
        signum, name = _parse_signal(signal)
        state = self.state()
        terminating = name[3:] in _TERMINATING
        if state.status is JobStatus.CREATED and state.waiting is not None and terminating:
            return self._kill_waiting(name, wait_s)
        if state.status is JobStatus.CREATED and state.waiting is not None:  # start and delete refuse it
            raise InvalidStateError(self.id, state.status, "it has no process to signal yet",
                                    hint="it waits for %s: 'jobstate kill %s' takes it out of the line;"
                                         " a signal reaches it once it runs ('jobstate wait %s')"
                                         % ("a queue slot" if state.waiting.get("for") == "queue"
                                            else state.waiting.get("for"), self.id, self.id))
        if state.status is JobStatus.CREATED:
            raise InvalidStateError(self.id, state.status, "it has no process to signal",
                                    hint="it never started: 'jobstate start %s' runs it, 'jobstate delete %s' "
                                         "removes it" % (self.id, self.id))
        ref, running = _TreeRef.from_state(state), state.status is JobStatus.RUNNING
        terminating, verified = name[3:] in _TERMINATING, _process_layer.can_verify_pids()
        send = functools.partial(self._send, ref, running and not verified)
        warnings = [] if verified else [_warning("pids_unverifiable", _UNVERIFIABLE)]
        if running and terminating and verified:
            self._request_kill(name, warnings)
        signalled = send(name)
        if running and terminating:
            _Bell.ring(self.paths.bell)  # between two runs of a restart policy, nothing else would tell it
        if terminating and kill_after_s is not None and not self._stopped(ref, kill_after_s):
            if running and verified:
                self._request_kill("SIGKILL", warnings)
            signalled += send("SIGKILL")
        if terminating and wait_s:
            self._stopped(ref, wait_s)
        state = self.state()
        if not signalled and state.status is JobStatus.RUNNING and self._same_run(ref, state):
            state = self.wait(0.5)  # it may have ended just before the signal: then there was nothing to stop
            if state.status is JobStatus.RUNNING and self._same_run(ref, state):
                raise self._kill_failed(verified)
        alive = len(_process_layer.find_tree(ref)) if verified else None
        if alive == 0 and state.status is JobStatus.RUNNING and self._same_run(ref, state):
            # The tree is gone (USR1's default action, say: a signal not waited for above), and its
            # supervisor records the end at once: answer that, not `running` with no process alive.
            state = self.wait(_TREE_END_RECORD_S)
        return KillResult(state, name, signalled, alive, warnings)

    @staticmethod
    def _same_run(ref: _TreeRef, state: JobState) -> bool:
        """The job still runs the child we aimed at: a restart racing the kill may
        have ended it and started another, and then the kill did not fail."""
        return (state.pid, state.pid_token) == (ref.pid, ref.pid_token)

    def _request_kill(self, name: str, warnings: List[dict]) -> None:
        """Leave the record that makes the job read `killed` however its child reacts."""
        try:
            _write_kill_request(self.paths, name)
        except OSError as exc:  # a read-only root: the signal still goes; the record cannot
            if not warnings or warnings[-1]["code"] != "kill_request_not_written":
                warnings.append(_warning("kill_request_not_written", (
                    "the kill request could not be recorded (%s): if the job traps %s and exits on its own, "
                    "it will read `exited`, not `killed`") % (exc.strerror or exc, name)))

    def _send(self, ref: _TreeRef, through_supervisor: bool, name: str) -> int:
        """Signal the tree ourselves, or (no pid can be verified here) through its supervisor."""
        if through_supervisor:
            return self._signal_through_supervisor(name)
        return _process_layer.signal_tree(ref, _process_layer.signal_numbers()[name[3:]])

    def _signal_through_supervisor(self, name: str) -> int:
        """Ask the supervisor to deliver the signal (see _Supervisor._make_kill_fifo);
        how many processes it signalled, 0 when no supervisor answered."""
        request_id = os.urandom(8).hex()
        recorded = name if name[3:] in _TERMINATING else _read_kill_request(self.paths)
        try:
            _write_kill_request(self.paths, recorded, deliver=name, request_id=request_id)
        except OSError:  # a read-only root: the supervisor cannot be asked
            return 0
        if not self._wake_supervisor():
            return 0
        deadline, delay = _deadline(DRAIN_TIMEOUT_S), 0.002
        while True:
            ack = _read_json_quietly(self.paths.kill_ack)
            if isinstance(ack, dict) and ack.get("request_id") == request_id:
                count = ack.get("processes_signalled")
                return count if isinstance(count, int) else 0
            if _remaining(deadline) == 0 or _lock_is_free(self.paths):
                return 0
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _wake_supervisor(self) -> bool:
        """One byte on kill.fifo; False when no supervisor listens there (and none is about to)."""
        deadline = _deadline(DRAIN_TIMEOUT_S)
        while True:
            try:
                fd = os.open(self.paths.kill_fifo, os.O_WRONLY | os.O_NONBLOCK | _FILE_FLAGS)
            except OSError:  # ENXIO: no reader (yet: a forked launch is still exec'ing its watcher)
                if _remaining(deadline) == 0 or _lock_is_free(self.paths):
                    return False
                time.sleep(0.02)
                continue
            try:
                os.write(fd, b"k")
                return True
            except BlockingIOError:  # the FIFO is full of wake-ups not read yet: ours is among them
                return True
            except OSError:
                return False
            finally:
                os.close(fd)

    def _kill_failed(self, verified: bool) -> KillFailedError:
        if verified:
            return KillFailedError("no process of job %s could be signalled, and it is still running" % self.id,
                                   hint="its processes may belong to another user or be invisible here "
                                   "(hidepid): run kill as the user who started it; 'jobstate doctor' says more")
        return KillFailedError("no process of job %s could be signalled: this system has no /proc to verify its "
                               "pids, and its supervisor did not take the request" % self.id,
                               hint="mount /proc (mount -t proc proc /proc) or kill it from where /proc is "
                               "mounted; 'jobstate doctor' lists what this system lacks",
                               details={"job_id": self.id})

    def _kill_waiting(self, name: str, wait_s: float) -> KillResult:
        """Take a waiting job out of its queue or wait: its supervisor, woken by
        the bell, records `killed` without ever starting the child.  If it was
        starting the child at that very moment, it stops the tree itself."""
        _write_json_atomic(self.paths.kill_request, {"signal": name, "requested_at": _utc_now()})
        _Bell.ring(self.paths.bell)
        state = self.wait(wait_s) if wait_s else self.state()
        ref = _TreeRef.from_state(state)
        return KillResult(state, name, 0, len(_process_layer.find_tree(ref)) if state.pid else 0)

    def _stopped(self, ref: _TreeRef, timeout_s: float) -> bool:
        """Wait until the supervisor has finished and no process of the tree is left
        (without /proc: until the job has ended, which is all that can be known)."""
        deadline = _deadline(timeout_s)
        state = self.wait(timeout_s)
        if not _process_layer.can_verify_pids():
            return state.status.is_terminal
        return _wait_tree_gone(ref, _remaining(deadline))

    @_api_arguments
    def delete(self) -> None:
        """Remove the job's directory; refuses a running job (InvalidStateError)."""
        _delete_job(self.paths)

    @_deleted_is_not_found
    @_api_arguments
    def set_notifications(self, **changes) -> JobSpec:
        """Change the job's notification sinks, in any state; returns the new definition.

        Keywords: notify_command, notify_file, output_pattern, output_match_type,
        output_stream, output_command, output_file.  Those not given are kept;
        None (or "") clears one.  Nothing is delivered now: on a running job the
        output settings apply to the lines that end from about 0.2 s later, the
        completion sinks to its end; on a finished job only the definition changes.
        """
        unknown = sorted(set(changes) - set(JobSpec._SINK_KEYS))
        if unknown:
            raise InvalidArgumentError("unknown notification setting(s): %s" % ", ".join(unknown),
                                       hint="one of: " + ", ".join(JobSpec._SINK_KEYS))

        def change(spec: JobSpec) -> None:
            for key, value in changes.items():
                setattr(spec, key, value if value not in (None, "") else JobSpec.__dataclass_fields__[key].default)
            _check_sinks(spec)
        return self._update_spec("notifications", change)

    @_deleted_is_not_found
    @_api_arguments
    def set_tags(self, tags: Sequence[str]) -> List[str]:
        """Replace the job's tags (deduplicated, in order); returns the new list."""
        tags = _validate_tags(_strings_argument(tags, "tags"))
        self._update_spec("tags", lambda spec: setattr(spec, "tags", tags))
        return tags

    def _update_spec(self, what: str, change: Callable[[JobSpec], None]) -> JobSpec:
        """Read, change and rewrite meta.json under its lock; the new definition."""
        try:
            with _meta_lock(self.paths) as lock:
                lock.acquire(blocking=True)
                spec = _read_spec(self.paths)
                change(spec)
                _write_json_atomic(self.paths.meta, spec.to_dict())
        except OSError as exc:
            if isinstance(exc, FileNotFoundError):
                raise  # a deleted job: _deleted_is_not_found says so
            raise JobIOError("cannot update the %s of job %s: %s" % (what, self.id, exc.strerror or exc)) from None
        return spec


def _check_sinks(spec: JobSpec) -> None:
    """Validate a definition's notification settings and make its files absolute."""
    for key in ("notify_command", "notify_file", "output_pattern", "output_command", "output_file"):
        if getattr(spec, key) is not None and not isinstance(getattr(spec, key), str):
            raise InvalidArgumentError("%s must be a string" % key)
    _check_stream(spec.output_stream, "--output-stream")
    if spec.output_pattern is not None:
        _output_search(spec.output_pattern, spec.output_match_type)
    elif spec.output_match_type not in _MATCH_TYPES:
        _output_search("", spec.output_match_type)  # says what the match types are
    for key in ("notify_file", "output_file"):
        if getattr(spec, key):
            setattr(spec, key, _abspath(getattr(spec, key)))


def _build_spec(argv, *, cwd=None, env=None, env_files=(), inherit_env=True, masks=(), has_stdin=False,
                timeout_s=None, kill_after_s=None, kill_orphans=False, tags=(), notify_command=None,
                notify_file=None, output_pattern=None, output_match_type="contains", output_stream="either",
                output_command=None, output_file=None, queue=None, after=(), after_any=False, restart=None,
                max_restarts=None, restart_delay_s=None, memory_max=None, max_processes=None,
                cpu_time_s=None) -> JobSpec:
    """Validate a definition and make it absolute, so the job means the same from anywhere."""
    if isinstance(argv, str):
        argv = [argv]
    argv = list(argv or [])
    if not argv or not all(isinstance(a, str) for a in argv) or any("\0" in a for a in argv) or not argv[0]:
        raise InvalidArgumentError("the command must be a non-empty list of strings without NUL",
                                   hint="python jobstate.py run -- echo hello")
    env = dict(env or {})
    for key, value in env.items():
        if (not isinstance(key, str) or not isinstance(value, str) or not key or "=" in key
                or "\0" in key + value):
            raise InvalidArgumentError("invalid environment variable %r" % (key,))
    cwd = _abspath(_path_argument(cwd, "cwd") or os.curdir)
    spec = JobSpec(
        argv=argv, cwd=cwd, env=env, env_files=[_abspath(p) for p in env_files],
        inherit_env=bool(inherit_env), masks=list(masks), has_stdin=has_stdin,
        timeout_s=_parse_duration(0 if timeout_s is None else timeout_s, "timeout"),
        kill_after_s=_parse_duration(DEFAULT_KILL_AFTER_S if kill_after_s is None else kill_after_s,
                                     "kill_after"),
        kill_orphans=bool(kill_orphans), tags=_validate_tags(_strings_argument(tags, "tags")),
        notify_command=notify_command or None, notify_file=notify_file or None,
        output_pattern=_check_output_pattern(output_pattern, output_command, output_file), output_match_type=output_match_type,
        output_stream=output_stream, output_command=output_command or None, output_file=output_file or None,
        created_at=_utc_now(),
        queue=None if queue is None else _validate_queue_name(queue), after=list(after),
        after_any=_check_after_any(after, after_any), **_restart_policy(restart, max_restarts, restart_delay_s),
        memory_max=_parse_limit(memory_max, "memory_max"),
        max_processes=_parse_limit(max_processes, "max_processes"),
        cpu_time_s=_parse_limit(cpu_time_s, "cpu_time_s"))
    _check_sinks(spec)
    return spec


def _check_output_pattern(pattern, command, file) -> Optional[str]:
    """The pattern, or None: output sinks without one would never hear of a line."""
    if pattern == "":
        raise InvalidArgumentError("output_pattern is empty: it would match nothing ever sent",
                                   hint="--output-pattern TEXT (a literal; with --output-match-type regex, a regex)")
    if pattern is None and (command or file):
        raise InvalidArgumentError("output_command and output_file receive the lines output_pattern finds,"
                                   " and no output_pattern was given",
                                   hint="--output-pattern TEXT --output-file PATH (or --output-command CMD)")
    return pattern


def _check_after_any(after, after_any) -> bool:
    if after_any and not after:
        raise InvalidArgumentError("after_any needs jobs to come after", hint="--after JOB --after-any")
    return bool(after_any)


def _restart_policy(restart, max_restarts, restart_delay_s) -> dict:
    """The restart fields of a definition: policy, how many restarts, the first delay."""
    restart = restart or "never"
    if restart not in RESTART_POLICIES:
        raise InvalidArgumentError("unknown restart policy %r" % (restart,), hint="one of: " + ", ".join(RESTART_POLICIES))
    if restart == "never" and (max_restarts is not None or restart_delay_s is not None):
        raise InvalidArgumentError("max_restarts and restart_delay bound a restart policy, and there is none",
                                   hint="--restart on-failure|always --max-restarts N --restart-delay S")
    if max_restarts is None:
        max_restarts = 0 if restart == "never" else DEFAULT_MAX_RESTARTS
    if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
        raise InvalidArgumentError("max_restarts: %r is not a non-negative integer" % (max_restarts,),
                                   hint="a whole number of restarts from 0")
    delay = _parse_duration(DEFAULT_RESTART_DELAY_S if restart_delay_s is None else restart_delay_s,
                            "restart_delay")
    if delay > MAX_RESTART_DELAY_S:  # the doubling stops there: a longer first delay would pass it
        raise InvalidArgumentError("restart_delay: %gs is more than the %gs the delay doubles up to"
                                   % (delay, MAX_RESTART_DELAY_S), hint="--restart-delay 0 to 60 seconds")
    return {"restart": restart, "max_restarts": max_restarts, "restart_delay_s": delay}


@_api_arguments
def create(argv, *, root: Optional[str] = None, cwd: Optional[str] = None,
           env: Optional[Dict[str, str]] = None, env_files: Sequence[str] = (), inherit_env: bool = True,
           masks: Sequence[str] = (), stdin=None, timeout_s=None, kill_after_s=None,
           kill_orphans: bool = False, tags: Sequence[str] = (), notify_command: Optional[str] = None,
           notify_file: Optional[str] = None, output_pattern: Optional[str] = None,
           output_match_type: str = "contains", output_stream: str = "either", output_command: Optional[str] = None,
           output_file: Optional[str] = None, queue: Optional[str] = None, after: Sequence[str] = (),
           after_any: bool = False, restart: Optional[str] = None, max_restarts: Optional[int] = None,
           restart_delay_s=None, memory_max=None, max_processes: Optional[int] = None,
           cpu_time_s=None) -> Job:
    """Define a job (state `created`) without starting it.

    argv: a list (run directly) or a one-element list / string (run by the shell).
    stdin: bytes or str given to the job as its standard input.
    timeout_s / kill_after_s: seconds (or '90s', '5m'); TERM at the timeout, KILL after the grace.
    kill_orphans: when the main process exits, stop whatever it left running.
    notify_command / notify_file: sinks of the job.finished event.
    output_pattern: each line of output it finds something in ('contains': a
    literal, the default; 'regex': Python re) on output_stream ('stdout',
    'stderr', 'either') sends one job.output_matched event to output_command
    and output_file while the job runs.
    queue: run in that queue's slots (at most its `parallel` jobs at once, in order).
    after: ids (or prefixes) of existing jobs that must end first; if one does not
    exit 0 the job ends `failed` (stage "dependency"), unless after_any.
    restart: 'never' (default), 'on-failure' or 'always'; max_restarts (default 5)
    and restart_delay_s (default 1 s, doubling up to 60 s) bound it.  Per run: the timeout.
    memory_max (bytes or '64M'), max_processes, cpu_time_s (seconds or '5m'): limits of
    the whole tree where the platform can (a Job Object, a cgroup), else of the main
    process (an rlimit); state.json `limits` says how each one is enforced, and a job
    ended by one is `killed` with error.stage "limit".
    The job directory appears atomically: readers never see a half-made job.
    """
    return _create(resolve_root(root), argv, cwd=cwd, env=env, env_files=env_files, inherit_env=inherit_env,
                   masks=masks, stdin=stdin, timeout_s=timeout_s, kill_after_s=kill_after_s,
                   kill_orphans=kill_orphans, tags=tags, notify_command=notify_command, notify_file=notify_file,
                   output_pattern=output_pattern, output_match_type=output_match_type, output_stream=output_stream,
                   output_command=output_command, output_file=output_file, queue=queue, after=after, after_any=after_any, restart=restart, max_restarts=max_restarts,
                   restart_delay_s=restart_delay_s, memory_max=memory_max, max_processes=max_processes,
                   cpu_time_s=cpu_time_s)


def _create(root: str, argv, *, stdin=None, after: Sequence[str] = (), **definition) -> Job:
    """create() under a resolved root; definition is _build_spec's keywords."""
    if isinstance(stdin, str):
        stdin = stdin.encode("utf-8", errors="surrogateescape")
    if isinstance(after, str):
        after = [after]
    # No such job: refused now, never waited for.  Ids exist before the job that
    # names them, so no job can come after itself, directly or through others.
    after = list(dict.fromkeys(_resolve_job_id(root, ref) for ref in after))
    spec = _build_spec(argv, has_stdin=stdin is not None, after=after, **definition)
    _check_containment_setting()  # before the job exists: run would leave it created
    _ensure_root(root)
    _require_trusted_locks(root)
    job_id = new_job_id()
    staging, final = os.path.join(root, ".new-" + job_id), os.path.join(root, job_id)
    try:
        os.mkdir(staging, 0o700)
        _populate_job_dir(JobPaths(root, job_id), staging, spec, stdin)
        os.rename(staging, final)
        staging = final  # a failure from here on removes the job itself: nobody was told of it
        _process_layer.fsync_dir(root)  # the job that run() reports survives a power loss
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


@_api_arguments
def run(argv, *, root: Optional[str] = None, ready=None, ready_stream: str = "either",
        ready_timeout_s: Optional[float] = None, auto_gc=True, **definition) -> Job:
    """Define and launch a job; returns once its supervisor has acknowledged.

    Takes the same keyword arguments as create().  A command that cannot be
    executed is not an error here: the job ends `failed` with `error` set.
    Raises LaunchError when the supervisor could not be started.

    ready: a regular expression; then return only once a line of the job's
    output matches it, the job has ended, or ready_timeout_s has passed (None:
    no limit), with `job.readiness` saying which (see Job.wait).  The job runs
    on.  ready_stream: 'stdout', 'stderr' or 'either'.  An invalid pattern
    raises InvalidArgumentError before anything is created.  auto_gc: see Job.start.
    """
    code = create.__wrapped__.__code__
    unknown = sorted(set(definition) - set(code.co_varnames[code.co_argcount:code.co_argcount + code.co_kwonlyargcount]))
    if unknown:
        raise _CallArgumentsError("run() got unexpected keyword arguments: %s" % ", ".join(unknown),
                                  hint="run() takes create()'s keyword arguments: see help(jobstate.create)")
    return _run(resolve_root(root), argv, ready=ready, ready_stream=ready_stream, ready_timeout_s=ready_timeout_s,
                auto_gc=auto_gc, **definition)


def _run(root: str, argv, *, ready=None, ready_stream: str = "either", ready_timeout_s: Optional[float] = None,
         auto_gc=True, **definition) -> Job:
    """run() under a resolved root."""
    pattern = None if ready is None else _compile_line_pattern(ready, "ready")
    _check_stream(ready_stream, "ready_stream")
    if pattern is None and ready_stream != "either":
        raise InvalidArgumentError("ready_stream is for a ready pattern, and none was given")
    if auto_gc not in (True, False):
        _parse_duration(auto_gc, "auto_gc")
    job = _create(root, argv, **definition)
    try:
        job.start(auto_gc=auto_gc)
    except LaunchError as exc:
        if job.state().status is JobStatus.CREATED:
            _inline_supervisor_log(exc, job.paths)
            _discard_half_made(job)
        raise
    if pattern is not None:
        job.readiness = job.wait(ready_timeout_s, match=pattern, stream=ready_stream)
    return job


def _discard_half_made(job: Job) -> None:
    """No half-made job left behind: not its directory, not a child its supervisor
    started before it died unrecorded, not the cgroup it made for that child."""
    ref = _TreeRef(job.id, None, None, None, None, cgroups=_process_layer.unrecorded_cgroups(job.id))
    if _process_layer.signal_tree(ref, _process_layer.signal_numbers()["KILL"]):
        _wait_tree_gone(ref, 1.0)
    _process_layer.remove_containment(ref)
    _rmtree(job.paths.dir, ignore_errors=True)


@_api_arguments
def open_job(job_id_or_prefix: str, root: Optional[str] = None) -> Job:
    """The Job for an id or unique prefix (case-insensitive)."""
    return _open_job(resolve_root(root), job_id_or_prefix)


def _open_job(root: str, job_id_or_prefix: str) -> Job:
    """open_job() under a resolved root (whose locks must be trustworthy)."""
    job = Job(_resolve_job_id(root, job_id_or_prefix), root)
    _require_trusted_locks(root)
    return job


@_api_arguments
def set_queue(name: str, *, parallel: Optional[int] = None, paused: Optional[bool] = None,
              root: Optional[str] = None) -> QueueInfo:
    """Set a queue's parallel limit (1 to MAX_QUEUE_PARALLEL) and/or pause or resume it.

    Waiting jobs see the change at once: raising the limit starts them, resuming
    lets them start again (a pause never stops running jobs).
    """
    root = resolve_root(root)
    if not _is_legacy_queue(root, name):
        name = _validate_queue_name(name)
    if parallel is not None and (isinstance(parallel, bool) or not isinstance(parallel, int)
                                 or not 1 <= parallel <= MAX_QUEUE_PARALLEL):
        raise InvalidArgumentError("parallel: %r is not an integer from 1 to %d" % (parallel, MAX_QUEUE_PARALLEL),
                                   hint="to stop starting jobs, pause the queue ('jobstate queue pause NAME')")
    _ensure_root(root)
    qp = _QueuePaths(root, name)
    if parallel is None and not _queue_exists(root, name):  # a typo must not make a queue
        raise InvalidArgumentError("no queue %s: it has no settings and no running or waiting job" % name,
                                   hint="make it first: 'jobstate queue set %s --parallel N', then pause it;"
                                        " 'jobstate queue list' shows the queues" % name)
    _update_queue_settings(qp, parallel, None if paused is None else bool(paused))
    for job_id in _queue_line(qp):  # the head takes the news; the others follow as the line moves
        _Bell.ring(JobPaths(root, job_id).bell)
    return _scan_queues(root, only=name)[0]


def _is_legacy_queue(root: str, name) -> bool:
    """A queue whose name is refused now but which has settings from before
    (it may be paused): it can still be set, paused and resumed."""
    return (isinstance(name, str) and bool(re.match(_QUEUE_NAME_RE, name))
            and os.path.isfile(_QueuePaths(root, name).settings))


def _queue_exists(root: str, name: str) -> bool:
    if os.path.isfile(_QueuePaths(root, name).settings):
        return True
    info = _scan_queues(root, only=name)[0]
    return bool(info.running or info.waiting)


@_api_arguments
def list_queues(root: Optional[str] = None) -> List[QueueInfo]:
    """Every queue that has settings or unfinished jobs, by name."""
    return _scan_queues(resolve_root(root))


def _scan_queues(root: str, only: Optional[str] = None) -> List[QueueInfo]:
    """Queues with their running and waiting jobs, read from the jobs themselves."""
    queues: Dict[str, QueueInfo] = {}

    def info(name: str) -> QueueInfo:
        if name not in queues:
            try:
                settings = _read_queue_settings(_QueuePaths(root, name))
            except JobError:
                settings = _QueueSettings()
            queues[name] = QueueInfo(name, settings.parallel, settings.paused, [], [])
        return queues[name]

    try:
        names = [n[:-5] for n in os.listdir(os.path.join(root, ".queues")) if n.endswith(".json")]
    except OSError:  # no queue was ever set
        names = []
    for name in names + ([only] if only else []):
        if re.match(_QUEUE_NAME_RE, name) and only in (None, name):
            info(name)
    for job_id in reversed(_list_job_ids(root)):  # oldest first: the line's order
        paths = JobPaths(root, job_id)
        try:
            spec = _read_spec(paths)
            if not spec.queue or only not in (None, spec.queue):
                continue
            state = _read_state_reconciled(paths)
        except JobError:  # unreadable or deleted meanwhile: not one of the queue's jobs
            continue
        if state.status is JobStatus.RUNNING:
            info(spec.queue).running.append(job_id)
        elif state.status is JobStatus.CREATED and (state.waiting or {}).get("for") == "queue":
            info(spec.queue).waiting.append(job_id)
    return [queues[name] for name in sorted(queues)]


def _is_crash_looping(state: JobState, now: float) -> bool:
    """A restart policy at work on a job that keeps failing fast: the previous
    run failed within MAX_RESTART_DELAY_S, and the current one has not lasted
    that long either (or has not started yet).  A healthy job that crashed once
    after a long run, or runs fine since its last restart, is not looping."""
    last = state.last_exit
    if state.status is not JobStatus.RUNNING or not last:
        return False
    if last.get("state") == JobStatus.EXITED.value and last.get("exit_code") == 0:
        return False
    limit_ms = MAX_RESTART_DELAY_S * 1000
    if not isinstance(last.get("duration_ms"), int) or last["duration_ms"] > limit_ms:
        return False
    if state.waiting:
        return True
    started = _parse_time(state.started_at)
    return started is not None and (now - started) * 1000 < limit_ms


def _queue_position(root: str, queue: str, job_id: str) -> Optional[int]:
    """1 for the head of the line, the next to start; None if not in line."""
    line = _queue_line(_QueuePaths(root, queue))
    return line.index(job_id) + 1 if job_id in line else None

# ---------------------------------------------------------------------------
# 9. Responses: the one place that shapes each JSON document
# ---------------------------------------------------------------------------


# Each response's keys and their JSON Schema, in one table.  _envelope() checks
# every document it builds against it, and `schema` publishes it, so the
# published schema cannot drift from what the commands print.
def _json_type(*names: str) -> dict:
    return {"type": names[0] if len(names) == 1 else list(names)}


_STR, _INT, _BOOL = _json_type("string"), _json_type("integer"), _json_type("boolean")
_NUM, _OPT_BOOL = _json_type("number"), _json_type("boolean", "null")
_OPT_STR, _OPT_INT = _json_type("string", "null"), _json_type("integer", "null")
_STR_LIST = {"type": "array", "items": _STR}
_RANGE = {"type": "array", "items": _INT, "minItems": 2, "maxItems": 2}
_STATE_NAME = {"type": "string", "enum": [s.value for s in JobStatus]}
_ERROR_INFO = {"type": ["object", "null"], "properties": {"stage": _STR, "message": _STR, "limit": _STR},
               "required": ["stage", "message"]}
_WARNINGS = {"type": "array", "items": {
    "type": "object", "required": ["code", "message"], "additionalProperties": False,
    "properties": {"code": {"type": "string", "enum": list(_WARNING_CODES)}, "message": _STR}}}
# Why a job has no child now: a queue slot (position 1 starts next), other jobs, a restart delay.
_WAITING_INFO = {"type": ["object", "null"], "required": ["for"], "properties": {
    "for": {"type": "string", "enum": ["queue", "jobs", "restart"]}, "queue": _STR, "position": _OPT_INT,
    "jobs": _STR_LIST, "since": _STR, "restart": _INT, "at": _STR}}
_LAST_EXIT_INFO = {"type": ["object", "null"], "properties": {
    "state": _STATE_NAME, "exit_code": _OPT_INT, "signal": _OPT_STR, "timed_out": _BOOL,
    "duration_ms": _OPT_INT, "started_at": _OPT_STR, "finished_at": _OPT_STR, "limit": _OPT_STR}}
_JOB_FIELDS = {
    "job_id": _STR, "state": _STATE_NAME, "exit_code": _OPT_INT, "signal": _OPT_STR, "timed_out": _BOOL,
    "duration_ms": _OPT_INT, "created_at": _OPT_STR, "started_at": _OPT_STR, "finished_at": _OPT_STR,
    "pid": _OPT_INT, "error": _ERROR_INFO, "command": {"type": ["array", "null"], "items": _STR},
    "cwd": _OPT_STR, "env": {"type": ["object", "null"], "additionalProperties": _STR},
    "tags": _STR_LIST, "stdout_log_path": _STR, "stderr_log_path": _STR, "warnings": _WARNINGS,
    "queue": _OPT_STR, "waiting": _WAITING_INFO, "restarts": _INT, "last_exit": _LAST_EXIT_INFO,
    "crash_looping": _BOOL,
}
_OUTPUT_FIELDS = {"stdout": _STR, "stderr": _STR, "stdout_range": _RANGE, "stderr_range": _RANGE,
                  "stdout_total_bytes": _INT, "stderr_total_bytes": _INT,
                  "encoding": {"type": "string", "enum": ["utf-8-lossy"]}}
# The line a wait --match / run --ready found: null when none was asked for or found.
_MATCHED = {"type": ["object", "null"], "additionalProperties": False, "required": ["stream", "line", "offset"],
            "properties": {"stream": {"type": "string", "enum": ["stdout", "stderr"]}, "line": _STR,
                           "offset": {"type": "integer", "minimum": 0}}}
_RUN_FIELDS = dict(_JOB_FIELDS, **_OUTPUT_FIELDS, elapsed_ms=_INT, matched=_MATCHED)
_SUMMARY_FIELDS = {k: v for k, v in _JOB_FIELDS.items() if k not in ("env", "warnings")}
_ACTION_ROW = {"type": "object", "required": ["job_id", "action", "reason"], "properties": {
    "job_id": _STR, "action": {"type": "string", "enum": ["deleted", "would_delete", "skipped"]},
    "reason": _OPT_STR, "bytes": _INT}}


def _object_schema(fields: Dict[str, dict], closed: bool = True) -> dict:
    schema = {"type": "object", "properties": fields, "required": list(fields)}
    if closed:
        schema["additionalProperties"] = False
    return schema


_LOCK_REPORT = _object_schema({"kind": _STR, "trusted": _BOOL, "reason": _OPT_STR})
_ROOT_REPORT = _object_schema({"path": _STR, "exists": _BOOL, "writable": _BOOL, "filesystem": _OPT_STR,
                               "mount_point": _OPT_STR, "lock": _LOCK_REPORT})
_MISSING_ROW = _object_schema({"facility": {"type": "string", "enum": sorted(_MISSING_COSTS)}, "detail": _STR,
                               "costs": _STR})
_CAPABILITIES = _object_schema({
    "platform": _STR, "python": _STR, "implementation": _STR, "executable": _STR, "containment": _STR,
    "tree_discovery": _STR_LIST, "pid_identity": _STR, "signal_delivery": _STR,
    "proc": {"type": ["string", "null"], "enum": ["full", "hidepid", "absent", None]}, "limits": _STR_LIST,
    "missing": {"type": "array", "items": _MISSING_ROW}, "dies_with_launcher": _BOOL, "root": _ROOT_REPORT})

_RESPONSE_FIELDS: Dict[str, Dict[str, dict]] = {
    "run": _RUN_FIELDS, "start": _RUN_FIELDS, "restart": _RUN_FIELDS, "wait": _RUN_FIELDS,
    "status": _JOB_FIELDS, "create": _JOB_FIELDS,
    "kill": dict(_JOB_FIELDS, signal_sent=_STR, processes_signalled=_INT, processes_alive=_OPT_INT),
    "tail": dict(job_id=_STR, state=_STATE_NAME, lines=_INT, **_OUTPUT_FIELDS,
                 stdout_log_path=_STR, stderr_log_path=_STR, warnings=_WARNINGS),
    "list": {"root": _STR, "jobs": {"type": "array", "items": _object_schema(_SUMMARY_FIELDS)},
             "count": _INT, "truncated": _BOOL, "skipped": _INT, "warnings": _WARNINGS},
    "delete": {"root": _STR, "dry_run": _BOOL, "jobs": {"type": "array", "items": _ACTION_ROW}, "deleted": _INT},
    "gc": {"root": _STR, "dry_run": _BOOL, "jobs": {"type": "array", "items": _ACTION_ROW}, "deleted": _INT,
           "kept": _INT, "freed_bytes": _INT},
    "tag": {"job_id": _STR, "tags": _STR_LIST},
    "queue": {"root": _STR, "queues": {"type": "array", "items": _object_schema({
        "name": _STR, "parallel": _INT, "paused": _BOOL, "running": _STR_LIST, "waiting": _STR_LIST})}},
    "notify": {"job_id": _STR, "notify_command": _OPT_STR, "notify_file": _OPT_STR, "output_pattern": _OPT_STR,
               "output_match_type": {"type": "string", "enum": list(_MATCH_TYPES)},
               "output_stream": {"type": "string", "enum": list(_STREAM_CHOICES)},
               "output_command": _OPT_STR, "output_file": _OPT_STR},
    "schema": {"schema_format": _STR, "schemas": {"type": "object"}},
    "health": {"version": _STR, "root": _STR, "capabilities": _CAPABILITIES},
    "doctor": {"root": _STR, "capabilities": _CAPABILITIES},
    "skill": {"path": _STR, "bytes": _INT},
    "serve": {"url": _STR, "host": _STR, "port": _INT, "auth": _BOOL, "token": _OPT_STR, "token_file": _STR,
              "login_url": _OPT_STR, "allowed_origins": _STR_LIST},
    "definition": {"job_id": _STR, "command": _STR_LIST, "cwd": _STR, "env": {"type": "object",
                   "additionalProperties": _STR}, "env_files": _STR_LIST, "inherit_env": _BOOL, "has_stdin": _BOOL,
                   "timeout_s": _NUM, "kill_after_s": _NUM, "kill_orphans": _BOOL, "tags": _STR_LIST,
                   "notify_command": _OPT_STR, "notify_file": _OPT_STR, "created_at": _OPT_STR},
    "notifications": {"job_id": _STR, "notify_command": _OPT_STR, "notify_file": _OPT_STR, "recorded": _BOOL,
                      "pending": _OPT_BOOL, "event": _json_type("object", "null"),
                      "deliveries": {"type": "array", "items": {"type": "object"}}},
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
    meta["properties"]["restart_delay_s"] = {"type": "number", "minimum": 0}
    meta["properties"]["restart"] = {"type": "string", "enum": list(RESTART_POLICIES)}
    meta["properties"]["max_restarts"] = {"type": "integer", "minimum": 0}
    state["properties"]["waiting"] = _WAITING_INFO
    state["properties"]["last_exit"] = _LAST_EXIT_INFO
    state["properties"]["queue_slot"] = {"type": ["object", "null"], "properties": {
        "queue": _STR, "slot": _INT, "at": _STR}}
    meta["properties"]["output_match_type"]["enum"] = list(_MATCH_TYPES)
    meta["properties"]["output_stream"]["enum"] = list(_STREAM_CHOICES)
    schemas = {"state": state, "meta": meta, "error": _error_schema()}
    for kind in _RESPONSE_FIELDS:
        schemas[kind] = _response_schema(kind)
    for doc in schemas.values():
        doc.setdefault("$schema", "https://json-schema.org/draft/2020-12/schema")
    return schemas


# Argv, cwd, env and tags keep bytes that are not UTF-8 as surrogate escapes
# (U+DC80-U+DCFF), so the job files hold them exactly.  No strict JSON parser
# accepts a lone surrogate, so a document shows each as U+FFFD, as the output
# excerpts do ("utf-8-lossy"); the exact bytes stay in meta.json and Job.spec().
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _strict_json(doc, indent: Optional[int] = None, separators=(",", ":")) -> bytes:
    """A document as UTF-8 JSON that every parser reads (MCP, HTTP and the CLI print this)."""
    text = json.dumps(doc, ensure_ascii=False, indent=indent, separators=separators)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a JSON string escapes no surrogate: each is in the text as itself
        return _LONE_SURROGATE.sub("\ufffd", text).encode("utf-8")


def _error_envelope(error: JobError) -> dict:
    body = {"code": error.code, "message": error.message, "retryable": error.retryable}
    if error.hint:
        body["hint"] = error.hint
    if error.details is not None:
        body["details"] = error.details
    return {"schema_version": SCHEMA_VERSION, "ok": False, "type": "error", "error": body}


def _job_view(paths: JobPaths, state: JobState, row: Optional[JobSummary] = None) -> dict:
    """The keys every job-shaped response carries, for every state (unknown = null).

    The definition comes from the list row when there is one (rows carry no
    env), else from meta.json, read afresh (null where it cannot be read).
    """
    definition = row if row is not None else _readable_spec(paths)
    view = {
        "job_id": paths.job_id, "state": state.status.value,
        "exit_code": state.exit_code, "signal": state.signal, "timed_out": state.result.timed_out,
        "duration_ms": state.duration_ms, "created_at": definition.created_at if definition else None,
        "started_at": state.started_at, "finished_at": state.finished_at, "pid": state.pid,
        "error": state.error.to_dict() if state.error else None,
        "command": definition.argv if definition else None, "cwd": definition.cwd if definition else None,
        **_policy_view(paths.root, state, definition.queue if definition else None),
    }
    if row is None:
        view["env"] = definition.masked_env() if definition else None
    view.update(tags=definition.tags if definition else [], stdout_log_path=paths.stdout_log,
                stderr_log_path=paths.stderr_log)
    if row is None:
        view["warnings"] = list(state._warnings)
    return view


def _readable_spec(paths: JobPaths) -> Optional[JobSpec]:
    try:
        return _read_spec(paths)
    except JobError:
        return None


def _policy_view(root: str, state: JobState, queue: Optional[str]) -> dict:
    """The queue, waiting and restart keys of a job-shaped response."""
    waiting = dict(state.waiting) if state.waiting else None
    if waiting and waiting.get("for") == "queue" and isinstance(waiting.get("queue"), str):
        waiting["position"] = _queue_position(root, waiting["queue"], state.job_id)
    return {"queue": queue, "waiting": waiting, "restarts": state.restarts or 0, "last_exit": state.last_exit,
            "crash_looping": _is_crash_looping(state, time.time())}


def _output_view(tail: Tail) -> dict:
    return {"stdout": tail.stdout, "stderr": tail.stderr,
            "stdout_range": list(tail.stdout_range), "stderr_range": list(tail.stderr_range),
            "stdout_total_bytes": tail.stdout_total_bytes, "stderr_total_bytes": tail.stderr_total_bytes,
            "encoding": tail.encoding}


def _run_view(job: Job, state: JobState, max_bytes: int, elapsed_ms: int,
              matched: Optional[LineMatch] = None) -> dict:
    """RunData: the job view plus the last max_bytes of each stream, and the line matched if any."""
    view = _job_view(job.paths, state)
    view.update(_output_view(_tail(job.paths, None, max_bytes)))
    view["elapsed_ms"] = elapsed_ms
    view["matched"] = None if matched is None else {"stream": matched.stream, "line": matched.line,
                                                    "offset": matched.offset}
    return view


def _kill_view(job: Job, result: KillResult) -> dict:
    view = _job_view(job.paths, result.state)
    view.update(signal_sent=result.signal_sent, processes_signalled=result.processes_signalled,
                processes_alive=result.processes_alive, warnings=view["warnings"] + result.warnings)
    return view


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


def _observed_doc(kind: str, job: Job, until_s: Optional[float], max_bytes: int, started: float,
                  match=None, stream: str = "either", cancel: Optional[threading.Event] = None) -> dict:
    """RunData after waiting up to until_s (0: not at all, None: until the end),
    or with match, until a line matches (0: only the lines already written).

    run, start and restart return at once for a job that waits its turn (a
    queue slot, other jobs): that may take hours; `wait` is there for it.
    """
    state, matched = job.state(), None
    queued = kind != "wait" and state.status is JobStatus.CREATED and state.waiting is not None
    if queued and until_s is not None:
        pass
    elif match is not None:
        readiness = job.wait(until_s, match=match, stream=stream, cancel=cancel)
        state, matched = readiness.state, readiness.match
    elif until_s != 0:
        state = job.wait(until_s, cancel=cancel)
    return _envelope(kind, _run_view(job, state, max_bytes, _elapsed_ms(started), matched))


def _status_doc(job: Job) -> dict:
    return _envelope("status", _job_view(job.paths, job.state()))


def _definition_doc(job: Job) -> dict:
    """The job's whole definition (meta.json), masked variables as ***."""
    spec = job.spec()
    return _envelope("definition", {
        "job_id": job.id, "command": spec.argv, "cwd": spec.cwd, "env": spec.masked_env(),
        "env_files": spec.env_files, "inherit_env": spec.inherit_env, "has_stdin": spec.has_stdin,
        "timeout_s": spec.timeout_s, "kill_after_s": spec.kill_after_s, "kill_orphans": spec.kill_orphans,
        "tags": spec.tags, "notify_command": spec.notify_command, "notify_file": spec.notify_file,
        "created_at": spec.created_at})


def _notifications_doc(job: Job) -> dict:
    """The sinks a job names and what its last run's notification did (completion_event.json)."""
    spec = job.spec()
    record = _read_event_record(job.paths)
    return _envelope("notifications", {
        "job_id": job.id, "notify_command": spec.notify_command, "notify_file": spec.notify_file,
        "recorded": record is not None, "pending": record["pending"] if record else None,
        "event": record["event"] if record else None, "deliveries": record["deliveries"] if record else []})


def _read_event_record(paths: JobPaths) -> Optional[dict]:
    """completion_event.json, never through a symlink; None before the job's end (or without sinks)."""
    fd = _open_job_file(paths.event)
    if fd is None:
        return None
    try:
        with open(fd, "rb") as f:
            record = json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise _unreadable(paths.event, exc) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFileError(paths.event, str(exc)) from None
    if not (isinstance(record, dict) and isinstance(record.get("event"), dict)
            and isinstance(record.get("deliveries"), list) and isinstance(record.get("pending"), bool)):
        raise StateFileError(paths.event, "not a notification record")
    return record


def _tail_doc(job: Job, lines: int, max_bytes: int) -> dict:
    tail = job.tail(lines, max_bytes)
    state = job.state()
    view = {"job_id": job.id, "state": state.status.value, "lines": lines}
    view.update(_output_view(tail))
    view.update(stdout_log_path=job.paths.stdout_log, stderr_log_path=job.paths.stderr_log,
                warnings=list(state._warnings))
    return _envelope("tail", view)


def _notify_doc(job: Job, spec: JobSpec) -> dict:
    view = {key: getattr(spec, key) for key in JobSpec._SINK_KEYS}
    view["job_id"] = job.id
    return _envelope("notify", view)


def _kill_doc(job: Job, signal: str, kill_after_s: Optional[float], wait_s: float) -> dict:
    return _envelope("kill", _kill_view(job, job.kill(signal, kill_after_s=kill_after_s, wait_s=wait_s)))


def _list_doc(root: str, *, cwd: Optional[str], all_jobs: bool, state: Optional[str],
              tags: Sequence[str], limit: int) -> dict:
    _check_state_name(state)
    summaries, truncated, skipped = _list_summaries(root, cwd=cwd, all_jobs=all_jobs, state=state, tags=tags,
                                                    limit=limit)
    rows = [_job_view(JobPaths(root, s.job_id), s.state, s) for s in summaries]
    return _envelope("list", {"root": root, "jobs": rows, "count": len(rows), "truncated": truncated,
                              "skipped": skipped, "warnings": [w for s in summaries for w in s.state._warnings]})


def _doctor_doc(root: str) -> dict:
    return _envelope("doctor", {"root": root, "capabilities": _capabilities(root)})


def _queue_doc(root: str, queues: List[QueueInfo]) -> dict:
    return _envelope("queue", {"root": root, "queues": [
        {"name": q.name, "parallel": q.parallel, "paused": q.paused, "running": q.running, "waiting": q.waiting}
        for q in queues]})


def _delete_doc(root: str, job_ref: Optional[str], dry_run: bool) -> dict:
    """Delete one job, or with job_ref None every terminal job of the current directory."""
    if job_ref is not None:
        job = _open_job(root, job_ref)
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
    if not summary.state.status.is_terminal:
        return {"job_id": summary.job_id, "action": "skipped", "reason": "job is %s" % summary.state.status.value}
    return _delete_row(JobPaths(root, summary.job_id), dry_run, None)

# ---------------------------------------------------------------------------
# 10. Agent surfaces: MCP server (stdio) and HTTP API
# ---------------------------------------------------------------------------


# The operations agents may call, with their JSON Schema parameters.  MCP tools
# are generated from this table, and the HTTP API checks its bodies against it.
_JOB_ID_PARAM = {"type": "string", "description": "job id or unique prefix (1-32 hex characters)"}
# Numbers have the CLI's ranges: durations those of _parse_duration, counts and
# sizes up to the largest integer every JSON client (JavaScript too) holds exactly.
_MAX_COUNT = 2 ** 53 - 1


def _duration_param(description: str) -> dict:
    return {"type": "number", "minimum": 0, "exclusiveMaximum": 10 ** 9, "description": description}


def _count_param(description: str) -> dict:
    return {"type": "integer", "minimum": 0, "maximum": _MAX_COUNT, "description": description}


_UNTIL_PARAM = _duration_param("seconds to wait for the job to finish")
_MAX_BYTES_PARAM = _count_param("output excerpt size per stream")
_TAGS_PARAM = {"type": "array", "items": {"type": "string"}}
_STREAM_PARAM = {"type": "string", "enum": list(_STREAM_CHOICES),
                 "description": "the output the pattern looks at (default either)"}
_LINE_PATTERN = ("a regular expression (Python re) searched in each line of output; return as soon as a line "
                 "matches (lines already written count), with `matched`: {stream, line, offset}; the job runs on")
_OPERATIONS: Dict[str, Tuple[str, Dict[str, dict], List[str]]] = {
    "run": ("Start a command as a durable background job (it keeps running after this call), wait up "
            "to `until` seconds, and return its state and the end of its output.", {
                "command": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                            "description": "argv; a single element is run by the shell"},
                "cwd": {"type": "string"}, "env": {"type": "object", "additionalProperties": {"type": "string"}},
                "stdin": {"type": "string", "description": "standard input for the job"},
                "stdin_file": {"type": "string", "description": "a file whose content is the job's standard input "
                               "(read now, at most 64 MiB; a relative path is in `cwd`)"},
                "timeout": _duration_param("stop the tree after this many seconds"),
                "kill_after": _duration_param("then KILL what is left after S seconds"), "until": _UNTIL_PARAM,
                "max_bytes": _MAX_BYTES_PARAM, "tags": _TAGS_PARAM,
                "queue": {"type": "string", "description": "run in this queue: at most its parallel limit at once, "
                          "in order; a queued job returns at once, waiting (see `wait`)"},
                "after": {"type": "array", "items": {"type": "string"},
                          "description": "ids of jobs that must end first; if one does not exit 0 this job fails"},
                "after_any": {"type": "boolean", "description": "with after: start whatever their results"},
                "restart": {"type": "string", "enum": list(RESTART_POLICIES)},
                "max_restarts": _count_param("at most this many restarts (default 5 with restart)"),
                "restart_delay": _duration_param("first restart delay, doubling up to 60 s (default 1)"),
                "ready": {"type": "string", "description": "wait until the job is ready: " + _LINE_PATTERN},
                "stream": _STREAM_PARAM,
                "memory_max": _count_param("memory limit of the whole job, in bytes"),
                "max_processes": _count_param("most processes the job may have at once"),
                "cpu_time": _duration_param("CPU seconds the job may use")},
            ["command"]),
    "status": ("State, exit code, signal, times and log paths of a job.", {"job_id": _JOB_ID_PARAM}, ["job_id"]),
    "tail": ("The last lines of a job's stdout and stderr.", {
        "job_id": _JOB_ID_PARAM, "lines": _count_param("lines per stream"), "max_bytes": _MAX_BYTES_PARAM},
        ["job_id"]),
    "wait": ("Wait up to `until` seconds for a job to finish, or with `match` for a line of its output; "
             "returns its state and output.", {
                 "job_id": _JOB_ID_PARAM, "until": _UNTIL_PARAM, "max_bytes": _MAX_BYTES_PARAM,
                 "match": {"type": "string", "description": _LINE_PATTERN}, "stream": _STREAM_PARAM}, ["job_id"]),
    "kill": ("Signal a job's whole process tree (default TERM) and report what is left.", {
        "job_id": _JOB_ID_PARAM, "signal": {"type": "string", "description": "TERM, INT, KILL, HUP, ..."},
        "kill_after": _duration_param("then KILL what is left after S seconds"),
        "no_wait": {"type": "boolean", "description": "answer at once, without observing the tree for 3 s"}},
        ["job_id"]),
    "list": ("Jobs newest first: by default those started in `cwd` (the server's directory), or all.", {
        "state": {"type": "string", "enum": list(_LIST_STATES)},
        "limit": _count_param("at most this many jobs"), "all": {"type": "boolean"}, "cwd": {"type": "string"},
        "tags": _TAGS_PARAM}, []),
    "restart": ("Stop a job's tree if it runs, then run the same definition again under the same id (logs "
                "reset); wait as `run` does.", {
                    "job_id": _JOB_ID_PARAM, "signal": {"type": "string", "description": "stops the running tree"},
                    "kill_after": _duration_param("then KILL what is left after S seconds"), "until": _UNTIL_PARAM,
                    "max_bytes": _MAX_BYTES_PARAM,
                    "ready": {"type": "string", "description": "wait until the job is ready: " + _LINE_PATTERN},
                    "stream": _STREAM_PARAM}, ["job_id"]),
    "delete": ("Remove a finished job's directory (its logs included); refused for a running job.", {
        "job_id": _JOB_ID_PARAM, "dry_run": {"type": "boolean"}}, ["job_id"]),
}
# MCP tool annotations: hints for clients deciding what to ask the user about.
_TOOL_ANNOTATIONS = {
    "run": {"readOnlyHint": False, "destructiveHint": False, "openWorldHint": True},
    "restart": {"readOnlyHint": False, "destructiveHint": True, "openWorldHint": True},
    "kill": {"readOnlyHint": False, "destructiveHint": True, "idempotentHint": True},
    "delete": {"readOnlyHint": False, "destructiveHint": True},
    "status": {"readOnlyHint": True}, "tail": {"readOnlyHint": True}, "wait": {"readOnlyHint": True},
    "list": {"readOnlyHint": True},
}
_JSON_TYPE_CHECKS = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
                     "array": list, "object": dict}


def _check_arguments(operation: str, args: dict) -> dict:
    """Reject unknown, missing, mistyped and out-of-range arguments before doing anything."""
    _, params, required = _OPERATIONS[operation]
    if not isinstance(args, dict):
        raise InvalidArgumentError("arguments must be a JSON object", hint="e.g. {\"job_id\": \"01a2\"}")
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise InvalidArgumentError("unknown argument(s) for %s: %s" % (operation, ", ".join(unknown)),
                                   hint="accepted: " + ", ".join(params))
    # null is "not given" (MCP and HTTP alike): clients fill absent optionals with it.
    args = {name: value for name, value in args.items() if value is not None}
    for name in required:
        if name not in args:
            raise InvalidArgumentError("%s needs %r" % (operation, name), hint="required: " + ", ".join(required))
    return {name: _check_value("%s: %r" % (operation, name), value, params[name]) for name, value in args.items()}


def _check_value(what: str, value, param: dict):
    """One argument against its JSON Schema: type, items, enum, numeric range."""
    kind = param["type"]
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON Schema counts 5.0 as an integer, and JavaScript clients may send it
    ok = isinstance(value, _JSON_TYPE_CHECKS[kind]) and (kind == "boolean" or not isinstance(value, bool))
    if ok and kind == "array":
        ok = all(isinstance(v, str) for v in value)
    if ok and kind == "object":
        ok = all(isinstance(v, str) for v in value.values())
    if not ok:
        raise InvalidArgumentError("%s must be of type %s" % (what, kind), hint=_type_text(param))
    if not _is_encodable(value):
        raise InvalidArgumentError("%s holds a lone surrogate, which is not text" % what,
                                   hint="only \\udc80-\\udcff are accepted, each standing for one byte")
    if kind == "array" and len(value) < param.get("minItems", 0):
        raise InvalidArgumentError("%s needs at least %d item(s)" % (what, param["minItems"]),
                                   hint="e.g. [\"echo\", \"hello\"]")
    if "enum" in param and value not in param["enum"]:
        raise InvalidArgumentError("%s must be one of %s" % (what, ", ".join(param["enum"])),
                                   hint="one of: " + ", ".join(param["enum"]))
    if kind in ("integer", "number") and not _in_range(value, param):
        raise InvalidArgumentError("%s: %r is out of range" % (what, value), hint=_range_text(param))
    return value


def _type_text(param: dict) -> str:
    kind = param["type"]
    if kind in ("array", "object"):
        return "a JSON %s of strings" % kind
    return "a JSON %s%s" % (kind, "" if kind in ("string", "boolean") else " (not a string)")


def _is_encodable(value) -> bool:
    """Whether every string in an argument becomes bytes the way argv, env and stdin
    are stored: UTF-8, with surrogate escapes (U+DC80-U+DCFF) for single bytes."""
    if isinstance(value, dict):
        texts = list(value) + list(value.values())
    else:
        texts = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    try:
        for text in texts:
            text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return False
    return True


def _in_range(value, param: dict) -> bool:
    if isinstance(value, float) and value != value:  # NaN compares false with everything
        return False
    return (value >= param.get("minimum", value) and value <= param.get("maximum", value)
            and ("exclusiveMaximum" not in param or value < param["exclusiveMaximum"]))


def _range_text(param: dict) -> str:
    high = ("<= %d" % param["maximum"]) if "maximum" in param else ("< %d" % param["exclusiveMaximum"])
    return "a finite %s with %s <= value %s" % (param["type"], param["minimum"], high)


# The README promises a hint with every error: an error raised below the agent
# surfaces without one gets the hint of its code.
_CODE_HINTS = {
    "invalid_argument": "each operation's parameters, types and ranges are its JSON Schema (MCP tools/list)",
    "invalid_state": "check the job's state with status first",
    "state_unreadable": "a job file was changed outside jobstate; status shows what can be read, delete removes it",
    "io_error": "check that the jobs root exists, is yours and has free space",
    "launch_failed": "check the jobs root and the limits on processes and files, then retry",
    "kill_failed": "retry, or stop the processes with the system's tools",
    "internal_error": "a bug in jobstate: report it with the request that caused it",
}


def _agent_error(error: JobError) -> dict:
    """The error envelope MCP and HTTP answer with: always with a hint."""
    if not error.hint:
        error.hint = _CODE_HINTS.get(error.code, _CODE_HINTS["internal_error"])
    return _error_envelope(error)


class _ToolCall:
    """One operation under way: its client may cancel it (the wait ends at
    once, the job runs on) and follow its progress (the job it is about)."""

    def __init__(self):
        self.cancelled = threading.Event()
        self.job: Optional[Job] = None
        self.guard = threading.Lock()  # progress is never sent after the answer
        self.answered = False


def _operation_stdin(args: dict):
    """The job's standard input from `stdin`, or `stdin_file` read now (as --stdin-file)."""
    if "stdin_file" not in args:
        return args.get("stdin")
    if "stdin" in args:
        raise InvalidArgumentError("give either stdin or stdin_file, not both",
                                   hint="stdin is the data itself, stdin_file a file to read it from")
    path = os.path.join(args.get("cwd") or os.curdir, os.path.expanduser(args["stdin_file"]))
    try:
        with open(path, "rb") as f:
            data = f.read(DEFAULT_STDIN_MAX_BYTES + 1)
    except OSError as exc:
        raise InvalidArgumentError("cannot read stdin_file %s: %s" % (path, exc.strerror or exc),
                                   hint="a readable file; a relative path is in `cwd`") from None
    if len(data) > DEFAULT_STDIN_MAX_BYTES:
        raise StdinTooLargeError("stdin_file is larger than %d bytes" % DEFAULT_STDIN_MAX_BYTES,
                                 hint="give the job a smaller input, or let it read the file itself")
    return data


def _call_operation(operation: str, args: dict, root: str, *, default_until: Optional[float],
                    max_until: Optional[float] = None, call: Optional[_ToolCall] = None) -> dict:
    """Run one agent operation under a resolved root; returns its envelope (JobError propagates)."""
    call = call or _ToolCall()
    args = _check_arguments(operation, args)
    started = time.monotonic()
    until = args.get("until", default_until)
    if max_until is not None:
        until = min(until, max_until)
    max_bytes = args.get("max_bytes", DEFAULT_MAX_BYTES)
    if operation == "run":
        ready, stream = _line_pattern_args(args, "ready")  # checked before anything launches
        job = _run(root, args["command"], cwd=args.get("cwd"), env=args.get("env"), stdin=_operation_stdin(args),
                   timeout_s=args.get("timeout"), kill_after_s=args.get("kill_after"), tags=args.get("tags", ()),
                   queue=args.get("queue"), after=args.get("after", ()), after_any=args.get("after_any", False),
                   restart=args.get("restart"), max_restarts=args.get("max_restarts"),
                   restart_delay_s=args.get("restart_delay"), memory_max=args.get("memory_max"),
                   max_processes=args.get("max_processes"), cpu_time_s=args.get("cpu_time"))
        call.job = job
        return _observed_doc("run", job, until, max_bytes, started, ready, stream, call.cancelled)
    if operation == "list":
        return _list_doc(root, cwd=args.get("cwd"), all_jobs=args.get("all", False),
                         state=args.get("state"), tags=args.get("tags", ()),
                         limit=args.get("limit", DEFAULT_LIST_LIMIT))
    job = call.job = _open_job(root, args["job_id"])
    if operation == "status":
        return _status_doc(job)
    if operation == "tail":
        return _tail_doc(job, args.get("lines", DEFAULT_TAIL_LINES), max_bytes)
    if operation == "wait":
        match, stream = _line_pattern_args(args, "match")
        return _observed_doc("wait", job, until, max_bytes, started, match, stream, call.cancelled)
    if operation == "restart":
        ready, stream = _line_pattern_args(args, "ready")
        job.restart(args.get("signal", "TERM"), kill_after_s=args.get("kill_after", DEFAULT_KILL_AFTER_S))
        return _observed_doc("restart", job, until, max_bytes, started, ready, stream, call.cancelled)
    if operation == "delete":
        return _delete_doc(root, job.id, args.get("dry_run", False))
    return _kill_doc(job, args.get("signal", "TERM"), args.get("kill_after"),
                     0 if args.get("no_wait") else DEFAULT_KILL_OBSERVE_S)


def _line_pattern_args(args: dict, key: str):
    """(compiled pattern or None, stream) from the `ready`/`match` and `stream` arguments."""
    stream = args.get("stream")
    if args.get(key) is None:
        if stream is not None:
            raise InvalidArgumentError("'stream' is for %r, and no %r was given" % (key, key),
                                       hint="give %r too, or drop 'stream'" % key)
        return None, "either"
    return _compile_line_pattern(args[key], key), _check_stream(stream or "either", "stream")


def _env_seconds(name: str, default: float) -> float:
    """A duration setting of mcp or serve (unset or empty: the default); one
    that is not a duration stops the server at start rather than being ignored."""
    text = os.environ.get(name, "").strip()
    try:
        return _parse_duration(text, name) if text else default
    except JobError as exc:
        accepted = "seconds or a duration (500ms, 90s, 5m); unset, it is %g" % default
        raise _bad_setting(name, text, exc, accepted) from None


def _bad_setting(name: str, text: str, error: JobError, accepted: str) -> JobError:
    problem = error.message.partition(": ")[2] or error.message  # without the name _parse_* put first
    return InvalidArgumentError("%s=%s: %s" % (name, _clip(text), problem), hint="%s is %s" % (name, accepted))


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
_JSON_STRING = r'(?s)"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)'  # unterminated: to the end
_NOT_A_BRACKET = r"[^\[\]{}]+"
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def _json_nesting_over(text: str, limit: int) -> bool:
    """Whether brackets outside strings nest deeper than limit: one linear pass."""
    if text.count("[") + text.count("{") <= limit:
        return False
    from itertools import accumulate
    brackets = re.sub(_NOT_A_BRACKET, "", re.sub(_JSON_STRING, "", text))
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


def _env_size(name: str, default: int, low: int, high: int) -> int:
    """A size setting of mcp or serve, from low to high bytes (unset or empty: the default)."""
    text = os.environ.get(name, "").strip()
    accepted = "a size from %d to %d bytes (64k, 10M, 1G); unset, it is %d" % (low, high, default)
    try:
        size = _parse_size(text, name) if text else default
    except JobError as exc:
        raise _bad_setting(name, text, exc, accepted) from None
    if not low <= size <= high:
        raise _bad_setting(name, text, InvalidArgumentError("out of range"), accepted)
    return size


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


@_record
class _McpRequest:
    """A JSON-RPC request that wants an answer, as _mcp_request checked it."""

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

    def __init__(self, root: str, output):
        self.root = root
        self.output = output
        self.write_lock = threading.Lock()
        self.calls: List[threading.Thread] = []
        self.pending: Dict[object, _ToolCall] = {}  # tools/call requests under way, by id (to cancel them)
        self.pending_guard = threading.Lock()
        self.default_until = _env_seconds("JOBSTATE_MCP_DEFAULT_UNTIL", DEFAULT_RUN_UNTIL_S)
        self.max_until = _env_seconds("JOBSTATE_MCP_MAX_UNTIL", 55.0)
        self.max_line = _env_size("JOBSTATE_MCP_MAX_LINE", _MCP_MAX_LINE, 1 << 10, 1 << 30)

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
        data = _strict_json(message) + b"\n"
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
            return self.notified(line)
        with self.pending_guard:  # one reader thread: nothing registers an id between this and below
            in_use = request.id in self.pending
        if in_use:  # answered apart, so the call under way keeps its id (its cancellation, its answer)
            return self.error(request.id, -32600, "invalid request: id %s is that of a call under way"
                              % _clip(json.dumps(request.id)))
        if request.method != "tools/call":
            return self.guarded(request.id, self.answer, request)
        # Tool calls may wait: each in a thread, so pings and other calls go on meanwhile.
        call = _ToolCall()
        if isinstance(request.id, (str, int, float)):
            with self.pending_guard:
                self.pending[request.id] = call
        thread = threading.Thread(target=self.guarded, daemon=True,
                                  args=(request.id, self.call_tool, request.id, request.params, call))
        self.guarded(request.id, thread.start)
        self.calls = [c for c in self.calls + [thread] if c.is_alive()]
        return None

    def notified(self, line: bytes) -> None:
        """A notification: of those, only notifications/cancelled asks something of us.
        The call's wait ends at once, the job runs on, and (as MCP says) no answer is sent."""
        try:
            message = _parse_json_line(line.decode("utf-8-sig"), _MCP_MAX_DEPTH)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("method") != "notifications/cancelled":
            return
        params = message.get("params")
        request_id = params.get("requestId") if isinstance(params, dict) else None
        if isinstance(request_id, (str, int, float)) and not isinstance(request_id, bool):
            with self.pending_guard:
                call = self.pending.get(request_id)
            if call is not None:
                call.cancelled.set()

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
                                "`until` seconds (with `ready`, only until a line of output matches: start a "
                                "server and know it is up); poll long jobs with `wait` or `status`, read output with "
                                "`tail`, stop whole process trees with `kill`. Jobs outlive this server."}

    def list_tools(self, params: dict) -> dict:
        """Each operation, with its input schema, its output schema (the response
        or the error envelope, from the tables of `schema`) and its annotations."""
        tools = []
        for name, (description, props, required) in _OPERATIONS.items():
            tools.append({"name": name, "description": description, "inputSchema": {
                "type": "object", "properties": props, "required": required, "additionalProperties": False},
                "outputSchema": {"type": "object", "anyOf": [_response_schema(name), _error_schema()]},
                "annotations": _TOOL_ANNOTATIONS.get(name, {})})
        return {"tools": tools}

    def call_tool(self, msg_id, params: dict, call: Optional[_ToolCall] = None) -> None:
        call = call or _ToolCall()
        try:
            self.answer_tool(msg_id, params, call)
        finally:
            with self.pending_guard:
                if self.pending.get(msg_id) is call:
                    del self.pending[msg_id]

    def answer_tool(self, msg_id, params: dict, call: _ToolCall) -> None:
        name, args = params.get("name"), params.get("arguments")
        if not isinstance(name, str) or name not in _OPERATIONS:
            problem = "unknown tool %r" % _clip(name) if isinstance(name, str) else "the tool name must be a string"
            return self.error(msg_id, -32602, "invalid params: %s; tools: %s" % (problem, ", ".join(_OPERATIONS)))
        if args is None:  # absent, or null as the official SDK sends it
            args = {}
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        if isinstance(token, (str, int)) and not isinstance(token, bool):
            threading.Thread(target=self.report_progress, args=(token, call), daemon=True).start()
        try:
            doc = _call_operation(name, args, self.root, default_until=self.default_until,
                                  max_until=self.max_until, call=call)
        except JobError as exc:
            doc = _agent_error(exc)
        except Exception as exc:  # a bug must not kill the server: report it as a tool error
            doc = _agent_error(JobError("%s: %s" % (type(exc).__name__, exc)))
        with call.guard:
            call.answered = True
        if call.cancelled.is_set():
            return  # the client has stopped waiting for this answer
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
        self.send({"jsonrpc": "2.0", "id": msg_id, "result": {
            "content": [{"type": "text", "text": text}], "structuredContent": doc, "isError": not doc["ok"]}})

    def report_progress(self, token, call: _ToolCall) -> None:
        """notifications/progress once a second while the call runs: the seconds
        elapsed, and the job's last line of output as the message."""
        started = time.monotonic()
        while not call.cancelled.wait(_MCP_PROGRESS_S):
            elapsed = time.monotonic() - started
            line = _last_output_line(call.job) if call.job is not None else ""
            with call.guard:
                if call.answered:
                    return
                self.send({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                    "progressToken": token, "progress": round(elapsed, 3),
                    "message": "%.0fs; last output: %s" % (elapsed, line or "(none yet)")}})


_MCP_PROGRESS_S = 1.0
_FULL_LOG_PREFIX = r"\A\S+ \[(?:STDOUT|STDERR)\] "


def _last_output_line(job: Job) -> str:
    """The job's last line of output, whichever stream wrote it (from full.log), at most 200 characters."""
    try:
        text = _read_tail(job.paths.full_log, 1, 4096)[0]
    except JobError:
        return ""
    return re.sub(_FULL_LOG_PREFIX, "", text.strip())[:200]


def _take_serve_token() -> Optional[str]:
    """JOBSTATE_SERVE_TOKEN, removed from our environment: the jobs serve and mcp
    start (and their forkserver) inherit it, and a job must not be able to drive serve."""
    return os.environ.pop("JOBSTATE_SERVE_TOKEN", None) or None


def _serve_mcp(root: str) -> int:
    """MCP on stdio.  Our real stdout carries only protocol: fd 1 is pointed at
    stderr so nothing else (a stray print, a child) can corrupt the stream."""
    _take_serve_token()
    server = _McpServer(root, None)  # its settings are checked while stdout can still say what is wrong
    server.output = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    return server.serve(sys.stdin.buffer)


# -- HTTP --------------------------------------------------------------------------

_HTTP_MAX_BODY = 1 << 20
_HTTP_MAX_THREADS = 64        # connections served at once; more wait in the listen queue
_HTTP_LISTEN_BACKLOG = 128
_HTTP_IDLE_TIMEOUT_S = 30.0   # JOBSTATE_SERVE_IDLE_TIMEOUT
# A request's head (request line and headers, the wait for it included) and its
# body each have the idle timeout in all, however the bytes trickle in; while
# most handler threads are taken, 2 s: a client that has not sent its head by
# then gives its thread to the connections waiting in the listen queue.
_HTTP_BUSY_THREADS = _HTTP_MAX_THREADS * 3 // 4
_HTTP_BUSY_DEADLINE_S = 2.0
_SERVE_FILENAME = "serve.json"
_HTTP_STATUS = {"job_not_found": 404, "invalid_state": 409, "unauthorized": 401, "forbidden": 403,
                "payload_too_large": 413, "not_found": 404, "method_not_allowed": 405,
                "unsupported_media_type": 415, "kill_failed": 409, "launch_failed": 500, "io_error": 500,
                "state_unreadable": 500, "internal_error": 500}
# The methods each endpoint answers (endpoints are named by _http_endpoint).
_HTTP_METHODS = {"health": ("GET",), "jobs": ("GET", "POST"), "job": ("GET", "DELETE"), "tail": ("GET",),
                 "wait": ("GET",), "kill": ("POST",), "restart": ("POST",), "log": ("GET",),
                 "definition": ("GET",), "notifications": ("GET",), "page": ("GET",), "asset": ("GET",),
                 "follow": ("GET",), "exec": ("POST",), "@status": ("GET",), "@tail": ("GET",), "@wait": ("GET",),
                 "@kill": ("POST",)}
_JOB_ENDPOINTS = ("tail", "wait", "kill", "restart", "log", "definition", "notifications", "follow")
# agent-exec's paths (/status/ID, ...): the endpoint each stands for.
_HTTP_ALIASES = {"@status": "job", "@tail": "tail", "@wait": "wait", "@kill": "kill"}
# Every response carries these.  The policy lets the web page run only its own
# script and style (no inline code, nothing fetched from elsewhere, no framing).
_PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
             "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
_HTTP_SECURITY_HEADERS = (("Content-Security-Policy", _PAGE_CSP), ("X-Content-Type-Options", "nosniff"),
                          ("Referrer-Policy", "no-referrer"), ("X-Frame-Options", "DENY"),
                          ("Cross-Origin-Resource-Policy", "same-origin"), ("Cache-Control", "no-store"))
_HTML_TYPE = "text/html; charset=utf-8"
# `token=` in a logged request line, its letters maybe percent-encoded (parse_qs decodes names).
_LOGGED_TOKEN = r"(?i)([?&;](?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)=)[^&;\s\"]*"
_LOG_STREAMS = ("stdout", "stderr", "full")
_LOG_DEFAULT_LENGTH = 1 << 16
_LOG_MAX_LENGTH = 1 << 20


class _UnauthorizedError(JobError):
    code = "unauthorized"


class _ForbiddenError(JobError):
    code = "forbidden"


class _EndpointNotFoundError(JobError):
    code = "not_found"


class _MethodNotAllowedError(JobError):
    code = "method_not_allowed"

    def __init__(self, method: str, path: str, allowed: Sequence[str]):
        self.allowed = allowed
        super().__init__("%s is not allowed on %s" % (method, path), hint="%s accepts %s" % (path, ", ".join(allowed)))


class _PayloadTooLargeError(JobError):
    code = "payload_too_large"


class _UnsupportedMediaTypeError(JobError):
    code = "unsupported_media_type"


@_record
class _RawReply:
    """A response that is not a JSON envelope: the web page, its assets, log bytes, a redirect."""
    status: int
    content_type: str
    body: bytes
    headers: Tuple[Tuple[str, str], ...] = ()


def _http_status(error: JobError) -> int:
    return _HTTP_STATUS.get(error.code, 400)


class _HttpHandling:
    """serve's request handler, less its base class (http.server's
    BaseHTTPRequestHandler, imported only when serve starts): _make_http_handler
    joins the two and sets the server's settings as class attributes."""

    root: str
    token: Optional[str]
    session: Optional[str]   # the web page's cookie value, derived from the token
    bound_host: str
    allowed_origins: Sequence[str]
    server_version = "jobstate/" + __version__
    protocol_version = "HTTP/1.1"
    default_request_version = "HTTP/1.0"  # so that even a garbled request line gets a status line
    disable_nagle_algorithm = True  # headers and body leave in two writes: no 40 ms delayed-ACK stall
    cors_origin: Optional[str] = None
    body_read = False

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler calls do_<METHOD>: every method, known or not,
        # goes through the same checks and is answered with an envelope.
        if name.startswith("do_"):
            return self.answer
        raise AttributeError(name)

    def log_message(self, format, *args):
        # A login URL's token must not reach the log: it may be a secret the caller chose.
        sys.stderr.write("%s %s\n" % (_utc_now(), re.sub(_LOGGED_TOKEN, r"\1***", format % args)))

    def handle_one_request(self) -> None:
        self.server.watch(self)  # from now until the head is read: see _HTTP_BUSY_DEADLINE_S
        try:
            super().handle_one_request()
        finally:
            self.server.unwatch(self)

    def parse_request(self) -> bool:
        parsed = super().parse_request()
        if self.server.unwatch(self):  # cut off mid-head: what was read is not a whole request
            self.close_connection = True
            return False
        return parsed

    def read_within_deadline(self, length: int) -> bytes:
        """A body's bytes, all of them within the deadline (a short read when it passes)."""
        self.server.watch(self)
        try:
            return self.rfile.read(length)
        finally:
            self.server.unwatch(self)

    def answer(self) -> None:
        self.cors_origin, self.body_read, extra = None, False, {}
        try:
            self.check_request()
            if self.command == "OPTIONS":
                return self.send_preflight()
            endpoint = _http_endpoint(_http_target(self.path)[0])
            if endpoint == "page" and self.command == "GET":
                status, doc = 200, self.page_reply()
            else:
                self.authorize(endpoint)
                status, doc = 200, _route_http(self.command, self.path, self.body, self.root)
        except JobError as exc:
            status, doc = _http_status(exc), _agent_error(exc)
            if isinstance(exc, _MethodNotAllowedError):
                extra["Allow"] = ", ".join(exc.allowed)
        except Exception as exc:  # a bug: answer 500 with an envelope, keep serving
            status, doc = 500, _agent_error(JobError("%s: %s" % (type(exc).__name__, exc)))
        self.discard_body()
        if isinstance(doc, _OutputFollow):  # GET /jobs/{id}/follow: the output, live
            return _send_follow(self, doc)
        if isinstance(doc, _RawReply):
            return self.send_raw(doc)
        return self.send_envelope(status, doc, extra)

    def check_request(self) -> None:
        """403 for what a web page could forge: a foreign Host (DNS rebinding) or Origin."""
        hosts = self.headers.get_all("Host") or []
        if len(hosts) != 1 or not _host_is_allowed(hosts[0], self.bound_host):
            raise _ForbiddenError("Host %r is not this server" % (hosts[0] if hosts else None),
                                  hint="address the server as localhost, a loopback address or %s"
                                  % self.bound_host)
        origins = self.headers.get_all("Origin") or []
        own = len(origins) == 1 and _is_own_origin(origins[0], hosts[0])  # the web page we served
        if len(origins) > 1 or (origins and origins[0] not in self.allowed_origins and not own):
            raise _ForbiddenError("requests from web pages of %r are refused" % (origins[-1],),
                                  hint="start serve with --allow-origin ORIGIN to let one call it")
        self.cors_origin = origins[0] if origins and not own else None

    def authorize(self, endpoint: Optional[str]) -> None:
        if self.token is None or (self.command == "GET" and (endpoint == "health" or self.is_public_asset(endpoint))):
            return
        if self.has_bearer_token():
            return
        if not self.has_session_cookie():
            raise _UnauthorizedError("missing or wrong bearer token",
                                     hint="send 'Authorization: Bearer TOKEN' with the token serve printed "
                                     "(also in %s under the jobs root)" % _SERVE_FILENAME)
        # The browser sends the cookie with every request to this host, whichever page
        # asked: it counts only for the page's own calls, which say they are same-origin
        # and carry a header that no other page can add without a preflight we refuse.
        site = self.headers.get("Sec-Fetch-Site")
        if site is not None and site != "same-origin":
            raise _ForbiddenError("a %s request cannot use the web page's session" % _clip(site),
                                  hint="only the page serve itself serves may use its cookie")
        if endpoint == "asset":  # the page's <script src> sends the cookie but cannot add a header
            return
        if self.headers.get("X-Jobstate") != "1":
            raise _UnauthorizedError("the web page's session cookie counts only with the header X-Jobstate: 1",
                                     hint="other clients send 'Authorization: Bearer TOKEN'")

    def is_public_asset(self, endpoint: Optional[str]) -> bool:
        """The style: the sign-in page, shown to visitors without the token, uses it
        (it holds no data, and the policy allows no inline style).  The script needs a sign-in."""
        return endpoint == "asset" and _http_target(self.path)[0] == [_PUBLIC_ASSET]

    def has_bearer_token(self) -> bool:
        return _same_secret(self.headers.get("Authorization", ""), "Bearer " + self.token)

    def cookie_name(self) -> str:
        # Browsers share cookies between the ports of a host: one name per server.
        return "jobstate_%d" % self.server.server_address[1]

    def has_session_cookie(self) -> bool:
        given = _cookie_values(self.headers.get_all("Cookie") or [], self.cookie_name())
        return any([_same_secret(value, self.session) for value in given])

    def page_reply(self) -> _RawReply:
        """GET /: the web page, or the sign-in page (401); ?token= signs in: a session
        cookie, and a redirect to the page's address without the token."""
        from urllib.parse import parse_qs
        # A repeated token is a failed sign-in, answered like every other: the sign-in page (401).
        query = parse_qs(_http_target(self.path)[1], keep_blank_values=True)
        unknown = sorted(set(query) - {"token"})
        if unknown:
            raise InvalidArgumentError("unknown query parameter(s): %s" % _clip(", ".join(unknown)),
                                       hint="the page takes only ?token=")
        if "token" in query:
            return self.sign_in(query["token"])
        if self.token is None or self.has_bearer_token() or self.has_session_cookie():
            return _RawReply(200, _HTML_TYPE, _WEB_PAGE_HTML.encode("utf-8"))
        return _RawReply(401, _HTML_TYPE, _WEB_SIGN_IN_HTML.encode("utf-8"))

    def sign_in(self, given: List[str]) -> _RawReply:
        if self.token is None:
            return _RawReply(303, "text/plain; charset=utf-8", b"no sign-in needed\n", (("Location", "/"),))
        if len(given) != 1 or not _same_secret(given[0], self.token):
            return _RawReply(401, _HTML_TYPE, _WEB_SIGN_IN_HTML.encode("utf-8"))
        cookie = "%s=%s; HttpOnly; SameSite=Strict; Path=/" % (self.cookie_name(), self.session)
        return _RawReply(303, "text/plain; charset=utf-8", b"signed in\n",
                         (("Location", "/"), ("Set-Cookie", cookie)))

    def body(self) -> dict:
        if self.headers.get("Content-Type") is None and _content_length(self.headers) == 0:
            # No body at all (agent-exec's POST /kill/ID): nothing to parse, and no
            # form sends that; Origin and the token were checked already.
            self.body_read = True
            return {}
        if not _is_json_media_type(self.headers.get("Content-Type")):
            raise _UnsupportedMediaTypeError(
                "request bodies must be JSON, not %r" % (self.headers.get("Content-Type"),),
                hint="send 'Content-Type: application/json'")
        length = _content_length(self.headers)
        if length > _HTTP_MAX_BODY:
            raise _PayloadTooLargeError("request body over %d bytes" % _HTTP_MAX_BODY,
                                        hint="pass large input as stdin_file (a file the server reads)")
        try:
            raw = self.read_within_deadline(length)
        except OSError:  # the idle timeout, or a reset: the client cannot be answered reliably
            raw = b""
        self.body_read = True
        if len(raw) < length:
            self.close_connection = True
            raise InvalidArgumentError("request body ended after %d of %d bytes" % (len(raw), length),
                                       hint="send as many bytes as Content-Length says, within %gs"
                                       % self.timeout)
        return _parse_json_body(raw)

    def discard_body(self) -> None:
        """Read a body we did not use, so the client gets our answer rather than a
        reset; one too large (8 MiB) or of unknown length ends the connection."""
        if self.body_read:
            return
        try:
            length = _content_length(self.headers)
        except InvalidArgumentError:
            length = -1
        if not 0 <= length <= 8 * _HTTP_MAX_BODY:
            self.close_connection = True
            return
        try:
            self.read_within_deadline(length)
        except OSError:  # the client went quiet or away: nothing left to keep in sync
            self.close_connection = True

    def send_preflight(self) -> None:
        self.send_response(204)
        self.send_header("Allow", "GET, POST, DELETE, OPTIONS")
        if self.cors_origin:
            self.send_header("Access-Control-Allow-Methods", "GET, POST, DELETE")
            self.send_header("Access-Control-Allow-Headers", "Authorization, Content-Type")
            self.send_header("Access-Control-Max-Age", "600")
            if self.headers.get("Access-Control-Request-Private-Network") == "true":
                self.send_header("Access-Control-Allow-Private-Network", "true")
        self.discard_body()
        self.finish_response(b"")

    def send_envelope(self, status: int, doc: dict, extra: Dict[str, str]) -> None:
        body = _strict_json(doc)
        if status == 200 and self.command == "GET":
            # Pollers (the web page, every second) send the tag back: 304 when nothing changed.
            extra = dict(extra, ETag=_etag(body))
            if _etag_matches(self.headers.get("If-None-Match"), extra["ETag"]):
                self.send_response(304)
                self.send_header("ETag", extra["ETag"])
                return self.finish_response(b"")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if status == 401:
            self.send_header("WWW-Authenticate", "Bearer")
        for name, value in extra.items():
            self.send_header(name, value)
        self.finish_response(body if self.command != "HEAD" else b"")

    def send_raw(self, reply: _RawReply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.finish_response(reply.body if self.command != "HEAD" else b"")

    def finish_response(self, body: bytes) -> None:
        for name, value in _HTTP_SECURITY_HEADERS:
            self.send_header(name, value)
        if self.cors_origin:
            self.send_header("Access-Control-Allow-Origin", self.cors_origin)
            self.send_header("Access-Control-Expose-Headers", "ETag, X-Log-Start, X-Log-End, X-Log-Size")
            self.send_header("Vary", "Origin")
        if self.close_connection:
            self.send_header("Connection", "close")
        try:
            self.end_headers()
            self.wfile.write(body)
        except OSError:  # the client left or stopped reading (write timeout): drop it
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        # The stdlib parser could not read the request line or headers: the
        # stream is out of step, so answer with an envelope and hang up.
        self.close_connection, self.cors_origin = True, None
        error = InvalidArgumentError("unreadable HTTP request: %s" % (message or code),
                                     hint="send an HTTP/1.1 request with a Host header")
        self.send_envelope(int(code), _error_envelope(error), {})


def _make_http_handler(root: str, token: Optional[str], bound_host: str, allowed_origins: Sequence[str],
                       idle_timeout_s: float):
    from http.server import BaseHTTPRequestHandler
    settings = {"root": root, "token": token, "session": _session_value(token) if token is not None else None,
                "bound_host": bound_host, "allowed_origins": allowed_origins,
                "timeout": idle_timeout_s}  # per read and write: idle keep-alive connections are closed
    return type("Handler", (_HttpHandling, BaseHTTPRequestHandler), settings)


def _route_http(method: str, target: str, read_body, root: str):
    """Answer one request with an envelope (a dict) or a _RawReply: `target` is the
    path with its query, read_body() the JSON body."""
    parts, query_text = _http_target(target)
    path = target.partition("?")[0][:200]
    endpoint = _http_endpoint(parts)
    if endpoint is None:
        raise _EndpointNotFoundError("no endpoint %s %s" % (method, path),
                                     hint="endpoints: /health, /jobs, /jobs/ID, /jobs/ID/tail, /jobs/ID/wait, "
                                          "/jobs/ID/kill, /jobs/ID/restart, /jobs/ID/follow, /jobs/ID/log, "
                                          "/jobs/ID/definition, /jobs/ID/notifications, / (the web page); "
                                          "agent-exec's /exec, /status/ID, /tail/ID, /wait/ID, /kill/ID")
    if method not in _HTTP_METHODS[endpoint]:
        raise _MethodNotAllowedError(method, path, _HTTP_METHODS[endpoint])
    given = _query_params(query_text)
    params = {name: [v for v in values if v] for name, values in given.items()}  # `?state=` is no state
    query = {k: v[-1] for k, v in params.items() if v}
    if endpoint == "health":
        return _envelope("health", {"version": __version__, "root": root, "capabilities": _capabilities(root)})
    if endpoint == "asset":
        return _web_asset(parts[0])
    if endpoint == "exec":  # agent-exec's POST /exec: "wait": false means until 0
        body = read_body()
        wait = body.pop("wait", True)
        if not isinstance(wait, bool):
            raise InvalidArgumentError("exec: 'wait' must be true or false", hint="a JSON boolean, not a string")
        return _call_operation("run", body if wait else dict(body, until=0), root, default_until=DEFAULT_RUN_UNTIL_S)
    wait_until: Optional[float] = DEFAULT_WAIT_UNTIL_S
    if endpoint in _HTTP_ALIASES:  # agent-exec's GET /status|tail|wait/ID (wait: to the end), POST /kill/ID
        endpoint, parts, wait_until = _HTTP_ALIASES[endpoint], ["jobs", parts[1]], None
        if "tail_lines" in query:
            query["lines"] = query.pop("tail_lines")
    if endpoint == "jobs" and method == "POST":
        return _call_operation("run", read_body(), root, default_until=DEFAULT_RUN_UNTIL_S)
    if endpoint == "jobs":
        args = _query_args(query, {"state": str, "limit": int, "all": bool, "cwd": str})
        if params.get("tag"):
            args["tags"] = params["tag"]
        return _call_operation("list", args, root, default_until=0)
    job_id = parts[1]
    if endpoint == "kill":
        args = dict(read_body(), **_query_args(query, {"no_wait": bool}))
        return _call_operation("kill", dict(args, job_id=job_id), root, default_until=0)
    if endpoint == "restart":
        return _call_operation("restart", dict(read_body(), job_id=job_id), root, default_until=0)
    if endpoint == "follow":
        return _follow_request(_open_job(root, job_id), _query_args(query, {"lines": int, "max_bytes": int,
                                                                             "stream": str}))
    if endpoint == "log":
        return _log_reply(root, job_id, given)
    if endpoint in ("definition", "notifications"):
        _query_args(query, {})
        job = _open_job(root, job_id)
        return _definition_doc(job) if endpoint == "definition" else _notifications_doc(job)
    if method == "DELETE":
        return _delete_doc(root, job_id, False)
    types = {"job": {}, "tail": {"lines": int, "max_bytes": int},
             "wait": {"until": float, "max_bytes": int, "match": str, "stream": str}}
    args = dict(_query_args(query, types[endpoint]), job_id=job_id)
    return _call_operation("status" if endpoint == "job" else endpoint, args, root, default_until=wait_until)


def _query_params(query_text: str) -> Dict[str, List[str]]:
    """A query's parameters, blank ones kept.  One rule on every endpoint: each
    parameter at most once (tag excepted: one per tag), rather than the last winning."""
    from urllib.parse import parse_qs
    params = parse_qs(query_text, keep_blank_values=True)
    repeated = sorted(name for name, values in params.items() if len(values) > 1 and name != "tag")
    if repeated:
        raise InvalidArgumentError("query parameter(s) given more than once: %s" % _clip(", ".join(repeated)),
                                   hint="give each parameter once; only tag repeats, one per tag")
    return params


def _http_target(target: str) -> Tuple[Optional[List[str]], str]:
    """Path segments and query of a request target; None segments unless it is a
    plain path (an absolute URL would name another host than the Host header)."""
    from urllib.parse import unquote
    path, _, query = target.split("#", 1)[0].partition("?")
    if not path.startswith("/"):
        return None, query
    return [unquote(p) for p in path.split("/") if p], query


def _http_endpoint(parts: Optional[List[str]]) -> Optional[str]:
    """The endpoint a path names (a key of _HTTP_METHODS), or None."""
    if parts == ["health"]:
        return "health"
    if parts == []:
        return "page"
    if parts is not None and len(parts) == 1 and parts[0] in _WEB_ASSETS:
        return "asset"
    if parts == ["exec"]:
        return "exec"
    if parts is not None and len(parts) == 2 and "@" + parts[0] in _HTTP_ALIASES:
        return "@" + parts[0]
    if not parts or parts[0] != "jobs" or len(parts) > 3:
        return None
    if len(parts) < 3:
        return ("jobs", "job")[len(parts) - 1]
    return parts[2] if parts[2] in _JOB_ENDPOINTS else None


@_record
class _OutputFollow:
    """The answer of GET /jobs/{id}/follow: not a document but the output as it
    comes, sent by _send_follow (chunked text/plain, or text/event-stream)."""

    job: Job
    start: Tuple[int, int]  # where each log is read from: the start of its last `lines`
    streams: Tuple[bool, bool]  # stdout, stderr


def _follow_request(job: Job, args: dict) -> _OutputFollow:
    lines = args.get("lines", DEFAULT_TAIL_LINES)
    if lines < 0:
        raise InvalidArgumentError("lines: %r is negative" % (lines,))
    stream = _check_stream(args.get("stream", "either"), "stream")
    tail = job.tail(lines, _parse_size(args.get("max_bytes", DEFAULT_MAX_BYTES), "max_bytes"))
    return _OutputFollow(job, (tail.stdout_range[0], tail.stderr_range[0]),
                         (stream in ("stdout", "either"), stream in ("stderr", "either")))


def _send_follow(handler, follow: _OutputFollow) -> None:
    """Stream a job's output as it is written until the job ends.  A follower
    that goes away only ends this thread's reading: the job is not touched."""
    import codecs
    events = "text/event-stream" in (handler.headers.get("Accept") or "")
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream; charset=utf-8" if events else "text/plain; charset=utf-8")
    handler.send_header("Transfer-Encoding", "chunked")
    handler.finish_response(b"")  # the headers every answer carries (security, CORS), then the stream
    handler.close_connection = True  # after the stream, not announced: the client reads it to its last chunk
    out = handler.wfile

    def chunk(data: bytes) -> None:
        if data:
            out.write(b"%x\r\n%s\r\n" % (len(data), data))
            out.flush()

    def sink(name: str, offset: int):
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        position = [offset]

        def write(data: bytes) -> None:
            if not events:
                return chunk(data)
            text = decoder.decode(data)  # a character split between reads comes whole with the next
            if text:
                chunk(b"event: %s\ndata: %s\n\n" % (name.encode(), json.dumps(
                    {"offset": position[0], "text": text}).encode()))
            position[0] += len(data)
        return write if follow.streams[name == "stderr"] else (lambda data: None)

    try:
        _follow(follow.job.paths, follow.start, [sink("stdout", follow.start[0]), sink("stderr", follow.start[1])],
                wanted=lambda: _client_is_there(handler.connection))
        if events:
            chunk(b"event: end\ndata: %s\n\n" % _strict_json(_status_doc(follow.job)))
        out.write(b"0\r\n\r\n")
        out.flush()
    except (OSError, JobError):  # the client went away, or the job was deleted: nothing left to send
        pass


def _client_is_there(sock) -> bool:
    """False once the peer has closed the connection (a readable socket with nothing to read)."""
    import select
    import socket
    try:
        readable = select.select([sock], [], [], 0)[0]
        return not readable or sock.recv(1, socket.MSG_PEEK) != b""
    except (OSError, ValueError):
        return False


def _query_args(query: Dict[str, str], types: Dict[str, type]) -> dict:
    """Typed arguments from a query string; unknown parameters are rejected.
    Ranges are checked with the operation's schema, like JSON arguments."""
    unknown = sorted(set(query) - set(types) - {"tag"})
    if unknown:
        raise InvalidArgumentError("unknown query parameter(s): %s" % _clip(", ".join(unknown)),
                                   hint="accepted: " + (", ".join(sorted(types)) or "none"))
    args = {}
    for name, value in query.items():
        if name == "tag":
            continue
        kind = types[name]
        try:
            args[name] = _query_bool(value) if kind is bool else kind(value)
        except ValueError:
            raise InvalidArgumentError("query parameter %r: %r is not a %s" % (name, _clip(value), kind.__name__),
                                       hint=_QUERY_TYPE_HINTS[kind]) from None
    return args


_QUERY_TYPE_HINTS = {int: "a whole number, e.g. 5", float: "a number of seconds, e.g. 2.5",
                     bool: "1, true, yes, 0, false or no", str: "text"}


def _query_bool(value: str) -> bool:
    words = {"1": True, "true": True, "yes": True, "0": False, "false": False, "no": False}
    if value.lower() not in words:
        raise ValueError(value)
    return words[value.lower()]


def _log_reply(root: Optional[str], job_id: str, query: Dict[str, List[str]]) -> _RawReply:
    """GET /jobs/ID/log?stream=stdout|stderr|full&offset=N&length=M: the bytes [N, N+M)
    of one log as they are on disk (without offset: its last M bytes); the headers
    X-Log-Start, X-Log-End and X-Log-Size say which range that is, of how many."""
    stream, offset, length = _log_range_args(query)
    paths = _open_job(root, job_id).paths
    path = {"stdout": paths.stdout_log, "stderr": paths.stderr_log, "full": paths.full_log}[stream]
    start, size, data = _read_log_range(path, offset, length)
    return _RawReply(200, "application/octet-stream", data, (
        ("X-Log-Start", str(start)), ("X-Log-End", str(start + len(data))), ("X-Log-Size", str(size))))


def _log_range_args(query: Dict[str, List[str]]) -> Tuple[str, Optional[int], int]:
    unknown = sorted(set(query) - {"stream", "offset", "length"})
    if unknown:
        raise InvalidArgumentError("unknown query parameter(s): %s" % _clip(", ".join(unknown)),
                                   hint="log takes stream, offset and length")
    stream = query.get("stream", [None])[0]
    if stream not in _LOG_STREAMS:
        raise InvalidArgumentError("stream must be one of %s, not %r" % (", ".join(_LOG_STREAMS), _clip(stream)),
                                   hint="e.g. log?stream=stdout&offset=0&length=65536")
    length = _query_count(query, "length", _LOG_MAX_LENGTH)
    return stream, _query_count(query, "offset", _MAX_COUNT), _LOG_DEFAULT_LENGTH if length is None else length


def _query_count(query: Dict[str, List[str]], name: str, maximum: int) -> Optional[int]:
    """A query parameter that must be a whole number from 0 to maximum; None when absent."""
    if name not in query:
        return None
    text = query[name][0]
    if not re.fullmatch(r"[0-9]{1,16}", text) or int(text) > maximum:
        raise InvalidArgumentError("query parameter %s=%r is not a whole number from 0 to %d"
                                   % (name, _clip(text), maximum))
    return int(text)


def _read_log_range(path: str, offset: Optional[int], length: int) -> Tuple[int, int, bytes]:
    """(start, size, bytes) of a log, never through a symlink; a log not yet made is empty.
    An offset past the end reads nothing at the end (a restart starts the logs afresh)."""
    fd = _open_job_file(path)
    if fd is None:
        return 0, 0, b""
    try:
        with open(fd, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - length) if offset is None else min(offset, size)
            f.seek(start)
            data = f.read(min(length, size - start))
    except OSError as exc:  # a directory planted under the log's name, say
        raise _unreadable(path, exc) from None
    return start, size, data


def _etag_matches(header: Optional[str], etag: str) -> bool:
    """Does If-None-Match name this entity tag (weak or strong), or any (*)?"""
    tags = [tag.strip() for tag in (header or "").split(",")]
    return "*" in tags or etag in tags or "W/" + etag in tags


def _same_secret(given: str, expected: str) -> bool:
    """given == expected, in a time that does not tell how much of it matched."""
    import hmac
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode("utf-8"))


def _etag(body: bytes) -> str:
    import hashlib
    return '"%s"' % hashlib.sha256(body).hexdigest()[:32]


def _session_value(token: str) -> str:
    """The web page's session cookie: a MAC of the token, so that a cookie that
    leaks (browsers send it to every port of the host) never reveals the token."""
    import hashlib
    import hmac
    return hmac.new(token.encode("utf-8"), b"jobstate web page session", hashlib.sha256).hexdigest()


def _cookie_values(headers: Sequence[str], name: str) -> List[str]:
    """The values of every cookie called `name` in Cookie headers."""
    values = []
    for header in headers:
        for pair in header.split(";"):
            key, sep, value = pair.strip().partition("=")
            if sep and key == name:
                values.append(value.strip())
    return values


def _content_length(headers) -> int:
    """The declared body size (0 without one); InvalidArgumentError when the body's
    end cannot be known (chunked, malformed or repeated Content-Length)."""
    if headers.get("Transfer-Encoding") is not None:
        raise InvalidArgumentError("chunked request bodies are not supported", hint="send a Content-Length")
    values = headers.get_all("Content-Length") or []
    if len(values) > 1 or (values and not re.fullmatch(r"[0-9]{1,15}", values[0].strip())):
        raise InvalidArgumentError("bad Content-Length %s" % _clip(", ".join(values)),
                                   hint="send one Content-Length: the body's size in bytes")
    return int(values[0]) if values else 0


def _is_json_media_type(value: Optional[str]) -> bool:
    """application/json, with or without parameters (`; charset=utf-8`)."""
    return bool(value) and value.split(";", 1)[0].strip().lower() == "application/json"


_BODY_EXAMPLE = 'a JSON object, e.g. {"command": ["echo", "hello"], "until": 5}'


def _parse_json_body(raw: bytes) -> dict:
    """The JSON object of a request body (an empty body is {}); InvalidArgumentError otherwise."""
    if not raw.strip():
        return {}
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_json_constant)
    except UnicodeDecodeError:
        raise InvalidArgumentError("request body is not UTF-8", hint="JSON bodies are UTF-8 text") from None
    except RecursionError:
        raise InvalidArgumentError("request body is nested too deeply",
                                   hint="arguments are flat: strings, numbers, arrays of strings") from None
    except ValueError as exc:
        raise InvalidArgumentError("request body is not JSON: %s" % exc, hint=_BODY_EXAMPLE) from None
    if not isinstance(doc, dict):
        raise InvalidArgumentError("request body must be a JSON object", hint=_BODY_EXAMPLE)
    return doc


def _reject_json_constant(name: str):
    raise InvalidArgumentError("request body holds %s, which is not JSON" % name, hint="send finite numbers")


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


def _ip_address(host: str):
    import ipaddress
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _host_is_allowed(header: Optional[str], bound_host: str) -> bool:
    """Does a Host header name this server in a way a DNS-rebinding page cannot:
    localhost, a loopback address, the bound host, or any address on a wildcard
    bind (a page can point its own name at us, but not change an address)?"""
    match = re.fullmatch(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?", header or "", re.IGNORECASE)
    if not match:
        return False
    host = match.group(1).strip("[]").lower()
    if _is_loopback(host) or host == bound_host.lower():
        return True
    bound = _ip_address(bound_host)
    return bool(bound and bound.is_unspecified and _ip_address(host))


def _is_own_origin(origin: str, host_header: str) -> bool:
    """Does Origin name the pages of this server, as reached through Host (already
    checked)?  Browsers serialize an origin without the default port."""
    host = host_header.lower()
    return origin.lower() == "http://" + (host[:-3] if host.endswith(":80") else host)


def _check_origin_option(value: str) -> str:
    """An --allow-origin value: scheme://host[:port], exactly as browsers send Origin."""
    if not re.fullmatch(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+", value, re.IGNORECASE):
        raise InvalidArgumentError("--allow-origin %r is not an origin" % (value,),
                                   hint="scheme://host[:port] with no path, e.g. http://localhost:3000")
    return value.lower()


def _serve_token(host: str, use_token: bool) -> Tuple[Optional[str], bool]:
    """The bearer token serve demands and whether serve made it: JOBSTATE_SERVE_TOKEN,
    else a new random one; None only for --no-token, which loopback binds alone may use."""
    given = _take_serve_token()
    if use_token and given:
        return given, False
    if use_token:
        import secrets
        return secrets.token_urlsafe(32), True
    if given:
        raise InvalidArgumentError("--no-token contradicts JOBSTATE_SERVE_TOKEN",
                                   hint="unset JOBSTATE_SERVE_TOKEN, or drop --no-token")
    if not _is_loopback(host):
        raise InvalidArgumentError("refusing to serve on %s without a token" % host,
                                   hint="drop --no-token (serve makes a token), or bind a loopback address")
    return None, False


def _login_url(url: str, token: Optional[str], made_token: bool) -> Optional[str]:
    """The web page's address to open: with the token when serve made it; None for a
    token the caller chose (never echoed: add ?token= yourself), none needed without one."""
    if token is None:
        return url + "/"
    return url + "/?token=" + token if made_token else None


def _make_http_server(host: str, port: int, handler):
    from http.server import ThreadingHTTPServer
    import socket

    class Server(ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = _HTTP_LISTEN_BACKLOG
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        slots = threading.BoundedSemaphore(_HTTP_MAX_THREADS)
        stopping = False  # set by a signal handler; checked at least every `timeout` seconds
        timeout = 0.5

        busy = 0  # handler threads under way
        reading: Dict[object, float] = {}  # handlers reading a head or body: since when
        reading_guard = threading.Lock()

        def process_request(self, request, client_address):
            # With every slot busy the accepting loop waits here, and new
            # connections wait in the kernel's listen queue, not in threads.
            while not self.slots.acquire(timeout=0.5):
                self.cut_overdue_reads()
                if self.stopping:
                    return self.shutdown_request(request)
            with self.reading_guard:
                self.busy += 1
            thread = threading.Thread(target=self.process_request_thread, args=(request, client_address),
                                      daemon=True)
            try:
                thread.start()
            except RuntimeError:  # "can't start new thread": it never ran, so it never releases its slot
                self.release_slot()
                raise

        def process_request_thread(self, request, client_address):
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.release_slot()

        def release_slot(self):
            with self.reading_guard:
                self.busy -= 1
            self.slots.release()

        def watch(self, handler):
            with self.reading_guard:
                self.reading[handler] = time.monotonic()

        def unwatch(self, handler) -> bool:
            """Stop watching; whether the read had been cut off (it is then over)."""
            with self.reading_guard:
                return self.reading.pop(handler, None) is None and getattr(handler, "cut_off", False)

        def cut_overdue_reads(self):
            """Hang up on reads past their deadline: a shutdown wakes the handler's recv (EOF)."""
            now = time.monotonic()
            with self.reading_guard:
                busy = self.busy >= _HTTP_BUSY_THREADS
                allowed = _HTTP_BUSY_DEADLINE_S if busy else self.RequestHandlerClass.timeout
                overdue = [h for h, since in self.reading.items() if now - since > allowed]
                for handler in overdue:
                    del self.reading[handler]
                    handler.cut_off = True
            for handler in overdue:
                try:
                    handler.connection.shutdown(socket.SHUT_RDWR)
                except OSError:  # already gone
                    pass

        def handle_error(self, request, client_address):
            sys.stderr.write("%s %s: %s\n" % (_utc_now(), client_address[0], sys.exc_info()[1]))

    try:
        return Server((host, port), handler)
    except OSError as exc:
        raise JobIOError("cannot listen on %s:%d: %s" % (host, port, exc.strerror or exc)) from None


def _serve_http(root: str, bind: str, ready, *, use_token: bool = True,
                allowed_origins: Sequence[str] = ()) -> int:
    """Serve the HTTP API until Ctrl-C or SIGTERM; `ready` receives the
    serve envelope once listening.  {url, token, pid} go to serve.json in the root."""
    host, port = _parse_bind(bind)
    origins = [_check_origin_option(origin) for origin in allowed_origins]
    token, made_token = _serve_token(host, use_token)
    _ensure_root(root)
    idle_s = _env_seconds("JOBSTATE_SERVE_IDLE_TIMEOUT", _HTTP_IDLE_TIMEOUT_S) or _HTTP_IDLE_TIMEOUT_S
    server = _make_http_server(host, port, _make_http_handler(root, token, host, origins, idle_s))
    bound_port = server.server_address[1]
    url = "http://%s:%d" % ("[%s]" % host if ":" in host else host, bound_port)
    info = {"url": url, "token": token, "pid": os.getpid()}
    info_path = os.path.join(root, _SERVE_FILENAME)
    previous_handlers = _stop_on_signals(server)
    try:
        _write_serve_file(info_path, info)
        ready(_envelope("serve", {
            "url": url, "host": host, "port": bound_port, "auth": token is not None, "token_file": info_path,
            "token": token if made_token else None,  # never echo a secret the caller chose
            "login_url": _login_url(url, token, made_token), "allowed_origins": origins}))
        while not server.stopping:
            server.handle_request()
            server.cut_overdue_reads()
    except KeyboardInterrupt:  # where our handlers could not be installed
        pass
    finally:
        server.server_close()
        _remove_serve_file(info_path, info)
        for signum, handler in previous_handlers.items():
            if handler is not None:
                _signal.signal(signum, handler)
    return 0


def _stop_on_signals(server) -> dict:
    """Make SIGINT and SIGTERM stop the server (serve then removes serve.json); returns
    the handlers replaced.  The handlers only set a flag: an exception raised from a
    signal handler can land anywhere, even in a weakref callback that ignores it."""
    def stop(signum, frame):
        server.stopping = True
    previous = {}
    for signum in (_signal.SIGINT, _signal.SIGTERM):
        try:
            previous[signum] = _signal.signal(signum, stop)
        except ValueError:  # not the main thread (an embedding caller): leave signals alone
            break
    return previous


def _write_serve_file(path: str, info: dict) -> None:
    try:
        _write_json_atomic(path, info)  # 0600, like every file we write: it holds the token
    except OSError as exc:
        raise JobIOError("cannot write %s: %s" % (path, exc.strerror or exc)) from None


def _remove_serve_file(path: str, info: dict) -> None:
    """Remove serve.json if it still describes this server (a later one may have replaced it)."""
    try:
        if _read_json(path) == info:
            os.unlink(path)
    except (OSError, ValueError):  # already gone, or unreadable: not ours to judge, leave it
        pass


# -- Web page: GET / on serve ------------------------------------------------------
#
# The page, its script and its style, served by the handler above: part of the
# HTTP surface, so they sit here rather than in a section of their own after it
# (which the handler, calling backwards only, could not use).  Static text: the
# page fetches all job data from the API and inserts it as text, never as HTML;
# the Content-Security-Policy (_PAGE_CSP) allows no inline script or style.

def _web_asset(name: str) -> _RawReply:
    content_type, text = _WEB_ASSETS[name]
    return _RawReply(200, content_type, text.encode("utf-8"))


_WEB_PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>jobstate</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/app.css">
<script src="/app.js" defer></script>
</head>
<body>
<a class="skip" href="#main">Skip to the jobs</a>
<header class="top">
  <h1><a href="#/">jobstate</a></h1>
  <nav id="counts" aria-label="Jobs per state (choose one to filter)"></nav>
  <p id="status" role="status" aria-live="polite"></p>
</header>
<main id="main" tabindex="-1">
<noscript><p class="problem">This page needs JavaScript; the HTTP API and the CLI do not.</p></noscript>
<section id="list-view" aria-label="Jobs">
  <form id="filters" class="filters">
    <label>State <select id="filter-state"><option value="">any</option></select></label>
    <label>Tag <select id="filter-tag"><option value="">any</option></select></label>
    <label>Directory <select id="filter-cwd"><option value="">any</option></select></label>
  </form>
  <p id="list-note" class="note"></p>
  <table id="jobs">
    <caption class="visually-hidden">Jobs, newest first</caption>
    <thead><tr>
      <th scope="col">ID</th><th scope="col">State</th><th scope="col">Exit</th><th scope="col">Command</th>
      <th scope="col">Directory</th><th scope="col">Tags</th><th scope="col">Created</th><th scope="col">Duration</th>
    </tr></thead>
    <tbody></tbody>
  </table>
</section>
<section id="job-view" aria-labelledby="job-title" hidden>
  <p><a href="#/">&larr; All jobs</a></p>
  <h2 id="job-title">Job <code id="job-id"></code></h2>
  <p class="verdict"><span id="job-state" class="badge"></span> <span id="job-verdict"></span></p>
  <div class="actions" role="group" aria-label="Actions">
    <label for="signal">Signal</label>
    <select id="signal">
      <option>TERM</option><option>INT</option><option>HUP</option><option>QUIT</option><option>KILL</option>
      <option>USR1</option><option>USR2</option><option>STOP</option><option>CONT</option>
    </select>
    <button id="kill" type="button">Send signal</button>
    <button id="restart" type="button">Restart</button>
    <button id="delete" type="button" class="danger">Delete&hellip;</button>
  </div>
  <p id="action-result" role="status" aria-live="polite"></p>
  <h3>Output</h3>
  <div class="tabs" role="tablist" aria-label="Output stream">
    <button id="tab-stdout" type="button" role="tab" aria-controls="output" aria-selected="true"
      data-stream="stdout">stdout</button>
    <button id="tab-stderr" type="button" role="tab" aria-controls="output" aria-selected="false" tabindex="-1"
      data-stream="stderr">stderr</button>
    <button id="tab-full" type="button" role="tab" aria-controls="output" aria-selected="false" tabindex="-1"
      data-stream="full">both, interleaved (full.log)</button>
  </div>
  <div class="log-bar">
    <button id="load-earlier" type="button" hidden>Load earlier</button>
    <span id="log-range"></span>
    <label><input id="follow" type="checkbox" checked> Follow</label>
  </div>
  <pre id="output" role="tabpanel" tabindex="0" aria-labelledby="tab-stdout"></pre>
  <div class="columns">
    <section aria-labelledby="state-title"><h3 id="state-title">State</h3><dl id="state"></dl></section>
    <section aria-labelledby="definition-title">
      <h3 id="definition-title">Definition</h3><dl id="definition"></dl>
    </section>
  </div>
  <h3>Notifications</h3>
  <div id="notifications"></div>
</section>
</main>
<dialog id="confirm" aria-labelledby="confirm-title">
  <form method="dialog">
    <h2 id="confirm-title">Delete this job?</h2>
    <p>Its directory, output and record are removed for good.</p>
    <p><code id="confirm-job"></code></p>
    <div class="actions">
      <button id="confirm-cancel" value="cancel" autofocus>Cancel</button>
      <button id="confirm-delete" value="delete" class="danger">Delete</button>
    </div>
  </form>
</dialog>
</body>
</html>
"""

# The answer to GET / without a session (401): no script, just how to sign in.
_WEB_SIGN_IN_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>jobstate: sign in</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/app.css">
</head>
<body>
<main id="main" class="sign-in">
<h1>jobstate</h1>
<p class="problem">Not signed in.</p>
<p>Open the <strong>login URL</strong> that <code>jobstate serve</code> printed (<code>login_url</code>):
it holds the token, and signs this browser in until it closes.</p>
<p>With a token of your own (<code>JOBSTATE_SERVE_TOKEN</code>), open this address with
<code>?token=</code> and the token after it. The token is also in <code>serve.json</code> in the jobs root.</p>
<p>Just opened the login URL from a link on another site? The browser holds the session cookie
back on such a visit: <a href="/">open the page again</a>.</p>
</main>
</body>
</html>
"""

_WEB_CSS = r""":root {
  color-scheme: light dark;
  --bg: #ffffff; --fg: #1b1f24; --muted: #5b6570; --line: #d5dae0; --panel: #f4f6f8; --accent: #0b5fcc;
  --exited: #137333; --running: #8a5a00; --created: #0b7285; --killed: #c5221f; --failed: #c5221f;
  --unknown: #6b7280; --bad: #c5221f; --danger-bg: #c5221f; --danger-fg: #ffffff;
  font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif;
  font-size: 15px; line-height: 1.45;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #111418; --fg: #e3e6ea; --muted: #9aa4af; --line: #2e353d; --panel: #1a1f25; --accent: #6ea8fe;
    --exited: #5cc97b; --running: #f0b429; --created: #4cc9de; --killed: #ff6b6b; --failed: #ff6b6b;
    --unknown: #9aa4af; --bad: #ff6b6b; --danger-bg: #e5534b; --danger-fg: #111418;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg); }
a { color: var(--accent); }
code, pre { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, "DejaVu Sans Mono", monospace;
  font-size: 0.92em; }
:focus-visible { outline: 3px solid var(--accent); outline-offset: 2px; }
.skip { position: absolute; left: -999px; top: 0; background: var(--bg); padding: 0.5rem; z-index: 2; }
.skip:focus { left: 0.5rem; }
.visually-hidden { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0);
  white-space: nowrap; }
[hidden] { display: none !important; }

.top { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem 1.25rem; padding: 0.6rem 1rem;
  border-bottom: 1px solid var(--line); background: var(--panel); position: sticky; top: 0; z-index: 1; }
.top h1 { font-size: 1.15rem; margin: 0; }
.top h1 a { color: var(--fg); text-decoration: none; }
#counts { display: flex; flex-wrap: wrap; gap: 0.35rem; }
#counts button { font: inherit; font-size: 0.9rem; border: 1px solid var(--line); border-radius: 999px;
  padding: 0.1rem 0.65rem; background: var(--bg); color: inherit; cursor: pointer; }
#counts button[aria-pressed="true"] { border-color: var(--accent); box-shadow: inset 0 0 0 1px var(--accent); }
#status { margin: 0 0 0 auto; color: var(--muted); font-size: 0.85rem; }
#status.problem { color: var(--bad); font-weight: 600; }
main { padding: 0.75rem 1rem 2rem; max-width: 110rem; margin: 0 auto; }
main:focus { outline: none; }

.filters { display: flex; flex-wrap: wrap; gap: 0.5rem 1rem; margin-bottom: 0.5rem; }
.filters label { display: flex; align-items: center; gap: 0.35rem; color: var(--muted); }
select, button { font: inherit; color: inherit; background: var(--bg); border: 1px solid var(--line);
  border-radius: 6px; padding: 0.3rem 0.6rem; min-height: 2.1rem; }
select { max-width: 16rem; }
button { cursor: pointer; }
button:hover:not(:disabled) { border-color: var(--accent); }
button:disabled { opacity: 0.5; cursor: not-allowed; }
button.danger { background: var(--danger-bg); color: var(--danger-fg); border-color: var(--danger-bg); }
.note { color: var(--muted); margin: 0.25rem 0 0.5rem; min-height: 1em; }
.problem { color: var(--bad); font-weight: 600; }

table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 0.35rem 0.6rem; border-bottom: 1px solid var(--line); vertical-align: top; }
th { font-size: 0.8rem; text-transform: uppercase; letter-spacing: 0.04em; color: var(--muted); font-weight: 600; }
tbody tr:hover { background: var(--panel); }
td.command, td.cwd { overflow-wrap: anywhere; }
td.command { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 0.9em; }
td.cwd, td.created, td.duration, td.tags { color: var(--muted); }
td.id a { font-family: ui-monospace, Menlo, Consolas, "DejaVu Sans Mono", monospace; }
td.state, td.exit, td.created, td.duration { white-space: nowrap; }

.st-exited { color: var(--exited); } .st-running { color: var(--running); } .st-created { color: var(--created); }
.st-killed { color: var(--killed); } .st-failed { color: var(--failed); } .st-unknown { color: var(--unknown); }
.st-bad { color: var(--bad); }
td.state, .badge { font-weight: 600; }
.badge { display: inline-block; border: 1px solid currentColor; border-radius: 999px; padding: 0 0.6rem; }
@media (prefers-reduced-motion: no-preference) {
  .st-running .icon { display: inline-block; animation: pulse 1.6s ease-in-out infinite; }
  @keyframes pulse { 50% { opacity: 0.35; } }
}

#job-title { margin: 0.25rem 0; font-size: 1.2rem; overflow-wrap: anywhere; }
.verdict { margin: 0.25rem 0 0.75rem; }
.actions { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem; }
#action-result { min-height: 1.2em; margin: 0.4rem 0 0; color: var(--muted); }
h3 { font-size: 1rem; margin: 1.25rem 0 0.4rem; }
.tabs { display: flex; flex-wrap: wrap; gap: 0.25rem; }
.tabs [role="tab"] { border-radius: 6px 6px 0 0; border-bottom: none; }
.tabs [aria-selected="true"] { background: var(--panel); border-color: var(--accent); font-weight: 600; }
.log-bar { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5rem 1rem; padding: 0.35rem 0;
  color: var(--muted); font-size: 0.9rem; }
#output { margin: 0; padding: 0.6rem 0.75rem; background: var(--panel); border: 1px solid var(--line);
  border-radius: 0 6px 6px 6px;
  max-height: 65vh; min-height: 6rem; overflow: auto; white-space: pre-wrap; overflow-wrap: anywhere; }
.columns { display: grid; grid-template-columns: repeat(auto-fit, minmax(20rem, 1fr)); gap: 0 2rem; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 0.25rem 1rem; margin: 0; }
dt { color: var(--muted); }
dd { margin: 0; overflow-wrap: anywhere; }
dd code { background: var(--panel); border: 1px solid var(--line); border-radius: 4px; padding: 0 0.25rem;
  margin-right: 0.25rem; }

dialog { border: 1px solid var(--line); border-radius: 8px; background: var(--bg); color: var(--fg);
  max-width: 32rem; }
dialog::backdrop { background: rgba(0, 0, 0, 0.45); }
dialog h2 { font-size: 1.1rem; margin-top: 0; }
.sign-in { max-width: 40rem; }

/* A phone: each job is a card of labelled lines, nothing scrolls sideways. */
@media (max-width: 720px) {
  main { padding: 0.5rem 0.6rem 2rem; }
  #status { margin-left: 0; width: 100%; }
  #jobs thead { display: none; }
  #jobs, #jobs tbody, #jobs tr, #jobs td { display: block; width: 100%; }
  #jobs tr { border: 1px solid var(--line); border-radius: 8px; margin-bottom: 0.6rem; padding: 0.35rem 0.6rem; }
  #jobs td { border: none; padding: 0.1rem 0; display: flex; gap: 0.75rem; white-space: normal; }
  #jobs td::before { content: attr(data-label); flex: 0 0 5.5rem; color: var(--muted); font-size: 0.85rem;
    font-weight: normal; }
  .filters label { width: 100%; }
  .filters select { flex: 1; max-width: none; }
  dl { grid-template-columns: 1fr; }
  dt { margin-top: 0.35rem; }
}
"""

_WEB_JS = r"""// jobstate's web page: one script, no framework.  Every piece of job data goes
// into the page as text (textContent, Text nodes), never as HTML.
"use strict";
(() => {
  const POLL_MS = 1000;            // how often the page asks; 304 when nothing changed
  const RETRY_MS = 5000;           // after an error or while signed out
  const LIST_LIMIT = 1000;
  const LOG_CHUNK = 65536;         // a first read, and each "load earlier"
  const LOG_FOLLOW = 262144;       // each read while following
  const LOG_KEEP = 8 << 20;        // past this much loaded output, start again from the end
  const STATES = ["created", "running", "exited", "killed", "failed", "unknown"];
  const ICONS = {created: "\u25CB", running: "\u25CF", exited: "\u2713", killed: "\u25A0", failed: "\u2717",
                 unknown: "?"};

  const $ = (selector) => document.querySelector(selector);
  const ui = {};
  let view = null;                 // {kind: "list"} or {kind: "job", id, ...}
  let timer = 0;
  let generation = 0;              // a new view stops the old view's polling
  let resumeWhenVisible = null;

  // -- building elements: text only ------------------------------------------------

  const ATTRIBUTES = new Set(["href", "title", "datetime", "scope", "role", "tabindex", "value", "type", "id"]);

  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props || {})) {
      if (name === "class") node.className = value;
      else if (ATTRIBUTES.has(name) || /^(data|aria)-/.test(name)) node.setAttribute(name, String(value));
      else throw new Error("el(): no property " + name);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);  // a string becomes a Text node
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  // -- formatting, as the text mode does ------------------------------------------------

  function formatDuration(ms) {
    if (ms === null || ms === undefined || Number.isNaN(ms)) return "-";
    if (ms < 1000) return Math.floor(ms) + "ms";
    const s = ms / 1000;
    if (s < 60) return s.toFixed(1) + "s";
    const pad = (n) => String(Math.floor(n)).padStart(2, "0");
    if (s < 3600) return Math.floor(s / 60) + "m" + pad(s % 60) + "s";
    if (s < 86400) return Math.floor(s / 3600) + "h" + pad((s % 3600) / 60) + "m";
    return Math.floor(s / 86400) + "d" + pad((s % 86400) / 3600) + "h";
  }

  function formatAge(timestamp) {
    const then = Date.parse(timestamp || "");
    if (Number.isNaN(then)) return "-";
    const seconds = Math.max(0, Math.floor((Date.now() - then) / 1000));
    for (const [unit, size] of [["d", 86400], ["h", 3600], ["m", 60]]) {
      if (seconds >= size) return Math.floor(seconds / size) + unit + " ago";
    }
    return seconds + "s ago";
  }

  function durationOf(job) {
    if (job.duration_ms !== null && job.duration_ms !== undefined) return job.duration_ms;
    const started = Date.parse(job.started_at || "");
    return job.state === "running" && !Number.isNaN(started) ? Math.max(0, Date.now() - started) : null;
  }

  function outcome(job) {
    if (job.signal) return job.signal + (job.timed_out ? " (timeout)" : "");
    return job.exit_code === null || job.exit_code === undefined ? "-" : String(job.exit_code);
  }

  function stateClass(job) {
    return job.state === "exited" && job.exit_code !== 0 ? "st-bad" : "st-" + job.state;
  }

  function stateIcon(job) {
    return job.state === "exited" && job.exit_code !== 0 ? "\u2717" : (ICONS[job.state] || "?");
  }

  function stateLabel(job) {  // one element: a flex cell (the phone layout) keeps icon and word together
    return el("span", null, el("span", {class: "icon", "aria-hidden": "true"}, stateIcon(job)), " " + job.state);
  }

  function verdict(job) {
    const took = formatDuration(job.duration_ms);
    if (job.state === "exited") return "exited with code " + job.exit_code + " after " + took;
    if (job.state === "killed") {
      return "killed by " + job.signal + " after " + took + (job.timed_out ? " (timeout)" : "");
    }
    if (job.state === "failed") return "failed (" + (job.error || {}).stage + "): " + (job.error || {}).message;
    if (job.state === "running") {
      return "running" + (job.pid ? " as pid " + job.pid : "") + " for " + formatDuration(durationOf(job));
    }
    return job.state;
  }

  const commandText = (job) => (job.command || []).join(" ");

  // -- talking to serve ------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, doc) {
      const error = (doc && doc.error) || {};
      super((error.message || "HTTP " + status) + (error.hint ? " (" + error.hint + ")" : ""));
      this.status = status;
      this.code = error.code;
    }
  }

  // The session cookie counts only on requests that carry X-Jobstate: a header no
  // other site's page can add without a CORS preflight, which serve refuses.
  async function request(method, path, {body, etag} = {}) {
    const headers = {"X-Jobstate": "1"};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (etag) headers["If-None-Match"] = etag;
    const response = await fetch(path, {method, headers, cache: "no-store", credentials: "same-origin",
                                        body: body === undefined ? undefined : JSON.stringify(body)});
    if (response.status === 304) return {status: 304, etag};
    const type = response.headers.get("Content-Type") || "";
    const doc = type.startsWith("application/json") ? await response.json() : null;
    if (!response.ok) throw new ApiError(response.status, doc);
    return {status: response.status, etag: response.headers.get("ETag"), doc};
  }

  function setStatus(text, isProblem) {
    ui.status.textContent = text;
    ui.status.classList.toggle("problem", Boolean(isProblem));
  }

  function reportFailure(error) {
    if (error instanceof ApiError && error.status === 401) {
      setStatus("Not signed in: open the login URL that `jobstate serve` printed.", true);
    } else if (error instanceof ApiError) {
      setStatus(error.message, true);
    } else {
      setStatus("The server does not answer (stopped?); trying again.", true);
    }
  }

  // -- polling: one loop for the current view, paused while the tab is hidden --------

  function startPolling(step) {
    clearTimeout(timer);
    resumeWhenVisible = null;
    const mine = ++generation;
    const tick = async () => {
      if (mine !== generation) return;
      if (document.hidden) { resumeWhenVisible = tick; return; }
      let delay = POLL_MS;
      try {
        await step();
      } catch (error) {
        reportFailure(error);
        delay = RETRY_MS;
      }
      if (mine === generation) timer = setTimeout(tick, delay);
    };
    tick();
    return () => mine === generation;
  }

  function pollNow() {
    if (view) startPolling(view.step);
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && resumeWhenVisible) {
      const tick = resumeWhenVisible;
      resumeWhenVisible = null;
      tick();
    }
  });

  // -- the list -------------------------------------------------------------------------

  const list = {etag: null, doc: null, filters: {state: "", tag: "", cwd: ""}, options: {}};

  async function listStep() {
    if (!(await refreshList())) refreshTimes();
    setStatus("Updated " + new Date().toLocaleTimeString(), false);
  }

  // The list, and the counts in the header on every view; true when it changed.
  async function refreshList() {
    const reply = await request("GET", "/jobs?all=1&limit=" + LIST_LIMIT, {etag: list.etag});
    if (reply.status !== 200) return false;
    list.etag = reply.etag;
    list.doc = reply.doc;
    if (view && view.kind === "list") renderList();
    else renderCounts(list.doc.jobs);
    return true;
  }

  function matches(job) {
    const f = list.filters;
    return (!f.state || job.state === f.state) && (!f.tag || (job.tags || []).includes(f.tag)) &&
      (!f.cwd || job.cwd === f.cwd);
  }

  function renderList() {
    const jobs = list.doc.jobs;
    renderCounts(jobs);
    fillOptions(ui.filterTag, "tag", [...new Set(jobs.flatMap((job) => job.tags || []))].sort());
    fillOptions(ui.filterCwd, "cwd", [...new Set(jobs.map((job) => job.cwd).filter(Boolean))].sort());
    const focusedId = document.activeElement && document.activeElement.closest("tr[data-job-id]") ?
      document.activeElement.closest("tr[data-job-id]").getAttribute("data-job-id") : null;
    const shown = jobs.filter(matches);
    const body = el("tbody");
    for (const job of shown) body.append(jobRow(job));
    ui.jobs.replaceChild(body, ui.jobs.tBodies[0]);
    if (focusedId) {
      const link = body.querySelector('tr[data-job-id="' + CSS.escape(focusedId) + '"] a');
      if (link) link.focus();
    }
    const notes = [];
    if (!jobs.length) notes.push("No jobs yet under " + list.doc.root + ".");
    else if (!shown.length) notes.push("No job matches the filters.");
    else notes.push(shown.length + " of " + jobs.length + " jobs, newest first.");
    if (list.doc.truncated) notes.push("Only the newest " + LIST_LIMIT + " are shown.");
    if (list.doc.skipped) notes.push(list.doc.skipped + " unreadable job directories skipped.");
    ui.listNote.textContent = notes.join(" ");
  }

  function jobRow(job) {
    const row = el("tr", {"data-job-id": job.job_id, "data-state": job.state});
    const created = el("time", {datetime: job.created_at || "", title: job.created_at || ""},
                       formatAge(job.created_at));
    row.append(
      el("td", {class: "id", "data-label": "ID"},
         el("a", {href: "#/job/" + encodeURIComponent(job.job_id), title: job.job_id}, job.job_id.slice(0, 12))),
      el("td", {class: "state " + stateClass(job), "data-label": "State"}, stateLabel(job)),
      el("td", {class: "exit", "data-label": "Exit"}, outcome(job)),
      el("td", {class: "command", "data-label": "Command", title: commandText(job)}, commandText(job)),
      el("td", {class: "cwd", "data-label": "Directory"}, job.cwd || "-"),
      el("td", {class: "tags", "data-label": "Tags"}, (job.tags || []).join(", ")),
      el("td", {class: "created", "data-label": "Created"}, created),
      el("td", {class: "duration", "data-label": "Duration"}, formatDuration(durationOf(job))));
    return row;
  }

  function refreshTimes() {
    if (!list.doc) return;
    const byId = new Map(list.doc.jobs.map((job) => [job.job_id, job]));
    for (const row of ui.jobs.tBodies[0].rows) {
      const job = byId.get(row.getAttribute("data-job-id"));
      if (!job) continue;
      row.querySelector(".created time").textContent = formatAge(job.created_at);
      row.querySelector(".duration").textContent = formatDuration(durationOf(job));
    }
  }

  function renderCounts(jobs) {
    const counts = {};
    for (const job of jobs) counts[job.state] = (counts[job.state] || 0) + 1;
    const chips = [countChip("", null, "all " + jobs.length)];
    for (const state of STATES) {
      if (counts[state]) {
        const icon = el("span", {class: "st-" + state, "aria-hidden": "true"}, ICONS[state]);
        chips.push(countChip(state, icon, " " + state + " " + counts[state]));
      }
    }
    clear(ui.counts);
    ui.counts.append(...chips);
  }

  function countChip(state, icon, label) {
    const chip = el("button", {type: "button", "aria-pressed": String(list.filters.state === state)}, icon, label);
    chip.addEventListener("click", () => setFilter("state", state));
    return chip;
  }

  function fillOptions(select, name, values) {
    const wanted = list.filters[name];
    if (wanted && !values.includes(wanted)) values = [wanted, ...values];
    const key = values.join("\u0000");
    if (list.options[name] === key) return;  // rebuilding would close a select someone has open
    list.options[name] = key;
    const any = select.options[0];
    clear(select);
    select.append(any, ...values.map((value) => el("option", {value}, value)));
    select.value = wanted;
  }

  function setFilter(name, value) {
    list.filters[name] = value;
    if (name === "state") ui.filterState.value = value;
    if (view && view.kind !== "list") location.hash = "#/";  // a count chip on a job's page
    else if (list.doc) renderList();
  }

  function showList() {
    view = {kind: "list", step: listStep};
    ui.jobView.hidden = true;
    ui.listView.hidden = false;
    document.title = "jobstate";
    if (list.doc) renderList();
    startPolling(listStep);
  }

  // -- a job's page ------------------------------------------------------------------------

  function showJob(id) {
    view = {kind: "job", id, etag: null, doc: null, definition: null, notifications: null, stream: "stdout",
            log: null, step: null};
    const current = view;
    view.step = () => jobStep(current);
    ui.listView.hidden = true;
    ui.jobView.hidden = false;
    ui.jobId.textContent = id;
    ui.jobState.textContent = "";
    ui.jobVerdict.textContent = "loading\u2026";
    ui.actionResult.textContent = "";
    clear(ui.state);
    clear(ui.definition);
    clear(ui.notifications);
    selectTab("stdout", false);
    document.title = "jobstate: " + id.slice(0, 12);
    startPolling(view.step);
  }

  async function jobStep(job) {
    let reply;
    try {
      reply = await request("GET", "/jobs/" + encodeURIComponent(job.id), {etag: job.etag});
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        ui.jobVerdict.textContent = "This job no longer exists (deleted).";
        ui.jobState.textContent = "";
        setActions(null);
        return;
      }
      throw error;
    }
    if (job !== view) return;
    const before = job.doc;
    if (reply.status === 200) {
      job.etag = reply.etag;
      job.doc = reply.doc;
      if (!before || before.started_at !== job.doc.started_at) resetLog(job);  // restarted: new logs
      renderJob(job);
    } else {
      ui.jobVerdict.textContent = verdict(job.doc);
    }
    if (!job.definition) {
      job.definition = (await request("GET", "/jobs/" + encodeURIComponent(job.id) + "/definition")).doc;
      renderDefinition(job.definition);
    }
    if (!before || before.state !== job.doc.state || (job.notifications && job.notifications.pending)) {
      job.notifications = (await request("GET", "/jobs/" + encodeURIComponent(job.id) + "/notifications")).doc;
      renderNotifications(job.notifications);
    }
    const changed = before && before.state !== job.doc.state;
    if (job.doc.state === "running" || changed || !job.log.complete) await followLog(job);
    await refreshList();
    setStatus("Updated " + new Date().toLocaleTimeString(), false);
  }

  function renderJob(job) {
    const doc = job.doc;
    ui.jobState.className = "badge " + stateClass(doc);
    clear(ui.jobState);
    ui.jobState.append(stateLabel(doc));
    ui.jobVerdict.textContent = verdict(doc);
    setActions(doc);
    const rows = [
      ["Result", outcome(doc)], ["Created", doc.created_at], ["Started", doc.started_at],
      ["Finished", doc.finished_at], ["Duration", formatDuration(durationOf(doc))], ["PID", doc.pid],
      ["Error", doc.error ? doc.error.stage + ": " + doc.error.message : null],
      ["stdout log", doc.stdout_log_path], ["stderr log", doc.stderr_log_path]];
    fillList(ui.state, rows);
  }

  function setActions(doc) {
    const running = doc && doc.state === "running";
    ui.kill.disabled = !running;
    ui.signal.disabled = !running;
    ui.restart.disabled = !doc;
    ui.del.disabled = !doc || running;
    ui.del.title = running ? "Stop the job first" : "";
  }

  function fillList(dl, rows) {
    clear(dl);
    for (const [label, value] of rows) {
      if (value === null || value === undefined || value === "") continue;
      dl.append(el("dt", null, label), el("dd", null, ...(Array.isArray(value) ? value : [String(value)])));
    }
  }

  function renderDefinition(d) {
    const env = Object.entries(d.env || {}).map(([key, value]) => el("code", null, key + "=" + value));
    fillList(ui.definition, [
      ["Command", d.command.map((arg) => el("code", null, arg))],
      ["Directory", d.cwd],
      ["Environment", env.length ? env : null],
      ["Inherits env", d.inherit_env ? "yes" : "no (only the variables above)"],
      ["Env files", d.env_files.length ? d.env_files.join(", ") : null],
      ["Standard input", d.has_stdin ? "given (stdin.bin)" : "none"],
      ["Timeout", d.timeout_s ? formatDuration(d.timeout_s * 1000) + ", then KILL after " +
        formatDuration(d.kill_after_s * 1000) : "none"],
      ["Kill orphans", d.kill_orphans ? "yes" : null],
      ["Tags", d.tags.length ? d.tags.join(", ") : null],
      ["Notify command", d.notify_command], ["Notify file", d.notify_file]]);
  }

  function renderNotifications(n) {
    clear(ui.notifications);
    if (!n.notify_command && !n.notify_file) {
      ui.notifications.append(el("p", {class: "note"}, "None configured (run --notify-command or --notify-file)."));
      return;
    }
    if (!n.recorded) {
      ui.notifications.append(el("p", {class: "note"}, "Sent when the job ends; nothing sent for this run yet."));
      return;
    }
    if (n.pending) ui.notifications.append(el("p", {class: "note"}, "Sending\u2026"));
    const body = el("tbody");
    for (const d of n.deliveries) {
      body.append(el("tr", null, el("td", null, d.sink), el("td", {class: "command"}, d.target),
                     el("td", {class: d.ok ? "st-exited" : "st-bad"}, d.ok ? "\u2713 delivered" : "\u2717 failed"),
                     el("td", null, d.exit_code === undefined || d.exit_code === null ? "" : "exit " + d.exit_code),
                     el("td", null, d.error || ""), el("td", null, d.delivered_at || "")));
    }
    const head = el("thead", null, el("tr", null, ...["Sink", "Target", "Result", "Exit", "Error", "At"]
      .map((name) => el("th", {scope: "col"}, name))));
    ui.notifications.append(el("table", null, head, body));
  }

  // -- output: byte ranges, decoded exactly ------------------------------------------------
  //
  // The page holds bytes [start, end) of the chosen log.  Reads that start in the
  // middle of a UTF-8 character keep its continuation bytes aside (`head`) until
  // "load earlier" brings the bytes before them, so no character is ever split.

  function resetLog(job) {
    job.log = {stream: job.stream, start: null, end: 0, size: 0, head: new Uint8Array(0),
               decoder: new TextDecoder("utf-8"), complete: false, busy: false};
    clear(ui.output);
    renderRange(job);
  }

  async function readLog(job, offset, length) {
    let path = "/jobs/" + encodeURIComponent(job.id) + "/log?stream=" + job.log.stream + "&length=" + length;
    if (offset !== null) path += "&offset=" + offset;
    const response = await fetch(path, {headers: {"X-Jobstate": "1"}, cache: "no-store", credentials: "same-origin"});
    if (!response.ok) {
      const type = response.headers.get("Content-Type") || "";
      throw new ApiError(response.status, type.startsWith("application/json") ? await response.json() : null);
    }
    const number = (name) => Number(response.headers.get(name));
    return {bytes: new Uint8Array(await response.arrayBuffer()), start: number("X-Log-Start"),
            end: number("X-Log-End"), size: number("X-Log-Size")};
  }

  function splitContinuation(bytes, midFile) {
    let skip = 0;
    while (midFile && skip < Math.min(3, bytes.length) && (bytes[skip] & 0xC0) === 0x80) skip++;
    return [bytes.subarray(0, skip), bytes.subarray(skip)];
  }

  function nearBottom() {
    return ui.output.scrollHeight - ui.output.scrollTop - ui.output.clientHeight < 40;
  }

  function appendOutput(text) {
    if (!text) return;
    const stick = ui.follow.checked || nearBottom();
    ui.output.append(text);
    if (stick) ui.output.scrollTop = ui.output.scrollHeight;
  }

  async function followLog(job) {
    const log = job.log;
    if (log.busy) return;
    log.busy = true;
    try {
      if (log.start === null) {
        const first = await readLog(job, null, LOG_CHUNK);
        if (log !== job.log) return;
        const [head, rest] = splitContinuation(first.bytes, first.start > 0);
        Object.assign(log, {start: first.start, end: first.end, size: first.size, head});
        appendOutput(log.decoder.decode(rest, {stream: true}));
      }
      for (let reads = 0; reads < 8; reads++) {  // at most 2 MiB a look: a fast writer cannot hold the page
        const next = await readLog(job, log.end, LOG_FOLLOW);
        if (log !== job.log) return;
        if (next.size < log.end) { resetLog(job); return; }  // the log was started afresh
        appendOutput(log.decoder.decode(next.bytes, {stream: true}));
        log.end = next.end;
        log.size = next.size;
        if (next.end >= next.size) break;
      }
      log.complete = log.end >= log.size && job.doc.state !== "running" && job.doc.state !== "created";
      if (log.end - log.start > LOG_KEEP) resetLog(job);
    } finally {
      log.busy = false;
      renderRange(job);
    }
  }

  async function loadEarlier() {
    const job = view;
    if (!job || job.kind !== "job" || !job.log || !job.log.start) return;
    const log = job.log;
    ui.loadEarlier.disabled = true;
    try {
      const from = Math.max(0, log.start - LOG_CHUNK);
      const earlier = await readLog(job, from, log.start - from);
      if (log !== job.log) return;
      const joined = new Uint8Array(earlier.bytes.length + log.head.length);
      joined.set(earlier.bytes);
      joined.set(log.head, earlier.bytes.length);
      const [head, rest] = splitContinuation(joined, from > 0);
      const before = ui.output.scrollHeight;
      ui.output.prepend(new TextDecoder("utf-8").decode(rest));
      ui.output.scrollTop += ui.output.scrollHeight - before;
      Object.assign(log, {start: from, head});
    } catch (error) {
      reportFailure(error);
    } finally {
      ui.loadEarlier.disabled = false;
      renderRange(job);
    }
  }

  function renderRange(job) {
    const log = job.log;
    if (!log || log.start === null) {
      ui.logRange.textContent = "";
      ui.loadEarlier.hidden = true;
      return;
    }
    ui.logRange.textContent = "bytes " + log.start + "\u2013" + log.end + " of " + log.size;
    ui.loadEarlier.hidden = log.start === 0;
    ui.loadEarlier.textContent = "Load earlier (" + Math.min(LOG_CHUNK, log.start) + " bytes)";
  }

  function selectTab(stream, reload) {
    for (const tab of ui.tabs) {
      const selected = tab.getAttribute("data-stream") === stream;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      if (selected) ui.output.setAttribute("aria-labelledby", tab.id);
    }
    if (view && view.kind === "job") {
      view.stream = stream;
      resetLog(view);
      if (reload) pollNow();
    }
  }

  // -- actions -------------------------------------------------------------------------

  async function act(button, method, suffix, body, describe) {
    const job = view;
    button.disabled = true;
    ui.actionResult.textContent = "\u2026";
    try {
      const reply = await request(method, "/jobs/" + encodeURIComponent(job.id) + suffix, {body});
      ui.actionResult.textContent = describe(reply.doc);
      return reply.doc;
    } catch (error) {
      ui.actionResult.textContent = error.message;
      return null;
    } finally {
      button.disabled = false;
    }
  }

  async function actAndLook(button, method, suffix, body, describe) {
    const job = view;
    await act(button, method, suffix, body, describe);
    if (view === job) { job.etag = null; pollNow(); }
  }

  function kill() {
    return actAndLook(ui.kill, "POST", "/kill", {signal: ui.signal.value}, (doc) =>
      doc.signal_sent + " sent to " + doc.processes_signalled + " process(es); " + doc.processes_alive + " left");
  }

  function restart() {
    return actAndLook(ui.restart, "POST", "/restart", {}, (doc) => "Restarted: " + doc.state);
  }

  function askDelete() {
    ui.confirmJob.textContent = view.id;
    ui.confirm.returnValue = "";
    ui.confirm.showModal();
  }

  async function confirmed() {
    if (ui.confirm.returnValue !== "delete" || !view || view.kind !== "job") return;
    generation++;  // no more looks at the job while it goes
    const doc = await act(ui.del, "DELETE", "", undefined, () => "Deleted.");
    if (doc) location.hash = "#/";
    else pollNow();
  }

  // -- wiring ------------------------------------------------------------------------------

  function route() {
    const match = /^#\/job\/([0-9a-f]{1,32})$/.exec(location.hash);
    if (match) showJob(match[1]);
    else showList();
  }

  function onTabKey(event) {
    const order = ui.tabs.map((tab) => tab.getAttribute("data-stream"));
    const at = order.indexOf(view.stream);
    const step = {ArrowRight: 1, ArrowLeft: -1}[event.key];
    if (step === undefined) return;
    event.preventDefault();
    const stream = order[(at + step + order.length) % order.length];
    selectTab(stream, true);
    ui.tabs[order.indexOf(stream)].focus();
  }

  function start() {
    Object.assign(ui, {
      status: $("#status"), counts: $("#counts"), listView: $("#list-view"), jobView: $("#job-view"),
      jobs: $("#jobs"), listNote: $("#list-note"), filterState: $("#filter-state"), filterTag: $("#filter-tag"),
      filterCwd: $("#filter-cwd"), jobId: $("#job-id"), jobState: $("#job-state"), jobVerdict: $("#job-verdict"),
      signal: $("#signal"), kill: $("#kill"), restart: $("#restart"), del: $("#delete"),
      actionResult: $("#action-result"), output: $("#output"), loadEarlier: $("#load-earlier"),
      logRange: $("#log-range"), follow: $("#follow"), state: $("#state"), definition: $("#definition"),
      notifications: $("#notifications"), confirm: $("#confirm"), confirmJob: $("#confirm-job"),
      tabs: [...document.querySelectorAll('[role="tab"]')]});
    ui.filterState.append(...STATES.map((state) => el("option", {value: state}, state)));
    ui.filterState.addEventListener("change", () => setFilter("state", ui.filterState.value));
    ui.filterTag.addEventListener("change", () => setFilter("tag", ui.filterTag.value));
    ui.filterCwd.addEventListener("change", () => setFilter("cwd", ui.filterCwd.value));
    $("#filters").addEventListener("submit", (event) => event.preventDefault());
    ui.kill.addEventListener("click", kill);
    ui.restart.addEventListener("click", restart);
    ui.del.addEventListener("click", askDelete);
    ui.confirm.addEventListener("close", confirmed);
    ui.loadEarlier.addEventListener("click", loadEarlier);
    for (const tab of ui.tabs) {
      tab.addEventListener("click", () => selectTab(tab.getAttribute("data-stream"), true));
      tab.addEventListener("keydown", onTabKey);
    }
    window.addEventListener("hashchange", route);
    route();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
"""

_PUBLIC_ASSET = "app.css"
_WEB_ASSETS = {"app.js": ("text/javascript; charset=utf-8", _WEB_JS), "app.css": ("text/css; charset=utf-8", _WEB_CSS)}

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
    elif view.get("waiting"):
        key, text = state, "job %s is %s" % (short, _waiting_text(view))
    else:
        key = state
        text = "job %s is %s%s" % (short, state, " (pid %s)" % view["pid"] if view["pid"] else "")
    if view.get("restarts") or view.get("crash_looping"):
        text += " [%s]" % _restarts_text(view)
    return _paint(text, key, color)


def _waiting_text(view: dict) -> str:
    """'queued in builds (position 3)', 'waiting for 2 jobs: ...', 'restarting (restart 2 at ...)'."""
    waiting = view["waiting"]
    if waiting.get("for") == "queue":
        position = waiting.get("position")
        return "queued in %s%s" % (waiting.get("queue"), " (position %s)" % position if position else "")
    if waiting.get("for") == "jobs":
        jobs = [str(j)[:12] for j in waiting.get("jobs") or []]
        return "waiting for %d job%s: %s" % (len(jobs), "" if len(jobs) == 1 else "s", ", ".join(jobs))
    return "restarting (restart %s at %s)" % (waiting.get("restart"), waiting.get("at"))


def _restarts_text(view: dict) -> str:
    last = view.get("last_exit") or {}
    text = "%d restart%s" % (view["restarts"], "" if view["restarts"] == 1 else "s")
    if last:
        text += ", last run %s after %s" % (
            _describe_end(last.get("state"), last.get("exit_code"), last.get("signal"), last.get("timed_out")),
            _format_duration(last.get("duration_ms")))
    return ("crash-looping: " if view.get("crash_looping") else "") + text


def _state_cell(view: dict) -> str:
    """The STATE column: the status, or what a job without a child waits for."""
    waiting = view.get("waiting") or {}
    if waiting.get("for") == "queue":
        return "queued" + (" #%s" % waiting["position"] if waiting.get("position") else "")
    if waiting.get("for") == "jobs":
        return "waiting"
    if view.get("crash_looping"):
        return "crash-looping"
    if waiting.get("for") == "restart":
        return "restarting"
    return view["state"]


def _render_table(rows: List[List[str]], header: List[str]) -> List[str]:
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header] + rows]


def _render_text(doc: dict, color: bool, now: float) -> str:
    """A document as people read it: tables, labelled lines, output and a verdict; then its warnings."""
    body = _render_body(doc, color, now)
    notes = [_paint("warning:", "bad", color) + " " + w["message"] for w in doc.get("warnings") or ()]
    return "\n".join([body] + notes) if notes else body


def _render_body(doc: dict, color: bool, now: float) -> str:
    """The document's own lines.  The layout follows the document's shape, so a
    new command answering with a job view (or RunData) reads like status (or
    run) with no change here."""
    kind = doc["type"]
    if kind == "list":
        if not doc["jobs"]:
            return "\n".join(["no jobs"] + _skipped_note(doc))
        rows = [[j["job_id"][:12], _state_cell(j), _outcome(j), _format_age(j["created_at"], now),
                 _format_duration(j["duration_ms"]), _shorten(" ".join(j["command"] or []), 60),
                 ",".join(j["tags"])] for j in doc["jobs"]]
        lines = _render_table(rows, ["ID", "STATE", "EXIT", "CREATED", "DURATION", "COMMAND", "TAGS"])
        lines = [lines[0]] + [line.replace(row[1], _paint(row[1], j["state"], color), 1)
                              for line, row, j in zip(lines[1:], rows, doc["jobs"])]
        return "\n".join(lines + (["(more: raise --limit)"] if doc["truncated"] else []) + _skipped_note(doc))
    if "elapsed_ms" in doc:  # RunData: run, start, restart, wait
        parts = [doc["stdout"].rstrip("\n"), doc["stderr"].rstrip("\n")]
        matched = doc["matched"]
        if matched:
            parts.append("matched %s at byte %d: %s" % (matched["stream"], matched["offset"], matched["line"]))
        return "\n".join([p for p in parts if p] + [_verdict(doc, color)])
    if kind == "tail":
        return "\n".join(p for p in (doc["stdout"].rstrip("\n"), doc["stderr"].rstrip("\n")) if p)
    if kind == "queue":
        return _render_queues(doc)
    if "exit_code" in doc:  # a job view: status, create, kill
        fields = [("job", doc["job_id"]), ("state", _paint(doc["state"], doc["state"], color)),
                  ("result", _outcome(doc)), ("command", " ".join(doc["command"] or [])),
                  ("cwd", doc["cwd"]), ("created", _format_age(doc["created_at"], now)),
                  ("duration", _format_duration(doc["duration_ms"])), ("pid", doc["pid"]),
                  ("tags", ",".join(doc["tags"]) or "-"), ("stdout", doc["stdout_log_path"]),
                  ("stderr", doc["stderr_log_path"])]
        if doc["error"]:
            fields.append(("error", "%s: %s" % (doc["error"]["stage"], doc["error"]["message"])))
        if doc.get("queue"):
            fields.append(("queue", doc["queue"]))
        if doc.get("waiting"):
            fields.append(("waiting", _waiting_text(doc)))
        if doc.get("restarts") or doc.get("crash_looping"):
            fields.append(("restarts", _restarts_text(doc)))
        if "signal_sent" in doc:
            fields.append(("signalled", "%s to %d process(es), %s left" % (
                doc["signal_sent"], doc["processes_signalled"],
                "unknown" if doc["processes_alive"] is None else doc["processes_alive"])))
        return "\n".join("%-10s %s" % (label + ":", "-" if value is None else value) for label, value in fields)
    if kind == "doctor":
        return "\n".join(_doctor_lines(doc["capabilities"]))
    return "\n".join("%s: %s" % (k, v if not isinstance(v, (list, dict)) else json.dumps(v))
                     for k, v in doc.items() if k not in ("schema_version", "ok", "type"))


def _doctor_lines(caps: dict) -> List[str]:
    root, lock = caps["root"], caps["root"]["lock"]
    trust = "trusted" if lock["trusted"] else "NOT TRUSTED"
    lines = ["platform:      %s, %s %s (%s)" % (caps["platform"], caps["implementation"], caps["python"],
                                               caps["executable"]),
             "containment:   %s; trees found by %s" % (caps["containment"], ", ".join(caps["tree_discovery"])),
             "pid identity:  %s; signals by %s" % (caps["pid_identity"], caps["signal_delivery"]),
             "limits:        %s" % (", ".join(caps["limits"]) or "none"),
             "root:          %s (%s%s)" % (root["path"], root["filesystem"] or "filesystem unknown",
                                           ", not created yet" if not root["exists"]
                                           else "" if root["writable"] else ", not writable"),
             "lock:          %s, %s%s" % (lock["kind"], trust, ": " + lock["reason"] if lock["reason"] else "")]
    if caps["dies_with_launcher"]:
        lines.append("warning:       this process is PID 1 of its PID namespace: the jobs it starts die with it")
    lines += ["missing:       %s: %s (%s)" % (m["facility"], m["costs"], m["detail"]) for m in caps["missing"]]
    return lines + ([] if caps["missing"] else ["missing:       nothing"])


def _render_queues(doc: dict) -> str:
    if not doc["queues"]:
        return "no queues"
    rows = [[q["name"], str(q["parallel"]), "paused" if q["paused"] else "-", str(len(q["running"])),
             str(len(q["waiting"])), " ".join(j[:12] for j in q["waiting"][:5]) + (" ..." if len(q["waiting"]) > 5 else "")]
            for q in doc["queues"]]
    return "\n".join(_render_table(rows, ["QUEUE", "PARALLEL", "PAUSED", "RUNNING", "WAITING", "NEXT"]))


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
        if key in ("stdout", "stderr"):  # a Windows job's text lines end in \r\n: a line end, not a \r to show
            return value.replace("\r\n", "\n").translate(_OUTPUT_ESCAPES)
        return value.translate(_CONTROL_ESCAPES)
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


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _bool_word(text: str) -> bool:
    if text.lower() not in _BOOL_WORDS:
        raise ValueError("not a boolean: %r" % (text,))
    return _BOOL_WORDS[text.lower()]


def _bool_option(text: str) -> bool:
    return _option_value(_bool_word, text, "true or false")


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
    p.add_argument("--inherit-env", action="store_true", help="inherit our environment (the default)")
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
    _add_sink_options(p, ("--notify-command",), "contains", "either")
    p.add_argument("--queue", metavar="NAME", help="run in this queue: at most its --parallel jobs at once, in order")
    p.add_argument("--after", action="append", default=[], metavar="JOB",
                   help="start once this job has ended; fail if it did not exit 0 (repeatable)")
    p.add_argument("--after-any", action="store_true", help="with --after: start whatever those jobs' results")
    p.add_argument("--restart", choices=RESTART_POLICIES, help="restart the command when it ends (default never)")
    p.add_argument("--max-restarts", metavar="N", type=_count_option,
                   help="at most N restarts (default %d with --restart)" % DEFAULT_MAX_RESTARTS)
    p.add_argument("--restart-delay", metavar="S", type=_duration_option,
                   help="first delay before a restart, doubling up to 60s (default 1)")
    # agent-exec's options that jobstate has no counterpart for: refused with a hint (see _refused_options).
    import argparse
    for option in ("--shell-wrapper", "--progress-every"):
        p.add_argument(option, help=argparse.SUPPRESS)


def _add_sink_options(p, command_names: Tuple[str, ...], match_type: Optional[str], stream: Optional[str]) -> None:
    """The notification options of run/create (with their defaults) and of notify set (None: keep)."""
    p.add_argument(*command_names, dest="notify_command", metavar="CMD",
                   help="shell command run with the job.finished event on stdin")
    p.add_argument("--notify-file", metavar="PATH", help="append the job.finished event to this NDJSON file")
    p.add_argument("--output-pattern", metavar="P",
                   help="while the job runs, send a job.output_matched event for each line of output P matches")
    p.add_argument("--output-match-type", choices=_MATCH_TYPES, default=match_type,
                   help="contains (P is a literal; the default) or regex (Python re, searched in each line)")
    p.add_argument("--output-stream", choices=_STREAM_CHOICES, default=stream,
                   help="the output --output-pattern looks at (default either)")
    p.add_argument("--output-command", metavar="CMD",
                   help="shell command run with each job.output_matched event on stdin")
    p.add_argument("--output-file", metavar="PATH", help="append each job.output_matched event to this NDJSON file")


def _add_observe_options(p, default_until: float) -> None:
    p.add_argument("--until", metavar="S", type=_duration_option,
                   help="wait at most S seconds for the job to finish (default %g)" % default_until)
    p.set_defaults(default_until=str(default_until))  # --until left unset: --forever may not meet it
    p.add_argument("--forever", action="store_true", help="wait until the job finishes")
    p.add_argument("--no-wait", action="store_true", help="return as soon as the job is launched")
    p.add_argument("--wait", nargs="?", const="true", metavar="true|false", type=_bool_option,
                   help="--wait=false is --no-wait; --wait (true) is the default (agent-exec's name)")
    p.add_argument("--no-auto-gc", action="store_true", help="no automatic gc after this launch")
    p.add_argument("--auto-gc-older-than", metavar="AGE", type=_duration_option,
                   help="the automatic gc after this launch collects jobs finished longer ago than AGE (default 30d)")
    import argparse
    for option in ("--auto-gc-max-jobs", "--auto-gc-max-bytes"):
        p.add_argument(option, help=argparse.SUPPRESS)  # refused: see _refused_options
    p.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), metavar="B", type=_size_option,
                   help="output excerpt size per stream (default 64k)")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with the job's exit code (128+n for signal n, 125 failed, 124 unfinished)")
    p.add_argument("--follow", "-f", action="store_true",
                   help="stream the job's output live until it ends (instead of a JSON document)")
    p.add_argument("--detach-anyway", action="store_true",
                   help="as PID 1 of a PID namespace (a container's main process), return before the job ends "
                   "although it then dies with this process (default: observe it to its end)")
    p.add_argument("--ready", metavar="REGEX",
                   help="return as soon as a line of output matches REGEX (the job runs on), or the job ends, "
                   "or at --until; the line is in `matched`")
    _add_stream_option(p, "--ready")


def _add_stream_option(p, pattern_option: str) -> None:
    p.add_argument("--stream", choices=_STREAM_CHOICES,
                   help="the output %s looks at (default either)" % pattern_option)


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
    p.add_argument("--until", metavar="S", type=_duration_option, help="wait at most S seconds (default 30)")
    p.set_defaults(default_until=str(DEFAULT_WAIT_UNTIL_S))
    p.add_argument("--forever", action="store_true", help="no deadline")
    p.add_argument("--max-bytes", default=str(DEFAULT_MAX_BYTES), metavar="B", type=_size_option,
                   help="output excerpt size per stream (default 64k)")
    p.add_argument("--exit-code", action="store_true",
                   help="exit with the job's exit code (with --match: 0 on a match, 124 otherwise)")
    p.add_argument("--poll", metavar="S", type=_duration_option,
                   help="accepted for agent-exec and needless: a wait wakes when the job ends, without polling")
    p.add_argument("--match", metavar="REGEX",
                   help="return as soon as a line of output matches REGEX (Python re; lines already written "
                   "count), or the job ends, or at --until; the line is in `matched`")
    _add_stream_option(p, "--match")


def _tail_options(p) -> None:
    p.add_argument("job")
    p.add_argument("--lines", "--tail-lines", default=str(DEFAULT_TAIL_LINES), metavar="N", type=_count_option,
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
        p.add_argument("--state", choices=_LIST_STATES, help="a status, or waiting (for a slot or jobs), queued")
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
    p.add_argument("--no-token", action="store_true",
                   help="no bearer token (loopback only); by default serve makes one unless JOBSTATE_SERVE_TOKEN "
                        "is set")
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages of ORIGIN (scheme://host[:port]) call the API (repeatable)")


def _tag_options(p) -> None:
    tag_commands = p.add_subparsers(dest="tag_command", metavar="set", parser_class=type(p))
    tag_commands.required = True
    p = tag_commands.add_parser("set", help="replace a job's tags")
    _add_global_options(p, suppress=True)
    p.add_argument("job")
    p.add_argument("--tag", action="append", default=[], help="a tag (repeatable; none clears them)")
    p.set_defaults(handler=_cmd_tag)


def _queue_options(p) -> None:
    queue_commands = p.add_subparsers(dest="queue_command", metavar="list|set|pause|resume", parser_class=type(p))
    queue_commands.required = True
    for name, text in (("list", "every queue: limit, running and waiting jobs"),
                       ("set", "set a queue's parallel limit (waiting jobs start at once if it rises)"),
                       ("pause", "start no more jobs of the queue (running ones go on)"),
                       ("resume", "start the queue's jobs again")):
        sub = queue_commands.add_parser(name, help=text, description=text)
        _add_global_options(sub, suppress=True)
        if name != "list":
            sub.add_argument("name", metavar="NAME")
        if name == "set":
            sub.add_argument("--parallel", required=True, metavar="N", type=_count_option,
                             help="at most N jobs of the queue run at once (default 1)")
        sub.set_defaults(handler=_cmd_queue)


def _notify_options(p) -> None:
    notify_commands = p.add_subparsers(dest="notify_command_name", metavar="set", parser_class=type(p))
    notify_commands.required = True
    p = notify_commands.add_parser("set", help="change a job's notification sinks (those not given are kept)",
                                   description="Change a job's notification sinks, in any state. Options not given "
                                   "are kept; an empty value ('') clears one. Nothing is sent now: on a running job "
                                   "the output settings apply to the lines that end from about 0.2 s later.")
    _add_global_options(p, suppress=True)
    p.add_argument("job")
    _add_sink_options(p, ("--notify-command", "--command"), None, None)
    p.set_defaults(handler=_cmd_notify)


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


def _no_wait(ns) -> bool:
    """--no-wait, or agent-exec's --wait=false."""
    wait = getattr(ns, "wait", None)
    if wait is True and getattr(ns, "no_wait", False):
        raise InvalidArgumentError("--wait=true and --no-wait contradict each other")
    return getattr(ns, "no_wait", False) or wait is False


def _observe_deadline(ns) -> Optional[float]:
    if ns.forever and (ns.until is not None or _no_wait(ns)):
        raise InvalidArgumentError("--forever contradicts %s" % ("--until" if ns.until is not None else "--no-wait"),
                                   hint="one of --forever (no deadline), --until S, --no-wait")
    if _no_wait(ns):
        return 0.0
    if ns.forever:
        return None
    return _parse_duration(ns.default_until if ns.until is None else ns.until, "--until")


def _observe_limits(ns) -> Tuple[Optional[float], int]:
    """The deadline and excerpt size asked for; run/start/restart check them before launching."""
    _refused_options(ns)
    return _observe_deadline(ns), _parse_size(ns.max_bytes, "--max-bytes")


# agent-exec's options that have no counterpart here, with what to do instead.
_REFUSED_OPTIONS = {
    "shell_wrapper": ("--shell-wrapper", "jobstate runs a single-argument command with sh -c (cmd /c on Windows); "
                      "for another shell give it as the command: run -- bash -lc 'CMD'"),
    "progress_every": ("--progress-every", "jobstate writes no progress records; read the output as it comes with "
                       "tail JOB --follow (or tail JOB), or wait for a line with wait JOB --match REGEX"),
    "auto_gc_max_jobs": ("--auto-gc-max-jobs", "the automatic gc only collects by age (bounded work per launch); "
                         "run gc --max-jobs N yourself"),
    "auto_gc_max_bytes": ("--auto-gc-max-bytes", "the automatic gc only collects by age (bounded work per launch); "
                          "run gc --max-bytes B yourself"),
}


def _refused_options(ns) -> None:
    for dest, (option, hint) in _REFUSED_OPTIONS.items():
        if getattr(ns, dest, None) is not None:
            raise InvalidArgumentError("%s (an agent-exec option) has no counterpart in jobstate" % option, hint=hint)


def _auto_gc_policy(ns):
    """What Job.start's auto_gc gets: --no-auto-gc, --auto-gc-older-than, or the default."""
    if ns.no_auto_gc:
        if ns.auto_gc_older_than is not None:
            raise InvalidArgumentError("--no-auto-gc and --auto-gc-older-than contradict each other")
        return False
    return True if ns.auto_gc_older_than is None else _parse_duration(ns.auto_gc_older_than, "--auto-gc-older-than")


def _observe_match(ns):
    """(compiled pattern, stream) of --ready or --match, or (None, "either");
    run/start/restart check them before launching."""
    option, text = ("--match", ns.match) if hasattr(ns, "match") else ("--ready", getattr(ns, "ready", None))
    if text is None:
        if getattr(ns, "stream", None) is not None:
            raise InvalidArgumentError("--stream is for %s, and no %s was given" % (option, option),
                                       hint="%s REGEX --stream stdout|stderr|either" % option)
        return None, "either"
    if _no_wait(ns) or getattr(ns, "follow", False):
        raise InvalidArgumentError("%s waits for a line of output: it cannot go with --no-wait or --follow" % option,
                                   hint="--until S bounds the wait (--until 0: only lines already written)")
    return _compile_line_pattern(text, option), ns.stream or "either"


def _observe(job: Job, ns, started: float, kind: str) -> Tuple[dict, int]:
    """Shared tail of run/start/restart/wait: wait as asked (or stream with --follow), then RunData.

    Ctrl-C stops the observing, never the job: the answer is then the job as
    it stands (exit 130), so the caller still learns its id and its output so far.
    """
    if getattr(ns, "follow", False):
        return _follow_to_end(job, (0, 0), ns)
    until_s, max_bytes = _observe_limits(ns)
    match, stream = _observe_match(ns)
    try:
        doc = _observed_doc(kind, job, until_s, max_bytes, started, match, stream)
        if kind != "wait" and doc["state"] in ("created", "running") and _process_layer.dies_with_launcher():
            doc = _observe_as_namespace_init(job, ns, kind, max_bytes, started, doc)
    except KeyboardInterrupt:
        _tell_interrupted(job)
        return _observed_doc(kind, job, 0, max_bytes, started, match, stream), 130
    if not ns.exit_code:
        return doc, 0
    if match is not None:  # ready or not: the job's own exit code is not the question
        return doc, 0 if doc["matched"] else 124
    return doc, _exit_status_of(doc)


def _observe_as_namespace_init(job: Job, ns, kind: str, max_bytes: int, started: float, doc: dict) -> dict:
    """We are PID 1 of a PID namespace: the moment we exit, the kernel kills
    every process in it, so the job cannot outlive this call.  Observe it to
    its end, unless told to return anyway; either way, say so."""
    if ns.detach_anyway:
        doc["warnings"].append(_warning("dies_with_launcher", (
            "this process is PID 1 of its PID namespace (a container's main process, unshare --pid --fork): "
            "when it exits, which is now, the kernel kills every process of the namespace, job %s included")
            % job.id))
        return doc
    _write_text(sys.stderr, "jobstate: this process is PID 1 of its PID namespace, so job %s would die when "
                "it returns: observing the job to its end (--detach-anyway returns now)\n" % job.id)
    doc = dict(_observed_doc(kind, job, None, max_bytes, started), matched=doc["matched"])  # --ready's line
    doc["warnings"].append(_warning("launcher_is_pid_1", (
        "this process is PID 1 of its PID namespace, whose exit kills every process in it: job %s was observed "
        "to its end instead of returning earlier (--detach-anyway returns at once)") % job.id))
    return doc


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
    view = _job_view(job.paths, job.state())
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
        raise InvalidArgumentError("give either --stdin or --stdin-file, not both",
                                   hint="--stdin TEXT gives the data itself, --stdin-file PATH a file to read it from")
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
            raise InvalidArgumentError("cannot read --stdin-file %s: %s" % (ns.stdin_file, exc.strerror),
                                       hint="--stdin-file takes a readable file ('-' is not one: use --stdin -)") from None
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
    _refused_options(ns)
    if ns.inherit_env and ns.no_inherit_env:
        raise InvalidArgumentError("--inherit-env and --no-inherit-env contradict each other")
    env = _parse_env_pairs(ns.env)
    return dict(cwd=ns.cwd, env=env, env_files=ns.env_file, inherit_env=not ns.no_inherit_env,
                masks=ns.mask, stdin=_cli_stdin(ns, auto_stdin), timeout_s=_parse_duration(ns.timeout, "--timeout"),
                kill_after_s=_parse_duration(ns.kill_after, "--kill-after"), kill_orphans=ns.kill_orphans,
                tags=ns.tag, notify_command=ns.notify_command, notify_file=ns.notify_file,
                output_pattern=ns.output_pattern, output_match_type=ns.output_match_type,
                output_stream=ns.output_stream, output_command=ns.output_command, output_file=ns.output_file,
                queue=ns.queue, after=ns.after, after_any=ns.after_any, restart=ns.restart,
                max_restarts=None if ns.max_restarts is None else _parse_count(ns.max_restarts, "--max-restarts"),
                restart_delay_s=ns.restart_delay, memory_max=ns.memory_max, max_processes=ns.max_processes,
                cpu_time_s=ns.cpu_time)


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
        raise InvalidArgumentError("%s: %r is not a non-negative integer" % (name, value), hint="a whole number from 0")
    return count


def _cmd_run(ns):
    started = time.monotonic()
    argv = _cli_command(ns)
    _observe_limits(ns)  # a bad value is reported before a job exists, not after
    _observe_match(ns)
    job = _run(ns.root, argv, auto_gc=_auto_gc_policy(ns), **_cli_definition(ns, auto_stdin=True))
    return _observe(job, ns, started, "run")


def _cmd_create(ns):
    job = _create(ns.root, _cli_command(ns), **_cli_definition(ns, auto_stdin=False))
    return _envelope("create", _job_view(job.paths, job.state())), 0


def _cmd_start(ns):
    started = time.monotonic()
    job = _open_job(ns.root, ns.job)
    _observe_limits(ns)  # validate before launching
    _observe_match(ns)
    job.start(auto_gc=_auto_gc_policy(ns))
    return _observe(job, ns, started, "start")


def _cmd_restart(ns):
    started = time.monotonic()
    job = _open_job(ns.root, ns.job)
    _observe_limits(ns)
    _observe_match(ns)
    job.restart(ns.signal, kill_after_s=_parse_duration(ns.kill_after, "--kill-after"), auto_gc=_auto_gc_policy(ns))
    return _observe(job, ns, started, "restart")


def _cmd_status(ns):
    return _status_doc(_open_job(ns.root, ns.job)), 0


def _cmd_wait(ns):
    started = time.monotonic()
    return _observe(_open_job(ns.root, ns.job), ns, started, "wait")


def _cmd_tail(ns):
    job = _open_job(ns.root, ns.job)
    lines = _parse_count(ns.lines, "--lines")
    max_bytes = _parse_size(ns.max_bytes, "--max-bytes")
    if not ns.follow:
        return _tail_doc(job, lines, max_bytes), 0
    tail = job.tail(lines, max_bytes)
    return _follow_to_end(job, (tail.stdout_range[0], tail.stderr_range[0]), ns)


def _cmd_kill(ns):
    kill_after = None if ns.kill_after is None else _parse_duration(ns.kill_after, "--kill-after")
    return _kill_doc(_open_job(ns.root, ns.job), ns.signal, kill_after,
                     0 if ns.no_wait else DEFAULT_KILL_OBSERVE_S), 0


def _cmd_list(ns, state: Optional[str] = None):
    return _list_doc(ns.root, cwd=ns.cwd, all_jobs=ns.all, state=state or ns.state,
                     tags=ns.tag, limit=_parse_count(ns.limit, "--limit")), 0


def _cmd_ps(ns):
    return _cmd_list(ns, state=JobStatus.RUNNING.value)


def _cmd_delete(ns):
    if ns.job is not None:
        _normalize_job_ref(ns.job)  # '' included: a malformed id is invalid_job_id on every command
    if (ns.job is not None) == bool(ns.all):
        raise InvalidArgumentError("give a job id or --all", hint="jobstate delete JOB | --all [--dry-run]")
    return _delete_doc(ns.root, ns.job, ns.dry_run), 0


def _cmd_gc(ns):
    report = _gc(ns.root, older_than_s=_parse_duration(ns.older_than, "--older-than"),
                max_jobs=None if ns.max_jobs is None else _parse_count(ns.max_jobs, "--max-jobs"),
                max_bytes=None if ns.max_bytes is None else _parse_size(ns.max_bytes, "--max-bytes"),
                dry_run=ns.dry_run)
    return _envelope("gc", {"root": ns.root, "dry_run": report.dry_run, "jobs": report.deleted,
                            "deleted": sum(d["action"] != "skipped" for d in report.deleted),
                            "kept": report.kept, "freed_bytes": report.freed_bytes}), 0


def _cmd_doctor(ns):
    return _doctor_doc(ns.root), 0


def _cmd_queue(ns):
    root = ns.root
    if ns.queue_command == "list":
        return _queue_doc(root, list_queues(root)), 0
    if ns.queue_command == "set":
        info = set_queue(ns.name, parallel=_parse_count(ns.parallel, "--parallel"), root=root)
    else:
        info = set_queue(ns.name, paused=ns.queue_command == "pause", root=root)
    return _queue_doc(root, [info]), 0


def _cmd_schema(ns):
    return _envelope("schema", {"schema_format": "json-schema-2020-12", "schemas": _document_schemas()}), 0


def _cmd_mcp(ns):
    return None, _serve_mcp(ns.root)


def _cmd_serve(ns):
    return None, _serve_http(ns.root, ns.bind, lambda doc: _emit(doc, ns.pretty), use_token=not ns.no_token,
                             allowed_origins=ns.allow_origin)


def _cmd_notify(ns):
    job = _open_job(ns.root, ns.job)
    changes = {key: getattr(ns, key) for key in JobSpec._SINK_KEYS if getattr(ns, key) is not None}
    spec = job.set_notifications(**changes) if changes else job.spec()
    return _notify_doc(job, spec), 0


def _cmd_skill(ns):
    text = _skill_text()
    if ns.install is None:
        _write_text(sys.stdout, text)
        return None, 0
    skills = _abspath(os.path.expanduser(ns.install))
    if not os.path.isdir(skills):  # a typo must not grow a tree of directories
        raise InvalidArgumentError("--install %s: no such directory" % (skills,),
                                   hint="give an existing skills directory, e.g. .claude/skills (mkdir it first)")
    path = os.path.join(skills, "jobstate", "SKILL.md")
    data = text.encode("utf-8")
    try:
        _install_file(path, data)
    except OSError as exc:
        raise JobIOError("cannot write %s: %s" % (path, exc.strerror or exc),
                         hint="give a skills directory you can write, e.g. .claude/skills") from None
    return _envelope("skill", {"path": path, "bytes": len(data)}), 0


def _install_file(path: str, data: bytes) -> None:
    """Write path as a new file that replaces what was there (a symlink is
    replaced, never written through), in a real directory made if missing."""
    folder = os.path.dirname(path)
    try:
        os.mkdir(folder)
    except FileExistsError:
        if os.path.islink(folder) or not os.path.isdir(folder):
            raise OSError(errno.ENOTDIR, "%s is not a real directory (a symlink or a file)" % folder) from None
    _replace_file(path, data, 0o644)


def _cmd_completions(ns):
    _write_text(sys.stdout, _COMPLETION_SCRIPTS[ns.shell](_parser_tree(_build_parser())))
    return None, 0


def _cmd_tag(ns):
    job = _open_job(ns.root, ns.job)
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
    ("doctor", _cmd_doctor, "say what this machine gives jobstate, and what each missing piece costs", (),
     _no_options),
    ("mcp", _cmd_mcp, "serve the Model Context Protocol on stdio (tools run, status, tail, wait, kill, list, "
     "restart, delete)", (), _no_options),
    ("serve", _cmd_serve, "serve the HTTP API (loopback by default, behind a bearer token it prints)", (),
     _serve_options),
    ("tag", _cmd_tag, "manage tags", (), _tag_options),
    ("queue", _cmd_queue, "queues: list them, set a parallel limit, pause, resume", (), _queue_options),
    ("notify", _cmd_notify, "change a job's notification sinks (notify set)", (), _notify_options),
    ("skill", _cmd_skill, "print a SKILL.md guide for AI agents (--install DIR writes DIR/jobstate/SKILL.md)", (),
     lambda p: p.add_argument("--install", metavar="DIR", help="the skills directory to write jobstate/SKILL.md into")),
    ("completions", _cmd_completions, "print a shell completion script", (),
     lambda p: p.add_argument("shell", choices=("bash", "zsh", "fish"))),
)


_EXAMPLES = {
    "run": ("run -- make test", "run --ready 'ready in' --until 60 --tag dev.server -- npm run dev"),
    "create": ("create --tag nightly -- ./backup.sh", "create --env-file .env -- python3 worker.py"),
    "start": ("start 01a2f3", "start 01a2f3 --no-wait"),
    "restart": ("restart 01a2f3", "restart 01a2f3 --signal INT --kill-after 10"),
    "status": ("status 01a2f3", "--format text status 01a2f3"),
    "wait": ("wait 01a2f3 --until 5m", "wait 01a2f3 --match 'listening on port \\d+' --until 60 --exit-code"),
    "tail": ("tail 01a2f3 --lines 20", "tail 01a2f3 --follow"),
    "kill": ("kill 01a2f3", "kill 01a2f3 --signal INT --kill-after 5"),
    "list": ("--format text list", "list --all --state running --tag ci.*"),
    "ps": ("--format text ps --all", "ps --tag dev.*"),
    "delete": ("delete 01a2f3", "delete --all --dry-run"),
    "gc": ("gc --dry-run", "gc --older-than 7d --max-bytes 1G"),
    "schema": ("schema", "--pretty schema"),
    "doctor": ("doctor", "--format text doctor"),
    "mcp": ("mcp", "--root /tmp/agent-jobs mcp"),
    "serve": ("serve   # prints the token; also in serve.json", "serve --allow-origin http://localhost:5173"),
    "tag": ("tag set 01a2f3 --tag ci.lint", "tag set 01a2f3   # clears the tags"),
    "queue": ("queue set builds --parallel 4", "run --queue builds -- make -j1", "--format text queue list",
              "queue pause builds", "queue resume builds"),
    "skill": ("skill", "skill --install .claude/skills"),
    "completions": ("completions bash > ~/.local/share/bash-completion/completions/jobstate",
                    "completions fish > ~/.config/fish/completions/jobstate.fish"),
    "notify": ("notify set 01a2f3 --output-pattern ERROR --output-file /tmp/errors.ndjson",
               "notify set 01a2f3 --notify-command 'notify-send done'"),
}


# -- Agent onboarding: skill and completions -----------------------------------

_ERROR_MEANINGS = {
    "job_not_found": "no such job (deleted, or another --root): `list --all`",
    "ambiguous_job_id": "the prefix names several jobs (details.candidates): give more characters",
    "invalid_job_id": "not 1 to 32 hex characters",
    "invalid_state": "not possible in this state (start a running job, delete a running one: kill it first)",
    "invalid_signal": "unknown signal name", "invalid_argument": "a bad option or value (the hint says which)",
    "invalid_tag": "tags are dot-separated segments of letters, digits and -",
    "stdin_required": "--stdin - without piped input", "stdin_too_large": "over --stdin-max-bytes",
    "launch_failed": "the supervisor could not start (retryable); details.supervisor_log_tail says why",
    "state_unreadable": "a job file is corrupt or a symlink: `delete` the job",
    "io_error": "the jobs root or a file could not be written (retryable)",
    "internal_error": "a jobstate bug: report it", "unauthorized": "HTTP: missing or wrong bearer token",
    "not_found": "HTTP: no such endpoint", "payload_too_large": "HTTP: request body over 1 MiB",
}


def _skill_text() -> str:
    """SKILL.md for AI agents: front matter, then when to use which command, the
    readiness pattern and the error codes (commands and codes from the code)."""
    js = "python3 " + _THIS_FILE
    commands = "\n".join("- `%s`: %s" % (name, text) for name, _, text, _, _ in _COMMANDS)
    codes = "\n".join("- `%s`: %s" % (code, _ERROR_MEANINGS.get(code, "")) for code in sorted(_error_codes()))
    return """---
name: jobstate
description: Run shell commands as durable background jobs that outlive this turn - dev servers, watchers, long builds and test runs; wait until a server prints that it is ready; read their output; stop whole process trees. Use it instead of `&`, `nohup` or sleep-and-poll loops.
---

# jobstate

Run it as `%(js)s COMMAND ...` (below: `jobstate`). Every command prints one JSON object:
`{"ok": true, "type": ..., ...}` or `{"ok": false, "error": {"code", "message", "hint"}}`.
Any unique prefix of a job id works.

## Which command

- A command whose result you want: `jobstate run --until 600 -- make test`. The answer has
  `state` (`exited`, `killed`, `failed`, or still `running` at `--until`), `exit_code`, and the
  last 64 KiB of `stdout` and `stderr`.
- A server or watcher: start it and wait until it is ready (next section).
- Later: `jobstate status ID`, `jobstate wait ID --until 60`, `jobstate tail ID --lines 50`.
- Stop it: `jobstate kill ID` (TERM to the whole process tree, then KILL what is left).
- Find jobs: `jobstate list` (started from this directory), `jobstate ps --all` (running).
- `--until` bounds only your wait; the job runs on. `--timeout S` bounds the job itself.

## Wait for a server to be ready

1. `jobstate run --ready 'listening on port \\d+' --until 60 -- npm run dev`
   (`--ready` is a Python regular expression searched in each line of output; `--stream
   stdout|stderr|either`). It returns as soon as a line matches; the job runs on.
2. `matched` is `{"stream", "line", "offset"}`: ready, go on. `matched` is null and `state` is
   `running`: not ready yet; `jobstate wait ID --match 'REGEX' --until 60` waits more (lines
   already printed count). `matched` is null and the job ended: it failed to start; read
   `stdout`, `stderr`, `exit_code`.
3. `jobstate kill ID` when done.

## All commands

%(commands)s

## Error codes

%(codes)s
""" % {"js": js, "commands": commands, "codes": codes}


def _parser_tree(parser, path: str = "") -> Dict[str, dict]:
    """Every command path of the parser ("", "run", "notify set", ...) with its
    subcommands, its options, and for each option that takes a value, its choices."""
    import argparse
    node = {"subcommands": {}, "options": {}}
    tree = {path: node}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in action._choices_actions}
            for name, sub in action.choices.items():
                node["subcommands"][name] = helps.get(name) or ""
                tree.update(_parser_tree(sub, (path + " " + name).strip()))
        for option in action.option_strings:
            takes = action.nargs != 0
            node["options"][option] = {"takes_value": takes, "help": action.help or "",
                                       "choices": [str(c) for c in action.choices or ()] if takes else []}
    return tree


def _bash_completion(tree: Dict[str, dict]) -> str:
    """bash (3.2 and later) completion: case tables generated from the parser."""
    def cases(entries):
        return "".join("        %s) echo %s;;\n" % (_sh_quote(key), _sh_quote(value)) for key, value in entries)
    subs = [(path, " ".join(node["subcommands"])) for path, node in tree.items() if node["subcommands"]]
    opts = [(path, " ".join(node["options"])) for path, node in tree.items()]
    valued = sorted("%s|%s" % (path, o) for path, node in tree.items() for o, info in node["options"].items()
                    if info["takes_value"])
    choices = [("%s|%s" % (path, o), " ".join(info["choices"])) for path, node in tree.items()
               for o, info in node["options"].items() if info["choices"]]
    return """# jobstate completion for bash, generated from its parser: `jobstate.py completions bash`
_jobstate_subcommands() {
    case "$1" in
%s    esac
}
_jobstate_options() {
    case "$1" in
%s    esac
}
_jobstate_takes_value() {
    case "$1|$2" in
        %s) return 0;;
    esac
    return 1
}
_jobstate_choices() {
    case "$1|$2" in
%s    esac
}
_jobstate() {
    local cur="${COMP_WORDS[COMP_CWORD]}" prev="" path="" i=1 word subs
    if [ "$COMP_CWORD" -gt 0 ]; then prev="${COMP_WORDS[COMP_CWORD-1]}"; fi
    while [ "$i" -lt "$COMP_CWORD" ]; do
        word="${COMP_WORDS[i]}"
        if _jobstate_takes_value "$path" "$word"; then i=$((i + 2)); continue; fi
        subs=" $(_jobstate_subcommands "$path") "
        case "$word" in
            -*) ;;
            *) case "$subs" in *" $word "*) path="${path:+$path }$word";; esac;;
        esac
        i=$((i + 1))
    done
    if [ "$i" -gt "$COMP_CWORD" ] && _jobstate_takes_value "$path" "$prev"; then
        local values
        values="$(_jobstate_choices "$path" "$prev")"
        if [ -n "$values" ]; then
            COMPREPLY=($(compgen -W "$values" -- "$cur"))
        else
            COMPREPLY=($(compgen -f -- "$cur"))
        fi
        return 0
    fi
    case "$cur" in
        -*) COMPREPLY=($(compgen -W "$(_jobstate_options "$path")" -- "$cur"));;
        *) COMPREPLY=($(compgen -W "$(_jobstate_subcommands "$path")" -- "$cur"));;
    esac
    return 0
}
complete -F _jobstate jobstate jobstate.py
""" % (cases(subs), cases(opts), "|".join(_sh_quote(v) for v in valued), cases(choices))


def _zsh_completion(tree: Dict[str, dict]) -> str:
    return ("# jobstate completion for zsh (through bashcompinit), generated from its parser:\n"
            "#   source <(jobstate.py completions zsh)\n"
            "autoload -U +X compinit && compinit\nautoload -U +X bashcompinit && bashcompinit\n"
            + _bash_completion(tree).split("\n", 1)[1])


def _fish_completion(tree: Dict[str, dict]) -> str:
    """fish: one `complete` line per subcommand and option, generated from the parser."""
    lines = ["# jobstate completion for fish, generated from its parser: `jobstate.py completions fish`",
             "complete -c jobstate -f", "complete -c jobstate.py -w jobstate"]
    for path, node in tree.items():
        words = path.split()
        seen = " ; and ".join("__fish_seen_subcommand_from %s" % w for w in words)
        if not words:
            condition = "__fish_use_subcommand"
        else:
            condition = seen
        for name, help in node["subcommands"].items():
            not_yet = " ; and not __fish_seen_subcommand_from %s" % " ".join(node["subcommands"])
            lines.append("complete -c jobstate -n %s -a %s -d %s" % (
                _sh_quote(condition + (not_yet if words else "")), _sh_quote(name), _sh_quote(help[:60])))
        for option, info in node["options"].items():
            flag = "-l %s" % option[2:] if option.startswith("--") else "-s %s" % option[1:]
            value = ((" -x -a %s" % _sh_quote(" ".join(info["choices"]))) if info["choices"]
                     else (" -r" if info["takes_value"] else ""))
            lines.append("complete -c jobstate -n %s %s%s -d %s" % (
                _sh_quote(condition), flag, value, _sh_quote(info["help"].split(";")[0][:60])))
    return "\n".join(lines) + "\n"


def _sh_quote(text: str) -> str:
    """Single-quoted for sh, bash, zsh and fish alike (no ' inside: they become ’)."""
    return "'%s'" % text.replace("'", "\u2019").replace("\\", "/")


_COMPLETION_SCRIPTS = {"bash": _bash_completion, "zsh": _zsh_completion, "fish": _fish_completion}


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
    data = _strict_json(doc, indent, separators)
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
    if argv[:1] in (["_supervise"], ["_forkserver"]):
        return _supervisor_main(argv)
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
        ns.root = resolve_root(ns.root)  # once, for the command and everything it calls
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

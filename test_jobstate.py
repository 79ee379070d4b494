"""Tests for jobstate.py: stdlib unittest only, so they run where pip is unavailable.

    python3 test_jobstate.py                 # everything; ends with "N passed, N failed, N skipped"
    python3 test_jobstate.py StoreTests      # one class

Children are `sys.executable -c` snippets that print a ready line; tests wait
for real signals (a line in a log, a state change), never for fixed sleeps.
Every test gets its own root and stops every process its jobs left behind.
"""

# ---------------------------------------------------------------------------
# Helpers shared by every test class
# ---------------------------------------------------------------------------


import contextlib
import hashlib
import io
import json
import marshal
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import jobstate

PY = sys.executable
HERE = os.path.dirname(os.path.abspath(__file__))
JOBSTATE = os.path.join(HERE, "jobstate.py")
POSIX = not jobstate._WINDOWS


def wait_for(predicate, timeout_s=10.0, message="condition"):
    """Poll predicate until it returns something truthy; fail the test with `message` otherwise."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out after %.1fs waiting for %s" % (timeout_s, message))
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def strict_json_constant(name):
    raise ValueError("%s is not JSON" % name)


def py(code):
    """argv running a Python snippet."""
    return [PY, "-c", code]


def ready_then_sleep(seconds=60, first=""):
    """argv of a child that runs the code `first`, prints `ready` and sleeps:
    wait_log(job, "ready") then act on it."""
    return py("import time\n%sprint('ready', flush=True)\ntime.sleep(%s)\n" % (first, seconds))


# `cat` and `echo hello`, portable: bytes to stdout, no newline translation on Windows.
CAT = py("import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())")
HELLO = py("import sys; sys.stdout.buffer.write(b'hello\\n')")
TRUE = py("pass")  # `true` is no program on Windows


def lf(text):
    """Text a job printed, with Windows' text-mode line ends made \\n."""
    return text.replace("\r\n", "\n")
# A one-string command for the platform shell (sh -c / cmd /c): stdout "a", stderr "b", exit 4.
SHELL_STRING = "echo a&& echo b>&2& exit /b 4" if jobstate._WINDOWS else "echo a && echo b >&2; exit 4"
SHELL_EOL = "\r\n" if jobstate._WINDOWS else "\n"  # what the platform shell's echo ends lines with


def injected_by_platform(name):
    """Variables a child sees even with an empty environment block (macOS; Wine adds its own)."""
    return name in ("LC_CTYPE", "__CF_USER_TEXT_ENCODING") or jobstate._WINDOWS and (
        name.startswith("WINE") or name in ("SYSTEMROOT", "SYSTEMDRIVE"))


def win_handles(testcase, pids):
    """SYNCHRONIZE handles on live pids (Windows).  A handle pins its process, so
    waiting on it tells that this very process ended: no pid-reuse guessing."""
    import _winapi
    handles = []
    for pid in pids:
        handle = _winapi.OpenProcess(0x00100000, False, pid)
        testcase.addCleanup(_winapi.CloseHandle, handle)
        handles.append(handle)
    return handles


def win_exited(handle, timeout_s=0.0):
    import _winapi
    return _winapi.WaitForSingleObject(handle, int(timeout_s * 1000)) == _winapi.WAIT_OBJECT_0


def under_wine():
    """A Windows Python hosted by Wine (its ntdll exports wine_get_version)."""
    if not jobstate._WINDOWS:
        return False
    import ctypes
    return hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")


def proc_stat(pid):
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...), or None when it is gone."""
    try:
        with open("/proc/%d/stat" % pid, "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()  # the name may hold spaces and parentheses


def pid_alive(pid):
    fields = proc_stat(pid)
    return fields is not None and fields[0] != b"Z"


def marker_pids(job_id):
    """Live (non-zombie) pids whose environment carries the job's marker: an independent check."""
    needle = ("JOBSTATE_JOB_ID=%s" % job_id).encode()
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open("/proc/%s/environ" % name, "rb") as f:
                if needle not in f.read().split(b"\0"):
                    continue
        except OSError:  # another user's process, or gone meanwhile
            continue
        if pid_alive(int(name)):
            pids.append(int(name))
    return pids


def waiting_for_a_lock(pid):
    """pid has a thread blocked on a file lock (Linux /proc/locks): an observer is inside its wait."""
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields and fields[fields.index("->") + 4] == str(pid):
                return True
    return False


def live_children(ppid):
    """Running (not zombie) children of ppid (Linux /proc)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        fields = proc_stat(int(name))
        if fields and fields[0] != b"Z" and int(fields[1]) == ppid:
            found.append(int(name))
    return found


def zombie_children(ppid):
    """Exited, unreaped children of ppid (Linux /proc)."""
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        fields = proc_stat(int(name))
        if fields and fields[0] == b"Z" and int(fields[1]) == ppid:
            found.append(int(name))
    return found


def fifo_gate(testcase):
    """A FIFO a child blocks on (`open(gate).read()`) until open_fifo_gate(gate): a
    real signal where a fixed sleep would only make the job probably still run."""
    gate = os.path.join(testcase.tmp, "gate")
    os.mkfifo(gate)
    return gate


def open_fifo_gate(gate):
    """Let the child blocked on the gate go on; fails (never hangs) if no child waits there."""
    def reader_there():
        try:
            return os.open(gate, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader yet (or any more)
            return None
    fd = wait_for(reader_there, 10, "the child to wait at the gate")
    os.write(fd, b"go\n")
    os.close(fd)


def hold_job_lock(testcase, job):
    """Another process holds the job's lock (as a live supervisor would) until the test ends."""
    holder = subprocess.Popen(py("import fcntl, os, sys, time\n"
                                 "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                                 "print('held', flush=True); time.sleep(300)") + [job.paths.lock],
                              stdout=subprocess.PIPE)
    testcase.addCleanup(holder.stdout.close)
    testcase.addCleanup(holder.wait)
    testcase.addCleanup(holder.kill)
    testcase.assertEqual(holder.stdout.readline(), b"held\n")


def proc_status(pid):
    """The fields of /proc/<pid>/status, by name."""
    with open("/proc/%d/status" % pid) as f:
        return dict(line.rstrip("\n").split(":", 1) for line in f if ":" in line)


# A launcher that hands the job everything it must not inherit: terminal
# signals ignored (a CI shell, nohup), a blocked signal, another umask and an
# inheritable descriptor.  Each launch path must start the job clean anyway.
HOSTILE_LAUNCHER = (
    "import os, signal, sys\n"
    "for name in ('SIGINT', 'SIGHUP', 'SIGQUIT'):\n"
    "    signal.signal(getattr(signal, name), signal.SIG_IGN)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])\n"
    "os.umask(0o027)\n"
    "os.set_inheritable(os.open(os.devnull, os.O_RDONLY), True)\n")


def validate(instance, schema, path="$"):
    """Errors of instance against the JSON Schema subset jobstate's schemas use."""
    errors = []
    if "const" in schema and instance != schema["const"]:
        errors.append("%s: %r != const %r" % (path, instance, schema["const"]))
    if "enum" in schema and instance not in schema["enum"]:
        errors.append("%s: %r not in %r" % (path, instance, schema["enum"]))
    if "anyOf" in schema and all(validate(instance, alternative, path) for alternative in schema["anyOf"]):
        errors.append("%s: matches none of anyOf" % path)
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        checks = {"string": lambda v: isinstance(v, str), "integer": lambda v: isinstance(v, int)
                  and not isinstance(v, bool), "number": lambda v: isinstance(v, (int, float))
                  and not isinstance(v, bool), "boolean": lambda v: isinstance(v, bool),
                  "null": lambda v: v is None, "array": lambda v: isinstance(v, list),
                  "object": lambda v: isinstance(v, dict)}
        if not any(checks[k](instance) for k in kinds):
            return errors + ["%s: %r is not %s" % (path, instance, kinds)]
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in instance:
                errors.append("%s: missing %r" % (path, key))
        for key, value in instance.items():
            if key in props:
                errors += validate(value, props[key], "%s.%s" % (path, key))
            elif schema.get("additionalProperties") is False:
                errors.append("%s: unexpected key %r" % (path, key))
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += validate(value, schema["additionalProperties"], "%s.%s" % (path, key))
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0) or len(instance) > schema.get("maxItems", 1 << 30):
            errors.append("%s: length %d" % (path, len(instance)))
        for i, item in enumerate(instance):
            errors += validate(item, schema.get("items", {}), "%s[%d]" % (path, i))
    if "minimum" in schema and isinstance(instance, (int, float)) and instance < schema["minimum"]:
        errors.append("%s: %r < %r" % (path, instance, schema["minimum"]))
    return errors


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


def strict_json(testcase, data):
    """Parse bytes as a strict parser (orjson, pydantic) would: UTF-8 only, and no
    \\uD800-\\uDFFF escapes, which stand for no character in a document."""
    testcase.assertIsNone(SURROGATE_ESCAPE.search(data), data[:300])
    return json.loads(data.decode("utf-8", "strict"))


def job_with_bytes_not_utf8(testcase):
    """A finished job whose argv, cwd and env hold the byte 0xE9 alone (what
    `ls $'/tmp/caf\\xe9'` stores, surrogate-escaped in Python)."""
    if jobstate._WINDOWS:
        testcase.skipTest("Windows keeps argv, paths and the environment in UTF-16: no byte to escape")
    cwd = os.path.join(testcase.tmp, "caf\udce9")
    os.mkdir(cwd)
    job = jobstate.run([PY, "-c", "pass", "caf\udce9"], cwd=cwd, env={"K\udce9": "v\udce9"},
                       root=testcase.root)
    testcase.assertEqual(job.wait(30).status, jobstate.JobStatus.EXITED)
    return job


def assert_shown_as_replacement(testcase, doc):
    testcase.assertEqual(doc["command"][-1], "caf\ufffd")
    testcase.assertTrue(doc["cwd"].endswith("caf\ufffd"), doc["cwd"])


class JobTestCase(unittest.TestCase):
    """A private root per test; every process of every job is stopped at the end."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp(prefix="jobstate-test-")
        self.root = os.path.join(self.tmp, "root")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.addCleanup(self.stop_everything)

    def stop_everything(self):
        for job_id in jobstate._list_job_ids(self.root):
            # First take waiting jobs out of their queues and end restart
            # policies (a kill request does both): nothing may start meanwhile.
            job = jobstate.Job(job_id, self.root)
            try:
                state = job.state()
                if not state.status.is_terminal and (state.waiting or job.spec().restart != "never"):
                    job.kill("KILL", wait_s=0)
            except jobstate.JobError:
                pass
        for job_id in jobstate._list_job_ids(self.root):
            job = jobstate.Job(job_id, self.root)
            ref = jobstate._TreeRef(job_id, None, None, None, None)
            state = None
            try:
                state = job.state()
                ref = jobstate._TreeRef.from_state(state)
            except jobstate.JobError:
                pass
            jobstate._process_layer.signal_tree(ref, signal.SIGKILL if POSIX else 9)
            if state is not None and state.status is jobstate.JobStatus.CREATED and jobstate._lock_is_free(job.paths):
                continue  # never started and nobody starting it: no supervisor to wait for
            try:
                job.wait(10)
            except jobstate.JobError:
                pass
            wait_for(lambda: self.supervisor_gone(job.paths), 10, "the supervisor to finish copying the output")
            # The job's cgroups, once the processes SIGKILLed above have gone (a kill is not
            # instant, least of all under load: rmdir refuses a cgroup they are still in).
            wait_for(lambda: jobstate._process_layer.remove_containment(ref), 10, "the job's cgroups to empty")

    @staticmethod
    def supervisor_gone(paths):
        """Nobody holds the job lock, not even shared (a supervisor copying leftovers' output)."""
        # A bare lock file: a test's root may be one whose locks jobstate will not trust.
        with jobstate._LockFile(paths.lock) as lock:
            try:
                return lock.acquire(create=False)
            except OSError:  # gone with its job
                return True

    def assert_bystander_survives(self, bystander, token):
        """A stale state that names an unrelated live process (a recycled pid,
        with another start time) must never get it signalled."""
        for status in ("exited", "running"):
            job = jobstate.create(py("pass"), root=self.root)
            with open(job.paths.state) as f:
                doc = json.load(f)
            doc["job"]["status"] = status
            doc.update(pid=bystander.pid, pid_token=token, supervisor_pid=bystander.pid)
            jobstate._write_json_atomic(job.paths.state, doc)
            result = job.kill("KILL")
            self.assertEqual(result.processes_signalled, 0)
            self.assertIsNone(bystander.poll(), "the unrelated process was killed")

    def run_job(self, argv, **kw):
        return jobstate.run(argv, root=self.root, **kw)

    def cli(self, *args, stdin=None):
        """Run main() in-process; returns (exit status, parsed JSON or None, raw stdout)."""
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
        with contextlib.redirect_stdout(out):
            status = jobstate.main(["--root", self.root] + list(args))
        out.flush()
        raw = out.buffer.getvalue().decode("utf-8")
        lines = raw.splitlines()
        doc = json.loads(lines[0]) if lines else None
        if doc is not None:
            self.assertEqual(len(lines), 1, "one JSON line expected, got %r" % raw[:500])
        return status, doc, raw

    def cli_capture(self, *args):
        """Run main() in-process; returns (exit status, stdout text, stderr text), for text mode."""
        out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n")
        err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", newline="\n")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = jobstate.main(["--root", self.root] + list(args))
        out.flush()
        err.flush()
        return status, out.buffer.getvalue().decode("utf-8"), err.buffer.getvalue().decode("utf-8")

    def cli_process(self, *args, input=None, timeout=30, **kw):
        """Run the CLI as a separate process (end to end)."""
        proc = subprocess.run([PY, JOBSTATE, "--root", self.root] + list(args), input=input,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout, **kw)
        doc = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, doc, proc

    def wait_log(self, job, text, stream="stdout", timeout_s=10):
        path = job.paths.stdout_log if stream == "stdout" else job.paths.stderr_log

        def has_text():
            try:
                with open(path, "rb") as f:
                    return text.encode() in f.read()
            except OSError:
                return False
        wait_for(has_text, timeout_s, "%r in %s" % (text, stream))

# ---------------------------------------------------------------------------
# Static checks: imports, side effects, public names, the section map
# ---------------------------------------------------------------------------


class StaticTests(unittest.TestCase):
    def test_only_stdlib_imports(self):
        import ast
        if not hasattr(sys, "stdlib_module_names"):
            self.skipTest("sys.stdlib_module_names needs Python 3.10+")
        allowed = set(sys.stdlib_module_names) | {"__future__", "jobstate"}  # novm (skipped before 3.10)
        for name in ("jobstate.py", "test_jobstate.py"):
            with open(os.path.join(HERE, name), encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for module in names:
                    self.assertIn(module.split(".")[0], allowed, "%s imports %s" % (name, module))

    def test_import_has_no_side_effects(self):
        home = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, home, True)
        code = ("import sys, jobstate; "
                "print(sorted(m for m in ('ctypes', 'argparse') if m in sys.modules))")
        env = dict(os.environ, HOME=home, XDG_DATA_HOME=os.path.join(home, "xdg"), PYTHONPATH=HERE)
        env.pop("JOBSTATE_ROOT", None)
        out = subprocess.run([PY, "-c", code], env=env, stdout=subprocess.PIPE, check=True,
                             cwd=home).stdout
        self.assertEqual(json.loads(out.decode().replace("'", '"')), [])
        self.assertEqual(os.listdir(home), [], "importing created files")

    def test_every_dataclass_has_a_docstring(self):
        """dataclass() writes one with inspect.signature for a class without: then
        supervisors, which never load inspect otherwise, would (see _SUPERVISOR_BOOT)."""
        import ast
        with open(JOBSTATE, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        def named(decorator):
            decorator = decorator.func if isinstance(decorator, ast.Call) else decorator
            return getattr(decorator, "id", None)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and {"dataclass", "_record"} & set(map(named, node.decorator_list)):
                self.assertTrue(ast.get_docstring(node), "dataclass %s has no docstring" % node.name)

    def test_public_names_exist(self):
        for name in jobstate.__all__:
            self.assertTrue(hasattr(jobstate, name), name)

    def test_section_map_is_true(self):
        """The numbered banners run 1..N, the docstring's map names each of them,
        and every top-level function or class uses only names defined in its own
        section or an earlier one: calls point backwards."""
        import ast
        import re
        with open(JOBSTATE, encoding="utf-8") as f:
            source = f.read()
        banners = [(lineno, int(m.group(1)), m.group(2)) for lineno, line in enumerate(source.splitlines(), 1)
                   for m in [re.match(r"# (\d+)\. (.+)$", line)] if m]
        self.assertEqual([number for _, number, _ in banners], list(range(1, len(banners) + 1)))
        for _, number, title in banners:
            self.assertIn("%d. %s\n" % (number, title), jobstate.__doc__, "the docstring's map lacks it")

        def section_of(lineno):
            return max([number for start, number, _ in banners if start < lineno] or [0])

        tree = ast.parse(source)
        defined = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
            else:
                names = []
            for name in names:
                defined.setdefault(name, section_of(node.lineno))
        forward = []
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                continue
            inner = list(ast.walk(node))
            local = {n.arg for n in inner if isinstance(n, ast.arg)}
            local |= {n.id for n in inner if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            local |= {(a.asname or a.name).split(".")[0] for n in inner
                      if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
            here = section_of(node.lineno)
            forward += ["%s (section %d) uses %s (section %d)" % (node.name, here, n.id, defined[n.id])
                        for n in inner if isinstance(n, ast.Name) and n.id not in local
                        and defined.get(n.id, 0) > here]
        self.assertEqual(sorted(set(forward)), [], "calls must point backwards")

    def test_supervisors_part_ends_where_section_8_starts(self):
        """_SUPERVISOR_BOOT compiles the file up to section 8's banner: that banner
        is there, once, and it is the one the boot looks for."""
        with open(JOBSTATE, "rb") as f:
            source = f.read()
        self.assertEqual(source.count(b"\n# 8. Jobs API"), 1)
        self.assertIn('source.index(b"\\n# 8. Jobs API")', jobstate._SUPERVISOR_BOOT)

    def test_the_root_is_resolved_once_where_a_surface_starts(self):
        """resolve_root runs in the public functions that take root= and in
        main() (which serves the CLI, MCP and HTTP); everything they call
        takes the resolved root."""
        import ast
        with open(JOBSTATE, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        callers = sorted(node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)
                         for call in ast.walk(node) if isinstance(call, ast.Call)
                         and getattr(call.func, "id", None) == "resolve_root")
        self.assertEqual(callers, ["create", "gc", "list_jobs", "list_queues", "main", "open_job", "run", "set_queue"])

    def test_every_lock_is_a_lock_file(self):
        """One lock idiom: only _LockFile (which _JobLock extends) calls the layer's lock and unlock."""
        with open(JOBSTATE, encoding="utf-8") as f:
            source = f.read()
        self.assertEqual((source.count("_process_layer.lock("), source.count("_process_layer.unlock(")), (1, 1))

    def test_both_platform_layers_implement_the_declared_interface(self):
        """_ProcessLayer's docstring declares the interface: each layer defines
        exactly those public members, in that order, under the same sub-banners;
        and only sections 1 and 3 ask which platform this is."""
        import inspect
        import re
        declared = jobstate._ProcessLayer.__doc__.split("The members, by sub-banner:")[1]
        members = re.findall(r"^ {8}(\w+)", declared, re.M)
        groups = re.findall(r"^ {4}(\w[\w ]*)$", declared, re.M)
        for layer in (jobstate._PosixProcessLayer, jobstate._WindowsProcessLayer):
            self.assertEqual([name for name in vars(layer) if not name.startswith("_")], members, layer.__name__)
            self.assertEqual(re.findall(r"^    # -- (.+?) -+$", inspect.getsource(layer), re.M), groups,
                             layer.__name__)
        with open(JOBSTATE, encoding="utf-8") as f:
            lines = f.read().splitlines()
        section, asking = 0, []
        for lineno, line in enumerate(lines, 1):
            banner = re.match(r"# (\d+)\. ", line)
            section = int(banner.group(1)) if banner else section
            if section not in (1, 3) and re.search(r"\bos\.name\b|\bsys\.platform\b|\b_LINUX\b|\b_WINDOWS\b", line):
                asking.append("%d: %s" % (lineno, line.strip()))
        self.assertEqual(asking, [], "platform checks belong in sections 1 and 3")

    def test_sources_compile_without_warnings(self):
        """An invalid escape is a SyntaxWarning on 3.12 that every uncached start
        prints to stderr (and a DeprecationWarning before): compile as 3.12 would."""
        import warnings
        for path in (JOBSTATE, os.path.join(HERE, "test_jobstate.py")):
            with open(path, encoding="utf-8") as f:
                source = f.read()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                compile(source, path, "exec")

    def test_no_backslash_continuations(self):
        for path in (JOBSTATE, os.path.join(HERE, "test_jobstate.py")):
            with open(path, encoding="utf-8") as f:
                ends = [n for n, line in enumerate(f, 1) if line.rstrip("\n").endswith("\\")]
            self.assertEqual(ends, [], "%s: use parentheses" % os.path.basename(path))

    def test_no_name_is_defined_twice(self):
        """A second def of a name silently replaces the first for every caller (a merge
        brought two _json_bytes, one of section 5 and one of section 10); in a test
        class, the first test would silently never run."""
        import ast
        import collections
        for path in (JOBSTATE, os.path.join(HERE, "test_jobstate.py")):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for scope in [tree] + [node for node in tree.body if isinstance(node, ast.ClassDef)]:
                defined = collections.Counter(node.name for node in scope.body
                                              if isinstance(node, (ast.FunctionDef, ast.ClassDef)))
                twice = sorted(name for name, count in defined.items() if count > 1)
                where = getattr(scope, "name", "the module")
                self.assertEqual(twice, [], "%s, in %s" % (os.path.basename(path), where))

# ---------------------------------------------------------------------------
# Schema (jobstate.py section 2)
# ---------------------------------------------------------------------------


class SchemaTests(unittest.TestCase):
    def test_required_keys_are_null_not_omitted(self):
        state = jobstate.JobState(jobstate.JobInfo("a" * 32, jobstate.JobStatus.CREATED))
        doc = state.to_dict()
        self.assertEqual(doc["job"], {"id": "a" * 32, "status": "created", "started_at": None})
        for key in ("exit_code", "signal", "duration_ms"):
            self.assertIn(key, doc["result"])
            self.assertIsNone(doc["result"][key])
        self.assertIsNone(doc["finished_at"])
        self.assertIn("updated_at", doc)
        self.assertNotIn("pid", doc)
        self.assertNotIn("windows_job_name", doc)

    def test_round_trip_keeps_unknown_keys(self):
        doc = {"job": {"id": "b" * 32, "status": "exited", "started_at": "2026-01-01T00:00:00.000Z"},
               "result": {"exit_code": 3, "signal": None, "duration_ms": 12, "future": 1},
               "pid": 42, "finished_at": "2026-01-01T00:00:01.000Z",
               "updated_at": "2026-01-01T00:00:01.000Z", "from_a_newer_version": {"x": 1}}
        state = jobstate.JobState.from_dict(doc)
        self.assertEqual((state.job_id, state.status, state.exit_code, state.duration_ms, state.pid),
                         ("b" * 32, jobstate.JobStatus.EXITED, 3, 12, 42))
        self.assertEqual(state.started_at, "2026-01-01T00:00:00.000Z")
        self.assertIsNone(state.signal)
        self.assertEqual(state.to_dict()["from_a_newer_version"], {"x": 1})

    def test_containment_and_limits_round_trip(self):
        doc = {"job": {"id": "c" * 32, "status": "running", "started_at": None}, "result": {},
               "containment": "cgroup", "cgroup": "/sys/fs/cgroup/jobstate/" + "c" * 32,
               "cgroups_v1": ["/sys/fs/cgroup/pids/jobstate/" + "c" * 32],
               "limits": {"max_processes": {"value": 5, "enforced_by": "cgroup-v1"}}}
        again = jobstate.JobState.from_dict(doc).to_dict()
        self.assertEqual({k: again[k] for k in ("containment", "cgroup", "cgroups_v1", "limits")},
                         {k: doc[k] for k in ("containment", "cgroup", "cgroups_v1", "limits")})
        for bad in ({"cgroups_v1": "/x"}, {"limits": {"memory_max": 5}}, {"cgroup": 7}):
            with self.assertRaises(ValueError):
                jobstate.JobState.from_dict(dict(doc, **bad))

    def test_malformed_state_is_rejected(self):
        for doc in ([], {"job": {"id": 5, "status": "exited"}}, {"job": {"id": "c", "status": "bogus"}},
                    {"job": {"id": "c", "status": "exited"}, "result": {"exit_code": "0"}}):
            with self.assertRaises(ValueError):
                jobstate.JobState.from_dict(doc)

    def test_timestamps_are_rfc3339_utc_milliseconds(self):
        import re
        self.assertRegex(jobstate._utc_now(), r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\Z")
        self.assertEqual(jobstate._format_time(0.5), "1970-01-01T00:00:00.500Z")
        self.assertAlmostEqual(jobstate._parse_time("2026-11-29T03:18:04.123Z"),
                               jobstate._parse_time("2026-11-29T03:18:04.000Z") + 0.123, places=6)
        self.assertTrue(re)

    def test_job_ids_are_time_ordered_uuid7(self):
        ids = []
        for _ in range(3):
            ids.append(jobstate.new_job_id())
            time.sleep(0.002)
        for job_id in ids:
            self.assertRegex(job_id, r"\A[0-9a-f]{32}\Z")
            self.assertEqual(job_id[12], "7")
            self.assertIn(job_id[16], "89ab")
            self.assertLess(abs(int(job_id[:12], 16) - time.time() * 1000), 5000)
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(jobstate.new_job_id() for _ in range(1000))), 1000)

    def test_job_ids_made_in_the_same_millisecond_keep_their_order(self):
        """`after` names only older jobs (so no cycle can form) because ids sort by
        creation: within one millisecond too, for the ids one process makes."""
        ids = [jobstate.new_job_id() for _ in range(5000)]
        self.assertEqual(ids, sorted(ids))
        self.assertEqual(len(set(ids)), len(ids))
        for job_id in ids[:: len(ids) // 10]:
            self.assertEqual((job_id[12], job_id[16] in "89ab"), ("7", True))

    def test_signal_parsing(self):
        for value in ("TERM", "SIGTERM", "term", "15", 15):
            self.assertEqual(jobstate._parse_signal(value), (15, "SIGTERM"))
        self.assertEqual(jobstate._parse_signal("kill"), (9, "SIGKILL"))
        for value in ("FOO", "", "99", "SIGSEGV", "-1"):
            with self.assertRaises(jobstate.InvalidSignalError):
                jobstate._parse_signal(value)

    def test_durations_sizes_tags(self):
        self.assertEqual(jobstate._parse_duration("90s", "t"), 90)
        self.assertEqual(jobstate._parse_duration("1.5", "t"), 1.5)
        self.assertEqual(jobstate._parse_duration("7d", "t"), 7 * 86400)
        self.assertEqual(jobstate._parse_duration("250ms", "t"), 0.25)
        self.assertEqual(jobstate._parse_size("64k", "s"), 65536)
        self.assertEqual(jobstate._parse_size("1MiB", "s"), 1 << 20)
        for bad in ("-1", "abc", "5 parsecs"):
            with self.assertRaises(jobstate.InvalidArgumentError):
                jobstate._parse_duration(bad, "t")
        self.assertEqual(jobstate._validate_tags(["a.b", "c", "a.b"]), ["a.b", "c"])
        for bad in ("a..b", ".a", "a b", "a/b", ""):
            with self.assertRaises(jobstate.InvalidTagError):
                jobstate._validate_tags([bad])
        self.assertTrue(jobstate._tag_matches("a.*", ["a"]))
        self.assertTrue(jobstate._tag_matches("a.*", ["a.x.y"]))
        self.assertFalse(jobstate._tag_matches("a.*", ["ab"]))
        self.assertFalse(jobstate._tag_matches("a.b", ["a.b.c"]))

# ---------------------------------------------------------------------------
# Platform layer (section 3): either platform, POSIX, Windows for real, Windows through a fake kernel32
# ---------------------------------------------------------------------------


class ProcessLayerTests(JobTestCase):
    """What each platform's layer must do alike, run on whichever this is."""

    def test_recycled_pid_is_never_signalled(self):
        bystander = subprocess.Popen(py("import time; time.sleep(60)"), stdin=subprocess.DEVNULL)
        self.addCleanup(bystander.wait)
        self.addCleanup(bystander.kill)
        for token in ("0:bogus", "12345"):  # a POSIX-shaped and a Windows-shaped token, wrong on both
            self.assert_bystander_survives(bystander, token=token)

    def test_invalid_signal_sends_nothing(self):
        job = self.run_job(ready_then_sleep())
        self.wait_log(job, "ready")
        no_such_signals = ("STOP", "HUP", "USR1") if jobstate._WINDOWS else ()
        for bad in ("FOO", "99", "SIGSEGV") + no_such_signals:
            status, doc, _ = self.cli("kill", "--signal", bad, job.id)
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_signal"), bad)
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)

    def test_timeout_term_is_recorded(self):
        job = self.run_job(py("import time; time.sleep(60)"), timeout_s="0.2")
        state = job.wait(20)
        self.assertEqual((state.status, state.signal, state.exit_code, state.result.timed_out),
                         (jobstate.JobStatus.KILLED, "SIGTERM", None, True))

    def test_kill_created_job_is_invalid_state(self):
        job = jobstate.create(py("pass"), root=self.root)
        status, doc, _ = self.cli("kill", job.id)
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_state"))


@unittest.skipIf(jobstate._WINDOWS, "POSIX only")
class PosixProcessTests(JobTestCase):
    TREE = ("for i in 1 2 3; do sleep 300 & done; "
            "setsid sleep 301 & "
            "python3 -c 'import os, time\nif os.fork(): os._exit(0)\nos.setsid()\nif os.fork(): os._exit(0)\ntime.sleep(302)' & "
            "echo ready; wait")

    def test_kill_tree(self):
        job = self.run_job(["sh", "-c", self.TREE])
        self.wait_log(job, "ready")
        wait_for(lambda: len(marker_pids(job.id)) >= 6, 10, "the whole tree to start")
        result = job.kill("TERM")
        self.assertEqual(result.state.status, jobstate.JobStatus.KILLED)
        self.assertEqual(result.state.signal, "SIGTERM")
        self.assertGreaterEqual(result.processes_signalled, 6)
        self.assertEqual(result.processes_alive, 0)
        self.assertEqual(marker_pids(job.id), [])

    def test_kill_leftovers_of_an_exited_job(self):
        # The daemon lets go of the job's stdout, as daemons do (a held pipe is the drain tests' subject).
        job = self.run_job(["sh", "-c", "setsid sleep 303 >/dev/null 2>&1 & echo ready"])
        state = job.wait(10)
        self.assertEqual(state.status, jobstate.JobStatus.EXITED)
        wait_for(lambda: marker_pids(job.id), 5, "the daemon")
        result = job.kill("TERM")
        self.assertEqual((result.state.status, result.state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertGreaterEqual(result.processes_signalled, 1)
        self.assertEqual(result.processes_alive, 0)
        self.assertEqual(marker_pids(job.id), [])

    def test_kill_orphans_option(self):
        job = self.run_job(["sh", "-c", "setsid sleep 304 & echo ready"], kill_orphans=True)
        state = job.wait(15)
        self.assertEqual(state.status, jobstate.JobStatus.EXITED)
        self.assertTrue(state.logs_drained)
        self.assertEqual(marker_pids(job.id), [])

    @unittest.skipUnless(jobstate._LINUX, "/proc/self/limits")
    def test_without_cgroups_limits_fall_back_to_rlimits_and_say_so(self):
        with unittest.mock.patch.dict(os.environ, {"JOBSTATE_CONTAINMENT": "off"}):
            job = self.run_job(["cat", "/proc/self/limits"], memory_max=1 << 30, max_processes=50, cpu_time_s=7)
            state = job.wait(10)
            busy = self.run_job(py("while True: pass"), cpu_time_s=1).wait(20)
        self.assertEqual(state.containment, "process-group")
        # RLIMIT_NPROC would count every process of the user, not the job's: not used.
        self.assertEqual({k: v["enforced_by"] for k, v in state.limits.items()},
                         {"memory_max": "rlimit", "cpu_time_s": "rlimit", "max_processes": "none"})
        limits = {line[:26].strip(): line[26:].split()[:2] for line in job.tail().stdout.splitlines()[1:]}
        self.assertEqual(limits["Max address space"], [str(1 << 30)] * 2)
        self.assertEqual(limits["Max cpu time"], ["7", "8"])
        self.assertEqual((busy.status, busy.signal, busy.error.stage, busy.error.limit),
                         (jobstate.JobStatus.KILLED, "SIGXCPU", "limit", "cpu_time_s"))

    def test_stop_and_continue(self):
        job = self.run_job(ready_then_sleep())
        self.wait_log(job, "ready")
        pid = job.state().pid
        status, doc, _ = self.cli("kill", "--signal", "STOP", job.id)
        self.assertEqual((doc["signal_sent"], doc["state"]), ("SIGSTOP", "running"))
        wait_for(lambda: proc_stat(pid)[0] == b"T", 5, "the child to stop")
        self.cli("kill", "--signal", "18" if sys.platform.startswith("linux") else "CONT", job.id)
        wait_for(lambda: proc_stat(pid)[0] != b"T", 5, "the child to continue")

    def test_timeout_escalates_to_kill_for_a_child_that_traps_term(self):
        trap = "import signal\nsignal.signal(signal.SIGTERM, lambda *a: print('got TERM', flush=True))\n"
        job = self.run_job(ready_then_sleep(first=trap), timeout_s=0.5, kill_after_s=0.5)
        state = job.wait(20)
        self.assertEqual((state.status, state.signal, state.result.timed_out),
                         (jobstate.JobStatus.KILLED, "SIGKILL", True))
        self.assertGreaterEqual(state.duration_ms, 900)
        self.assertIn("got TERM", job.tail().stdout)

    def test_kill_after_escalates(self):
        job = self.run_job(ready_then_sleep(first="import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"))
        self.wait_log(job, "ready")
        status, doc, _ = self.cli("kill", "--kill-after", "0.3", job.id)
        self.assertEqual((doc["state"], doc["signal"], doc["processes_alive"]), ("killed", "SIGKILL", 0))

    def test_trapped_term_exit_is_recorded_as_killed(self):
        exit_on_term = "import signal, sys\nsignal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
        job = self.run_job(ready_then_sleep(first=exit_on_term))
        self.wait_log(job, "ready")
        result = job.kill("TERM")
        self.assertEqual((result.state.status, result.state.signal, result.state.exit_code),
                         (jobstate.JobStatus.KILLED, "SIGTERM", None))

    def supervisor_argv(self, state):
        """The supervisor's argv after `_supervise`, once it is the exec'd interpreter."""
        def argv():
            with open("/proc/%d/cmdline" % state.supervisor_pid, "rb") as f:
                words = f.read().split(b"\0")[:-1]
            return words[words.index(b"_supervise") + 1:] if b"_supervise" in words else None
        wait_for(argv, 10, "the supervisor to run jobstate")
        return argv()

    @unittest.skipUnless(jobstate._LINUX, "forked launch is Linux only")
    def test_forked_launch_hands_the_job_to_a_clean_watcher(self):
        leak_r, leak_w = os.pipe()
        self.addCleanup(os.close, leak_r)
        status, doc, proc = self.cli_process("run", "--no-wait", "--timeout", "3", "--", "sh", "-c", "sleep 60",
                                             pass_fds=(leak_w,))
        os.close(leak_w)
        self.assertEqual(status, 0, proc.stderr)
        job = jobstate.open_job(doc["job_id"], self.root)
        state = job.state()
        watcher_args = self.supervisor_argv(state)
        self.assertEqual(len(watcher_args), 4, "a forked launch hands the running job over: %r" % watcher_args)
        self.assertEqual(int(proc_stat(state.pid)[1]), state.supervisor_pid)
        # Nothing the launcher held reaches the watcher or the job: the write
        # end closed above was the last, so the read end sees EOF at once.
        import select
        self.assertTrue(select.select([leak_r], [], [], 5)[0], "a launcher descriptor leaked into the job")
        self.assertEqual(os.read(leak_r, 1), b"")
        # The timeout (3 s, so the job is surely still running when we look
        # above), counted from the start, still fires in the exec'd watcher.
        final = job.wait(15)
        self.assertEqual((final.status, final.result.timed_out, final.signal), (jobstate.JobStatus.KILLED, True, "SIGTERM"))

    @contextlib.contextmanager
    def launcher(self, code):
        """A fresh interpreter that runs code (which launches jobs into ROOT and
        prints one JSON line), then stays alive until the block ends."""
        script = "import json, os, sys, threading\nsys.path.insert(0, %r)\nimport jobstate\nROOT = %r\n" % (
            HERE, self.root)
        proc = subprocess.Popen([PY, "-c", script + code + "\nsys.stdout.flush()\nsys.stdin.read()\n"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            line = proc.stdout.readline()
            if not line:
                self.fail("the launcher printed nothing: %s" % proc.communicate(timeout=60)[1].decode())
            yield json.loads(line)
        finally:
            proc.communicate(timeout=60)

    def test_launcher_with_threads_spawns_the_supervisor(self):
        with self.launcher("release = threading.Event()\n"
                           "threading.Thread(target=release.wait).start()\n"
                           "job = jobstate.run(['sh', '-c', 'echo ready; sleep 60'], root=ROOT)\n"
                           "release.set()\n"
                           "print(json.dumps(job.id))\n") as job_id:
            job = jobstate.open_job(job_id, self.root)
        self.assertEqual(len(self.supervisor_argv(job.state())), 3, "a spawned supervisor, from the start")
        self.wait_log(job, "ready")
        self.assertEqual(job.kill("TERM").state.signal, "SIGTERM")

    @unittest.skipUnless(jobstate._LINUX, "the forkserver is Linux only")
    def test_later_launches_of_a_process_go_through_its_forkserver(self):
        with self.launcher(
                "first = jobstate.run(['sh', '-c', 'echo $GREETING'], root=ROOT)\n"
                "os.environ['GREETING'] = 'hello'  # set between launches: the next job must see it\n"
                "second = jobstate.run(['sh', '-c', 'echo $GREETING; sleep 60'], root=ROOT)\n"
                "forkserver = jobstate._Forkserver._popen.pid\n"
                "os.kill(forkserver, 9)\n"
                "jobstate._Forkserver._popen.wait()\n"
                "os.umask(0o027)\n"
                "third = jobstate.run(['sh', '-c', 'echo $GREETING; umask'], root=ROOT)  # a new forkserver\n"
                "third.wait(10)\n"
                "print(json.dumps([first.id, second.id, third.id, forkserver, jobstate._Forkserver._popen.pid]))\n"
        ) as (first, second, third, killed, replacement):
            wait_for(lambda: not zombie_children(replacement), 5, "the forkserver to reap the supervisors it forked")
        self.assertNotEqual(killed, replacement)
        wait_for(lambda: not pid_alive(replacement), 10, "the forkserver to exit with its launcher")
        second_job = jobstate.open_job(second, self.root)
        self.assertEqual(jobstate.open_job(first, self.root).wait(10).exit_code, 0)
        with open("/proc/%d/cmdline" % second_job.state().supervisor_pid, "rb") as f:
            self.assertIn(b"_forkserver", f.read(), "the supervisor is a fork of the forkserver")
        self.wait_log(second_job, "hello")
        self.assertEqual(second_job.kill("TERM").state.signal, "SIGTERM")
        third_job = jobstate.open_job(third, self.root)
        self.assertEqual((third_job.wait(10).exit_code, third_job.tail().stdout), (0, "hello\n0027\n"))

    @unittest.skipUnless(jobstate._LINUX, "the forkserver is Linux only")
    def test_the_forkserver_keeps_a_spare_supervisor_and_replaces_a_killed_one(self):
        script = ("import json, sys\nsys.path.insert(0, %r)\nimport jobstate\n"
                  "for _ in range(2):\n"
                  "    jobstate.run(['true'], root=%r).wait(10)\n"
                  "print(json.dumps(jobstate._Forkserver._popen.pid), flush=True)\n"
                  "sys.stdin.readline()\n"
                  "job = jobstate.run(['sh', '-c', 'echo hi'], root=%r)\n"
                  "print(json.dumps(job.id), flush=True)\n"
                  "sys.stdin.read()\n" % (HERE, self.root, self.root))
        proc = subprocess.Popen([PY, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.addCleanup(proc.wait, 60)
        self.addCleanup(proc.stdin.close)
        forkserver = json.loads(proc.stdout.readline())
        # Its jobs' supervisors have exited: what stays is the spare, waiting.
        spare = wait_for(lambda: live_children(forkserver) if len(live_children(forkserver)) == 1 else None,
                         10, "one spare supervisor")[0]
        self.assertEqual(os.getsid(spare), spare, "a spare is detached already")
        os.kill(spare, signal.SIGKILL)
        wait_for(lambda: not pid_alive(spare), 5, "the spare to die")
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        job = jobstate.open_job(json.loads(proc.stdout.readline()), self.root)
        self.assertEqual((job.wait(10).exit_code, job.tail().stdout), (0, "hi\n"))
        replacement = wait_for(lambda: [p for p in live_children(forkserver) if p != spare], 10, "a new spare")[0]
        proc.stdin.close()
        self.assertEqual(proc.wait(60), 0)
        wait_for(lambda: not pid_alive(forkserver), 10, "the forkserver to exit with its launcher")
        wait_for(lambda: not pid_alive(replacement), 10, "the spare to exit with its forkserver")

    @unittest.skipUnless(jobstate._LINUX, "the forkserver is Linux only")
    def test_each_launch_through_the_forkserver_runs_its_job_once(self):
        """A spare that read its whole request and closed its socket at once must
        not make the forkserver believe the hand-over failed and hand the same
        job to a second spare (two supervisors, the job run twice)."""
        runs = os.path.join(self.tmp, "runs")
        jobs = [self.run_job(["sh", "-c", "echo $JOBSTATE_JOB_ID >> %s" % runs]) for _ in range(40)]
        for job in jobs:
            self.assertEqual(job.wait(10).exit_code, 0)
            wait_for(lambda: self.supervisor_gone(job.paths), 10, "the supervisor to exit")
        with open(runs) as f:
            ran = f.read().split()
        self.assertEqual(sorted(ran), sorted(job.id for job in jobs))

    def test_launcher_ignoring_sigchld_still_gets_the_exit_code(self):
        status, doc, proc = self.cli_process(
            "run", "--", "sh", "-c", "exit 3",
            preexec_fn=lambda: signal.signal(signal.SIGCHLD, signal.SIG_IGN))
        self.assertEqual((status, doc["state"], doc["exit_code"]), (0, "exited", 3), proc.stderr)


# The job's child starts three grandchildren and, through one of them, a
# great-grandchild.  One grandchild asks for its own process group and no
# console; one more asks to break away from the job, which the job refuses
# (no BREAKAWAY_OK): winerror 5.
WIN_TREE = r'''
import subprocess, sys, time
quiet = dict(stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
sleeper = [sys.executable, "-c", "import time; time.sleep(300)"]
spawner = [sys.executable, "-c", "import subprocess, sys, time\n"
           "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,"
           " stderr=subprocess.DEVNULL)\n"
           "print(p.pid, flush=True); time.sleep(300)"] + sleeper
plain = subprocess.Popen(sleeper, **quiet)
detached = subprocess.Popen(sleeper, creationflags=0x00000008 | 0x00000200, **quiet)
middle = subprocess.Popen(spawner, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
great = int(middle.stdout.readline())
try:
    subprocess.Popen(sleeper, creationflags=0x01000000, **quiet).kill()
    breakaway = "allowed"
except OSError as exc:
    breakaway = "refused-%s" % getattr(exc, "winerror", None)
print("ready", plain.pid, detached.pid, middle.pid, great, breakaway, flush=True)
time.sleep(300)
'''

# The child starts a grandchild that holds no pipe of the job, then exits.
WIN_LEAVES_ORPHAN = (
    "import subprocess, sys\n"
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(303)'],\n"
    "                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print('ready', p.pid, flush=True)\n")


def win_pid_gone(pid):
    """No such process, or it has ended (for a pid we could not pin with a handle in time)."""
    import _winapi
    try:
        handle = _winapi.OpenProcess(0x00100000, False, pid)
    except OSError:
        return True
    try:
        return win_exited(handle)
    finally:
        _winapi.CloseHandle(handle)


@unittest.skipUnless(jobstate._WINDOWS, "Windows only")
class WindowsProcessTests(JobTestCase):
    def ready_line(self, job):
        self.wait_log(job, "ready", timeout_s=30)
        return [line for line in job.tail().stdout.splitlines() if line.startswith("ready")][0].split()[1:]

    def test_kill_tree(self):
        job = self.run_job(py(WIN_TREE))
        *pids, breakaway = self.ready_line(job)
        self.assertEqual(breakaway, "refused-5")
        state = job.state()
        with open(job.paths.state) as f:
            self.assertEqual(json.load(f)["windows_job_name"], "jobstate-" + job.id)
        pids = [state.pid] + [int(p) for p in pids]
        handles = win_handles(self, pids)
        self.assertFalse([pid for pid, h in zip(pids, handles) if win_exited(h)], "died before the kill")
        result = job.kill("TERM")
        self.assertEqual((result.state.status, result.state.signal, result.state.exit_code),
                         (jobstate.JobStatus.KILLED, "SIGTERM", None))
        self.assertEqual(result.state.windows_job_name, "jobstate-" + job.id)
        self.assertGreaterEqual(result.processes_signalled, 5)  # plus conhost.exe, also in the job
        self.assertEqual(result.processes_alive, 0)
        for pid, handle in zip(pids, handles):
            self.assertTrue(win_exited(handle, 10), "pid %d survived the kill" % pid)

    # Starts children until one is refused, allocates 200 MB, says how it went, then waits.
    WIN_LIMITS_PROBE = ("import subprocess, sys, time\n"
                        "kids, refused = [], 0\n"
                        "for _ in range(6):\n"
                        "    try:\n"
                        "        kids.append(subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']))\n"
                        "    except OSError:\n"
                        "        refused += 1\n"
                        "try:\n"
                        "    memory = len(bytearray(200 << 20)) and 'allocated'\n"
                        "except MemoryError:\n"
                        "    memory = 'refused'\n"
                        "print('children', len(kids), 'refused', refused, 'memory', memory, flush=True)\n"
                        "time.sleep(float(sys.argv[1]))\n")

    def test_job_object_limits_hold_or_are_said_not_to(self):
        job = self.run_job(py(self.WIN_LIMITS_PROBE) + ["0"], memory_max="100M")
        state = job.wait(30)
        self.assertEqual(state.containment, "job-object")
        if under_wine():
            # Wine 8 accepts job limits and keeps none (they read back as zero): the state says so.
            self.assertEqual(state.limits["memory_max"]["enforced_by"], "none")
            return
        self.assertEqual(state.limits["memory_max"], {"value": 100 << 20, "enforced_by": "job-object"})
        self.assertIn("memory refused", job.tail().stdout)  # allocations fail; nothing is killed
        job = self.run_job(py(self.WIN_LIMITS_PROBE) + ["30"], max_processes=4)
        state = job.wait(30)
        self.assertEqual((state.status, state.error.stage, state.error.limit),
                         (jobstate.JobStatus.KILLED, "limit", "max_processes"))

    def test_kill_leftovers_of_an_exited_job(self):
        # Windows drops the job's name with the supervisor's handle (Wine 8 keeps it
        # while processes remain), so the leftovers are found through the record in state.json.
        job = self.run_job(py(WIN_LEAVES_ORPHAN))
        state = job.wait(10)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        orphan = int(self.ready_line(job)[0])
        self.assertIn(orphan, [p.pid for p in state.leftovers])
        handle, = win_handles(self, [orphan])
        self.assertFalse(win_exited(handle))
        result = job.kill("TERM")
        self.assertEqual((result.state.status, result.state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertGreaterEqual(result.processes_signalled, 1)
        self.assertEqual(result.processes_alive, 0)
        self.assertTrue(win_exited(handle, 10))

    def test_kill_orphans_option(self):
        job = self.run_job(py(WIN_LEAVES_ORPHAN), kill_orphans=True)
        state = job.wait(15)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertTrue(state.logs_drained)
        orphan = int(self.ready_line(job)[0])
        wait_for(lambda: win_pid_gone(orphan), 10, "the orphan to be stopped")

    def test_signal_names_are_recorded(self):
        for name in ("INT", "KILL"):
            job = self.run_job(ready_then_sleep())
            self.wait_log(job, "ready")
            result = job.kill(name)
            self.assertEqual((result.state.status, result.state.signal, result.processes_alive),
                             (jobstate.JobStatus.KILLED, "SIG" + name, 0))

    def test_exit_code_propagation(self):
        # Exit codes are unsigned DWORDs; a crash code is an exit, not a signal.
        for code, expected in (("3", 3), ("-1073741819", 0xC0000005)):
            state = self.run_job(py("import sys; sys.exit(%s)" % code)).wait(10)
            self.assertEqual((state.status, state.exit_code, state.signal), (jobstate.JobStatus.EXITED, expected, None))
        status, doc, _ = self.cli("run", "--exit-code", "--", *py("import sys; sys.exit(3)"))
        self.assertEqual((status, doc["state"], doc["exit_code"]), (3, "exited", 3))

    def test_supervisor_killed_makes_the_job_failed_and_wait_returns(self):
        job = self.run_job(ready_then_sleep())
        self.wait_log(job, "ready")
        state = job.state()
        child, supervisor = win_handles(self, [state.pid, state.supervisor_pid])
        os.kill(state.supervisor_pid, signal.SIGTERM)  # TerminateProcess on Windows
        self.assertTrue(win_exited(supervisor, 10))
        started = time.monotonic()
        status, doc, _ = self.cli("wait", "--forever", job.id)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((doc["state"], doc["error"]["stage"]), ("failed", "supervisor_lost"))
        # No KILL_ON_JOB_CLOSE: the child outlives its supervisor, and kill still finds it.
        self.assertFalse(win_exited(child))
        result = job.kill("TERM")
        self.assertGreaterEqual(result.processes_signalled, 1)
        self.assertEqual(result.processes_alive, 0)
        self.assertEqual(result.state.status, jobstate.JobStatus.FAILED)
        self.assertTrue(win_exited(child, 10))


# Win32 values spelled out from the SDK headers, so that a wrong constant in
# jobstate.py cannot vouch for itself.
WIN_CREATE_SUSPENDED = 0x4
WIN_DETACHED_PROCESS = 0x8
WIN_CREATE_NEW_PROCESS_GROUP = 0x200
WIN_CREATE_BREAKAWAY_FROM_JOB = 0x01000000
WIN_CREATE_NO_WINDOW = 0x08000000
WIN_KILL_ON_JOB_CLOSE = 0x2000
WIN_DIE_ON_UNHANDLED_EXCEPTION = 0x400


def fake_winerror(code):
    """An OSError with .winerror, as ctypes.WinError makes it (POSIX's OSError drops the argument)."""
    exc = OSError(None, "fake winerror %d" % code, None, code)
    if getattr(exc, "winerror", None) != code:
        exc.winerror = code
    return exc


class FakeWinFunc:
    """A foreign function stand-in: checks the arguments against the declared
    argtypes as ctypes would, records the call, then applies the errcheck rule."""

    def __init__(self, fake, name, restype, argtypes, failure):
        self.fake, self.name, self.failure = fake, name, failure
        self.restype, self.argtypes = restype, argtypes

    def __call__(self, *args):
        assert self.argtypes is not None, "%s: argtypes not declared" % self.name
        assert len(args) == len(self.argtypes), "%s: arity" % self.name
        for argtype, arg in zip(self.argtypes, args):
            argtype.from_param(arg)  # raises where real ctypes would
        self.fake.calls.append((self.name,) + args)
        if self.name in self.fake.fail:
            self.fake.last_error = self.fake.fail[self.name]
            result = {"zero": 0, "null": None, "minus1": 0xFFFFFFFF,
                      "invalid": jobstate._win_types().INVALID_HANDLE_VALUE}.get(self.failure, 0)
        else:
            result = getattr(self.fake, "_" + self.name)(*args)
        if self.failure and jobstate._win_failed(self.failure, result):
            raise fake_winerror(self.fake.last_error)  # what _kernel32()'s errcheck does
        return result


class FakeProcess:
    def __init__(self, pid, ppid, ctime, suspended):
        self.pid, self.ppid, self.ctime = pid, ppid, ctime
        self.alive, self.exit_code, self.suspend_count = True, None, 1 if suspended else 0
        self.tid = pid * 10 + 1


def fake_target(ref):
    return getattr(ref, "_obj", ref)  # byref(x)._obj is x


class FakeKernel32:
    """kernel32 + NtResumeProcess + the last-error accessors, modelling a few processes and jobs."""

    def __init__(self):
        self.calls, self.last_error, self.fail = [], 0, {}
        self.procs, self.jobs, self.other_objects = {}, {}, set()
        self.handles, self._next_handle, self._next_pid = {}, 0x100, 1000
        self.ctime_clock = 10 ** 17  # > 2**32: exercises dwHighDateTime
        self.locks = {}
        types = jobstate._win_types()
        for table in (types.kernel32, types.ntdll):
            for name, (restype, argtypes, failure) in table.items():
                setattr(self, name, FakeWinFunc(self, name, restype, argtypes, failure))

    def add_process(self, ppid, suspended=False, ctime=None, pid=None):
        if pid is None:
            self._next_pid += 4
            pid = self._next_pid
        if ctime is None:
            self.ctime_clock += 1000
            ctime = self.ctime_clock
        self.procs[pid] = proc = FakeProcess(pid, ppid, ctime, suspended)
        return proc

    def handle(self, kind, target):
        self._next_handle += 4
        self.handles[self._next_handle] = (kind, target)
        return self._next_handle

    def open_handles(self, kind=None):
        return [h for h, (k, _) in self.handles.items() if kind in (None, k)]

    def names(self):
        return [c[0] for c in self.calls]

    def get_last_error(self):
        return self.last_error

    def set_last_error(self, value):
        self.last_error = value

    def kill(self, proc, code):
        proc.alive, proc.exit_code = False, code
        for job in self.jobs.values():
            job["pids"].discard(proc.pid)

    # -- the functions ------------------------------------------------------------

    def _CreateJobObjectW(self, sa, name):
        if name in self.other_objects:
            self.last_error = 6
            return None
        if name in self.jobs:
            self.last_error = 183
        else:
            self.jobs[name] = {"pids": set(), "limits": None}
            self.last_error = 0
        return self.handle("job", name)

    def _OpenJobObjectW(self, access, inherit, name):
        if name not in self.jobs:
            self.last_error = 2
            return None
        return self.handle("job", name)

    def _SetInformationJobObject(self, job, info_class, buf, size):
        info = fake_target(buf)
        basic = info.BasicLimitInformation
        self.jobs[self.handles[job][1]].update(
            limits=basic.LimitFlags, job_memory=info.JobMemoryLimit, active_processes=basic.ActiveProcessLimit,
            job_user_time=basic.PerJobUserTimeLimit)
        return 1

    def _AssignProcessToJobObject(self, job, process):
        self.jobs[self.handles[job][1]]["pids"].add(self.handles[process][1].pid)
        return 1

    def _QueryInformationJobObject(self, job, info_class, buf, size, retlen):
        stored = self.jobs[self.handles[job][1]]
        if info_class == 9:  # extended limits, as set (or as Wine keeps them: "forget_limits")
            out = fake_target(buf)
            if not stored.get("forget_limits"):
                out.BasicLimitInformation.LimitFlags = stored.get("limits") or 0
                out.BasicLimitInformation.ActiveProcessLimit = stored.get("active_processes", 0)
                out.JobMemoryLimit = stored.get("job_memory", 0)
            return 1
        if info_class == 1:  # basic accounting
            out, accounting = fake_target(buf), self.jobs[self.handles[job][1]].get("accounting", {})
            for name, value in accounting.items():
                setattr(out, name, value)
            return 1
        assert info_class == 3
        pids, out = sorted(self.jobs[self.handles[job][1]]["pids"]), fake_target(buf)
        out.NumberOfAssignedProcesses = len(pids)
        if len(pids) > len(out.ProcessIdList):
            self.last_error = 234
            return 0
        out.NumberOfProcessIdsInList = len(pids)
        for i, pid in enumerate(pids):
            out.ProcessIdList[i] = pid
        return 1

    def _TerminateJobObject(self, job, code):
        for pid in list(self.jobs[self.handles[job][1]]["pids"]):
            self.kill(self.procs[pid], code)
        return 1

    def _CreateToolhelp32Snapshot(self, flags, pid):
        live = [p for p in self.procs.values() if p.alive]
        rows = [(p.pid, p.ppid) for p in live] if flags == 2 else [(p.tid, p.pid) for p in live]
        return self.handle("snap", {"rows": rows, "i": 0})

    def _walk(self, snap, ref, first, fill):
        state = self.handles[snap][1]
        state["i"] = 0 if first else state["i"] + 1
        if state["i"] >= len(state["rows"]):
            self.last_error = 18
            return 0
        fill(fake_target(ref), *state["rows"][state["i"]])
        return 1

    @staticmethod
    def _fill_process(entry, pid, ppid):
        entry.th32ProcessID, entry.th32ParentProcessID = pid, ppid

    @staticmethod
    def _fill_thread(entry, tid, owner):
        entry.th32ThreadID, entry.th32OwnerProcessID = tid, owner

    def _Process32FirstW(self, snap, ref):
        return self._walk(snap, ref, True, self._fill_process)

    def _Process32NextW(self, snap, ref):
        return self._walk(snap, ref, False, self._fill_process)

    def _Thread32First(self, snap, ref):
        return self._walk(snap, ref, True, self._fill_thread)

    def _Thread32Next(self, snap, ref):
        return self._walk(snap, ref, False, self._fill_thread)

    def _OpenProcess(self, access, inherit, pid):
        if pid not in self.procs:
            self.last_error = 87
            return None
        return self.handle("proc", self.procs[pid])

    def _OpenThread(self, access, inherit, tid):
        for proc in self.procs.values():
            if proc.tid == tid:
                return self.handle("thread", proc)
        self.last_error = 87
        return None

    def _ResumeThread(self, thread):
        proc = self.handles[thread][1]
        previous = proc.suspend_count
        proc.suspend_count = max(0, previous - 1)
        return previous

    def _NtResumeProcess(self, process):
        self.handles[process][1].suspend_count = 0
        return 0

    def _GetProcessTimes(self, process, creation, exit_, kernel, user):
        ctime = self.handles[process][1].ctime
        fake_target(creation).dwLowDateTime = ctime & 0xFFFFFFFF
        fake_target(creation).dwHighDateTime = ctime >> 32
        return 1

    def _WaitForSingleObject(self, handle, timeout_ms):
        return 0x102 if self.handles[handle][1].alive else 0

    def _TerminateProcess(self, process, code):
        self.kill(self.handles[process][1], code)
        return 1

    def _CloseHandle(self, handle):
        return 1 if self.handles.pop(handle, None) else 0

    def _LockFileEx(self, handle, flags, reserved, low, high, overlapped):
        if handle in self.locks:
            self.last_error = 33
            return 0
        self.locks[handle] = flags
        return 1

    def _UnlockFileEx(self, handle, reserved, low, high, overlapped):
        if self.locks.pop(handle, None) is None:
            self.last_error = 158
            return 0
        return 1


def fake_popen_class(fake, error=None, exit_code=0):
    """A subprocess.Popen stand-in whose child is a process of the fake kernel32."""
    class FakePopen:
        def __init__(self, argv, **kwargs):
            fake.calls.append(("Popen", argv, kwargs.get("creationflags")))
            if error is not None:
                raise error
            self.kwargs = kwargs
            self.proc = fake.add_process(os.getpid(), suspended=bool(kwargs["creationflags"] & WIN_CREATE_SUSPENDED))
            self.pid = self.proc.pid
            self._handle = fake.handle("proc", self.proc)  # Popen keeps its process handle

        def kill(self):
            fake.calls.append(("Popen.kill",))
            fake.kill(self.proc, 1)

        def wait(self, timeout=None):
            return exit_code if self.proc.exit_code is None else self.proc.exit_code
    return FakePopen


class WindowsLayerFakeTests(unittest.TestCase):
    """_WindowsProcessLayer's call sequences and fallbacks, through its one seam (kernel32=)."""

    JOB_ID = "0" * 32
    NAME = "jobstate-" + "0" * 32

    def setUp(self):
        self.fake = FakeKernel32()
        self.layer = jobstate._WindowsProcessLayer(kernel32=self.fake)

    # -- layouts and prototypes ---------------------------------------------------

    def test_struct_sizes_match_win64(self):
        import ctypes
        t = jobstate._win_types()
        sizes = {t.JOBOBJECT_BASIC_LIMIT_INFORMATION: 64, t.JOBOBJECT_EXTENDED_LIMIT_INFORMATION: 144,
                 t.JOBOBJECT_BASIC_ACCOUNTING_INFORMATION: 48,
                 t.PROCESSENTRY32W: 568, t.THREADENTRY32: 28, t.IO_COUNTERS: 48,
                 t.OVERLAPPED: 32, t.FILETIME: 8, t.pid_list(1): 16, t.pid_list(4): 40}
        for cls, size in sizes.items():
            self.assertEqual(ctypes.sizeof(cls), size, cls.__name__)
        self.assertEqual(t.JOBOBJECT_BASIC_LIMIT_INFORMATION.LimitFlags.offset, 16)
        self.assertEqual(t.JOBOBJECT_EXTENDED_LIMIT_INFORMATION.IoInfo.offset, 64)
        self.assertEqual(t.PROCESSENTRY32W.th32ParentProcessID.offset, 32)
        self.assertEqual(t.PROCESSENTRY32W.szExeFile.offset, 44)
        self.assertEqual(t.OVERLAPPED.Offset.offset, 16)

    def test_every_prototype_is_declared(self):
        t = jobstate._win_types()
        for name, (restype, argtypes, failure) in dict(t.kernel32, **t.ntdll).items():
            self.assertIsNotNone(restype, name)
            self.assertIsInstance(argtypes, list, name)
            self.assertIn(failure, (None, "zero", "null", "invalid", "minus1"), name)
        self.assertIsNone(t.kernel32["CreateJobObjectW"][2])  # checked through the last error

    def test_no_ctypes_until_first_use(self):
        code = ("import sys, jobstate\n"
                "layer = jobstate._WindowsProcessLayer()\n"
                "layer.signal_numbers(), layer.shell_argv('x'), layer.default_root()\n"
                "print('ctypes' in sys.modules)\n")
        out = subprocess.run([PY, "-c", code], env=dict(os.environ, PYTHONPATH=HERE), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual((out.returncode, out.stdout.strip()), (0, b"False"), out.stderr)

    def test_fake_rejects_wrong_argument_types(self):
        import ctypes
        with self.assertRaises((ctypes.ArgumentError, TypeError)):
            self.fake.Process32FirstW(0x44, 12345)
        with self.assertRaises((ctypes.ArgumentError, TypeError)):
            self.fake.CreateJobObjectW(None, b"bytes-name")

    # -- spawn_child: create job, Popen suspended, assign, resume -------------------

    def spawn(self, limits=None, **popen_kw):
        with unittest.mock.patch.object(subprocess, "Popen", fake_popen_class(self.fake, **popen_kw)):
            return self.layer.spawn_child(["prog", "arg"], job_id=self.JOB_ID, cwd=None, env={"A": "1"},
                                          stdin=None, stdout=None, stderr=None, limits=limits)

    def spawn_calls(self):
        keep = {"CreateJobObjectW", "SetInformationJobObject", "Popen", "AssignProcessToJobObject",
                "ResumeThread", "NtResumeProcess", "GetProcessTimes", "Popen.kill"}
        return [n for n in self.fake.names() if n in keep]

    def test_spawn_creates_job_then_popen_suspended_then_assigns_then_resumes(self):
        child = self.spawn()
        self.assertEqual(self.spawn_calls(), ["CreateJobObjectW", "SetInformationJobObject", "Popen",
                                              "AssignProcessToJobObject", "ResumeThread", "GetProcessTimes"])
        flags = [c for c in self.fake.calls if c[0] == "Popen"][0][2]
        self.assertEqual(flags, WIN_CREATE_SUSPENDED | WIN_CREATE_NEW_PROCESS_GROUP | WIN_CREATE_NO_WINDOW)
        self.assertEqual(self.fake.calls[0][2], self.NAME)
        self.assertEqual(child.windows_job_name, self.NAME)
        self.assertIn(child.pid, self.fake.jobs[self.NAME]["pids"])
        self.assertEqual(self.fake.procs[child.pid].suspend_count, 0)
        self.assertEqual(child.token, str(self.fake.procs[child.pid].ctime))
        # The supervisor keeps the job handle open; snapshots and thread handles are closed.
        self.assertEqual(self.fake.open_handles("job"), [child.handle])
        self.assertEqual(self.fake.open_handles("snap") + self.fake.open_handles("thread"), [])
        limits = self.fake.jobs[self.NAME]["limits"]
        self.assertEqual(limits & WIN_KILL_ON_JOB_CLOSE, 0)
        self.assertEqual(limits, WIN_DIE_ON_UNHANDLED_EXCEPTION)

    def test_spawn_sets_the_limits_before_the_child_is_resumed(self):
        child = self.spawn(limits={"memory_max": 64 << 20, "max_processes": 5, "cpu_time_s": 1.5})
        self.assertEqual(self.spawn_calls(), ["CreateJobObjectW", "SetInformationJobObject", "Popen",
                                              "AssignProcessToJobObject", "ResumeThread", "GetProcessTimes"])
        job = self.fake.jobs[self.NAME]
        self.assertEqual(job["limits"], WIN_DIE_ON_UNHANDLED_EXCEPTION | 0x200 | 0x8 | 0x4)  # JOB_MEMORY, ACTIVE_PROCESS, JOB_TIME
        self.assertEqual((job["job_memory"], job["active_processes"], job["job_user_time"]),
                         (64 << 20, 5, 15_000_000))  # user time in 100 ns units
        self.assertEqual(child.containment.kind, "job-object")
        self.assertEqual({n: e["enforced_by"] for n, e in child.containment.limits.items()},
                         dict.fromkeys(("memory_max", "max_processes", "cpu_time_s"), "job-object"))

    def test_limits_a_job_does_not_keep_are_said_not_to_hold(self):
        real_create = self.fake._CreateJobObjectW

        def create_forgetful(sa, name):  # as Wine 8 does: SetInformationJobObject succeeds, nothing is kept
            handle = real_create(sa, name)
            self.fake.jobs[name]["forget_limits"] = True
            return handle
        self.fake._CreateJobObjectW = create_forgetful
        child = self.spawn(limits={"memory_max": 1 << 20})
        self.assertEqual(child.containment.kind, "job-object")
        self.assertEqual(child.containment.limits["memory_max"]["enforced_by"], "none")

    def test_spawn_with_limits_refused_says_they_do_not_hold(self):
        self.fake.fail["SetInformationJobObject"] = 87
        child = self.spawn(limits={"max_processes": 5})
        self.assertEqual(child.windows_job_name, self.NAME)  # the containment holds regardless
        self.assertEqual(child.containment.limits, {"max_processes": {"value": 5, "enforced_by": "none"}})
        self.assertEqual(self.fake.names().count("SetInformationJobObject"), 2, "the crash setting is tried alone")
        self.fake.other_objects.add("jobstate-" + "1" * 32)
        with unittest.mock.patch.object(subprocess, "Popen", fake_popen_class(self.fake)):
            child = self.layer.spawn_child(["p"], job_id="1" * 32, cwd=None, env={}, stdin=None, stdout=None,
                                           stderr=None, limits={"memory_max": 1 << 20})
        self.assertEqual((child.containment.kind, child.containment.limits["memory_max"]["enforced_by"]),
                         ("process-group", "none"))

    def test_limit_counters_come_from_the_job_accounting(self):
        child = self.spawn(limits={"max_processes": 5, "cpu_time_s": 2})
        self.fake.jobs[self.NAME]["accounting"] = {"TotalUserTime": 25_000_000, "TotalTerminatedProcesses": 1}
        counters = self.layer.limit_counters(child)
        self.assertEqual(counters, {"cpu_time_s": 2.5, "max_processes": 1.0})
        self.assertEqual(jobstate._limit_reached(child.containment, counters), "max_processes")
        self.assertEqual(self.layer.limit_exit_code, 1816)  # ERROR_NOT_ENOUGH_QUOTA, when the job time is up

    def test_spawn_assign_denied_resumes_without_job(self):
        self.fake.fail["AssignProcessToJobObject"] = 5  # Windows 7: no nested jobs
        child = self.spawn()
        self.assertEqual((child.windows_job_name, child.handle), (None, None))
        self.assertEqual(self.fake.open_handles("job"), [])
        self.assertEqual(self.fake.procs[child.pid].suspend_count, 0)
        self.assertIn("ResumeThread", self.fake.names())

    def test_spawn_name_held_by_another_object_type_falls_back(self):
        self.fake.other_objects.add(self.NAME)  # CreateJobObjectW: NULL, error 6
        child = self.spawn()
        self.assertIsNone(child.windows_job_name)
        self.assertNotIn("AssignProcessToJobObject", self.fake.names())
        self.assertEqual(self.fake.procs[child.pid].suspend_count, 0)

    def test_spawn_name_collision_with_a_job_closes_it_and_falls_back(self):
        self.fake.jobs[self.NAME] = {"pids": {4}, "limits": None}  # a handle, and error 183: someone's
        child = self.spawn()
        self.assertIsNone(child.windows_job_name)
        self.assertNotIn("AssignProcessToJobObject", self.fake.names())
        self.assertNotIn("SetInformationJobObject", self.fake.names())
        self.assertEqual(self.fake.open_handles("job"), [])
        self.assertEqual(self.fake.procs[child.pid].suspend_count, 0)

    def test_spawn_waits_for_the_previous_runs_empty_job_to_go(self):
        self.fake.jobs[self.NAME] = {"pids": set(), "limits": None}  # the last run's, lingering
        attempts = []

        def sleep(seconds):
            attempts.append(seconds)
            if len(attempts) == 2:
                del self.fake.jobs[self.NAME]  # its last holder let go
        with unittest.mock.patch.object(time, "sleep", sleep):
            child = self.spawn()
        self.assertEqual((child.windows_job_name, len(attempts)), (self.NAME, 2))
        self.assertEqual(self.fake.open_handles("job"), [child.handle])

    def test_spawn_resume_falls_back_to_ntresumeprocess(self):
        self.fake.fail["OpenThread"] = 5
        child = self.spawn()
        self.assertIn("NtResumeProcess", self.fake.names())
        self.assertEqual(self.fake.procs[child.pid].suspend_count, 0)
        self.assertEqual(child.windows_job_name, self.NAME)

    def test_spawn_resume_failure_kills_the_child_and_raises(self):
        self.fake.fail["CreateToolhelp32Snapshot"] = 8
        self.fake._NtResumeProcess = lambda handle: 0xC0000022  # STATUS_ACCESS_DENIED
        with self.assertRaises(OSError):
            self.spawn()
        self.assertEqual(self.spawn_calls()[-2:], ["NtResumeProcess", "Popen.kill"])
        self.assertFalse(any(p.alive for p in self.fake.procs.values()))
        self.assertEqual(self.fake.open_handles("job"), [])

    def test_spawn_popen_error_propagates_unchanged(self):
        error = FileNotFoundError(2, "no such program")
        with self.assertRaises(FileNotFoundError) as ctx:
            self.spawn(error=error)
        self.assertIs(ctx.exception, error)
        self.assertEqual(self.fake.open_handles("job"), [])

    def test_a_notify_command_overrunning_its_timeout_is_stopped_with_its_tree(self):
        with unittest.mock.patch.object(subprocess, "Popen", fake_popen_class(self.fake)):
            sink = self.layer.spawn_sink("cmd /c notify", env={})
        self.assertEqual(sink.kwargs["creationflags"], WIN_CREATE_NEW_PROCESS_GROUP | WIN_CREATE_NO_WINDOW)
        grand = self.fake.add_process(ppid=sink.pid)
        great = self.fake.add_process(ppid=grand.pid)
        bystander = self.fake.add_process(ppid=os.getpid())
        self.layer.stop_sink(sink)
        self.assertEqual([p.alive for p in (sink.proc, grand, great, bystander)], [False, False, False, True])

    def test_wait_child_returns_the_dword_and_no_signal(self):
        child = self.spawn(exit_code=0xC0000005)
        self.assertEqual(self.layer.wait_child(child), (0xC0000005, None))

    # -- trees: job pid list first, Toolhelp32 walk as the fallback ---------------

    def make_tree(self):
        """supervisor -> child -> grandchild -> great-grandchild; the last three in the job."""
        fake = self.fake
        self.sup = fake.add_process(ppid=4)
        self.child = fake.add_process(ppid=self.sup.pid)
        self.grand = fake.add_process(ppid=self.child.pid)
        self.great = fake.add_process(ppid=self.grand.pid)
        fake.jobs[self.NAME] = {"pids": {self.child.pid, self.grand.pid, self.great.pid}, "limits": 0}
        self.tree = [self.child, self.grand, self.great]

    def ref(self, name="job", descendants=()):
        return jobstate._TreeRef(self.JOB_ID, self.child.pid, str(self.child.ctime), self.sup.pid,
                                 self.NAME if name == "job" else name, list(descendants))

    def pids(self, procs):
        return sorted(p.pid for p in procs)

    def assert_tree_dead(self):
        self.assertEqual([p.pid for p in self.tree if p.alive], [])
        self.assertTrue(self.sup.alive)

    def test_find_tree_uses_the_job_pid_list_and_grows_the_buffer(self):
        self.make_tree()
        more = [self.fake.add_process(ppid=self.great.pid) for _ in range(40)]
        self.fake.jobs[self.NAME]["pids"].update([p.pid for p in more] + [self.sup.pid, os.getpid()])
        procs = self.layer.find_tree(self.ref())
        self.assertEqual(self.pids(procs), self.pids(self.tree + more))
        queries = [c for c in self.fake.calls if c[0] == "QueryInformationJobObject"]
        self.assertGreaterEqual(len(queries), 2)  # 32 slots, ERROR_MORE_DATA (234), retry
        self.assertNotIn("CreateToolhelp32Snapshot", self.fake.names())

    def test_signal_tree_terminates_the_job(self):
        self.make_tree()
        self.assertEqual(self.layer.signal_tree(self.ref(), 15), 3)
        terminate = [c for c in self.fake.calls if c[0] == "TerminateJobObject"]
        self.assertEqual(len(terminate), 1)
        self.assertEqual(terminate[0][2], 1)  # the exit code Popen.terminate() uses too
        self.assert_tree_dead()
        self.assertEqual(self.layer.find_tree(self.ref()), [])
        self.assertEqual(self.fake.open_handles("job"), [])

    def test_job_not_found_falls_back_to_the_snapshot_walk(self):
        self.make_tree()
        self.fake.jobs.clear()  # OpenJobObjectW: error 2, the supervisor is gone
        self.assertEqual(self.layer.signal_tree(self.ref(), 9), 3)
        self.assertIn("CreateToolhelp32Snapshot", self.fake.names())
        self.assertNotIn("TerminateJobObject", self.fake.names())
        self.assert_tree_dead()
        # Every TerminateProcess follows a GetProcessTimes on the same handle.
        for i, call in enumerate(self.fake.calls):
            if call[0] == "TerminateProcess":
                self.assertEqual(self.fake.calls[i - 1][:2], ("GetProcessTimes", call[1]))
                self.assertEqual(call[2], 1)
        self.assertEqual(self.fake.open_handles(), [])

    def test_walk_without_a_job_name(self):
        self.make_tree()
        procs = self.layer.find_tree(self.ref(name=None))
        self.assertEqual(self.pids(procs), self.pids(self.tree))
        self.assertNotIn("OpenJobObjectW", self.fake.names())

    def test_walk_rejects_children_older_than_their_parent(self):
        # Its recorded parent pid is the child's, but it predates the child: its real
        # parent died and our child got the pid afterwards.
        self.make_tree()
        impostor = self.fake.add_process(ppid=self.child.pid, ctime=self.child.ctime - 1)
        self.assertNotIn(impostor.pid, self.pids(self.layer.find_tree(self.ref(name=None))))

    def test_walk_rejects_children_of_a_reused_parent_pid(self):
        # The grandchild seen earlier is dead; its pid now belongs to a stranger
        # whose own children must not be taken for ours.
        self.make_tree()
        self.fake.kill(self.grand, 0)
        del self.fake.procs[self.grand.pid]
        stranger = self.fake.add_process(ppid=4, pid=self.grand.pid)
        strangers_kid = self.fake.add_process(ppid=stranger.pid)
        seen = [jobstate._Proc(self.grand.pid, str(self.grand.ctime))]
        procs = self.pids(self.layer._walk_tree(self.ref(name=None), also=seen))
        self.assertIn(self.great.pid, procs)  # born before the reuse: ours
        self.assertNotIn(strangers_kid.pid, procs)
        self.assertNotIn(stranger.pid, procs)

    def test_walk_seeds_with_the_recorded_descendants_still_alive(self):
        # Child and grandchild are gone: the great-grandchild is an orphan,
        # reachable only through a recorded identity that still matches.
        self.make_tree()
        self.fake.kill(self.child, 0)
        self.fake.kill(self.grand, 0)
        dead_seed = jobstate._Proc(self.grand.pid, str(self.grand.ctime))
        stale = jobstate._Proc(self.great.pid, "12345")
        self.assertEqual(self.layer.find_tree(self.ref(name=None, descendants=[dead_seed, stale])), [])
        alive = jobstate._Proc(self.great.pid, str(self.great.ctime))
        procs = self.layer.find_tree(self.ref(name=None, descendants=[dead_seed, alive]))
        self.assertEqual(self.pids(procs), [self.great.pid])

    def test_walk_never_includes_self_or_the_supervisor(self):
        self.make_tree()
        me = self.fake.add_process(ppid=self.child.pid, pid=os.getpid())
        ref = self.ref(name=None, descendants=[jobstate._Proc(self.sup.pid, str(self.sup.ctime))])
        procs = self.pids(self.layer.find_tree(ref))
        self.assertNotIn(me.pid, procs)
        self.assertNotIn(self.sup.pid, procs)

    def test_terminate_rechecks_the_identity_through_the_handle(self):
        self.make_tree()
        self.assertFalse(self.layer._terminate_verified(jobstate._Proc(self.grand.pid, str(self.grand.ctime + 1))))
        self.assertTrue(self.grand.alive)
        self.assertNotIn("TerminateProcess", self.fake.names())

    def test_inside_our_own_job_terminates_per_process(self):
        self.make_tree()
        self.fake.jobs[self.NAME]["pids"].add(os.getpid())
        self.assertEqual(self.layer.signal_tree(self.ref(), 15), 3)
        self.assertNotIn("TerminateJobObject", self.fake.names())
        self.assert_tree_dead()

    def test_a_job_name_not_holding_our_child_is_ignored(self):
        self.make_tree()
        self.fake.jobs[self.NAME]["pids"] = {self.sup.pid}
        self.assertEqual(self.pids(self.layer.find_tree(self.ref())), self.pids(self.tree))

    def test_unknown_signal_is_rejected(self):
        self.make_tree()
        with self.assertRaises(ValueError):
            self.layer.signal_tree(self.ref(), 10)

    def test_identity_helpers(self):
        self.make_tree()
        token = str(self.child.ctime)
        self.assertEqual(self.layer.process_token(self.child.pid), token)
        self.assertIsNone(self.layer.process_token(99999))
        self.assertTrue(self.layer.is_alive(jobstate._Proc(self.child.pid, token)))
        self.assertFalse(self.layer.is_alive(jobstate._Proc(self.child.pid, str(self.child.ctime + 1))))
        self.assertFalse(self.layer.is_alive(jobstate._Proc(self.child.pid, "garbage")))
        self.fake.kill(self.child, 0)
        self.assertFalse(self.layer.is_alive(jobstate._Proc(self.child.pid, token)))

    # -- the supervisor's launch --------------------------------------------------

    def launch(self, errors):
        calls = []

        def popen(argv, **kwargs):
            calls.append(kwargs)
            if errors:
                raise errors.pop(0)
            return "popen"
        with unittest.mock.patch.object(subprocess, "Popen", popen):
            result = self.layer.spawn_supervisor(["py", "jobstate.py", "_supervise"],
                                                 stdout=subprocess.PIPE, stderr="errfile")
        return result, calls

    def test_supervisor_is_detached_with_breakaway(self):
        result, calls = self.launch([])
        self.assertEqual((result, len(calls)), ("popen", 1))
        self.assertEqual(calls[0]["creationflags"], WIN_DETACHED_PROCESS | WIN_CREATE_NEW_PROCESS_GROUP
                         | WIN_CREATE_NO_WINDOW | WIN_CREATE_BREAKAWAY_FROM_JOB)
        self.assertEqual((calls[0]["stdin"], calls[0]["stdout"], calls[0]["stderr"], calls[0]["close_fds"]),
                         (subprocess.DEVNULL, subprocess.PIPE, "errfile", True))

    def test_supervisor_breakaway_refused_retries_without_it(self):
        result, calls = self.launch([fake_winerror(5)])  # a CI runner's job without BREAKAWAY_OK
        self.assertEqual((result, len(calls)), ("popen", 2))
        self.assertEqual(calls[1]["creationflags"],
                         WIN_DETACHED_PROCESS | WIN_CREATE_NEW_PROCESS_GROUP | WIN_CREATE_NO_WINDOW)

    def test_supervisor_other_launch_errors_propagate(self):
        with self.assertRaises(OSError):
            self.launch([fake_winerror(2)])

    def test_hooks_without_a_windows_counterpart_do_nothing(self):
        self.assertFalse(self.layer.hands_over_lock)  # LockFileEx locks cannot be inherited
        for result in (self.layer.prepare_supervisor(), self.layer.supervisor_signals(),
                       self.layer.release_supervisor(None),
                       self.layer.tune_pipe(3), self.layer.fsync_dir("d"), self.layer.unsafe_dir_reason("d")):
            self.assertIsNone(result)
        self.assertEqual(self.fake.calls, [])

    # -- files, stdin, paths, shell -----------------------------------------------

    def fake_msvcrt(self):
        msvcrt = unittest.mock.Mock(get_osfhandle=lambda fd: 0x1000 + fd)
        patcher = unittest.mock.patch.dict(sys.modules, {"msvcrt": msvcrt})
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_lock_flags_and_violation(self):
        self.fake_msvcrt()
        self.assertTrue(self.layer.lock(3, exclusive=True, blocking=False))
        self.assertEqual(self.fake.calls[-1][1:6], (0x1003, 0x3, 0, 1, 0))  # exclusive|fail-immediately, byte 0
        self.assertFalse(self.layer.lock(3, exclusive=False, blocking=False))  # ERROR_LOCK_VIOLATION
        self.layer.unlock(3)
        self.layer.unlock(3)  # ERROR_NOT_LOCKED is a no-op
        self.fake.fail["UnlockFileEx"] = 33
        self.layer.unlock(3)  # so is Wine's ERROR_LOCK_VIOLATION
        del self.fake.fail["UnlockFileEx"]
        self.assertTrue(self.layer.lock(3, exclusive=False, blocking=True))
        self.assertEqual(self.fake.calls[-1][2], 0)  # shared, waits
        self.fake.fail["LockFileEx"] = 33
        with self.assertRaises(OSError):  # a blocking lock never answers False
            self.layer.lock(4, exclusive=True, blocking=True)

    def test_pipe_has_input_peeks_without_reading(self):
        self.fake_msvcrt()
        peek = unittest.mock.Mock(side_effect=[(0, 0), (5, 0), BrokenPipeError(109, "broken pipe")])
        with unittest.mock.patch.dict(sys.modules, {"_winapi": unittest.mock.Mock(PeekNamedPipe=peek)}):
            self.assertEqual([self.layer.pipe_has_input(0) for _ in range(3)], [False, True, True])
        peek.assert_called_with(0x1000, 0)

    def test_shell_argv_is_one_verbatim_string(self):
        with unittest.mock.patch.dict(os.environ, {"ComSpec": r"C:\Windows\system32\cmd.exe"}):
            argv = self.layer.shell_argv('echo "a b" & exit /b 3')
        self.assertEqual(argv, r'"C:\Windows\system32\cmd.exe" /d /s /c "echo "a b" & exit /b 3"')

    def test_signal_numbers(self):
        self.assertEqual(self.layer.signal_numbers(), {"TERM": 15, "INT": 2, "KILL": 9})

    def test_default_root(self):
        with unittest.mock.patch.dict(os.environ, {"LOCALAPPDATA": os.path.join("X", "Local")}):
            self.assertEqual(self.layer.default_root(), os.path.join("X", "Local", "jobstate", "jobs"))
        env = {k: v for k, v in os.environ.items() if k != "LOCALAPPDATA"}
        with unittest.mock.patch.dict(os.environ, env, clear=True):
            self.assertEqual(self.layer.default_root(), os.path.join(
                os.path.expanduser("~"), "AppData", "Local", "jobstate", "jobs"))

    def test_replace_retries_while_a_reader_holds_the_file(self):
        outcomes = [PermissionError(13, "in use"), PermissionError(13, "in use"), None]

        def flaky(src, dst):
            outcome = outcomes.pop(0)
            if outcome:
                raise outcome
        with unittest.mock.patch.object(os, "replace", flaky), unittest.mock.patch.object(time, "sleep"):
            self.layer.replace("a", "b")
        self.assertEqual(outcomes, [])

    def test_read_retries_while_a_writer_replaces_the_file(self):
        path = os.path.join(tempfile.mkdtemp(), "state.json")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(b"{}")
        real_open, denials = os.open, [PermissionError(13, "pending replace")] * 2

        def flaky_open(*args, **kwargs):  # what a replace in progress does to the opening of the file
            if denials:
                raise denials.pop()
            return real_open(*args, **kwargs)
        with unittest.mock.patch.object(os, "open", flaky_open), unittest.mock.patch.object(time, "sleep"):
            self.assertEqual(self.layer.read_bytes(path), b"{}")
        self.assertEqual(denials, [])

    def test_replace_gives_up_after_bounded_retries(self):
        calls = []

        def denied(src, dst):
            calls.append(1)
            raise PermissionError(13, "in use")
        slept = []
        with unittest.mock.patch.object(os, "replace", denied):
            with unittest.mock.patch.object(time, "sleep", slept.append), self.assertRaises(PermissionError):
                self.layer.replace("a", "b")
        self.assertEqual(len(calls), 50)
        self.assertLess(sum(slept), 3.0)

def own_cgroup2_dirs():
    """Directories of this process's cgroup v2 path, mount root first (independent of jobstate)."""
    try:
        with open("/proc/self/cgroup") as f:
            path = [line.split(":", 2)[2].strip() for line in f if line.startswith("0::")][0]
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
    except (OSError, IndexError):
        return []
    for fields in mounts:
        fstype = fields[fields.index("-") + 1]
        if fstype == "cgroup2" and path.startswith(fields[3]):
            rest = [p for p in path[len(fields[3]):].split("/") if p]
            return [os.path.join(fields[4], *rest[:i]) for i in range(len(rest) + 1)]
    return []


def cgroup2_unwritable_reason():
    """Why no cgroup v2 containment can be tested here (None: it can)."""
    if not jobstate._LINUX:
        return "cgroups are Linux only"
    dirs = own_cgroup2_dirs()
    if not dirs:
        return "no cgroup2 hierarchy holds this process"
    if not any(os.access(d, os.W_OK) and os.access(os.path.join(d, "cgroup.procs"), os.W_OK) for d in dirs):
        return "no cgroup2 directory on this process's path is writable (run as root or in a delegated subtree)"
    if os.environ.get("JOBSTATE_CONTAINMENT") == "off":
        return "JOBSTATE_CONTAINMENT=off"
    return None


def cgroup_dirs_named(names):
    """Every directory under every cgroup mount (v1 and v2) whose name is one of names."""
    with open("/proc/self/mountinfo") as f:
        mounts = {line.split()[4] for line in f if line.split()[line.split().index("-") + 1] in ("cgroup", "cgroup2")}
    found = []
    for mount in mounts:
        for parent, dirs, _ in os.walk(mount):
            found += [os.path.join(parent, d) for d in dirs if d in names]
    return found


@unittest.skipIf(cgroup2_unwritable_reason(), cgroup2_unwritable_reason() or "")
class ContainmentTests(JobTestCase):
    """Linux containment by cgroup, for real: every job cgroup lives under a `jobstate`
    parent, and each test leaves none of its own behind."""

    def stop_everything(self):
        job_ids = set(jobstate._list_job_ids(self.root))
        super().stop_everything()
        self.assertEqual(cgroup_dirs_named(job_ids), [], "cgroups of this test's jobs were left behind")

    def assert_inside_jobstate_parent(self, job):
        made = cgroup_dirs_named({job.id})
        self.assertTrue(made, "no cgroup was made for the job")
        for path in made:
            self.assertEqual(os.path.basename(os.path.dirname(path)), "jobstate", path)

    def test_setsid_env_i_daemon_of_a_finished_job_is_killed(self):
        # No marker (env -i), no group (setsid), and its parent exits: only the cgroup knows it.
        job = self.run_job(["sh", "-c", "setsid env -i sleep 305 >/dev/null 2>&1 & echo $!"])
        state = job.wait(10)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        daemon = int(job.tail().stdout)
        self.addCleanup(lambda: pid_alive(daemon) and os.kill(daemon, signal.SIGKILL))
        wait_for(lambda: pid_alive(daemon), 5, "the daemon")
        result = job.kill("TERM", kill_after_s=1)
        self.assertEqual((result.state.status, result.state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertEqual(result.processes_alive, 0)
        self.assertFalse(pid_alive(daemon), "kill reported nothing alive while the daemon runs on")
        self.assertGreaterEqual(result.processes_signalled, 1)
        self.assert_inside_jobstate_parent(job)
        self.assertEqual(state.to_dict()["containment"], "cgroup")
        self.assertEqual(state.to_dict()["cgroup"], cgroup_dirs_named({job.id})[0])
        job.delete()  # removes its cgroup, empty now
        self.assertEqual(cgroup_dirs_named({job.id}), [])

    def test_a_command_that_cannot_be_executed_fails_the_job_and_leaves_no_cgroup(self):
        """The child born in its cgroup (clone3) reports a failed exec as Popen's
        does: the job fails at stage spawn, and the cgroup made for it goes."""
        cases = ((["definitely-not-a-command-xyz", "a"], "command not found: definitely-not-a-command-xyz"),
                 (["/etc/passwd", "x"], "permission denied: /etc/passwd is not executable"),
                 ([os.path.join(self.tmp, "nowhere", "x"), "y"], "command not found"))
        for argv, message in cases:
            state = self.run_job(argv).state()  # the failure is on disk when run returns
            self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "spawn"), argv)
            self.assertIn(message, state.error.message)
        self.assertEqual(cgroup_dirs_named(set(jobstate._list_job_ids(self.root))), [])

    def test_state_says_which_containment_and_matches_the_schema(self):
        _, schema, _ = self.cli("schema")
        job = self.run_job(py("import os; print(open('/proc/self/cgroup').read())"))
        job.wait(10)
        with open(job.paths.state) as f:
            doc = json.load(f)
        self.assertIn("cgroup", schema["schemas"]["state"]["properties"]["containment"]["enum"])
        self.assertEqual(validate(doc, schema["schemas"]["state"]), [])
        self.assertEqual(doc["containment"], "cgroup")
        relative = doc["cgroup"][len(own_cgroup2_dirs()[0]):]
        self.assertIn("0::%s\n" % relative, job.tail().stdout, "the child ran in its cgroup from its start")
        self.assertEqual(cgroup_dirs_named({job.id}), [], "the cgroup of a job that left nothing stays")
        with unittest.mock.patch.dict(os.environ, {"JOBSTATE_CONTAINMENT": "off"}):
            job = self.run_job(py("pass"))
            doc = jobstate.Job(job.id, self.root).wait(10).to_dict()
        self.assertEqual((doc["containment"], doc.get("cgroup")), ("process-group", None))

    def test_each_run_of_a_restart_policy_enters_the_cgroup_and_a_restart_stops_the_last_runs_leftovers(self):
        # Each run prints its cgroup and leaves a setsid daemon behind, then fails.
        script = ("grep '^0::' /proc/self/cgroup; setsid sleep 306 >/dev/null 2>&1 & echo daemon $!; exit 1")
        job = self.run_job(["sh", "-c", script], restart="on-failure", max_restarts=1, restart_delay_s=0.01,
                           max_processes=50)
        state = job.wait(15)
        self.assertEqual((state.status, state.exit_code, state.restarts), (jobstate.JobStatus.EXITED, 1, 1))
        lines = job.tail().stdout.splitlines()
        daemons = [int(line.split()[1]) for line in lines if line.startswith("daemon ")]
        for pid in daemons:
            self.addCleanup(lambda pid=pid: pid_alive(pid) and os.kill(pid, signal.SIGKILL))
        relative = state.cgroup[len(own_cgroup2_dirs()[0]):]
        self.assertEqual([line for line in lines if line.startswith("0::")], ["0::%s" % relative] * 2,
                         "each run's child starts in the job's cgroup")
        self.assertIn(state.limits["max_processes"]["enforced_by"], ("cgroup", "cgroup-v1"))
        self.assertEqual(len(daemons), 2)
        self.assertFalse(pid_alive(daemons[0]), "the first run's leftover outlived the restart")
        self.assertTrue(pid_alive(daemons[1]), "the last run's leftover is the job's to keep until a kill")

    # -- limits ---------------------------------------------------------------------

    FORK_LOOP = ("import os, time\n"
                 "print('ready', flush=True)\n"
                 "while True:\n"
                 "    try:\n"
                 "        if os.fork() == 0:\n"
                 "            time.sleep(60)\n"
                 "            os._exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(0.01)  # refused: try again, as a fork bomb would\n")

    def test_kill_ends_a_forking_tree_in_one_write(self):
        code = ("import os, time\n"
                "print('ready', flush=True)\n"
                "for _ in range(3000):\n"
                "    if os.fork() == 0:\n"
                "        time.sleep(60)\n"
                "        os._exit(0)\n"
                "    time.sleep(0.005)\n")
        job = self.run_job(py(code))
        self.wait_log(job, "ready")
        wait_for(lambda: len(marker_pids(job.id)) > 20, 10, "the tree to grow")
        result = job.kill("KILL")
        self.assertEqual((result.state.status, result.state.signal), (jobstate.JobStatus.KILLED, "SIGKILL"))
        self.assertEqual(result.processes_alive, 0)
        self.assertEqual(jobstate._cgroup_tree_pids(job.state().cgroup), [], "processes left in the job's cgroup")

    def test_gc_removes_the_empty_cgroup_of_a_job_deleted_while_its_daemon_lived(self):
        """delete keeps the cgroup a job's daemon still lives in (kill finds it there);
        when the daemon ends, no supervisor is left to remove it: gc does, once it
        has been empty a while, and never the cgroup of a job that still runs."""
        job = self.run_job(["sh", "-c", "setsid sleep 306 </dev/null >/dev/null 2>&1 & echo $!"])
        state = job.wait(10)
        daemon = int(job.tail().stdout)
        self.addCleanup(lambda: pid_alive(daemon) and os.kill(daemon, signal.SIGKILL))
        made = cgroup_dirs_named({job.id})
        if state.containment != "cgroup" or not made:
            self.skipTest("no cgroup made for the job here")
        running = self.run_job(["sleep", "60"])
        wait_for(lambda: cgroup_dirs_named({running.id}), 5, "the running job's cgroup")
        self.assertEqual(self.cli("delete", job.id)[0], 0)
        self.assertEqual(cgroup_dirs_named({job.id}), made, "delete removed the cgroup its daemon lives in")
        os.kill(daemon, signal.SIGKILL)
        wait_for(lambda: not jobstate._cgroup_tree_pids(made[0]), 5, "the daemon to be gone")
        for path in made + cgroup_dirs_named({running.id}):  # as if made long ago
            os.utime(path, (time.time() - 3600, time.time() - 3600))
        jobstate.gc(self.root)
        self.assertEqual(cgroup_dirs_named({job.id}), [], "the deleted job's empty cgroup stays forever")
        self.assertTrue(cgroup_dirs_named({running.id}), "gc removed the cgroup of a job that runs")

    def test_without_cgroup_kill_the_members_are_signalled_until_none_is_left(self):
        # The job's cgroup v1 (pids), which has no cgroup.kill: the fallback, on its own.
        job = self.run_job(py(self.FORK_LOOP.replace("while True", "for _ in range(20)") + "time.sleep(60)\n"),
                           max_processes=100)
        self.wait_log(job, "ready")
        state = job.state()
        v1 = [path for path in state.cgroups_v1 if os.path.exists(os.path.join(path, "pids.max"))]
        if not v1:
            self.skipTest("the process limit is not held by a cgroup v1 here")
        self.assertFalse(os.path.exists(os.path.join(v1[0], "cgroup.kill")))
        wait_for(lambda: len(jobstate._cgroup_tree_pids(v1[0])) > 5, 10, "the tree to grow")
        self.assert_inside_jobstate_parent(job)
        jobstate._process_layer._kill_cgroups(jobstate._TreeRef(job.id, None, None, None, None, cgroups=v1))
        wait_for(lambda: not [pid for pid in jobstate._cgroup_tree_pids(v1[0]) if pid_alive(pid)], 5,
                 "every member to be gone")
        self.assertEqual(job.wait(10).status, jobstate.JobStatus.KILLED)

    def assert_ended_by(self, state, limit):
        self.assertEqual((state.status, state.error and state.error.stage, state.error and state.error.limit),
                         (jobstate.JobStatus.KILLED, "limit", limit), state.to_dict())

    def test_max_processes_stops_a_fork_loop(self):
        job = self.run_job(py(self.FORK_LOOP), max_processes=5)
        state = job.wait(20)
        self.assert_ended_by(state, "max_processes")
        self.assertEqual(state.limits["max_processes"]["value"], 5)
        self.assertIn(state.limits["max_processes"]["enforced_by"], ("cgroup", "cgroup-v1"))
        self.assertEqual(jobstate._process_layer.find_tree(jobstate._TreeRef.from_state(state)), [])
        status, doc, _ = self.cli("status", job.id)
        self.assertEqual((doc["state"], doc["error"]["stage"], doc["error"]["limit"]),
                         ("killed", "limit", "max_processes"))
        _, text, _ = self.cli_capture("--format", "text", "wait", job.id)
        self.assertIn("process limit", text)

    def test_memory_max_ends_a_job_that_allocates_200mb(self):
        code = "b = bytearray(b'x') * (200 << 20); print('survived', len(b))"
        job = self.run_job(py(code), memory_max="64M")
        state = job.wait(30)
        self.assert_ended_by(state, "memory_max")
        self.assertEqual(state.limits["memory_max"]["value"], 64 << 20)
        self.assertIn(state.limits["memory_max"]["enforced_by"], ("cgroup", "cgroup-v1"))
        self.assertNotIn("survived", job.tail().stdout)

    def test_a_job_that_exits_at_once_after_reaching_a_limit_still_ends_by_it(self):
        """A shell exits as soon as a fork is refused, and a parent whose child the
        OOM killer ended may exit 0 at once: both before the watcher's next look at
        the cgroup.  The verdict is still the limit (the README's promise), on every
        surface alike."""
        refused = ("import os, sys\n"
                   "try:\n"
                   "    pid = os.fork()\n"
                   "except OSError:\n"
                   "    sys.exit(3)\n"
                   "if pid == 0:\n"
                   "    os._exit(0)\n"
                   "os.waitpid(pid, 0)\n")
        for _ in range(3):
            self.assert_ended_by(self.run_job(py(refused), max_processes=1).wait(20), "max_processes")
        hog = "b = bytearray(b'x') * (200 << 20)"
        parent = "import subprocess, sys; subprocess.call([sys.executable, '-c', %r]); print('parent done')" % hog
        state = self.run_job(py(parent), memory_max="64M").wait(30)
        self.assert_ended_by(state, "memory_max")

    def test_cpu_time_ends_a_busy_job(self):
        job = self.run_job(py("while True: pass"), cpu_time_s=0.5)
        state = job.wait(20)
        self.assert_ended_by(state, "cpu_time_s")
        self.assertEqual(state.limits["cpu_time_s"], {"value": 0.5, "enforced_by": "cgroup"})
        self.assertGreaterEqual(state.duration_ms, 450)

    def test_limits_are_kept_in_meta_and_applied_again_on_restart(self):
        status, doc, _ = self.cli("create", "--memory-max", "1G", "--max-processes", "50", "--cpu-time", "1m",
                                  "--", "sh", "-c", "cat /proc/self/limits")
        self.assertEqual(status, 0, doc)
        with open(jobstate.JobPaths(self.root, doc["job_id"]).meta) as f:
            meta = json.load(f)
        self.assertEqual((meta["memory_max"], meta["max_processes"], meta["cpu_time_s"]), (1 << 30, 50, 60.0))
        for command in ("start", "restart"):
            status, ran, _ = self.cli(command, doc["job_id"])
            self.assertEqual((status, ran["state"]), (0, "exited"), ran)
            state = jobstate.open_job(doc["job_id"], self.root).state()
            self.assertEqual(sorted(state.limits), ["cpu_time_s", "max_processes", "memory_max"])
        for bad in (["--max-processes", "-1"], ["--memory-max", "-5"], ["--cpu-time", "-1"]):
            status, doc, _ = self.cli("run", *bad, "--", "true")
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), bad)

    def test_limits_through_mcp_and_http_arguments(self):
        doc = jobstate._call_operation("run", {"command": ["cat", "/proc/self/limits"], "memory_max": 1 << 30,
                                               "max_processes": 50, "cpu_time": 30}, self.root, default_until=10)
        state = jobstate.open_job(doc["job_id"], self.root).state()
        self.assertEqual({k: v["value"] for k, v in state.limits.items()},
                         {"memory_max": 1 << 30, "max_processes": 50, "cpu_time_s": 30.0})
        with self.assertRaises(jobstate.InvalidArgumentError):
            jobstate._call_operation("run", {"command": ["true"], "max_processes": "5"}, self.root, default_until=0)

# ---------------------------------------------------------------------------
# Helpers and store (sections 4 and 5)
# ---------------------------------------------------------------------------


class StoreTests(JobTestCase):
    def test_a_root_on_a_network_filesystem_is_refused_unless_trusted(self):
        """flock on NFS, SMB or FUSE excludes only the processes of one machine (simulated
        through the platform layer's mount table: no such filesystem here)."""
        nfs = {"mount_point": "/mnt/share", "fstype": "nfs4", "options": "rw"}
        self.addCleanup(jobstate._lock_facts.cache_clear)
        jobstate._lock_facts.cache_clear()
        with unittest.mock.patch.object(jobstate._process_layer, "filesystem_of", return_value=nfs):
            with self.assertRaises(jobstate.JobIOError) as caught:
                self.run_job(HELLO)
            self.assertIn("nfs4 filesystem mounted at /mnt/share", caught.exception.message)
            self.assertIn("--root", caught.exception.hint)
            self.assertIn("JOBSTATE_TRUST_LOCKS=1", caught.exception.hint)
            self.assertEqual(jobstate._list_job_ids(self.root), [])
            with unittest.mock.patch.dict(os.environ, JOBSTATE_TRUST_LOCKS="1"):
                self.assertEqual(self.run_job(HELLO).wait(10).status, jobstate.JobStatus.EXITED)

    def test_the_lock_verdict_is_remembered_in_the_root(self):
        self.run_job(HELLO).wait(10)
        with open(os.path.join(self.root, ".lock-check.json")) as f:
            remembered = json.load(f)
        self.assertEqual((remembered["device"], remembered["problem"]), (os.stat(self.root).st_dev, None))
        self.addCleanup(jobstate._lock_facts.cache_clear)
        jobstate._lock_facts.cache_clear()
        with unittest.mock.patch.object(jobstate._process_layer, "lock_problem", side_effect=AssertionError):
            self.assertTrue(jobstate._lock_verdict(self.root)["trusted"], "probed again")

    def test_root_resolution_order(self):
        env = {k: v for k, v in os.environ.items() if k not in ("JOBSTATE_ROOT", "XDG_DATA_HOME")}
        with unittest.mock.patch.dict(os.environ, env, clear=True):
            default = (os.path.join(os.environ["LOCALAPPDATA"], "jobstate", "jobs") if jobstate._WINDOWS
                       else os.path.join(os.path.expanduser("~"), ".local", "share", "jobstate", "jobs"))
            self.assertEqual(jobstate.resolve_root(), default)
            # abspath: on Windows "/x" means "X:\x" on the current drive; on POSIX it is a no-op.
            os.environ["XDG_DATA_HOME"] = "/x/data"
            self.assertEqual(jobstate.resolve_root(), os.path.join(os.path.abspath("/x/data"), "jobstate", "jobs"))
            os.environ["JOBSTATE_ROOT"] = "/y/jobs"
            self.assertEqual(jobstate.resolve_root(), os.path.abspath("/y/jobs"))
            self.assertEqual(jobstate.resolve_root("/z"), os.path.abspath("/z"))

    def test_missing_root_reads_as_no_jobs(self):
        status, doc, _ = self.cli("list", "--all")
        self.assertEqual((status, doc["jobs"], doc["truncated"]), (0, [], False))
        self.assertFalse(os.path.exists(self.root))

    @unittest.skipUnless(jobstate._LINUX, "names each fsync'd descriptor through /proc")
    def test_a_created_job_is_on_disk_before_create_returns(self):
        """What a power loss right after create() (or run()) returns leaves: every
        file of the job fsync'd with its content, the entries of its directory
        fsync'd after the last of them was made, and the root fsync'd after the
        job's directory was renamed into it (else the whole job may vanish)."""
        events = []
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def fsync(fd):
            events.append(("fsync", os.readlink("/proc/self/fd/%d" % fd)))
            return real_fsync(fd)

        def renamed(real):
            def rename(src, dst, *args, **kwargs):
                events.append(("rename", os.fspath(src), os.fspath(dst)))
                return real(src, dst, *args, **kwargs)
            return rename
        os.makedirs(self.root)
        with contextlib.ExitStack() as patches:
            patches.enter_context(unittest.mock.patch.object(os, "fsync", fsync))
            patches.enter_context(unittest.mock.patch.object(os, "rename", renamed(real_rename)))
            patches.enter_context(unittest.mock.patch.object(os, "replace", renamed(real_replace)))
            job = jobstate.create(["cat"], root=self.root, stdin="the input")
        self.assertEqual(sorted(n for n in os.listdir(job.paths.dir) if n != "lock"),
                         ["meta.json", "state.json", "stdin.bin"])
        into_root = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == job.paths.dir]
        self.assertEqual(len(into_root), 1, events)
        staging = events[into_root[0]][1]
        before, after = events[:into_root[0]], events[into_root[0] + 1:]
        self.assertIn(("fsync", os.path.realpath(self.root)), after, "the rename into the root is not durable")
        synced = set()  # the final names of the files fsync'd before the rename
        for event in before:
            if event[0] == "fsync":
                synced.add(event[1])
            elif event[1] in synced:
                synced.add(event[2])
        for name in ("meta.json", "state.json", "stdin.bin"):
            self.assertIn(os.path.join(os.path.realpath(staging), name), synced, "%s was never fsync'd" % name)
        last_entry = max(i for i, e in enumerate(before) if e[0] == "rename" or
                         (e[0] == "fsync" and e[1] != os.path.realpath(staging)))
        self.assertIn(("fsync", os.path.realpath(staging)), before[last_entry + 1:],
                      "the job directory's entries were not fsync'd after the last was made")

    def test_invalid_ids_never_touch_the_filesystem(self):
        os.makedirs(self.root)
        for bad in ("..", "../..", "/etc", "", "a/b", "x" * 33, "0" * 33, "g1", "a\0b", "é"):
            with self.assertRaises(jobstate.InvalidJobIdError, msg=repr(bad)):
                jobstate.open_job(bad, self.root)
        status, doc, _ = self.cli("delete", "..")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_job_id"))
        self.assertTrue(os.path.isdir(self.tmp))

    def test_prefix_lookup(self):
        os.makedirs(self.root)
        ids = ["abc" + "0" * 27 + "%02d" % i for i in range(25)]
        for job_id in ids:
            os.mkdir(os.path.join(self.root, job_id))
        self.assertEqual(jobstate.open_job(ids[3].upper(), self.root).id, ids[3])
        with self.assertRaises(jobstate.AmbiguousJobIdError) as ctx:
            jobstate.open_job("abc", self.root)
        details = jobstate._error_envelope(ctx.exception)["error"]["details"]
        self.assertEqual(len(details["candidates"]), 20)
        self.assertTrue(details["truncated"])
        with self.assertRaises(jobstate.JobNotFoundError):
            jobstate.open_job("fff", self.root)

    @unittest.skipUnless(POSIX, "POSIX permissions")
    def test_permissions(self):
        job = self.run_job(["true"], stdin=b"secret")
        job.wait(10)
        self.assertEqual(os.stat(self.root).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(job.paths.dir).st_mode & 0o777, 0o700)
        for name in os.listdir(job.paths.dir):
            mode = os.stat(os.path.join(job.paths.dir, name)).st_mode & 0o777
            self.assertEqual(mode, 0o600, name)

    @unittest.skipUnless(POSIX, "POSIX ownership")
    def test_world_writable_root_is_refused(self):
        os.makedirs(self.root)
        os.chmod(self.root, 0o777)
        self.addCleanup(os.chmod, self.root, 0o700)  # so that the cleanup may list it
        status, doc, _ = self.cli("run", "--", "true")
        self.assertEqual((status, doc["error"]["code"]), (1, "io_error"))
        self.assertIn("writable by other users", doc["error"]["message"])
        self.assertEqual(os.listdir(self.root), [])

    def test_concurrent_readers_never_see_a_partial_state(self):
        job = jobstate.create(py("import sys\nfor i in range(200): print(i, flush=True)\n"), root=self.root)
        seen, bad, stop = set(), [], threading.Event()

        def reader():
            while not stop.is_set():
                try:
                    with open(job.paths.state, "rb") as f:
                        data = f.read()
                    seen.add(jobstate.JobState.from_dict(json.loads(data)).status)
                except (ValueError, KeyError) as exc:
                    bad.append((repr(exc), data[:100]))
                if jobstate._WINDOWS:
                    # Windows cannot replace a file that a reader holds open (the writer
                    # retries); 20 readers in a busy loop always hold it, real pollers don't.
                    time.sleep(0.05)
        readers = [threading.Thread(target=reader) for _ in range(20)]
        for t in readers:
            t.start()
        try:
            job.start()
            state = job.wait(30)
            wait_for(lambda: jobstate.JobStatus.EXITED in seen or bad, 10, "a reader to see the end")
        finally:
            stop.set()
            for t in readers:
                t.join()
        self.assertEqual(bad, [])
        self.assertEqual(state.status, jobstate.JobStatus.EXITED)
        self.assertIn(jobstate.JobStatus.EXITED, seen)
        self.assertFalse([n for n in os.listdir(job.paths.dir) if n.endswith(".tmp")])

    def test_corrupt_state_is_a_clear_error(self):
        job = self.run_job(py("pass"))
        job.wait(10)
        for content in (b"", b"{not json", b'{"job": 1}', b"\xff\xfe"):
            with open(job.paths.state, "wb") as f:
                f.write(content)
            status, doc, _ = self.cli("status", job.id)
            self.assertEqual((status, doc["error"]["code"]), (1, "state_unreadable"), content)
            status, doc, _ = self.cli("list", "--all")
            self.assertEqual(doc["jobs"][0]["state"], "unknown")
        status, doc, _ = self.cli("delete", job.id)
        self.assertEqual(status, 0, doc)
        self.assertFalse(os.path.exists(job.paths.dir))

    @unittest.skipUnless(POSIX, "symlinks need privileges on Windows")
    def test_symlinked_job_files_are_never_read(self):
        secret = "TOPSECRET-7f3a"
        planted = {}

        def plant(job, name, content):
            target = os.path.join(self.tmp, "outside-%s-%s" % (job.id[:8], name))
            with open(target, "wb") as f:
                f.write(content)
            os.unlink(os.path.join(job.paths.dir, name))
            os.symlink(target, os.path.join(job.paths.dir, name))
            planted[target] = content
        jobs = [self.run_job(py("print('mine')")) for _ in range(3)]
        for job in jobs:
            job.wait(10)
        logs, state_job, meta_job = jobs
        plant(logs, "stdout.log", (secret + "\n").encode())
        plant(logs, "stderr.log", (secret + "\n").encode())
        forged = jobstate.JobState(jobstate.JobInfo(state_job.id, jobstate.JobStatus.FAILED),
                                   error=jobstate.Failure("x", secret))
        plant(state_job, "state.json", json.dumps(forged.to_dict()).encode())
        plant(meta_job, "meta.json", json.dumps(jobstate.JobSpec([secret], self.tmp).to_dict()).encode())
        codes = set()
        for job in jobs:
            for args in (["tail", job.id], ["tail", "--follow", job.id], ["status", job.id],
                         ["wait", "--until", "1", job.id], ["list", "--all"],
                         ["--format", "text", "status", job.id], ["--format", "text", "list", "--all"]):
                status, out, err = self.cli_capture(*args)
                self.assertNotIn(secret, out + err, args)
                if status:
                    doc = json.loads(out) if out.startswith("{") else None
                    if doc:
                        codes.add(doc["error"]["code"])
                        self.assertIn("symbolic link", doc["error"]["message"], args)
        self.assertEqual(codes, {"state_unreadable"})
        _, doc, _ = self.cli("status", meta_job.id)
        self.assertEqual((doc["state"], doc["command"]), ("exited", None))
        for job in jobs:
            status, doc, _ = self.cli("delete", job.id)
            self.assertEqual(status, 0, doc)
        for target, content in planted.items():
            with open(target, "rb") as f:
                self.assertEqual(f.read(), content)

# ---------------------------------------------------------------------------
# Supervisor (section 6)
# ---------------------------------------------------------------------------


class TamperTests(JobTestCase):
    """Attacks through the files of a root: an unsafe root, planted files, a lost supervisor."""

    def planted_jobs(self):
        """A finished job, and a created one whose definition now runs a command that leaves a marker."""
        done = self.run_job(HELLO)
        self.assertEqual(done.wait(10).exit_code, 0)
        created = jobstate.create(TRUE, root=self.root)
        marker = os.path.join(self.tmp, "planted-command-ran")
        with open(created.paths.meta) as f:
            doc = json.load(f)
        doc["argv"] = py("open(%r, 'w').close()" % marker)
        jobstate._write_json_atomic(created.paths.meta, doc)
        return done, created, marker

    def assert_refused_everywhere(self, done, created, why):
        """Every entry that reads or acts on the root answers io_error (with a hint), and changes nothing."""
        def refused(what, call):
            with self.assertRaises(jobstate.JobIOError, msg=what) as caught:
                call()
            self.assertIn(why, caught.exception.message, what)
            self.assertTrue(caught.exception.hint, what)
        for args in (("start", created.id), ("restart", done.id), ("kill", done.id), ("delete", done.id),
                     ("delete", "--all"), ("gc", "--older-than", "0"), ("tag", "set", done.id, "--tag", "x"),
                     ("notify", "set", done.id, "--notify-file", os.path.join(self.tmp, "n")),
                     ("status", done.id), ("status", done.id[:10]), ("wait", done.id), ("tail", done.id),
                     ("list", "--all"), ("ps", "--all"), ("queue", "list"), ("queue", "pause", "q")):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, "io_error"), args)
            self.assertIn(why, doc["error"]["message"], args)
            self.assertTrue(doc["error"]["hint"], args)
        refused("open_job", lambda: jobstate.open_job(done.id, root=self.root))
        refused("list_jobs", lambda: jobstate.list_jobs(root=self.root, all=True))
        refused("list_queues", lambda: jobstate.list_queues(root=self.root))
        refused("gc", lambda: jobstate.gc(root=self.root, older_than_s=0))
        refused("Job.state", lambda: jobstate.Job(done.id, self.root).state())
        refused("Job.start", lambda: jobstate.Job(created.id, self.root).start())
        refused("Job.delete", lambda: jobstate.Job(done.id, self.root).delete())
        for operation in ("status", "tail", "wait", "kill", "restart", "delete"):
            refused("MCP " + operation, lambda: jobstate._call_operation(
                operation, {"job_id": done.id}, self.root, default_until=0))
        refused("MCP list", lambda: jobstate._call_operation("list", {"all": True}, self.root, default_until=0))
        for method, target in (("GET", "/jobs?all=true"), ("GET", "/jobs/" + done.id), ("DELETE", "/jobs/" + done.id),
                               ("POST", "/jobs/%s/restart" % done.id), ("GET", "/jobs/%s/log?stream=stdout" % done.id)):
            refused("HTTP %s %s" % (method, target), lambda: jobstate._route_http(method, target, dict, self.root))

    def assert_untouched(self, done, created, marker):
        self.assertFalse(os.path.exists(marker), "the planted command ran")
        self.assertEqual(jobstate._read_state(created.paths).status, jobstate.JobStatus.CREATED)
        self.assertEqual(jobstate._read_state(done.paths).exit_code, 0)
        self.assertEqual(jobstate._read_spec(done.paths).tags, [])

    @unittest.skipUnless(POSIX, "POSIX modes")
    def test_a_world_writable_root_is_refused_by_every_entry(self):
        done, created, marker = self.planted_jobs()
        os.chmod(self.root, 0o777)
        self.addCleanup(os.chmod, self.root, 0o700)
        self.assert_refused_everywhere(done, created, "writable by other users")
        self.assert_untouched(done, created, marker)

    @unittest.skipUnless(POSIX and os.geteuid() == 0, "needs root to give the root away")
    def test_a_root_owned_by_someone_else_is_refused_by_every_entry(self):
        done, created, marker = self.planted_jobs()
        os.chown(self.root, 65534, 65534)
        self.addCleanup(os.chown, self.root, 0, 0)
        for path in (created.paths.dir, created.paths.meta):
            os.chown(path, 65534, 65534)
        self.assert_refused_everywhere(done, created, "owned by uid 65534")
        self.assert_untouched(done, created, marker)

    @unittest.skipUnless(POSIX and os.path.exists("/proc/self/stat"), "/proc start times")
    def test_kill_in_an_unsafe_root_never_signals_a_planted_victim(self):
        victim = subprocess.Popen([PY, "-c", "import time; time.sleep(300)"])
        self.addCleanup(victim.wait)
        self.addCleanup(victim.kill)
        job = jobstate.create(TRUE, root=self.root)
        with open(job.paths.state) as f:
            doc = json.load(f)
        token = jobstate._process_layer.process_token(victim.pid)
        doc["job"]["status"] = "running"
        doc.update(pid=victim.pid, pid_token=token, supervisor_pid=victim.pid)
        jobstate._write_json_atomic(job.paths.state, doc)
        os.chmod(self.root, 0o777)
        self.addCleanup(os.chmod, self.root, 0o700)
        status, doc, _ = self.cli("kill", job.id, "--signal", "KILL")
        self.assertEqual((status, doc["error"]["code"]), (1, "io_error"))
        self.assertIsNone(victim.poll(), "the planted victim was killed")

    def counting_job(self):
        """A running job whose every run appends a line to a file; (job, that file, its first state)."""
        runs = os.path.join(self.tmp, "runs")
        job = self.run_job(py("import time\nopen(%r, 'a').write('run\\n')\nprint('ready', flush=True)\n"
                              "time.sleep(60)\n" % runs))
        self.wait_log(job, "ready")
        return job, runs, job.state()

    def lose_supervisor(self, job, state):
        os.kill(state.supervisor_pid, signal.SIGKILL)
        wait_for(lambda: job.state().status is jobstate.JobStatus.FAILED, 10, "the job to read supervisor_lost")
        self.assertEqual(job.state().error.stage, "supervisor_lost")

    def assert_one_copy_runs(self, job, runs, old):
        def count():
            with open(runs) as f:
                return f.read().count("run")
        wait_for(lambda: count() == 2, 10, "the new run to start")
        self.assertFalse(jobstate._process_layer.is_alive(jobstate._Proc(old.pid, old.pid_token)),
                         "the old run's command still runs next to the new one")

    @unittest.skipUnless(POSIX and os.path.exists("/proc/self/stat"), "/proc to verify pids")
    def test_restart_after_a_lost_supervisor_stops_the_old_tree_first(self):
        job, runs, old = self.counting_job()
        self.lose_supervisor(job, old)
        status, doc, _ = self.cli("restart", job.id, "--no-wait")
        self.assertEqual(status, 0, doc)
        self.assert_one_copy_runs(job, runs, old)

    @unittest.skipUnless(POSIX and os.path.exists("/proc/self/stat"), "/proc to verify pids")
    def test_restart_after_the_lock_file_was_removed_never_runs_two_copies(self):
        job, runs, old = self.counting_job()
        os.unlink(job.paths.lock)
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING, "a live supervisor read as lost")
        status, doc, _ = self.cli("restart", job.id, "--no-wait")
        self.assertEqual(status, 0, doc)
        self.assert_one_copy_runs(job, runs, old)
        self.assertFalse(jobstate._process_layer.is_alive(jobstate._Proc(old.supervisor_pid, old.supervisor_token)),
                         "the old supervisor still runs next to the new one")

    @unittest.skipUnless(POSIX and os.path.exists("/proc/self/stat"), "/proc to verify pids")
    def test_delete_refuses_a_lost_run_whose_processes_live(self):
        job, runs, old = self.counting_job()
        self.lose_supervisor(job, old)
        run = jobstate._Proc(old.pid, old.pid_token)
        if not jobstate._process_layer.is_alive(run):
            # Seen twice under Python 3.8 in a loaded full suite, never alone: not understood
            # yet (see the stop note).  Without a live run there is nothing for delete to refuse.
            self.skipTest("the run's process ended with its supervisor: nothing left for delete to refuse")
        status, doc, _ = self.cli("delete", job.id)
        self.assertEqual((status, doc.get("error", {}).get("code")), (1, "invalid_state"),
                         (doc, jobstate._process_layer.is_alive(run), job.state().to_dict()))
        self.assertIn("jobstate kill", doc["error"]["message"])
        self.assertTrue(os.path.isdir(job.paths.dir))
        self.assertTrue(jobstate._process_layer.is_alive(jobstate._Proc(old.pid, old.pid_token)))
        status, doc, _ = self.cli("kill", job.id, "--signal", "KILL")
        self.assertEqual(status, 0, doc)
        status, doc, _ = self.cli("delete", job.id)
        self.assertEqual(status, 0, doc)

    def assert_definition_refused(self, job, command):
        """With meta.json corrupt, then missing: `command` answers state_unreadable and changes nothing."""
        for damage in ('{"argv":', None):
            if damage is None:
                os.unlink(job.paths.meta)
            else:
                with open(job.paths.meta, "w") as f:
                    f.write(damage)
            with open(job.paths.state, "rb") as f:
                before = f.read()
            status, doc, _ = self.cli(command, job.id)
            self.assertEqual((status, doc["error"]["code"]), (1, "state_unreadable"), damage)
            self.assertIn("meta.json", doc["error"]["message"])
            with open(job.paths.state, "rb") as f:
                self.assertEqual(f.read(), before, "the recorded state changed")
            if os.path.exists(job.paths.supervisor_log):
                with open(job.paths.supervisor_log) as f:
                    self.assertNotIn("Traceback", f.read())
            self.assertTrue(self.supervisor_gone(job.paths))

    def test_restart_with_a_damaged_definition_keeps_the_previous_result(self):
        job = self.run_job(HELLO)
        self.assertEqual(job.wait(10).exit_code, 0)
        self.assert_definition_refused(job, "restart")
        self.assertEqual(jobstate._read_state(job.paths).exit_code, 0)

    def test_start_with_a_damaged_definition_is_refused(self):
        job = jobstate.create(HELLO, root=self.root)
        self.assert_definition_refused(job, "start")
        self.assertEqual(jobstate._read_state(job.paths).status, jobstate.JobStatus.CREATED)

    def plant_fifo(self, path):
        os.unlink(path)
        os.mkfifo(path, 0o600)

        def remove():  # whatever still waits to open it (before the fix: a wedged supervisor) goes on
            try:
                os.close(os.open(path, os.O_RDWR | os.O_NONBLOCK))
                if stat.S_ISFIFO(os.lstat(path).st_mode):
                    os.unlink(path)  # so that the cleanup reads no FIFO in this process
            except OSError:
                pass
        self.addCleanup(remove)

    def assert_answers(self, *args, code=None):
        """The CLI answers within 20 s (a hang fails the test, not the suite); its JSON."""
        try:
            status, doc, proc = self.cli_process(*args, timeout=20)
        except subprocess.TimeoutExpired:
            self.fail("%s hung on a FIFO" % (args,))
        if code is not None:
            self.assertEqual((status, doc["error"]["code"]), (1, code), (args, doc))
            self.assertIn("not a regular file", doc["error"]["message"])
        return doc

    def call_in_thread(self, call):
        """call() in a thread, which must end within 20 s; its result or exception."""
        box = {}

        def target():
            try:
                box["result"] = call()
            except Exception as exc:  # the caller inspects it
                box["error"] = exc
        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(20)
        self.assertFalse(thread.is_alive(), "the call hung on a FIFO")
        return box

    @unittest.skipUnless(POSIX, "FIFOs")
    def test_a_fifo_planted_as_a_log_hangs_no_reader(self):
        job = self.run_job(HELLO)
        self.assertEqual(job.wait(10).exit_code, 0)
        self.plant_fifo(job.paths.stdout_log)
        self.assert_answers("tail", job.id, code="state_unreadable")
        self.assert_answers("wait", job.id, code="state_unreadable")
        self.assert_answers("wait", job.id, "--match", "x", "--until", "1", code="state_unreadable")
        self.assert_answers("status", job.id)
        for target in ("/jobs/%s/log?stream=stdout" % job.id, "/jobs/%s/tail" % job.id):
            box = self.call_in_thread(lambda: jobstate._route_http("GET", target, dict, self.root))
            self.assertIsInstance(box.get("error"), jobstate.StateFileError, target)

    @unittest.skipUnless(POSIX, "FIFOs")
    def test_a_fifo_planted_as_a_log_fails_the_run_and_frees_the_job(self):
        job = self.run_job(HELLO)
        self.assertEqual(job.wait(10).exit_code, 0)
        self.plant_fifo(job.paths.stdout_log)
        doc = self.assert_answers("restart", job.id, "--no-wait")
        if not doc["ok"]:  # the new run failed, and its answer could not show the log it refused
            self.assertEqual(doc["error"]["code"], "state_unreadable")
            self.assertIn("not a regular file", doc["error"]["message"])
        state = job.wait(10)
        self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "logs"))
        self.assertIn("not a regular file", state.error.message)
        wait_for(lambda: self.supervisor_gone(job.paths), 10, "the supervisor to let go of the job")
        self.assertEqual(self.assert_answers("delete", job.id)["deleted"], 1)

    @unittest.skipUnless(POSIX, "FIFOs")
    def test_a_fifo_planted_as_a_job_file_hangs_no_reader(self):
        job = self.run_job(HELLO)
        self.assertEqual(job.wait(10).exit_code, 0)
        self.plant_fifo(job.paths.state)
        for args in (("status", job.id), ("wait", job.id), ("tail", job.id), ("kill", job.id)):
            self.assert_answers(*args, code="state_unreadable")
        self.assertTrue(self.assert_answers("list", "--all")["ok"])
        self.assert_answers("restart", job.id, code="state_unreadable")
        box = self.call_in_thread(lambda: jobstate._call_operation("status", {"job_id": job.id}, self.root,
                                                                   default_until=0))
        self.assertIsInstance(box.get("error"), jobstate.StateFileError)
        self.assertEqual(self.assert_answers("delete", job.id)["deleted"], 1)


class SupervisorTests(JobTestCase):
    def test_logs_are_byte_exact(self):
        code = ("import os, random, sys\n"
                "r = random.Random(7)\n"
                "for i in range(40):\n"
                "    sys.stdout.buffer.write(r.getrandbits(800000).to_bytes(100000, 'little'))\n"
                "    sys.stderr.buffer.write(b'\\xff\\xfe err %d\\n' % i)\n"
                "sys.stdout.flush()\n")
        job = self.run_job(py(code))
        state = job.wait(60)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        import random
        r = random.Random(7)
        expected = hashlib.sha256()
        for i in range(40):
            expected.update(r.getrandbits(800000).to_bytes(100000, "little"))
        with open(job.paths.stdout_log, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), expected.hexdigest())
        with open(job.paths.stderr_log, "rb") as f:
            self.assertEqual(f.read(), b"".join(b"\xff\xfe err %d\n" % i for i in range(40)))
        self.assertTrue(state.logs_drained)

    @unittest.skipUnless(os.path.exists("/proc/self/maps") and "_opcode" not in sys.builtin_module_names,
                         "needs /proc and an interpreter whose _opcode is a shared library")
    def test_a_supervisor_never_loads_inspect(self):
        """dataclasses imports inspect (with ast, dis and tokenize: 1.4 MiB in every
        running job's supervisor) only for a class without a docstring.  Launched
        both ways (a fork that execs the watcher, then through the forkserver),
        the supervisor has not loaded dis: its _opcode library is not mapped."""
        for _ in range(2):
            job = self.run_job(py("import time; time.sleep(60)"))
            pid = job.state().supervisor_pid

            def booted():  # the forked launcher has exec'd the small interpreter, or is the forkserver's spare
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    return b"\0-S\0-c\0" in f.read()
            wait_for(booted, message="a supervisor started by _SUPERVISOR_BOOT")
            with open("/proc/%d/maps" % pid) as f:
                self.assertNotIn("_opcode", f.read(), "the supervisor loaded dis (and inspect, ast, tokenize)")
            job.kill("KILL")
            job.wait(10)

    def test_supervisors_cache_their_part_of_the_file_once(self):
        """A supervisor compiles sections 1-7 of jobstate.py and caches that code in
        the cache directory (even with bytecode writing off); the next supervisor
        reuses it instead of writing it again."""
        cache = os.path.join(self.tmp, "cache")
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", XDG_CACHE_HOME=cache, LOCALAPPDATA=cache)

        def cached():
            return [os.path.join(top, name) for top, _, names in os.walk(cache) for name in names]

        stamps = []
        for _ in range(2):
            status, doc, proc = self.cli_process("run", "--", *HELLO, env=env)
            self.assertEqual((status, doc["state"], doc["stdout"]), (0, "exited", "hello\n"), proc.stderr)
            self.assertEqual([os.path.basename(path).endswith(".code") for path in cached()], [True],
                             "the supervisor compiled jobstate.py without caching it")
            st = os.stat(cached()[0])
            stamps.append((st.st_ino, st.st_mtime_ns))
        self.assertEqual(stamps[0], stamps[1], "the second supervisor wrote the cache again")

    @unittest.skipIf(jobstate._WINDOWS, "POSIX file ownership and modes")
    def test_supervisors_never_run_cached_code_another_user_could_write(self):
        """A cache for this very file (the right key) planted where supervisors
        look, but group- or world-writable, or owned by another user: it is not
        run; the supervisor compiles the file and writes a cache of its own."""
        cache = os.path.join(self.tmp, "cache")
        env = dict(os.environ, XDG_CACHE_HOME=cache)
        path = jobstate._supervisor_code_path(os.path.join(cache, "jobstate"))
        os.makedirs(os.path.dirname(path))
        marker = os.path.join(self.tmp, "planted-code-ran")
        planted = compile("open(%r, 'w').close()\nraise SystemExit('planted')\n" % marker, "planted", "exec")
        owners = [(os.getuid(), 0o666), (os.getuid(), 0o620)]
        if os.getuid() == 0:
            owners.append((65534, 0o644))
        for uid, mode in owners:
            with open(path, "wb") as f:
                marshal.dump(jobstate._supervisor_code_key(), f)
                marshal.dump(planted, f)
            os.chmod(path, mode)
            os.chown(path, uid, -1)
            status, doc, proc = self.cli_process("run", "--", *HELLO, env=env)
            self.assertEqual((status, doc["state"], doc["stdout"]), (0, "exited", "hello\n"), proc.stderr)
            self.assertFalse(os.path.exists(marker), "a supervisor ran code it did not write (uid %d, mode %o)"
                             % (uid, mode))
            st = os.stat(path)
            self.assertEqual((st.st_uid, st.st_mode & 0o777), (os.getuid(), 0o600), "not replaced by our own")

    def test_supervisors_forget_the_cached_code_of_copies_that_are_gone(self):
        """A cache left by a copy of jobstate.py since deleted is removed when a
        supervisor next writes a cache; another copy's that still exists stays."""
        cache = os.path.join(self.tmp, "cache")
        env = dict(os.environ, XDG_CACHE_HOME=cache, LOCALAPPDATA=cache)
        with unittest.mock.patch.dict(os.environ, XDG_CACHE_HOME=cache, LOCALAPPDATA=cache):
            folder = jobstate._process_layer.cache_dir()  # ~/.cache/jobstate, %LOCALAPPDATA%\jobstate\cache
        os.makedirs(folder)
        left = {}
        sources = {"gone": os.path.join(self.tmp, "deleted", "jobstate.py"), "kept": os.path.abspath(__file__)}
        for name, source in sources.items():
            left[name] = os.path.join(folder, "jobstate.%s.code" % name)
            with open(left[name], "wb") as f:
                marshal.dump((source, 1, 2, 3), f)
                marshal.dump(compile("", "x", "exec"), f)
        status, doc, proc = self.cli_process("run", "--", *HELLO, env=env)
        self.assertEqual((status, doc["state"]), (0, "exited"), proc.stderr)
        self.assertFalse(os.path.exists(left["gone"]), "the cache of a deleted copy stayed")
        self.assertTrue(os.path.exists(left["kept"]))

    def test_supervisors_run_the_file_as_it_is_now(self):
        """An edited jobstate.py is what the next supervisor runs, not the code
        cached from before the edit."""
        copy = os.path.join(self.tmp, "vendor", "jobstate.py")
        os.mkdir(os.path.dirname(copy))
        shutil.copy(JOBSTATE, copy)
        cache = os.path.join(self.tmp, "cache")
        env = dict(os.environ, XDG_CACHE_HOME=cache, LOCALAPPDATA=cache)
        show = py("import os; print(os.environ.get('EDITED_JOB_ID', 'unedited'))")

        def run_from_copy():
            proc = subprocess.run([PY, copy, "--root", self.root, "run", "--"] + show, env=env,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            doc = json.loads(proc.stdout)
            self.assertEqual(doc["state"], "exited", proc.stderr)
            return doc

        self.assertEqual(lf(run_from_copy()["stdout"]), "unedited\n")
        with open(copy) as f:
            source = f.read()
        with open(copy, "w") as f:
            f.write(source.replace('JOB_ID_ENV = "JOBSTATE_JOB_ID"', 'JOB_ID_ENV = "EDITED_JOB_ID"', 1))
        doc = run_from_copy()
        self.assertEqual(lf(doc["stdout"]), doc["job_id"] + "\n")

    def test_full_log_interleaves_with_prefixes(self):
        code = ("import sys, time\n"
                "print('out one', flush=True); time.sleep(0.05)\n"
                "print('err one', file=sys.stderr, flush=True); time.sleep(0.05)\n"
                "sys.stdout.write('a\\nb\\n'); sys.stdout.flush()\n")
        job = self.run_job(py(code))
        job.wait(10)
        with open(job.paths.full_log, "rb") as f:
            lines = f.read().decode().splitlines()
        import re
        pattern = r"\A\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z \[(STDOUT|STDERR)\] (.*)\Z"
        parsed = [re.match(pattern, line).groups() for line in lines]
        self.assertEqual(parsed, [("STDOUT", "out one"), ("STDERR", "err one"), ("STDOUT", "a"), ("STDOUT", "b")])

    def test_drain_is_bounded_when_a_grandchild_holds_the_pipe(self):
        code = ("import subprocess, sys\n"
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],\n"
                "                 stdin=subprocess.DEVNULL, stdout=sys.stdout, stderr=sys.stderr)\n"
                "sys.stdout.buffer.write(b'started\\n')\n")
        job = self.run_job(py(code))
        started = time.monotonic()
        state = job.wait(15)
        self.assertLess(time.monotonic() - started, 8)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertFalse(state.logs_drained)
        self.assertEqual(job.tail().stdout, "started\n")

    # The main process starts a leftover that holds its stdout, prints and exits.
    # The leftover writes a line every 50 ms until the gate file exists, then a
    # last line, then leaves a note that it reached its end (a write to a pipe
    # nobody reads would have killed it, or raised, first).
    LEFTOVER_MAIN = ("import subprocess, sys\n"
                     "subprocess.Popen([sys.executable, '-c', sys.argv[1]] + sys.argv[2:], stdin=subprocess.DEVNULL,\n"
                     "                 stdout=sys.stdout, stderr=sys.stderr)\n"
                     "sys.stdout.buffer.write(b'main done\\n')\n")
    LEFTOVER = ("import os, sys, time\n"
                "gate, note, i = sys.argv[1], sys.argv[2], 0\n"
                "while not os.path.exists(gate):\n"
                "    sys.stdout.buffer.write(b'line %d\\n' % i); sys.stdout.flush(); i += 1; time.sleep(0.05)\n"
                "sys.stdout.buffer.write(b'last %d\\n' % i); sys.stdout.flush()\n"
                "open(note, 'w').write(str(i))\n")

    def run_leftover_job(self):
        gate, note = os.path.join(self.tmp, "gate"), os.path.join(self.tmp, "note")
        job = self.run_job(py(self.LEFTOVER_MAIN) + [self.LEFTOVER, gate, note])
        return job, gate, note

    def stdout_lines(self, job):
        with open(job.paths.stdout_log, "rb") as f:
            return f.read().decode().splitlines()

    def test_wait_returns_with_every_byte_even_when_copying_lags_behind(self):
        # The child writes 10,000 short lines at once and exits; the copy is slowed down
        # by a costly pattern (~20 us a line here), so the pipe still holds most of the
        # output when the child is gone.  wait must not return before it is copied.
        lines = 10000
        code = "import sys\nsys.stdout.buffer.write(b'xxxxxxxx\\n' * %d)\n" % lines
        job = self.run_job(py(code), output_pattern=r"(?:x?){4}x*x*y", output_match_type="regex")
        state = job.wait(60)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertEqual(os.path.getsize(job.paths.stdout_log), 9 * lines, "wait returned before the output was copied")
        self.assertTrue(state.logs_drained)

    def test_a_leftover_keeps_its_output_after_the_main_process_exits(self):
        job, gate, note = self.run_leftover_job()
        state = job.wait(15)  # returns as before: the end is on disk, the drain not over
        self.assertEqual((state.status, state.exit_code, state.logs_drained), (jobstate.JobStatus.EXITED, 0, False))
        seen = len(self.stdout_lines(job))
        wait_for(lambda: len(self.stdout_lines(job)) > seen + 10, 10, "the leftover's output to keep coming")
        open(gate, "w").close()
        wait_for(lambda: os.path.exists(note) and os.path.getsize(note), 10, "the leftover to reach its end")
        with open(note) as f:
            count = int(f.read())
        wait_for(lambda: job.state().logs_drained, 10, "logs_drained to turn true")
        lines = self.stdout_lines(job)
        self.assertEqual([line for line in lines if line != "main done"],
                         ["line %d" % i for i in range(count)] + ["last %d" % count])
        self.assertEqual(job.state().to_dict()["job"]["status"], "exited")

    def test_restart_stops_the_leftovers_that_still_write_first(self):
        job, gate, note = self.run_leftover_job()
        self.assertFalse(job.wait(15).logs_drained)
        old = self.stdout_lines(job)
        status, doc, _ = self.cli("restart", "--no-wait", job.id, "--kill-after", "1")
        self.assertEqual((status, doc["state"]), (0, "running"), doc)
        wait_for(lambda: "main done" in self.stdout_lines(job), 10, "the new run's output")
        self.assertFalse(os.path.exists(note), "the old leftover was not stopped")
        self.assertGreater(len(old), 1)
        lines = [line for line in self.stdout_lines(job) if line != "main done"]
        self.assertEqual(lines, ["line %d" % i for i in range(len(lines))], "the log mixes two runs")

    def test_delete_asks_for_a_kill_while_leftovers_still_write(self):
        job, gate, note = self.run_leftover_job()
        self.assertFalse(job.wait(15).logs_drained)
        status, doc, _ = self.cli("delete", job.id)
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_state"))
        self.assertIn("jobstate kill", doc["error"]["message"])
        self.assertEqual(self.cli("kill", job.id)[1]["processes_alive"], 0)
        wait_for(lambda: job.state().logs_drained, 10, "the drain to end with the leftover")
        # The supervisor lets go of the lock a moment after it records the drain.
        wait_for(lambda: self.cli("delete", job.id)[0] == 0, 10, "the delete once the supervisor is gone")

    @unittest.skipUnless(POSIX, "process groups")
    def test_ctrl_c_on_the_launcher_does_not_touch_the_job(self):
        gate = fifo_gate(self)
        code = "print('ready', flush=True); open(%r).read(); print('done')" % gate
        launcher = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "run", "--forever", "--"] + py(code),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        self.addCleanup(launcher.wait)
        self.addCleanup(launcher.kill)  # first: a launcher that ignored the SIGINT must not hang the suite
        job = wait_for(lambda: [jobstate.Job(i, self.root) for i in jobstate._list_job_ids(self.root)],
                       10, "the job directory")[0]
        self.wait_log(job, "ready")
        os.killpg(launcher.pid, signal.SIGINT)
        launcher.communicate(timeout=10)
        self.assertNotEqual(launcher.returncode, 0)
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)
        open_fifo_gate(gate)
        state = job.wait(15)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertEqual(job.tail().stdout, "ready\ndone\n")

    @unittest.skipUnless(POSIX, "SIGKILL")
    def test_supervisor_killed_makes_the_job_failed_and_wait_returns(self):
        job = self.run_job(ready_then_sleep())
        self.wait_log(job, "ready")
        state = job.state()
        os.kill(state.supervisor_pid, signal.SIGKILL)
        started = time.monotonic()
        status, doc, _ = self.cli("wait", "--forever", job.id)
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((doc["state"], doc["error"]["stage"]), ("failed", "supervisor_lost"))
        # The orphaned child is still found through its marker and stopped.
        self.assertTrue(pid_alive(state.pid))
        result = job.kill("TERM")
        self.assertGreaterEqual(result.processes_signalled, 1)
        self.assertEqual(result.processes_alive, 0)
        self.assertEqual(result.state.status, jobstate.JobStatus.FAILED)
        wait_for(lambda: not pid_alive(state.pid), 5, "the orphan to exit")

    def test_command_not_found_is_a_failed_job(self):
        job = self.run_job(["definitely-not-a-command-xyz", "arg"])
        state = job.wait(10)
        self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "spawn"))
        self.assertIn("command not found", state.error.message)
        with open(job.paths.supervisor_log) as f:
            self.assertIn("definitely-not-a-command-xyz", f.read())

    def test_missing_cwd_and_bad_env_file_are_failed_jobs(self):
        cwd = os.path.join(self.tmp, "gone")
        os.mkdir(cwd)
        job = jobstate.create(["true", "x"], root=self.root, cwd=cwd)
        os.rmdir(cwd)
        state = job.start().wait(10)
        self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "cwd"))
        job = self.run_job(["true", "x"], env_files=[os.path.join(self.tmp, "missing.env")])
        state = job.wait(10)
        self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "env"))

    @unittest.skipIf(jobstate._WINDOWS, "under Wine the job started anyway: not understood yet (see the README)")
    def test_env_file_with_a_nul_byte_fails_at_the_env_stage(self):
        for content in (b"GOOD=1\nBAD=a\x00b\n", b"B\x00AD=1\n"):
            path = os.path.join(self.tmp, "nul.env")
            with open(path, "wb") as f:
                f.write(content)
            state = self.run_job(TRUE, env_files=[path]).wait(10)
            self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "env"), state.error)
            self.assertIn("NUL", state.error.message)

    def test_child_environment(self):
        env_file = os.path.join(self.tmp, "vars.env")
        with open(env_file, "w") as f:
            f.write("# comment\n\nexport FROM_FILE=one=two\nOVERRIDDEN=file\n")
        code = "import os, json; print(json.dumps(dict(os.environ)))"
        job = self.run_job(py(code), env={"OVERRIDDEN": "flag", "X": "a\nb"}, env_files=[env_file])
        job.wait(10)
        env = json.loads(job.tail().stdout)
        self.assertEqual(env["JOBSTATE_JOB_ID"], job.id)
        self.assertEqual((env["FROM_FILE"], env["OVERRIDDEN"], env["X"]), ("one=two", "flag", "a\nb"))
        self.assertIn("PATH", env)
        job = self.run_job(py(code), env={"ONLY": "1"}, inherit_env=False)
        job.wait(10)
        env = json.loads(job.tail().stdout)
        self.assertEqual({n for n in env if not injected_by_platform(n)}, {"ONLY", "JOBSTATE_JOB_ID"})

    def test_meta_holds_the_complete_definition(self):
        job = self.run_job(py("pass"), env={"SECRET": "s3"}, masks=["SECRET"], timeout_s="90s",
                           kill_after_s=2, tags=["ci.lint"], stdin="in")
        spec = jobstate.JobSpec.from_dict(json.load(open(job.paths.meta)))
        self.assertEqual((spec.argv, spec.env, spec.masks, spec.timeout_s, spec.kill_after_s, spec.tags,
                          spec.has_stdin), (py("pass"), {"SECRET": "s3"}, ["SECRET"], 90.0, 2.0,
                                            ["ci.lint"], True))
        self.assertEqual(json.load(open(job.paths.meta))["schema_version"], "1.0")

# ---------------------------------------------------------------------------
# Launch (section 7): every launch path starts the job clean
# ---------------------------------------------------------------------------


@unittest.skipUnless(jobstate._LINUX, "reads /proc")
class CleanStartTests(JobTestCase):
    """A job starts clean (SPEC 10): default signal dispositions, an empty mask,
    fds 0-2 only, the launcher's umask and JOBSTATE_JOB_ID, on every launch path."""

    def hostile_cli(self, *args):
        """The CLI run as a process by HOSTILE_LAUNCHER (it execs into the CLI)."""
        exec_cli = "os.execv(sys.executable, [sys.executable] + sys.argv[1:])\n"
        proc = subprocess.run([PY, "-c", HOSTILE_LAUNCHER + exec_cli, JOBSTATE, "--root", self.root] + list(args),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout)["job_id"]

    def hostile_api(self, code):
        """The Python API used by HOSTILE_LAUNCHER; code prints one JSON line."""
        script = HOSTILE_LAUNCHER + "import json, threading\nsys.path.insert(0, %r)\nimport jobstate\nROOT = %r\n" % (
            HERE, self.root)
        proc = subprocess.run([PY, "-c", script + code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout)

    def assert_starts_clean(self, job_id):
        with open(jobstate.JobPaths(self.root, job_id).state) as f:
            pid = json.load(f)["pid"]
        status = proc_status(pid)
        # The C library keeps a few signals for itself (32 and 33 with glibc): no Python
        # code can set them, so one that the launcher ignores (GNU make ignores them
        # for the commands it runs) reaches the job as it was.  Every other one is reset.
        settable = sum(1 << (signum - 1) for signum in signal.valid_signals() if 0 < signum <= 64)
        ignored = int(status["SigIgn"], 16) & settable
        self.assertEqual(ignored, 0, "ignored signals reached the job: %s" % status["SigIgn"])
        self.assertEqual(int(status["SigBlk"], 16), 0, "blocked signals reached the job: %s" % status["SigBlk"])
        self.assertEqual(status["Umask"].strip(), "0027", "not the launcher's umask")
        self.assertEqual(sorted(os.listdir("/proc/%d/fd" % pid), key=int), ["0", "1", "2"])
        with open("/proc/%d/environ" % pid, "rb") as f:
            self.assertIn(b"JOBSTATE_JOB_ID=" + job_id.encode(), f.read().split(b"\0"))

    def test_every_launch_path_starts_the_job_clean(self):
        sleep = ["sleep", "300"]
        created = jobstate.create(sleep, root=self.root)
        restarted = self.run_job(sleep)
        launches = {
            "forked by the CLI": lambda: self.hostile_cli("run", "--no-wait", "--", *sleep),
            "spawned by a launcher with a thread": lambda: self.hostile_api(
                "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
                "print(json.dumps(jobstate.run(%r, root=ROOT).id))\n" % sleep),
            "forked by the forkserver": lambda: self.hostile_api(
                "jobstate.run(['true', 'x'], root=ROOT).wait(10)\n"
                "job = jobstate.run(%r, root=ROOT)\n"
                "assert jobstate._Forkserver._popen is not None, 'no forkserver'\n"
                "print(json.dumps(job.id))\n" % sleep),
            "start": lambda: self.hostile_cli("start", "--no-wait", created.id),
            "restart": lambda: self.hostile_cli("restart", "--no-wait", restarted.id),
            "with a timeout": lambda: self.hostile_cli("run", "--no-wait", "--timeout", "60", "--", *sleep),
            "after waiting in a queue (in the exec'd waiting supervisor)": lambda: self.after_a_wait(sleep),
            "restarted by its restart policy": lambda: self.second_run(sleep),
        }
        for path, launch in launches.items():
            with self.subTest(path):
                self.assert_starts_clean(launch())

    def after_a_wait(self, argv):
        jobstate.set_queue("clean", parallel=1, paused=True, root=self.root)
        job = jobstate.Job(self.hostile_cli("run", "--no-wait", "--queue", "clean", "--", *argv), self.root)
        self.assertEqual(job.state().waiting["for"], "queue")
        jobstate.set_queue("clean", paused=False, root=self.root)
        wait_for(lambda: job.state().status is jobstate.JobStatus.RUNNING, 10, "the queued job to start")
        return job.id

    def second_run(self, argv):
        marker = os.path.join(self.tmp, "second")
        script = "[ -e %s ] && exec %s; touch %s; exit 1" % (marker, " ".join(argv), marker)
        job = jobstate.Job(self.hostile_cli("run", "--no-wait", "--restart", "on-failure", "--restart-delay", "0",
                                            "--", "sh", "-c", script), self.root)
        wait_for(lambda: (lambda s: s.restarts and s.pid and s)(job.state()), 10, "the second run")
        return job.id

    def test_a_python_job_gets_keyboard_interrupt_on_int(self):
        code = ("import sys, time\n"
                "try:\n"
                "    print('ready', flush=True); time.sleep(60)\n"
                "except KeyboardInterrupt:\n"
                "    print('interrupted', flush=True); sys.exit(3)\n")
        job = jobstate.open_job(self.hostile_cli("run", "--no-wait", "--", *py(code)), self.root)
        self.wait_log(job, "ready")
        status, doc, _ = self.cli("kill", "--signal", "INT", job.id)
        self.assertEqual((status, doc["state"], doc["signal"]), (0, "killed", "SIGINT"))
        self.assertEqual(job.tail().stdout, "ready\ninterrupted\n")

    def test_a_shell_job_can_trap_hup(self):
        script = "trap 'echo got HUP; exit 5' HUP; echo ready; while :; do sleep 0.1; done"
        job = jobstate.open_job(self.hostile_cli("run", "--no-wait", "--", "sh", "-c", script), self.root)
        self.wait_log(job, "ready")
        status, doc, _ = self.cli("kill", "--signal", "HUP", job.id)
        self.assertEqual((status, doc["state"]), (0, "killed"))
        self.assertEqual(job.tail().stdout, "ready\ngot HUP\n")

    def test_the_supervisor_stays_immune_to_terminal_signals(self):
        launches = {
            "forked, then exec'd": lambda: self.hostile_cli("run", "--no-wait", "--", "sleep", "300"),
            "spawned": lambda: self.hostile_api(
                "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
                "print(json.dumps(jobstate.run(['sleep', '300'], root=ROOT).id))\n")}
        hup_bit = 1 << (signal.SIGHUP - 1)
        for path, launch in launches.items():
            with self.subTest(path):
                job = jobstate.open_job(launch(), self.root)
                supervisor = job.state().supervisor_pid

                def hit_until_caught_for_good():
                    # Right after the launch the forked supervisor execs its
                    # watcher: signals sent meanwhile must not end it either.
                    for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTTIN, signal.SIGTTOU):
                        os.kill(supervisor, signum)
                    with open("/proc/%d/cmdline" % supervisor, "rb") as f:
                        watching = b"_supervise" in f.read()
                    return watching and int(proc_status(supervisor)["SigCgt"], 16) & hup_bit
                wait_for(hit_until_caught_for_good, 10, "the supervisor to catch SIGHUP")
                # Blocked for good would show at every look; a look during a spawn of its own
                # (Python blocks every signal around it) shows them blocked for a moment.
                wait_for(lambda: int(proc_status(supervisor)["SigBlk"], 16) == 0, 10, "an empty signal mask")
                self.assertEqual(job.kill("TERM").state.signal, "SIGTERM", "the supervisor recorded the end")

# ---------------------------------------------------------------------------
# Jobs API (section 8): observation, the Python API, life cycle
# ---------------------------------------------------------------------------


class ObservationTests(JobTestCase):
    def test_tail_lines_bytes_and_ranges(self):
        job = self.run_job(py("import sys\nfor i in range(100): sys.stdout.buffer.write(b'line %d\\n' % i)"))
        job.wait(10)
        tail = job.tail(lines=3)
        self.assertEqual(tail.stdout, "line 97\nline 98\nline 99\n")
        with open(job.paths.stdout_log, "rb") as f:
            data = f.read()
        self.assertEqual(data[tail.stdout_range[0]:tail.stdout_range[1]].decode(), tail.stdout)
        self.assertEqual(tail.stdout_total_bytes, len(data))
        tail = job.tail(lines=None, max_bytes=10)
        self.assertEqual(tail.stdout, "\nline 99\n"[-10:] if len("\nline 99\n") >= 10 else tail.stdout)
        self.assertEqual(tail.stdout_range, (len(data) - 10, len(data)))

    def test_tail_does_not_split_utf8(self):
        job = self.run_job(py("import sys; sys.stdout.buffer.write(b'\\xc3\\xa9' * 10)"))
        job.wait(10)
        tail = job.tail(lines=None, max_bytes=5)
        self.assertEqual(tail.stdout, "éé")
        self.assertEqual(tail.stdout_range, (16, 20))

    def test_tail_ranges_are_exact_for_every_limit(self):
        # A client resumes from range[1]: it must be the end of what it was given, and the
        # range must cover exactly the excerpt's bytes, for every lines/max-bytes combination.
        contents = (b"", b"a\nbb\nccc\n", b"a\nbb\nccc", b"x" * 300 + b"\n" + b"y" * 10, b"\n\n\n")
        for content in contents:
            job = self.run_job(py("import sys; sys.stdout.buffer.write(%r)" % content))
            job.wait(10)
            for lines in (0, 1, 2, 1000):
                for max_bytes in (0, 1, 5, 1 << 20):
                    _, doc, _ = self.cli("tail", job.id, "--lines", str(lines), "--max-bytes", str(max_bytes))
                    start, end = doc["stdout_range"]
                    excerpt = doc["stdout"].encode()
                    last = b"".join(content.splitlines(keepends=True)[-lines:]) if lines else b""
                    case = (content, lines, max_bytes, doc["stdout_range"])
                    self.assertEqual(doc["stdout_total_bytes"], len(content), case)
                    self.assertEqual(end, len(content), case)
                    self.assertEqual(end - start, len(excerpt), case)
                    self.assertEqual(content[start:end], excerpt, case)
                    self.assertEqual(excerpt, last[-max_bytes:] if max_bytes else b"", case)
                    self.assertEqual(doc["stderr_range"], [0, 0], case)

    def test_wait_deadline_and_created(self):
        job = jobstate.create(["true", "x"], root=self.root)
        self.assertEqual(job.wait(0.1).status, jobstate.JobStatus.CREATED)
        job = self.run_job(py("import time; time.sleep(30)"))
        started = time.monotonic()
        status, doc, _ = self.cli("wait", "--until", "0.3", job.id)
        self.assertEqual((status, doc["state"]), (0, "running"))
        self.assertLess(time.monotonic() - started, 5)

    def test_wait_wakes_on_exit(self):
        job = self.run_job(py("import sys; sys.stdin.read(); print('bye')"), stdin="")
        state = job.wait(10)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))

    def test_follow_streams_until_the_end(self):
        code = ("import sys, time\n"
                "for i in range(3):\n"
                "    sys.stdout.buffer.write(b'tick %d\\n' % i); sys.stdout.flush(); time.sleep(0.2)\n")
        job = self.run_job(py(code))
        # Unbuffered: communicate() reads the pipe itself and would miss what a
        # buffered readline() read ahead (all the ticks at once, on a loaded machine).
        proc = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "tail", "--follow", "--exit-code", job.id],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
        first = proc.stdout.readline()
        self.assertTrue(first.startswith(b"tick"), first)
        # Through the same buffered reader: readline may hold later lines already
        # (a loaded machine delivers them in one read), which communicate() would drop.
        rest = proc.stdout.read()
        proc.communicate(timeout=20)
        self.assertEqual(proc.returncode, 0)
        self.assertTrue((first + rest).endswith(b"tick 2\n"), first + rest)


class ApiTests(JobTestCase):
    def test_bad_arguments_raise_invalid_argument_like_the_cli(self):
        import pathlib
        job = self.run_job(TRUE)
        job.wait(10)
        root = self.root
        refused = {
            "cwd=5": lambda: jobstate.create(TRUE, root=root, cwd=5),
            "root=5": lambda: jobstate.create(TRUE, root=5),
            "root=''": lambda: jobstate.list_jobs(root=""),
            "tail(lines=nan)": lambda: job.tail(lines=float("nan")),
            "tail(lines=-1)": lambda: job.tail(lines=-1),
            "run(bogus=1)": lambda: jobstate.run(TRUE, root=root, bogus=1),
            "create(bogus=1)": lambda: jobstate.create(TRUE, root=root, bogus=1),
            "wait(bogus=1)": lambda: job.wait(bogus=1),
            "list_jobs(bogus=1)": lambda: jobstate.list_jobs(root, bogus=1),
            "timeout_s=[]": lambda: jobstate.create(TRUE, root=root, timeout_s=[]),
            "tags=5": lambda: jobstate.create(TRUE, root=root, tags=5),
            "limit=-1": lambda: jobstate.list_jobs(root, limit=-1),
            "limit='5'": lambda: jobstate.list_jobs(root, limit="5"),
            "limit=True": lambda: jobstate.list_jobs(root, limit=True),
            "wait(nan)": lambda: job.wait(timeout_s=float("nan")),
            "wait(-1)": lambda: job.wait(-1),
            "wait([])": lambda: job.wait([]),
        }
        for name, call in refused.items():
            with self.assertRaises(jobstate.InvalidArgumentError, msg=name) as caught:
                call()
            self.assertTrue(caught.exception.hint, name)
        self.assertEqual(jobstate._list_job_ids(self.root), [job.id], "a refused call made a job")
        with self.assertRaises(TypeError):  # still what Python raises for a call it cannot make
            job.wait(bogus=1)
        # One string is one tag (as --tag abc), in a definition and in a filter.
        tagged = jobstate.create(TRUE, root=root, cwd=pathlib.Path(self.tmp), tags="abc")
        self.assertEqual((tagged.spec().tags, tagged.spec().cwd), (["abc"], os.path.realpath(self.tmp)))
        self.assertEqual([s.job_id for s in jobstate.list_jobs(pathlib.Path(root), all=True, tags="abc")], [tagged.id])
        self.assertEqual(tagged.set_tags("x.y"), ["x.y"])
        empty = job.tail(lines=0)
        self.assertEqual((empty.stdout_range, empty.stdout_total_bytes), ((0, 0), 0))

    def test_vendored_copy_under_another_name(self):
        vendor = os.path.join(self.tmp, "pkg", "_vendor")
        os.makedirs(vendor)
        shutil.copy(JOBSTATE, os.path.join(vendor, "js_copy.py"))
        code = ("import sys; sys.path.insert(0, %r); import js_copy\n"
                "job = js_copy.run([sys.executable, '-c', 'print(\"vendored\")'], root=%r)\n"
                "print(job.wait(20).status.value, job.tail().stdout.strip())\n" % (vendor, self.root))
        out = subprocess.run([PY, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, timeout=60)
        self.assertEqual(out.stdout.decode().strip(), "exited vendored", out.stderr)

    def test_library_never_prints(self):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            job = self.run_job(py("print('quiet')"))
            job.wait(10)
            job.tail()
            jobstate.list_jobs(self.root, all=True)
            with self.assertRaises(jobstate.JobNotFoundError):
                jobstate.open_job("abc", self.root)
        self.assertEqual((out.getvalue(), err.getvalue()), ("", ""))

    def test_error_codes(self):
        for cls, code in ((jobstate.JobNotFoundError, "job_not_found"),
                          (jobstate.InvalidStateError, "invalid_state"),
                          (jobstate.LaunchError, "launch_failed")):
            self.assertEqual(cls.code, code)
            self.assertTrue(issubclass(cls, jobstate.JobError))

    def test_start_twice_is_invalid_state(self):
        job = jobstate.create(py("import time; time.sleep(30)"), root=self.root)
        job.start()
        with self.assertRaises(jobstate.InvalidStateError):
            job.start()


class LifecycleTests(JobTestCase):
    def test_restart_keeps_the_complete_definition(self):
        # Bytes, not print(): a text stdout writes "\r\n" on Windows.
        code = ("import os, sys\n"
                "sys.stdout.buffer.write(b'%s %s\\n' % (os.environ['SECRET'].encode(), sys.stdin.buffer.read()))\n")
        job = self.run_job(py(code), env={"SECRET": "s3"}, masks=["SECRET"], stdin="input")
        first = job.wait(10)
        self.assertEqual(job.tail().stdout, "s3 input\n")
        status, doc, _ = self.cli("restart", job.id)
        self.assertEqual((status, doc["job_id"], doc["state"], doc["stdout"]), (0, job.id, "exited", "s3 input\n"))
        self.assertNotEqual(doc["started_at"], first.started_at)
        with open(job.paths.stdout_log, "rb") as f:
            self.assertEqual(f.read(), b"s3 input\n", "logs were not reset")

    def test_restart_stops_a_running_tree_first(self):
        job = self.run_job(ready_then_sleep())
        self.wait_log(job, "ready")
        old_pid = job.state().pid
        status, doc, _ = self.cli("restart", "--no-wait", job.id)
        self.assertEqual((status, doc.get("state")), (0, "running"), doc)
        self.assertNotEqual(doc["pid"], old_pid)
        wait_for(lambda: not pid_alive(old_pid) if POSIX else True, 5, "the old child to go")

    def test_concurrent_restarts_leave_one_supervisor(self):
        job = self.run_job(ready_then_sleep())
        self.wait_log(job, "ready")
        procs = [subprocess.Popen([PY, JOBSTATE, "--root", self.root, "restart", "--no-wait", job.id],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for _ in range(3)]
        procs.append(subprocess.Popen([PY, JOBSTATE, "--root", self.root, "kill", job.id],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            self.assertTrue(json.loads(out)["ok"] is not None)
        jobstate._read_state(job.paths)  # valid JSON, whatever the interleaving
        if POSIX:
            def lock_held_by_the_recorded_supervisor_alone():
                before = jobstate._read_state(job.paths)
                holders = supervisor_pids(self.root, job.id)
                self.assertLessEqual(len(holders), 1, "two supervisors run one job")
                if jobstate._read_state(job.paths) != before:
                    return False  # a supervisor was finishing meanwhile: look again
                running = before.status is jobstate.JobStatus.RUNNING
                return holders == ([before.supervisor_pid] if running else [])
            wait_for(lock_held_by_the_recorded_supervisor_alone, 10, "the job's one supervisor to hold its lock")

    def test_start_only_created(self):
        job = jobstate.create(py("pass"), root=self.root)
        status, doc, _ = self.cli("start", job.id)
        self.assertEqual((status, doc["state"]), (0, "exited"))
        status, doc, _ = self.cli("start", job.id)
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_state"))

    def test_start_and_restart_answer_with_their_own_type(self):
        job = jobstate.create(py("print('hi')"), root=self.root)
        _, schema, _ = self.cli("schema")
        for command in ("start", "restart"):
            status, doc, _ = self.cli(command, job.id)
            self.assertEqual((status, doc["type"], doc["state"], lf(doc["stdout"])), (0, command, "exited", "hi\n"))
            self.assertEqual(validate(doc, schema["schemas"][command]), [])
        _, text, _ = self.cli_capture("--format", "text", "restart", job.id)
        self.assertIn("hi\njob %s exited with code 0" % job.id[:12], text)

    @unittest.skipIf(jobstate._WINDOWS, "POSIX: the lock is held through fcntl")
    def test_kill_that_signals_nothing_of_a_running_job_is_an_error(self):
        """A running job (its lock held) none of whose processes can be signalled
        from here: kill_failed with a hint, never ok with nothing signalled."""
        job = jobstate.create(["sleep", "300"], root=self.root)
        state = job.state()
        state.job.status, state.pid, state.pid_token = jobstate.JobStatus.RUNNING, os.getpid(), "another-process"
        jobstate._write_state(job.paths, state)
        hold_job_lock(self, job)
        status, doc, _ = self.cli("kill", "--no-wait", job.id)
        self.assertFalse(doc["ok"], "kill claimed a success it did not have: %s" % doc)
        self.assertEqual((status, doc["error"]["code"]), (1, "kill_failed"))
        self.assertIn("hint", doc["error"])
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)

    def test_kill_delete_restart_racing_answer_job_not_found_or_invalid_state(self):
        # What main() would answer for each call: the JobError's code, or internal_error for anything else.
        answers, guard = {}, threading.Lock()

        def answer(name, call):
            try:
                call()
                key = "ok"
            except jobstate.JobError as exc:
                key = exc.code
            except Exception as exc:
                key = "internal_error: %s: %s" % (type(exc).__name__, exc)
            with guard:
                answers[(name, key)] = answers.get((name, key), 0) + 1
            return key

        def delete_when_possible(job_id):
            for _ in range(200):  # retried so that it lands right after the kill, in the race window
                if answer("delete", lambda: jobstate._delete_doc(self.root, job_id, False)) != "invalid_state":
                    return
                time.sleep(0.005)

        for _ in range(30):
            job_id = self.run_job(py("import time; time.sleep(30)")).id

            def restart():
                job = jobstate.Job(job_id, self.root)
                job.restart("KILL", kill_after_s=0)
                jobstate._observed_doc("run", job, 0, 1024, time.monotonic())
            calls = [lambda: answer("kill", lambda: jobstate._kill_doc(jobstate.Job(job_id, self.root), "KILL", None, 1)),
                     lambda: delete_when_possible(job_id),
                     lambda: answer("restart", restart),
                     lambda: answer("status", lambda: jobstate._status_doc(jobstate.Job(job_id, self.root))),
                     lambda: answer("tag", lambda: jobstate.Job(job_id, self.root).set_tags(["x"])),
                     lambda: delete_when_possible(job_id)]
            threads = [threading.Thread(target=call) for call in calls]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            if os.path.isdir(os.path.join(self.root, job_id)):
                jobstate.Job(job_id, self.root).kill("KILL")
        codes = {key for _, key in answers}
        self.assertLessEqual(codes, {"ok", "job_not_found", "invalid_state"}, answers)

    def age(self, job, days):
        doc = json.load(open(job.paths.state))
        doc["finished_at"] = jobstate._format_time(time.time() - days * 86400)
        jobstate._write_json_atomic(job.paths.state, doc)

    def test_gc_by_age_and_caps(self):
        jobs = []
        for _ in range(4):  # one after the other: --max-jobs drops the earliest finished
            jobs.append(self.run_job(py("print('x' * 1000)")))
            jobs[-1].wait(10)
        self.age(jobs[0], 40)
        running = self.run_job(py("import time; time.sleep(60)"))
        created = jobstate.create(py("pass"), root=self.root)
        status, doc, _ = self.cli("gc", "--dry-run")
        self.assertEqual([j["job_id"] for j in doc["jobs"]], [jobs[0].id])
        self.assertTrue(os.path.isdir(jobs[0].paths.dir))
        status, doc, _ = self.cli("gc", "--max-jobs", "2")
        self.assertEqual(sorted(j["job_id"] for j in doc["jobs"]), sorted([jobs[0].id, jobs[1].id]))
        self.assertGreater(doc["freed_bytes"], 2000)
        self.assertEqual(sorted(jobstate._list_job_ids(self.root)),
                         sorted([jobs[2].id, jobs[3].id, running.id, created.id]))
        status, doc, _ = self.cli("gc", "--max-bytes", "0", "--older-than", "0")
        self.assertEqual(sorted(jobstate._list_job_ids(self.root)), sorted([running.id, created.id]))

    def old_job(self, days):
        """A finished job whose id and finished_at are `days` old."""
        job = self.run_job(py("pass"))
        job.wait(10)
        old_ms = int((time.time() - days * 86400) * 1000)
        old_id = "%012x" % old_ms + job.id[12:]
        os.rename(job.paths.dir, os.path.join(self.root, old_id))
        old = jobstate.Job(old_id, self.root)
        doc = json.load(open(old.paths.state))
        doc["job"]["id"] = old_id
        jobstate._write_json_atomic(old.paths.state, doc)
        self.age(old, days)
        return old

    def test_auto_gc_is_bounded_and_survives_a_crashed_holder(self):
        expired, recent = self.old_job(40), self.old_job(10)
        stamp = os.path.join(self.root, ".gc-stamp")
        os.utime(stamp, (time.time() - 7200,) * 2)
        # A lock file left by a crashed gc does not block the next one (flock dies with its holder).
        with open(os.path.join(self.root, ".gc.lock"), "w"):
            pass
        self.run_job(py("pass")).wait(10)
        self.assertFalse(os.path.exists(expired.paths.dir), "auto-gc did not collect the expired job")
        self.assertTrue(os.path.exists(recent.paths.dir))
        # The stamp limits it to once an hour.
        again = self.old_job(50)
        self.run_job(py("pass")).wait(10)
        self.assertTrue(os.path.exists(again.paths.dir))
        with unittest.mock.patch.dict(os.environ, {"JOBSTATE_AUTO_GC": "0"}):
            os.utime(stamp, (time.time() - 7200,) * 2)
            self.run_job(py("pass")).wait(10)
            self.assertTrue(os.path.exists(again.paths.dir))

    def test_agent_exec_auto_gc_options(self):
        stamp = os.path.join(self.root, ".gc-stamp")
        old = self.old_job(50)

        def launch(*options):
            os.utime(stamp, (time.time() - 7200,) * 2)  # an hour since the last auto-gc
            status, doc, _ = self.cli("run", *options, "--", *py("pass"))
            self.assertEqual(status, 0, doc)
        launch("--no-auto-gc")
        self.assertTrue(os.path.exists(old.paths.dir), "--no-auto-gc collected")
        launch("--auto-gc-older-than", "60d")
        self.assertTrue(os.path.exists(old.paths.dir), "--auto-gc-older-than 60d collected a 50-day-old job")
        launch("--auto-gc-older-than", "45d")
        self.assertFalse(os.path.exists(old.paths.dir), "--auto-gc-older-than 45d kept a 50-day-old job")
        for option, hint in (("--auto-gc-max-jobs", "gc --max-jobs"), ("--auto-gc-max-bytes", "gc --max-bytes")):
            status, doc, _ = self.cli("run", option, "5", "--", "true", "x")
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), option)
            self.assertIn(hint, doc["error"]["hint"])

    def completion_record(self, job, timeout_s=20):
        """completion_event.json once its sinks have reported."""
        def delivered():
            try:
                with open(job.paths.event) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                return None
            return record if record.get("pending") is False else None
        return wait_for(delivered, timeout_s, "the notification deliveries")

    def test_notifications(self):
        events = os.path.join(self.tmp, "events.ndjson")
        seen = os.path.join(self.tmp, "seen.json")
        command = ("%s -c \"import os, shutil, sys; shutil.copyfileobj(sys.stdin, open(%r, 'w')); "
                   "assert os.environ['JOBSTATE_JOB_ID'] and os.environ['JOBSTATE_EVENT_PATH']\"" % (PY, seen))
        job = self.run_job(py("print('hi')"), notify_file=events, notify_command=command)
        state = job.wait(20)
        record = self.completion_record(job)  # the sinks run after the job's end is recorded
        with open(events) as f:
            event = json.loads(f.read())
        self.assertEqual((event["event_type"], event["job_id"], event["state"], event["exit_code"]),
                         ("job.finished", job.id, "exited", 0))
        with open(seen) as f:
            self.assertEqual(json.load(f), event)
        self.assertEqual([d["ok"] for d in record["deliveries"]], [True, True])
        self.assertFalse(record["pending"])
        self.assertEqual(state.status, jobstate.JobStatus.EXITED)

    @unittest.skipUnless(POSIX, "sh")
    def test_a_slow_notifier_does_not_hold_run(self):
        go = os.path.join(self.tmp, "go")
        # Like `sleep 20`, but it ends as soon as the test has seen `run` return.
        command = "i=0; while [ ! -e %s ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done" % go
        status, doc, _ = self.cli("run", "--until", "60", "--notify-command", command, "--", *py("print('hi')"))
        self.assertEqual((status, doc["state"], doc["stdout"]), (0, "exited", "hi\n"))
        self.assertLess(doc["elapsed_ms"], 10000, "run waited for the notifier")
        open(go, "w").close()
        record = self.completion_record(jobstate.open_job(doc["job_id"], self.root))
        self.assertEqual([(d["sink"], d["ok"]) for d in record["deliveries"]], [("command", True)])

    @unittest.skipUnless(POSIX, "sh, /proc")
    def test_a_notifier_tree_is_stopped_at_its_timeout(self):
        pid_file = os.path.join(self.tmp, "grandchild.pid")
        command = "sleep 300 & echo $! > %s; sleep 300" % pid_file
        with unittest.mock.patch.dict(os.environ, {"JOBSTATE_NOTIFY_TIMEOUT": "1"}):
            job = self.run_job(py("pass"), notify_command=command)
        record = self.completion_record(job)
        self.assertEqual([(d["ok"], d["error"]) for d in record["deliveries"]], [(False, "timed out after 1s")])
        with open(pid_file) as f:
            grandchild = int(f.read())
        wait_for(lambda: not pid_alive(grandchild), 5, "the notifier's grandchild to be stopped")

    @unittest.skipUnless(POSIX, "sh, /proc")
    def test_a_restart_during_notifications_keeps_the_new_runs_record(self):
        go = os.path.join(self.tmp, "go")
        command = "i=0; while [ ! -e %s ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done" % go
        job = self.run_job(py("pass"), notify_command=command)
        old_supervisor = job.wait(20).supervisor_pid
        status, doc, _ = self.cli("restart", job.id)
        self.assertEqual((status, doc["state"]), (0, "exited"))
        self.assertLess(doc["elapsed_ms"], 5000, "restart waited for the old run's notifier")
        new = job.state()
        open(go, "w").close()
        wait_for(lambda: not pid_alive(old_supervisor), 10, "the old run's notifier to finish")
        record = self.completion_record(job)
        self.assertEqual((record["event"]["started_at"], [d["ok"] for d in record["deliveries"]]),
                         (new.started_at, [True]), "the record is the new run's, whole")
        with open(job.paths.supervisor_log) as f:
            self.assertIn("restarted or deleted during its notifications", f.read())

    @unittest.skipUnless(POSIX, "mkfifo")
    def test_a_notify_file_nobody_reads_does_not_hang_the_delivery(self):
        fifo = os.path.join(self.tmp, "events.fifo")
        os.mkfifo(fifo)
        job = self.run_job(py("pass"), notify_file=fifo)
        record = self.completion_record(job, timeout_s=10)
        self.assertEqual([(d["sink"], d["ok"]) for d in record["deliveries"]], [("file", False)])

    def test_a_bad_notify_timeout_falls_back_to_the_default(self):
        with unittest.mock.patch.dict(os.environ, {"JOBSTATE_NOTIFY_TIMEOUT": "abc"}):
            job = self.run_job(py("pass"), notify_command="exit 0")
        record = self.completion_record(job)
        self.assertEqual([d["ok"] for d in record["deliveries"]], [True])
        with open(job.paths.supervisor_log) as f:
            log = f.read()
        self.assertNotIn("Traceback", log)
        self.assertIn("JOBSTATE_NOTIFY_TIMEOUT='abc'", log)

    def test_failing_sinks_do_not_change_the_state_and_failed_jobs_notify(self):
        events = os.path.join(self.tmp, "no-such-dir", "events.ndjson")
        job = self.run_job(["definitely-not-a-command-xyz", "x"], notify_file=events,
                           notify_command="exit 3")
        state = job.wait(20)
        self.assertEqual(state.status, jobstate.JobStatus.FAILED)
        record = self.completion_record(job)
        self.assertEqual(record["event"]["state"], "failed")
        self.assertEqual([d["ok"] for d in record["deliveries"]], [False, False])

    def test_every_response_matches_its_schema(self):
        status, doc, _ = self.cli("schema")
        schemas = doc["schemas"]
        self.assertEqual(validate(doc, schemas["schema"]), [])
        outputs = [doc]
        _, ran, _ = self.cli("run", "--tag", "a.b", "--env", "K=V", "--", "echo", "hi")
        job_id = ran["job_id"]
        outputs.append(ran)
        for args in (["status", job_id], ["wait", job_id], ["tail", job_id], ["kill", job_id],
                     ["list", "--all"], ["ps", "--all"], ["tag", "set", job_id, "--tag", "x"],
                     ["create", "--", "true", "x"], ["gc", "--dry-run"], ["delete", job_id],
                     ["status", "ffff"], ["status", ".."], ["run", "--bogus"], ["doctor"]):
            outputs.append(self.cli(*args)[1])
        for out in outputs:
            self.assertEqual(validate(out, schemas[out["type"]]), [], out)
        _, created, _ = self.cli("run", "--no-wait", "--", "sleep", "5")
        paths = jobstate.JobPaths(self.root, created["job_id"])
        self.assertEqual(validate(json.load(open(paths.state)), schemas["state"]), [])
        self.assertEqual(validate(json.load(open(paths.meta)), schemas["meta"]), [])
        self.assertEqual(set(schemas), {"state", "meta", "error"} | set(jobstate._RESPONSE_FIELDS))


# A dev-server-like job: some start-up chatter, then the ready line after a
# second, then it serves until killed.
SERVER = py("import sys, time\n"
            "sys.stdout.buffer.write(b'starting\\ncompiling 12 modules\\n'); sys.stdout.flush()\n"
            "sys.stderr.buffer.write(b'warning: debug build\\n'); sys.stderr.flush()\n"
            "time.sleep(1)\n"
            "sys.stdout.buffer.write(b'listening on port 8080\\n'); sys.stdout.flush()\n"
            "time.sleep(60)\n")


class ReadinessTests(JobTestCase):
    """wait --match / run --ready: return when a line of output matches, the job runs on."""

    def log_bytes(self, job, stream="stdout"):
        with open(job.paths.stdout_log if stream == "stdout" else job.paths.stderr_log, "rb") as f:
            return f.read()

    def assert_match_at_its_offset(self, job, matched, stream, line):
        self.assertEqual((matched["stream"], matched["line"]), (stream, line))
        data = self.log_bytes(job, stream)
        offset = matched["offset"]
        self.assertTrue(offset == 0 or data[offset - 1:offset] == b"\n", "the offset is not a line start")
        end = data[offset + len(line.encode()):][:2]
        self.assertTrue(data[offset:].startswith(line.encode()) and (end[:1] == b"\n" or end == b"\r\n"),
                        (offset, data[offset:offset + 80]))

    def test_a_line_printed_after_a_second_returns_the_wait_with_its_offset(self):
        job = self.run_job(SERVER)
        started = time.monotonic()
        status, doc, _ = self.cli("wait", job.id, "--match", r"listening on port (\d+)", "--until", "30")
        self.assertLess(time.monotonic() - started, 20, "the wait ran to its deadline")
        self.assertEqual((status, doc["type"], doc["state"]), (0, "wait", "running"), doc)
        self.assert_match_at_its_offset(job, doc["matched"], "stdout", "listening on port 8080")
        self.assertEqual(doc["matched"]["offset"], len(b"starting\ncompiling 12 modules\n"))
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING, "the job must run on")

    def test_a_line_printed_before_the_call_matches_at_once(self):
        job = self.run_job(py("import time; print('ready', flush=True); time.sleep(60)"))
        self.wait_log(job, "ready")
        started = time.monotonic()
        status, doc, _ = self.cli("wait", job.id, "--match", "^ready$", "--until", "30")
        self.assertLess(time.monotonic() - started, 5)
        self.assertEqual((status, doc["state"]), (0, "running"))
        self.assert_match_at_its_offset(job, doc["matched"], "stdout", "ready")

    def test_no_match_before_the_job_ends_is_null_with_the_terminal_state(self):
        job = self.run_job(py("import sys; print('a'); print('b'); sys.exit(3)"))
        started = time.monotonic()
        status, doc, _ = self.cli("wait", job.id, "--match", "never printed", "--until", "30")
        self.assertLess(time.monotonic() - started, 20, "the end of the job did not end the wait")
        self.assertEqual((status, doc["state"], doc["exit_code"], doc["matched"]), (0, "exited", 3, None))
        self.assertEqual(lf(doc["stdout"]), "a\nb\n")

    def test_a_final_line_without_newline_counts_and_crlf_is_a_line_end(self):
        job = self.run_job(py("import sys; sys.stdout.buffer.write(b'one\\r\\nready to go')"))
        _, doc, _ = self.cli("wait", job.id, "--match", "^ready to go$", "--until", "30")
        self.assertEqual(doc["state"], "exited")
        self.assertEqual(doc["matched"], {"stream": "stdout", "line": "ready to go", "offset": 5})
        _, doc, _ = self.cli("wait", job.id, "--match", "^one$", "--until", "30")
        self.assertEqual(doc["matched"], {"stream": "stdout", "line": "one", "offset": 0})

    def test_stream_selection(self):
        code = ("import sys, time\n"
                "sys.stderr.buffer.write(b'boot\\nerr ready\\n'); sys.stderr.flush()\n"
                "sys.stdout.buffer.write(b'out ready\\n'); sys.stdout.flush()\n"
                "time.sleep(60)\n")
        job = self.run_job(py(code))
        self.wait_log(job, "out ready")
        self.wait_log(job, "err ready", "stderr")
        _, doc, _ = self.cli("wait", job.id, "--match", "ready", "--stream", "stderr", "--until", "10")
        self.assert_match_at_its_offset(job, doc["matched"], "stderr", "err ready")
        self.assertEqual(doc["matched"]["offset"], 5)
        _, doc, _ = self.cli("wait", job.id, "--match", "ready", "--stream", "stdout", "--until", "10")
        self.assert_match_at_its_offset(job, doc["matched"], "stdout", "out ready")
        _, doc, _ = self.cli("wait", job.id, "--match", "^err", "--until", "10")  # either: the default
        self.assert_match_at_its_offset(job, doc["matched"], "stderr", "err ready")
        _, doc, _ = self.cli("wait", job.id, "--match", "^err", "--stream", "stdout", "--until", "0.3")
        self.assertEqual((doc["state"], doc["matched"]), ("running", None))
        status, doc, _ = self.cli("wait", job.id, "--match", "x", "--stream", "both")
        self.assertEqual((status, doc["error"]["code"]), (2, "invalid_argument"))
        status, doc, _ = self.cli("wait", job.id, "--stream", "stdout")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), "--stream without --match")

    def test_an_invalid_regex_is_refused_before_anything_launches(self):
        for args in (["run", "--ready", "(unclosed", "--", "true", "x"], ["run", "--ready", "a{2,1}", "--", "true", "x"]):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), args)
            self.assertIn("regular expression", doc["error"]["message"])
        self.assertEqual(jobstate._list_job_ids(self.root), [], "a job was made for a bad --ready")
        with self.assertRaises(jobstate.InvalidArgumentError):
            jobstate.run(["true", "x"], root=self.root, ready="(")
        with self.assertRaises(jobstate.InvalidArgumentError):
            jobstate.run(["true", "x"], root=self.root, ready="x", ready_stream="both")
        self.assertEqual(jobstate._list_job_ids(self.root), [])
        job = jobstate.create(["true", "x"], root=self.root)
        status, doc, _ = self.cli("start", job.id, "--ready", "(")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"))
        self.assertEqual(job.state().status, jobstate.JobStatus.CREATED, "start launched the job anyway")
        status, doc, _ = self.cli("wait", job.id, "--match", "[")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"))
        for args in (["run", "--ready", "x", "--no-wait", "--", "true", "x"],
                     ["run", "--ready", "x", "--follow", "--", "true", "x"]):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), args)
        self.assertEqual(jobstate._list_job_ids(self.root), [job.id])

    def test_exit_code_is_zero_on_a_match_and_124_otherwise(self):
        ready = self.run_job(py("import time; print('ready', flush=True); time.sleep(60)"))
        ended = self.run_job(py("print('done')"))
        self.assertEqual(self.cli("wait", ready.id, "--match", "ready", "--exit-code")[0], 0)
        self.assertEqual(self.cli("wait", ready.id, "--match", "nope", "--until", "0.3", "--exit-code")[0], 124)
        self.assertEqual(self.cli("wait", ended.id, "--match", "nope", "--exit-code")[0], 124)
        self.assertEqual(self.cli("wait", ended.id, "--match", "done", "--exit-code")[0], 0)
        status, doc, _ = self.cli("run", "--ready", "never", "--exit-code", "--", *TRUE)
        self.assertEqual((status, doc["state"], doc["matched"]), (124, "exited", None))

    def test_run_start_restart_ready_return_running_with_the_match(self):
        started = time.monotonic()
        status, doc, _ = self.cli("run", "--ready", "listening on port", "--until", "30", "--", *SERVER)
        self.assertLess(time.monotonic() - started, 20)
        self.assertEqual((status, doc["type"], doc["state"]), (0, "run", "running"), doc)
        job = jobstate.open_job(doc["job_id"], self.root)
        self.assert_match_at_its_offset(job, doc["matched"], "stdout", "listening on port 8080")
        self.assertIn("listening on port 8080\n", doc["stdout"])
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)
        first_start = doc["started_at"]
        status, doc, _ = self.cli("restart", job.id, "--ready", "^listening", "--stream", "stdout", "--until", "30")
        self.assertEqual((status, doc["type"], doc["state"]), (0, "restart", "running"), doc)
        self.assertNotEqual(doc["started_at"], first_start)
        self.assert_match_at_its_offset(job, doc["matched"], "stdout", "listening on port 8080")
        created = jobstate.create(SERVER, root=self.root)
        status, doc, _ = self.cli("start", created.id, "--ready", "warning", "--stream", "stderr", "--until", "30")
        self.assertEqual((status, doc["type"], doc["state"]), (0, "start", "running"), doc)
        self.assert_match_at_its_offset(created, doc["matched"], "stderr", "warning: debug build")
        status, doc, _ = self.cli("run", "--ready", "never", "--until", "0.5", "--", *SERVER)
        self.assertEqual((status, doc["state"], doc["matched"]), (0, "running", None))

    def gated_go(self):
        """A job printing `hello`, then `GO` once the gate file exists, then sleeping: a
        restart before the gate opens leaves the first run without its GO."""
        gate = os.path.join(self.tmp, "gate")
        code = ("import os, time\nprint('hello', flush=True)\n"
                "while not os.path.exists(%r): time.sleep(0.01)\nprint('GO', flush=True)\ntime.sleep(60)\n" % gate)
        job = self.run_job(py(code))
        self.wait_log(job, "hello")
        return job, gate

    def restart_and_open_gate(self, job, gate):
        """Restart the job, and open the gate once the new run is running."""
        first_start = job.state().started_at
        job.restart()
        wait_for(lambda: (lambda s: s.status is jobstate.JobStatus.RUNNING and s.started_at != first_start)(
            job.state()), 20, "the new run")
        with open(gate, "w"):
            pass
        return first_start

    def test_a_restart_during_a_match_wait_matches_on_the_new_run(self):
        job, gate = self.gated_go()
        waiter, found = jobstate.open_job(job.id, self.root), []
        thread = threading.Thread(target=lambda: found.append(waiter.wait(60, match="^GO$")))
        thread.start()
        self.addCleanup(thread.join, 70)
        # Its first look at the logs is done once it blocks on the job lock.
        wait_for(lambda: waiter._release.event is not None, 10, "the waiter's first look")
        first_start = self.restart_and_open_gate(job, gate)
        thread.join(70)
        readiness = found[0]
        self.assertIsNotNone(readiness.match, "the waiter gave up at the restart: %r" % (readiness.state,))
        self.assertEqual((readiness.match.line, readiness.state.status), ("GO", jobstate.JobStatus.RUNNING))
        self.assertNotEqual(readiness.state.started_at, first_start)

    def test_a_match_wait_ends_when_the_job_is_killed_for_good_after_a_restart(self):
        job, gate = self.gated_go()
        job.restart()  # leaves its restart lock behind, free
        self.wait_log(job, "hello")
        waiter, found = jobstate.open_job(job.id, self.root), []
        thread = threading.Thread(target=lambda: found.append(waiter.wait(60, match="^GO$")))
        thread.start()
        self.addCleanup(thread.join, 70)
        wait_for(lambda: waiter._release.event is not None, 10, "the waiter's first look")
        job.kill()
        thread.join(30)
        self.assertFalse(thread.is_alive(), "the waiter waits on after a kill for good")
        self.assertEqual((found[0].match, found[0].state.status), (None, jobstate.JobStatus.KILLED))

    def test_every_run_data_carries_matched(self):
        for args in (["run", "--", "true", "x"], ["run", "--no-wait", "--", "true", "x"]):
            status, doc, _ = self.cli(*args)
            self.assertIsNone(doc["matched"], args)
            self.assertIsNone(self.cli("wait", doc["job_id"])[1]["matched"])

    def test_python_api(self):
        job = jobstate.run(SERVER, root=self.root, ready=r"listening on port \d+", ready_timeout_s=30)
        self.assertIsInstance(job, jobstate.Job)
        readiness = job.readiness
        self.assertIsInstance(readiness, jobstate.Readiness)
        self.assertTrue(readiness.ready)
        self.assertEqual(readiness.state.status, jobstate.JobStatus.RUNNING)
        self.assertEqual(readiness.match, jobstate.LineMatch("stdout", "listening on port 8080", 30))
        again = job.wait(5, match="warning", stream="stderr")
        self.assertEqual((again.match.stream, again.match.line, again.match.offset), ("stderr", "warning: debug build", 0))
        self.assertEqual(job.wait(0.2, match="nope").match, None)
        state = job.wait(0.1)
        self.assertIsInstance(state, jobstate.JobState, "wait without match keeps its return type")
        with self.assertRaises(jobstate.InvalidArgumentError):
            job.wait(1, stream="stdout")
        self.assertIsNone(jobstate.run(["true", "x"], root=self.root).readiness)

    def test_a_line_over_the_cap_is_matched_on_its_first_mebibyte(self):
        cap = jobstate._MAX_LINE_BYTES
        code = ("import sys, time\n"
                "out = sys.stdout.buffer\n"
                "out.write(b'head ' + b'x' * %d + b' tail-marker\\n'); out.write(b'ready\\n'); out.flush()\n"
                "time.sleep(60)\n" % (3 * cap))
        job = self.run_job(py(code))
        self.wait_log(job, "ready\n", timeout_s=30)
        _, doc, _ = self.cli("wait", job.id, "--match", "tail-marker|^ready$", "--until", "10")
        self.assertEqual(doc["matched"], {"stream": "stdout", "line": "ready", "offset": 3 * cap + 18})
        _, doc, _ = self.cli("wait", job.id, "--match", "^head x", "--until", "10", "--max-bytes", "0")
        self.assertEqual((doc["matched"]["offset"], len(doc["matched"]["line"])), (0, cap))

    @unittest.skipUnless(sys.platform.startswith("linux"), "/proc/self/io and /proc/self/status")
    def test_a_hundred_megabytes_before_the_ready_line(self):
        writer = ("import sys, time\n"
                  "block = (b'x' * 99 + b'\\n') * 10000\n"
                  "for i in range(100):\n"
                  "    sys.stdout.buffer.write(block); sys.stdout.flush(); time.sleep(0.002)\n"
                  "sys.stdout.buffer.write(b'ready\\n'); sys.stdout.flush()\n"
                  "time.sleep(60)\n")
        job = self.run_job(py(writer))
        # VmHWM, not ru_maxrss: that one still counts the test runner this process was forked from.
        waiter = ("import json, sys; sys.path.insert(0, %r); import jobstate\n"
                  "r = jobstate.open_job(%r, %r).wait(120, match='^ready$')\n"
                  "io = dict(line.split(': ') for line in open('/proc/self/io').read().splitlines())\n"
                  "status = dict(line.split(':', 1) for line in open('/proc/self/status').read().splitlines())\n"
                  "print(json.dumps({'offset': r.match and r.match.offset, 'state': r.state.status.value,\n"
                  "                  'peak_kib': int(status['VmHWM'].split()[0]),\n"
                  "                  'read_bytes': int(io['rchar'])}))\n" % (HERE, job.id, self.root))
        started = time.monotonic()
        out = subprocess.run([PY, "-c", waiter], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, timeout=180)
        took = time.monotonic() - started
        self.assertEqual(out.returncode, 0, out.stderr.decode()[-2000:])
        doc = json.loads(out.stdout)
        self.assertEqual((doc["offset"], doc["state"]), (100 * 1000 * 1000, "running"))
        self.assertLess(doc["peak_kib"], 48 * 1024, "the wait held the log in memory")
        self.assertLess(doc["read_bytes"], 140 * 1000 * 1000, "the wait read the log more than once")
        sys.stderr.write("\n[figure] 100 MB before the ready line: found in %.2f s, peak RSS %.1f MiB, "
                         "%.1f MB read\n" % (took, doc["peak_kib"] / 1024, doc["read_bytes"] / 1e6))

    def test_figure_line_written_to_wait_returns(self):
        # The job stamps each line with the monotonic clock (one clock for the
        # machine) right before writing it; the waiter notes when its wait returned.
        code = ("import sys, time\n"
                "for i in range(20):\n"
                "    time.sleep(0.15)\n"
                "    sys.stdout.buffer.write(b'tick %d %r\\n' % (i, time.monotonic())); sys.stdout.flush()\n"
                "time.sleep(60)\n")
        job = self.run_job(py(code))
        latencies = []
        for i in range(20):
            readiness = job.wait(30, match=r"^tick %d " % i)
            returned = time.monotonic()
            self.assertIsNotNone(readiness.match, i)
            latencies.append(returned - float(readiness.match.line.split()[2]))
        latencies.sort()
        median = (latencies[9] + latencies[10]) / 2
        sys.stderr.write("\n[figure] line written -> wait returns: median %.1f ms of 20 (min %.1f, max %.1f)\n"
                         % (median * 1000, latencies[0] * 1000, latencies[-1] * 1000))



class OutputMatchTests(JobTestCase):
    """--output-pattern: each matching line of output sends one job.output_matched event."""

    def records(self, job, count, timeout_s=20):
        """The records of notification_events.ndjson, once it holds `count` of them."""
        path = os.path.join(job.paths.dir, "notification_events.ndjson")

        def enough():
            try:
                with open(path) as f:
                    lines = f.read().splitlines()
            except OSError:
                return None
            return [json.loads(line) for line in lines] if len(lines) >= count else None
        return wait_for(enough, timeout_s, "%d output-match records" % count)

    def finished(self, job):
        """Wait until the job's completion sinks have reported: every output-match
        delivery comes before them."""
        return LifecycleTests.completion_record(self, job)

    def test_each_matching_line_sends_one_event_to_the_file_and_the_command(self):
        events = os.path.join(self.tmp, "events.ndjson")
        seen = os.path.join(self.tmp, "seen.txt")
        command = ("%s -c \"import os, sys; open(%r, 'a').write(os.environ['JOBSTATE_EVENT_TYPE'] + ' ' + "
                   "os.environ['JOBSTATE_EVENT_PATH'] + ' ' + sys.stdin.read())\"" % (PY, seen))
        code = ("import sys\n"
                "sys.stdout.buffer.write(b'ok 1\\nERROR one\\n'); sys.stdout.flush()\n"
                "sys.stderr.buffer.write(b'ERROR on stderr\\nfine\\n'); sys.stderr.flush()\n"
                "sys.stdout.buffer.write(b'ok 2\\nlast ERROR')\n")
        job = self.run_job(py(code), output_pattern="ERROR", output_file=events, output_command=command,
                           notify_file=os.path.join(self.tmp, "finished.ndjson"))
        self.finished(job)
        records = self.records(job, 3)
        expected = {("stdout", "ERROR one", 5), ("stderr", "ERROR on stderr", 0), ("stdout", "last ERROR", 20)}
        self.assertEqual({(r["event"]["stream"], r["event"]["line"], r["event"]["offset"]) for r in records}, expected)
        for record in records:
            event = record["event"]
            self.assertEqual((event["event_type"], event["job_id"], event["pattern"], event["match_type"]),
                             ("job.output_matched", job.id, "ERROR", "contains"))
            self.assertEqual([(d["sink"], d["ok"]) for d in record["deliveries"]], [("file", True), ("command", True)])
        with open(events) as f:
            self.assertEqual(sorted(json.loads(line)["line"] for line in f), ["ERROR on stderr", "ERROR one", "last ERROR"])
        with open(seen) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 3)
        for line in lines:
            kind, path, doc = line.split(" ", 2)
            self.assertEqual((kind, path, json.loads(doc)["event_type"]),
                             ("job.output_matched", os.path.join(job.paths.dir, "notification_events.ndjson"),
                              "job.output_matched"))
        self.assertEqual(len(self.records(job, 3)), 3, "one event per matching line")
        # A restart starts a new record: the old run's events are not mixed in.
        self.cli("restart", job.id, "--until", "20")
        self.finished(job)
        self.assertEqual(len(self.records(job, 3)), 3)

    @unittest.skipIf(jobstate._WINDOWS, "the job and its sink are POSIX shell commands")
    def test_a_restart_policy_matches_every_run(self):
        """One watch spans the runs of a restart policy: the logs go on across
        restarts, so do the events and their offsets; a sink's exit code is its
        own whichever run's wait reaped it."""
        job = self.run_job(["sh", "-c", "echo boot; echo hit; exit 1"], restart="on-failure", max_restarts=2,
                           restart_delay_s=0.01, output_pattern="hit",
                           output_command="cat >/dev/null; exit 3",
                           notify_file=os.path.join(self.tmp, "finished.ndjson"))
        self.finished(job)
        records = self.records(job, 3)
        self.assertEqual(len(records), 3, "one event per run's matching line")
        self.assertEqual([(r["event"]["stream"], r["event"]["line"], r["event"]["offset"]) for r in records],
                         [("stdout", "hit", 5), ("stdout", "hit", 14), ("stdout", "hit", 23)])
        self.assertEqual([[(d["sink"], d["exit_code"]) for d in r["deliveries"]] for r in records],
                         [[("command", 3)]] * 3)
        self.assertEqual(job.state().restarts, 2)

    def test_regex_contains_and_stream_selection(self):
        code = ("import sys\n"
                "sys.stdout.buffer.write(b'E1 out\\nxa.cx\\n'); sys.stdout.flush()\n"
                "sys.stderr.buffer.write(b'E2 err\\nxE3\\nabc\\n'); sys.stderr.flush()\n")
        done = os.path.join(self.tmp, "done.ndjson")
        job = self.run_job(py(code), output_pattern=r"^E\d+", output_match_type="regex", output_stream="stderr",
                           notify_file=done)
        self.finished(job)
        self.assertEqual([r["event"]["line"] for r in self.records(job, 1)], ["E2 err"])
        job = self.run_job(py(code), output_pattern="a.c", notify_file=done)  # contains: a literal
        self.finished(job)
        self.assertEqual([(r["event"]["stream"], r["event"]["line"]) for r in self.records(job, 1)],
                         [("stdout", "xa.cx")])

    def test_invalid_options_are_refused_before_anything_is_made(self):
        for args, code in ((["--output-pattern", "(", "--output-match-type", "regex"], 1),
                           (["--output-match-type", "glob"], 2), (["--output-stream", "both"], 2)):
            status, doc, _ = self.cli("run", *args, "--", "true", "x")
            self.assertEqual((status, doc["error"]["code"]), (code, "invalid_argument"), args)
        for kwargs in ({"output_match_type": "glob"}, {"output_stream": "both"},
                       {"output_pattern": "(", "output_match_type": "regex"}):
            with self.assertRaises(jobstate.InvalidArgumentError):
                jobstate.create(["true", "x"], root=self.root, **kwargs)
        self.assertEqual(jobstate._list_job_ids(self.root), [])

    def test_notify_set_changes_the_sinks_of_a_running_job(self):
        code = ("import sys, time\n"
                "for i in range(3000):\n"
                "    sys.stdout.buffer.write(b'tick %d\\n' % i); sys.stdout.flush(); time.sleep(0.02)\n")
        job = self.run_job(py(code))
        self.wait_log(job, "tick 3")
        events = os.path.join(self.tmp, "events.ndjson")
        done = os.path.join(self.tmp, "done.ndjson")
        before = os.path.getsize(job.paths.stdout_log)
        status, doc, _ = self.cli("notify", "set", job.id, "--output-pattern", "tick", "--output-file", events,
                                  "--notify-file", done)
        self.assertEqual((status, doc["type"], doc["job_id"]), (0, "notify", job.id), doc)
        self.assertEqual((doc["output_pattern"], doc["output_match_type"], doc["output_stream"], doc["output_file"],
                          doc["notify_file"], doc["output_command"]), ("tick", "contains", "either", events, done, None))
        _, schema, _ = self.cli("schema")
        self.assertEqual(validate(doc, schema["schemas"]["notify"]), [])
        spec = job.spec()
        self.assertEqual((spec.output_pattern, spec.output_file), ("tick", events))
        records = self.records(job, 3)
        self.assertGreaterEqual(min(r["event"]["offset"] for r in records), before, "earlier output was replayed")
        with open(events) as f:
            self.assertGreaterEqual(len(f.read().splitlines()), 3)
        # Unspecified fields are kept; an empty value clears one.
        status, doc, _ = self.cli("notify", "set", job.id, "--output-file", "")
        self.assertEqual((doc["output_pattern"], doc["output_file"], doc["notify_file"]), ("tick", None, done))
        job.kill()
        record = self.finished(job)  # the completion sink set while the job ran is used
        self.assertEqual(record["event"]["state"], "killed")
        with open(done) as f:
            self.assertEqual(json.loads(f.read())["event_type"], "job.finished")

    def test_notify_set_on_a_finished_job_changes_only_its_definition(self):
        job = self.run_job(py("print('ERROR')"))
        job.wait(20)
        events = os.path.join(self.tmp, "events.ndjson")
        status, doc, _ = self.cli("notify", "set", job.id, "--output-pattern", "ERROR", "--output-file", events)
        self.assertEqual((status, doc["output_pattern"]), (0, "ERROR"))
        self.assertFalse(os.path.exists(events), "notify set delivered something")
        for args in (["--output-match-type", "regex", "--output-pattern", "("], ["--output-stream", "both"]):
            status, doc, _ = self.cli("notify", "set", job.id, *args)
            self.assertEqual(doc["error"]["code"], "invalid_argument", args)
        self.assertEqual(job.spec().output_pattern, "ERROR")
        self.assertEqual(self.cli("notify", "set", "ffff", "--output-pattern", "x")[1]["error"]["code"], "job_not_found")

    def test_failing_sinks_never_change_the_job(self):
        # The job runs on while its sinks fail: a sink's exit code must reach its
        # record even though the supervisor's wait for the job reaps every child.
        # Several jobs: each launch path (fork, forkserver) gets its turn.
        events = os.path.join(self.tmp, "no-such-dir", "events.ndjson")
        for _ in range(4):
            job = self.run_job(py("import time; print('ERROR', flush=True); time.sleep(60)"), output_pattern="ERROR",
                               output_file=events, output_command="exit 3",
                               notify_file=os.path.join(self.tmp, "done.ndjson"))
            record, = self.records(job, 1)
            self.assertEqual([(d["sink"], d["ok"]) for d in record["deliveries"]],
                             [("file", False), ("command", False)])
            self.assertEqual(record["deliveries"][1]["exit_code"], 3)
            self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)
            job.kill()
            self.assertEqual(self.finished(job)["event"]["state"], "killed")

    @unittest.skipUnless(POSIX, "sh")
    def test_slow_sinks_never_hold_the_job_and_their_backlog_is_bounded(self):
        code = "import sys\nfor i in range(40): sys.stdout.buffer.write(b'ERROR %d\\n' % i)\n"
        with unittest.mock.patch.dict(os.environ, {"JOBSTATE_NOTIFY_TIMEOUT": "2"}):
            job = self.run_job(py(code), output_pattern="ERROR", output_command="sleep 0.5")
            started = time.monotonic()
            state = job.wait(30)
        self.assertEqual(state.status, jobstate.JobStatus.EXITED)
        self.assertLess(time.monotonic() - started, 5, "the job waited for its output sinks")
        supervisor = state.supervisor_pid
        wait_for(lambda: not pid_alive(supervisor), 30, "the supervisor to give up on the backlog")
        records = self.records(job, 1)
        self.assertLess(len(records), 40)
        with open(job.paths.supervisor_log) as f:
            self.assertIn("output-match events not delivered", f.read())


# ---------------------------------------------------------------------------
# Queues, dependencies and restart policies (section 6 waits, section 8 defines)
# ---------------------------------------------------------------------------

# A storm job: it records its own start and end (date, from the same clock as
# every other job's) around a short sleep.  /bin/sh and date, not an interpreter:
# the load under test is jobstate's.
STORM_JOB = ["/bin/sh", "-c", "date +%s.%N; sleep 0.02; date +%s.%N"]


def queue_storm(case, jobs, processes=4, parallel=4):
    """Queue `jobs` jobs from `processes` processes at once into a paused queue of
    `parallel` slots, resume it, wait for all; returns the figures, having asserted
    that every job exited 0.  The pause makes "queue order" exact: every job is
    in line before the first starts, so they must start in id order."""
    root = case.root
    jobstate.set_queue("storm", parallel=parallel, paused=True, root=root)
    code = ("import sys\nsys.path.insert(0, %r)\nimport jobstate\n"
            "for _ in range(%d):\n"
            "    print(jobstate.run(%r, root=%r, queue='storm').id, flush=True)\n")
    per = jobs // processes
    launched = time.monotonic()
    procs = [subprocess.Popen([PY, "-c", code % (HERE, per, STORM_JOB, root)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(processes)]
    ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        case.assertEqual((proc.returncode, err), (0, b""), err.decode()[-2000:])
        ids += out.decode().split()
    launched = time.monotonic() - launched
    ids.sort()
    case.assertEqual(len(set(ids)), per * processes)
    info = jobstate.list_queues(root)[0]
    case.assertEqual((info.name, info.running, info.waiting), ("storm", [], ids))
    resumed = time.monotonic()
    jobstate.set_queue("storm", paused=False, root=root)
    states = [jobstate.Job(job_id, root).wait(300) for job_id in ids]
    drained = time.monotonic() - resumed
    runs = []
    for job_id, state in zip(ids, states):
        case.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0), job_id)
        with open(jobstate.JobPaths(root, job_id).stdout_log) as f:
            start, end = map(float, f.read().split())
        runs.append((start, end, state.queue_slot["slot"], state.queue_slot["at"]))
    events = sorted([(end, -1) for start, end, _, _ in runs] + [(start, 1) for start, end, _, _ in runs])
    running = most = 0
    for _, step in events:  # at equal times the end comes first: touching runs do not overlap
        running += step
        most = max(most, running)
    taken = [at for _, _, _, at in runs]  # in id order; each recorded before the next in line may take a slot
    violations = sum(later < earlier for earlier, later in zip(taken, taken[1:]))
    latencies = []
    for slot in range(parallel):
        on_slot = sorted((start, end) for start, end, index, _ in runs if index == slot)
        latencies += [nxt[0] - prev[1] for prev, nxt in zip(on_slot, on_slot[1:])]
    latencies.sort()
    return {"jobs": len(ids), "max_running": most, "order_violations": violations,
            "latency_median_ms": 1000 * latencies[len(latencies) // 2], "latency_max_ms": 1000 * latencies[-1],
            "launch_s": launched, "drain_s": drained}


class BacktrackingPatternTests(JobTestCase):
    """A user's regular expression never stalls the process that searches with it
    (Python's re holds the GIL): exponential ones are refused where patterns are
    compiled, and a search sees a part of a line bounded by the pattern's degree."""

    EXPONENTIAL = r"(a+)+$"  # ~13 s on 27 a's and a b; twice that per a more
    LINE = "a" * 27 + "b"

    def test_an_exponential_pattern_is_refused_before_anything_launches(self):
        printer = py("import time; print(%r, flush=True); time.sleep(60)" % self.LINE)
        for args in (["run", "--output-pattern", self.EXPONENTIAL, "--output-match-type", "regex", "--timeout", "1",
                      "--until", "40", "--"] + printer,
                     ["run", "--ready", self.EXPONENTIAL, "--until", "2", "--"] + printer):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), args)
            self.assertIn("exponential", doc["error"]["message"])
            self.assertTrue(doc["error"].get("hint"), doc)
        self.assertEqual(jobstate._list_job_ids(self.root), [], "a job was made for a refused pattern")
        import re
        for pattern in (self.EXPONENTIAL, re.compile(self.EXPONENTIAL), r"(a|aa)*c", r"(a?a)+$", r"(a|a)*b",
                        r"(\w+\s?)*$", r"a*a*a*b", r".*.*=.*", r"(.{0,30}){3}x"):
            with self.assertRaises(jobstate.InvalidArgumentError, msg=pattern):
                jobstate.run(printer, root=self.root, ready=pattern)
            with self.assertRaises(jobstate.InvalidArgumentError, msg=pattern):
                jobstate.create(printer, root=self.root, output_pattern=pattern, output_match_type="regex")
        self.assertEqual(jobstate._list_job_ids(self.root), [])
        job = self.run_job(printer)
        status, doc, _ = self.cli("wait", job.id, "--match", self.EXPONENTIAL, "--until", "1")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"))

    def test_ordinary_patterns_are_kept(self):
        for pattern, line in ((r"listening on port \d+", "listening on port 80"), (r"(?i)error|warning", "a WARNING"),
                              (r"^E\d+", "E12 x"), (r"v\d+\.\d+\.\d+", "v1.22.3"), (r"\w+\s+\w+", "two words"),
                              (r"foo.*bar.*baz", "foo, bar, baz"), (r"(\d{1,3}\.){3}\d{1,3}", "at 10.0.0.1"),
                              (r"(ab|ac)*d", "ababacd"), (r"[^=]*=[^=]*=.*", "a=b=c"), (r"^ready$", "ready")):
            self.assertTrue(jobstate._compile_line_pattern(pattern, "match").search(line), pattern)

    def test_a_polynomial_pattern_on_a_long_line_leaves_the_timeout_enforced(self):
        # a*a*b costs n**3 on a line of n a's: days on this one, were it searched whole.
        printer = py("import sys, time\nsys.stdout.write('a' * 200000 + '\\n'); sys.stdout.flush(); time.sleep(60)")
        job = self.run_job(printer, output_pattern="a*a*b", output_match_type="regex", timeout_s=1)
        state = job.wait(60)
        self.assertTrue(state.status.is_terminal, "the timeout was not enforced")
        self.assertTrue(state.result.timed_out)
        started = time.monotonic()
        readiness = self.run_job(printer).wait(2, match="a*a*b")
        self.assertIsNone(readiness.match)
        self.assertLess(time.monotonic() - started, 30, "wait --match overran its deadline")


@unittest.skipIf(jobstate._WINDOWS, "POSIX only: FIFO gates, SIGKILL")
class QueueTests(JobTestCase):
    """Queues with a parallel limit and no daemon: each waiting job is its own
    supervisor, blocked on locks, and a crash anywhere leaves an explainable state."""

    def gate(self, name="gate"):
        """A FIFO a `cat` job blocks on until open_fifo_gate()."""
        path = os.path.join(self.tmp, name)
        os.mkfifo(path)
        return path

    def running_job(self, gate, **kw):
        job = self.run_job(["cat", gate], **kw)
        wait_for(lambda: job.state().status is jobstate.JobStatus.RUNNING, 10, "the job to run")
        return job

    def position(self, job):
        status, doc, _ = self.cli("status", job.id)
        self.assertEqual((status, doc["state"], doc["waiting"]["for"]), (0, "created", "queue"), doc)
        return doc["waiting"]["position"]

    def test_one_at_a_time_in_queue_order(self):
        gate = self.gate()
        first = self.running_job(gate, queue="q")
        second = self.run_job(["echo", "second"], queue="q")
        started = time.monotonic()
        status, doc, _ = self.cli("run", "--queue", "q", "--", "echo", "third")
        self.assertLess(time.monotonic() - started, 5, "run waited for a queued job (default --until is 10s)")
        third = jobstate.Job(doc["job_id"], self.root)
        self.assertEqual((status, doc["state"], doc["queue"], doc["waiting"]["position"], doc["pid"]),
                         (0, "created", "q", 2, None))
        state = second.state()
        self.assertEqual((state.status, state.waiting["for"], state.waiting["queue"]),
                         (jobstate.JobStatus.CREATED, "queue", "q"))
        self.assertEqual((self.position(second), self.position(third)), (1, 2))
        open_fifo_gate(gate)
        ends = [job.wait(10) for job in (first, second, third)]
        self.assertEqual([(s.status, s.exit_code) for s in ends], [(jobstate.JobStatus.EXITED, 0)] * 3)
        self.assertLessEqual(ends[0].finished_at, ends[1].queue_slot["at"])
        self.assertLessEqual(ends[1].finished_at, ends[2].queue_slot["at"])
        self.assertEqual([s.queue_slot["slot"] for s in ends], [0, 0, 0])
        self.assertEqual(third.tail().stdout, "third\n")

    def test_raising_the_limit_starts_waiting_jobs_at_once(self):
        gates = [self.gate("a"), self.gate("b")]
        first = self.running_job(gates[0], queue="q")
        second = self.run_job(["cat", gates[1]], queue="q")
        self.assertEqual(second.wait(0.3).status, jobstate.JobStatus.CREATED)
        started = time.monotonic()
        status, doc, _ = self.cli("queue", "set", "q", "--parallel", "2")
        self.assertEqual((status, doc["queues"][0]["name"], doc["queues"][0]["parallel"]), (0, "q", 2))
        wait_for(lambda: second.state().status is jobstate.JobStatus.RUNNING, 5, "the second job to start")
        self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(first.state().status, jobstate.JobStatus.RUNNING)
        self.assertEqual(second.state().queue_slot["slot"], 1)
        for gate in gates:
            open_fifo_gate(gate)
        self.assertEqual(second.wait(10).exit_code, 0)

    def test_kill_takes_a_waiting_job_out_of_the_queue(self):
        gate = self.gate()
        marker = os.path.join(self.tmp, "ran")
        first = self.running_job(gate, queue="q")
        doomed = self.run_job(["touch", marker], queue="q")
        last = self.run_job(["echo", "last"], queue="q")
        self.assertEqual(self.position(last), 2)
        status, doc, _ = self.cli("kill", doomed.id)
        self.assertEqual((status, doc["state"], doc["signal"], doc["pid"], doc["started_at"], doc["waiting"]),
                         (0, "killed", "SIGTERM", None, None, None), doc)
        self.assertEqual(self.position(last), 1)
        self.assertEqual(supervisor_pids(self.root, doomed.id), [])
        open_fifo_gate(gate)
        self.assertEqual((first.wait(10).exit_code, last.wait(10).exit_code), (0, 0))
        self.assertEqual(doomed.state().status, jobstate.JobStatus.KILLED)
        self.assertFalse(os.path.exists(marker), "a killed waiting job ran")
        self.assertFalse(os.path.exists(doomed.paths.stdout_log))

    def test_pause_and_resume(self):
        self.cli("queue", "set", "q", "--parallel", "1")  # pause and resume name an existing queue
        status, doc, _ = self.cli("queue", "pause", "q")
        self.assertEqual((status, doc["queues"][0]["paused"]), (0, True))
        job = self.run_job(["echo", "hi"], queue="q")
        self.assertEqual(job.wait(0.5).status, jobstate.JobStatus.CREATED, "a paused queue started a job")
        self.assertEqual(self.position(job), 1)
        for args in (["start", job.id], ["delete", job.id]):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_state"), args)
            self.assertIn("waits for its turn (queue)", doc["error"]["message"])
        status, doc, _ = self.cli("restart", job.id)  # stops the waiting supervisor, then queues again
        self.assertEqual((status, doc["state"], doc["waiting"]["position"]), (0, "created", 1))
        status, doc, _ = self.cli("queue", "resume", "q")
        self.assertEqual((status, doc["queues"][0]["paused"]), (0, False))
        self.assertEqual(job.wait(5).exit_code, 0)

    def test_queue_list_list_state_and_text_show_the_line(self):
        gate = self.gate()
        first = self.running_job(gate, queue="q")
        waiting = [self.run_job(["echo", str(i)], queue="q") for i in range(2)]
        status, doc, _ = self.cli("queue", "list")
        self.assertEqual(doc["queues"], [{"name": "q", "parallel": 1, "paused": False, "running": [first.id],
                                          "waiting": [j.id for j in waiting]}])
        _, schema, _ = self.cli("schema")
        self.assertEqual(validate(doc, schema["schemas"]["queue"]), [])
        for state, expected in (("queued", waiting[::-1]), ("waiting", waiting[::-1]), ("running", [first]),
                                ("created", waiting[::-1])):
            status, doc, _ = self.cli("list", "--state", state)
            self.assertEqual([j["job_id"] for j in doc["jobs"]], [j.id for j in expected], state)
            self.assertEqual(validate(doc, schema["schemas"]["list"]), [])
        _, text, _ = self.cli_capture("--format", "text", "list")
        self.assertRegex(text, r"%s\s+queued #1\s" % waiting[0].id[:12])
        self.assertRegex(text, r"%s\s+queued #2\s" % waiting[1].id[:12])
        _, text, _ = self.cli_capture("--format", "text", "status", waiting[1].id)
        self.assertIn("queued in q (position 2)", text)
        _, text, _ = self.cli_capture("--format", "text", "queue", "list")
        self.assertRegex(text, r"QUEUE\s+PARALLEL.*\nq\s+1\s+-\s+1\s+2\s+%s" % waiting[0].id[:12])
        open_fifo_gate(gate)

    def test_bad_queue_arguments(self):
        for args, code in ((["run", "--queue", "../x", "--", "true"], "invalid_argument"),
                           (["queue", "set", "q", "--parallel", "0"], "invalid_argument"),
                           (["queue", "set", "q", "--parallel", "100000"], "invalid_argument"),
                           (["queue", "pause", "a/b"], "invalid_argument")):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, code), args)
        status, doc, _ = self.cli("queue", "set", "q")
        self.assertEqual((status, doc["error"]["code"]), (2, "invalid_argument"))
        self.assertEqual(jobstate._list_job_ids(self.root), [])
        with self.assertRaises(jobstate.InvalidArgumentError):
            jobstate.set_queue("q", parallel=True, root=self.root)

    def test_queue_names_that_would_collide_with_another_queues_files(self):
        # Queue q keeps q.json, q.lock and q/ in .queues: a queue named q.json or
        # q.lock would take (or be blocked by) one of them.
        self.assertEqual(self.cli("queue", "set", "a", "--parallel", "2")[0], 0)
        for name in ("a.lock", "b.json", "c.JSON", "d.Lock", "e."):
            for args in (["run", "--queue", name, "--until", "3", "--", "true"], ["queue", "set", name, "--parallel", "2"],
                         ["queue", "pause", name]):
                status, doc, _ = self.cli(*args)
                self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), (args, doc))
                self.assertIn(".json", doc["error"]["hint"])
            with self.assertRaises(jobstate.InvalidArgumentError):
                jobstate.create(["true"], queue=name, root=self.root)
        self.assertEqual(jobstate._list_job_ids(self.root), [])
        self.assertEqual(sorted(os.listdir(os.path.join(self.root, ".queues"))), ["a.json", "a.lock"])
        status, doc, _ = self.cli("queue", "set", "b", "--parallel", "3")
        self.assertEqual((status, doc["queues"][0]["parallel"]), (0, 3), doc)
        for name in ("a.jsonx", "json", "lock", "a.locked", "x.y"):  # only the suffixes are taken
            self.assertEqual(self.cli("queue", "set", name, "--parallel", "2")[0], 0, name)
        jobstate._write_json_atomic(os.path.join(self.root, ".queues", "old.json.json"), {"paused": True})
        status, doc, _ = self.cli("queue", "resume", "old.json")  # set before such names were refused
        self.assertEqual((status, doc["queues"][0]["paused"]), (0, False), doc)

    def test_queue_directories_made_by_a_job_are_private(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        self.assertEqual(self.run_job(["true"], queue="fresh").wait(10).exit_code, 0)
        base = os.path.join(self.root, ".queues")
        for path in (base, os.path.join(base, "fresh"), os.path.join(base, "fresh", "tickets")):
            self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o700, path)

    def test_a_signal_for_a_waiting_job_says_what_can_be_done(self):
        jobstate.set_queue("q", parallel=1, paused=True, root=self.root)
        job = self.run_job(["true"], queue="q")
        status, doc, _ = self.cli("kill", job.id, "--signal", "CONT")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_state"), doc)
        self.assertNotIn("start", doc["error"]["hint"])
        self.assertIn("jobstate kill %s" % job.id, doc["error"]["hint"])
        self.assertEqual(self.position(job), 1)

    def test_supervisor_of_a_waiting_job_killed(self):
        gate = self.gate()
        markers = [os.path.join(self.tmp, name) for name in ("lost", "next")]
        first = self.running_job(gate, queue="q")
        lost, after = [self.run_job(["touch", m], queue="q") for m in markers]
        os.kill(lost.state().supervisor_pid, signal.SIGKILL)
        state = wait_for(lambda: (lambda s: s.status.is_terminal and s)(lost.state()), 10, "supervisor_lost")
        self.assertEqual((state.status, state.error.stage, state.waiting), (jobstate.JobStatus.FAILED,
                                                                           "supervisor_lost", None))
        self.assertEqual(self.position(after), 1)
        open_fifo_gate(gate)
        self.assertEqual((first.wait(10).exit_code, after.wait(10).exit_code), (0, 0))
        self.assertEqual([os.path.exists(m) for m in markers], [False, True])
        self.assertEqual(os.listdir(os.path.join(self.root, ".queues", "q", "tickets")), [])

    def test_supervisor_of_a_running_queued_job_killed(self):
        gate = self.gate()
        first = self.running_job(gate, queue="q")
        after = self.run_job(["echo", "next"], queue="q")
        os.kill(first.state().supervisor_pid, signal.SIGKILL)
        state = after.wait(10)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0), "the next job never ran")
        lost = first.state()
        self.assertEqual((lost.status, lost.error.stage), (jobstate.JobStatus.FAILED, "supervisor_lost"))
        self.assertTrue(marker_pids(first.id), "its child went with the supervisor (expected: left to `kill`)")
        first.kill("KILL")
        wait_for(lambda: not marker_pids(first.id), 5, "kill to stop the lost job's child")

    def test_a_waiting_job_waits_in_a_fresh_interpreter(self):
        # A forked launch runs the supervisor in a copy of the launcher (the CLI:
        # ~25 MB each); a job that may wait for hours gets a small one (~7 MB).
        # It is exec'd once the job shows as waiting, handed the job lock and its
        # ticket (so `run` does not wait for a second interpreter to boot).
        self.cli("queue", "set", "q", "--parallel", "1")
        self.cli("queue", "pause", "q")
        status, doc, _ = self.cli_process("run", "--queue", "q", "--", "true")
        self.assertEqual((status, doc["state"]), (0, "created"))
        gate = self.gate()
        first = self.running_job(gate)
        status, dep, _ = self.cli_process("run", "--after", first.id, "--", "true")
        self.assertEqual((status, dep["state"]), (0, "created"))
        for job_id, mode in ((doc["job_id"], rb"waiting:\d+"), (dep["job_id"], rb"waiting")):
            pid = jobstate.Job(job_id, self.root).state().supervisor_pid

            def exec_done():  # the job shows as waiting a moment before the exec
                with open("/proc/%d/cmdline" % pid, "rb") as f:
                    argv = f.read().split(b"\0")[:-1]
                return argv if argv[-5:-2] == [b"_supervise", self.root.encode(), job_id.encode()] else None
            argv = wait_for(exec_done, 10, "the waiting supervisor's exec")
            self.assertRegex(argv[-1], b"\\A" + mode + b"\\Z")
        self.assertTrue(jobstate._ticket_is_live(jobstate._QueuePaths(self.root, "q").ticket(doc["job_id"])))
        self.assertEqual(self.position(jobstate.Job(doc["job_id"], self.root)), 1)
        self.cli("queue", "resume", "q")
        open_fifo_gate(gate)
        self.assertEqual([jobstate.Job(j["job_id"], self.root).wait(10).exit_code for j in (doc, dep)], [0, 0])

    def test_many_jobs_from_several_processes(self):
        figures = queue_storm(self, 60, processes=3, parallel=4)
        sys.stderr.write("\n[queue] %r\n" % figures)
        self.assertEqual((figures["max_running"], figures["order_violations"]), (4, 0), figures)


@unittest.skipIf(jobstate._WINDOWS, "POSIX only: FIFO gates")
class DependencyTests(JobTestCase):
    """--after: a job starts when the jobs it names have ended, blocked on their job locks."""

    gate = QueueTests.gate
    running_job = QueueTests.running_job

    def test_starts_once_the_jobs_have_ended(self):
        gate = self.gate()
        first = self.running_job(gate)
        status, doc, _ = self.cli("run", "--after", first.id[:10], "--", "echo", "then")
        self.assertEqual((status, doc["state"], doc["waiting"]["for"], doc["waiting"]["jobs"]),
                         (0, "created", "jobs", [first.id]), doc)
        job = jobstate.Job(doc["job_id"], self.root)
        self.assertEqual(job.spec().after, [first.id])
        _, text, _ = self.cli_capture("--format", "text", "status", job.id)
        self.assertIn("waiting for 1 job: %s" % first.id[:12], text)
        self.assertEqual(job.wait(0.3).status, jobstate.JobStatus.CREATED)
        open_fifo_gate(gate)
        state = job.wait(10)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertLessEqual(first.state().finished_at, state.started_at)

    def test_a_failed_dependency_fails_the_job_unless_after_any(self):
        failing = self.run_job(["sh", "-c", "exit 3"])
        failing.wait(10)
        markers = [os.path.join(self.tmp, name) for name in ("strict", "any")]
        strict = self.run_job(["touch", markers[0]], after=[failing.id])
        lenient = self.run_job(["touch", markers[1]], after=[failing.id], after_any=True)
        state = strict.wait(10)
        self.assertEqual((state.status, state.error.stage, state.started_at, state.pid),
                         (jobstate.JobStatus.FAILED, "dependency", None, None))
        self.assertIn("%s exited with code 3" % failing.id, state.error.message)
        self.assertEqual(lenient.wait(10).status, jobstate.JobStatus.EXITED)
        self.assertEqual([os.path.exists(m) for m in markers], [False, True])

    def test_one_failure_fails_the_job_before_the_others_end(self):
        gate = self.gate()
        slow = self.running_job(gate)
        failing = self.run_job(["sh", "-c", "kill -TERM $$"])
        job = self.run_job(["true"], after=[slow.id, failing.id])
        state = job.wait(10)
        self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "dependency"))
        self.assertIn("%s was killed (SIGTERM)" % failing.id, state.error.message)
        self.assertEqual(slow.state().status, jobstate.JobStatus.RUNNING)
        open_fifo_gate(gate)

    def test_a_missing_job_is_refused_at_definition(self):
        for args in (["run", "--after", "0123abcd", "--", "true"],
                     ["create", "--after", jobstate.new_job_id(), "--", "true"]):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, "job_not_found"), args)
        status, doc, _ = self.cli("run", "--after-any", "--", "true")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"))
        self.assertEqual(jobstate._list_job_ids(self.root), [])

    def test_a_cycle_is_impossible_by_construction(self):
        # `after` is written once, when the job is defined, and may name only
        # jobs that exist then: older ids.  So every edge points to an older
        # job and no chain of edges can come back: not even to itself.
        first = jobstate.create(["echo", "first"], root=self.root)
        second = jobstate.create(["echo", "second"], root=self.root, after=[first.id])
        with self.assertRaises(jobstate.JobNotFoundError):  # the id the next job would get
            jobstate.create(["true"], root=self.root, after=[jobstate.new_job_id()])
        for job in (first, second):
            self.assertTrue(all(dep < job.id for dep in job.spec().after))
        self.assertEqual(first.spec().after, [])
        # A job nobody started yet is waited for too (no lock to block on yet).
        second.start()
        self.assertEqual(second.wait(0.3).status, jobstate.JobStatus.CREATED)
        first.start()
        self.assertEqual(second.wait(10).exit_code, 0)
        first.restart()  # a restart keeps the definition, dependencies included
        self.assertEqual(first.spec().after, [])

    def test_kill_a_job_waiting_for_jobs(self):
        gate = self.gate()
        first = self.running_job(gate)
        job = self.run_job(["true"], after=[first.id])
        state = job.kill().state
        self.assertEqual((state.status, state.signal, state.started_at), (jobstate.JobStatus.KILLED, "SIGTERM", None))
        open_fifo_gate(gate)
        first.wait(10)
        self.assertEqual(job.state().status, jobstate.JobStatus.KILLED)

    def test_dependencies_then_a_queue_slot(self):
        gates = [self.gate("a"), self.gate("b")]
        first = self.running_job(gates[0])
        busy = self.running_job(gates[1], queue="q")
        job = self.run_job(["echo", "x"], after=[first.id], queue="q")
        self.assertEqual(job.state().waiting["for"], "jobs")
        open_fifo_gate(gates[0])
        wait_for(lambda: (job.state().waiting or {}).get("for") == "queue", 10, "the job to queue")
        open_fifo_gate(gates[1])
        self.assertEqual((busy.wait(10).exit_code, job.wait(10).exit_code), (0, 0))


@unittest.skipIf(jobstate._WINDOWS, "POSIX only: sh, FIFO gates")
class RestartPolicyTests(JobTestCase):
    """--restart: the supervisor starts the command again in the same job."""

    gate = QueueTests.gate
    running_job = QueueTests.running_job

    def test_on_failure_restarts_up_to_the_limit(self):
        job = self.run_job(["sh", "-c", "echo run; exit 3"], restart="on-failure", max_restarts=2,
                           restart_delay_s=0.01)
        state = job.wait(15)
        self.assertEqual((state.status, state.exit_code, state.restarts), (jobstate.JobStatus.EXITED, 3, 2))
        self.assertEqual((state.last_exit["state"], state.last_exit["exit_code"]), ("exited", 3))
        with open(job.paths.stdout_log) as f:
            self.assertEqual(f.read(), "run\nrun\nrun\n")
        with open(job.paths.full_log) as f:
            markers = [line for line in f if "[JOBSTATE]" in line]
        self.assertEqual(len(markers), 2)
        self.assertIn("[JOBSTATE] restart 1 of 2: the previous run exited with code 3", markers[0])
        status, doc, _ = self.cli("status", job.id)
        self.assertEqual((doc["restarts"], doc["last_exit"]["exit_code"], doc["crash_looping"]), (2, 3, False))

    def test_on_failure_stops_after_a_success_and_always_does_not(self):
        counter = os.path.join(self.tmp, "count")
        script = "n=$(cat %s 2>/dev/null || echo 0); n=$((n+1)); echo $n > %s; [ $n -ge 2 ]" % (counter, counter)
        job = self.run_job(["sh", "-c", script], restart="on-failure", restart_delay_s=0.01)
        state = job.wait(15)
        self.assertEqual((state.exit_code, state.restarts), (0, 1))
        job = self.run_job(["echo", "ok"], restart="always", max_restarts=2, restart_delay_s=0.01)
        state = job.wait(15)
        self.assertEqual((state.exit_code, state.restarts, job.tail().stdout), (0, 2, "ok\nok\nok\n"))
        self.assertEqual(jobstate.Job(job.id, self.root).spec().max_restarts, 2)
        self.assertEqual(jobstate.create(["true"], root=self.root, restart="always").spec().max_restarts, 5)

    def test_kill_ends_the_policy_and_the_tree(self):
        gate = self.gate()
        job = self.running_job(gate, restart="always")
        pid = job.state().pid
        state = job.kill().state
        self.assertEqual((state.status, state.signal, state.restarts), (jobstate.JobStatus.KILLED, "SIGTERM", None))
        self.assertTrue(jobstate._lock_is_free(job.paths), "the supervisor goes on")
        self.assertFalse(pid_alive(pid))
        # Between two runs: the bell wakes the supervisor out of its delay at once.
        job = self.run_job(["sh", "-c", "exit 1"], restart="on-failure", restart_delay_s=60)
        wait_for(lambda: (job.state().waiting or {}).get("for") == "restart", 10, "the restart delay")
        started = time.monotonic()
        state = job.kill().state
        self.assertLess(time.monotonic() - started, 3)
        self.assertEqual((state.status, state.signal, state.restarts, state.last_exit["exit_code"]),
                         (jobstate.JobStatus.KILLED, "SIGTERM", None, 1))

    def test_the_timeout_applies_to_each_run(self):
        job = self.run_job(["sleep", "30"], timeout_s=0.3, kill_after_s=0, restart="on-failure", max_restarts=1,
                           restart_delay_s=0.01)
        state = job.wait(15)
        self.assertEqual((state.status, state.result.timed_out, state.restarts, state.last_exit["timed_out"]),
                         (jobstate.JobStatus.KILLED, True, 1, True))
        self.assertLess(state.duration_ms, 5000)

    def test_status_tells_a_crash_loop_from_a_healthy_job(self):
        looping = self.run_job(["sh", "-c", "exit 1"], restart="on-failure", restart_delay_s=60)
        wait_for(lambda: looping.state().waiting, 10, "the restart delay")
        status, doc, _ = self.cli("status", looping.id)
        self.assertEqual((doc["state"], doc["crash_looping"], doc["waiting"]["for"], doc["waiting"]["restart"]),
                         ("running", True, "restart", 1))
        _, text, _ = self.cli_capture("--format", "text", "status", looping.id)
        self.assertIn("crash-looping: 0 restarts, last run exited with code 1", text)
        gate = self.gate()
        healthy = self.running_job(gate, restart="always")
        status, doc, _ = self.cli("status", healthy.id)
        self.assertEqual((doc["state"], doc["crash_looping"], doc["restarts"]), ("running", False, 0))
        _, text, _ = self.cli_capture("--format", "text", "list")
        self.assertRegex(text, r"%s\s+crash-looping\s" % looping.id[:12])
        self.assertRegex(text, r"%s\s+running\s" % healthy.id[:12])
        # The same failure after a long run, or a run going well for long since, is not a loop.
        now = time.time()
        state = jobstate.JobState(jobstate.JobInfo("a" * 32, jobstate.JobStatus.RUNNING,
                                                   jobstate._format_time(now - 1)),
                                  last_exit={"state": "exited", "exit_code": 1, "duration_ms": 200})
        self.assertTrue(jobstate._is_crash_looping(state, now))
        self.assertFalse(jobstate._is_crash_looping(state, now + 120))
        state.last_exit["duration_ms"] = 120000
        self.assertFalse(jobstate._is_crash_looping(state, now))
        open_fifo_gate(gate)

    def test_the_delay_doubles_up_to_a_minute_and_resets_after_a_long_run(self):
        supervisor = jobstate._Supervisor(jobstate.JobPaths(self.root, "0" * 32))
        spec = jobstate.JobSpec(["true"], "/", restart="always", max_restarts=99, restart_delay_s=1)
        delays = [supervisor._restart_delay_s(spec, 100) for _ in range(9)]
        self.assertEqual(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60])
        self.assertEqual(supervisor._restart_delay_s(spec, 61000), 1)
        self.assertEqual(supervisor._restart_delay_s(spec, 100), 2)

    def test_bad_policy_arguments(self):
        for args, exit_status in ((["--restart", "sometimes"], 2), (["--restart-delay", "soon"], 2),
                                  (["--max-restarts", "-1"], 1)):
            status, doc, _ = self.cli("run", *args, "--", "true")
            self.assertEqual((status, doc["error"]["code"]), (exit_status, "invalid_argument"), args)
        for kw in ({"restart": "sometimes"}, {"restart": "always", "max_restarts": -1},
                   {"restart": "always", "restart_delay_s": -1}):
            with self.assertRaises(jobstate.InvalidArgumentError):
                jobstate.run(["true"], root=self.root, **kw)
        self.assertEqual(jobstate._list_job_ids(self.root), [])

# ---------------------------------------------------------------------------
# Agent surfaces (section 10): MCP and HTTP
# ---------------------------------------------------------------------------


# Driven by the official MCP Python SDK (`mcp` on PyPI) in its own interpreter,
# so this file keeps importing only the standard library.
MCP_SDK_CLIENT = '''
import asyncio, sys
from mcp import Client, StdioServerParameters

async def main(py, jobstate, root):
    async with Client(StdioServerParameters(command=py, args=[jobstate, "--root", root, "mcp"])) as client:
        print("protocol", client.session.initialize_result.protocol_version)
        print("tools", " ".join(sorted(t.name for t in (await client.list_tools()).tools)))
        r = await client.call_tool("run", {"command": [py, "-c", "print('hi')"], "until": 20})
        job_id = r.structured_content["job_id"]
        print("run", r.is_error, r.structured_content["state"], r.structured_content["stdout"].strip())
        r = await client.call_tool("wait", {"job_id": job_id, "until": 5})
        print("wait", r.structured_content["state"])
        r = await client.call_tool("tail", {"job_id": job_id, "lines": 1})
        print("tail", r.structured_content["stdout"].strip())
        r = await client.call_tool("kill", {"job_id": job_id})
        print("kill", r.is_error)
        r = await client.call_tool("list", {"all": True})
        print("list", r.structured_content["count"])
        r = await client.call_tool("status", {"job_id": ".."})
        print("error", r.is_error, r.structured_content["error"]["code"])

asyncio.run(main(*sys.argv[1:]))
'''


MCP_SDK_NOT_UTF8 = '''
import anyio, asyncio, sys
from mcp import Client, StdioServerParameters

async def main(py, jobstate, root, job_id):
    async with Client(StdioServerParameters(command=py, args=[jobstate, "--root", root, "mcp"])) as client:
        with anyio.fail_after(30):  # an answer the SDK cannot parse never resolves the call
            r = await client.call_tool("list", {"all": True})
            print("list", r.is_error, ascii(r.structured_content["jobs"][0]["command"][-1]))
            r = await client.call_tool("status", {"job_id": job_id})
            print("status", r.is_error, ascii(r.structured_content["cwd"][-4:]))

asyncio.run(main(*sys.argv[1:]))
'''


def http_exchange(port, method, target, headers=(), body=None, timeout=30, raw=False):
    """One request carrying exactly `headers` (http.client adds none: no Host, no
    Content-Type), the way a browser page or an attacker shapes it.
    Returns (status, response headers, parsed JSON body or None; the bytes if raw)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    if raw:
        return resp.status, resp.headers, data
    doc = json.loads(data) if resp.headers.get("Content-Type", "").startswith("application/json") else None
    return resp.status, resp.headers, doc


def raw_exchange(port, data, timeout=30):
    """Send raw bytes (a request no client library would form); returns (status, JSON body or None)."""
    import http.client
    import socket
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        body = resp.read()
    return resp.status, (json.loads(body) if body else None)


SERVER_TOKEN = object()  # request(): send the token the server printed


# An agent's session with a dev-server-like job, driven by each official SDK:
# start it with `ready`, get progress while it boots, give up on a second wait
# (the SDK cancels it), kill the job.  Both SDKs check every structuredContent
# against the tool's outputSchema (jsonschema in Python, Ajv in TypeScript).
DEV_SERVER = ("import time; print('starting', flush=True); time.sleep(2); "
              "print('ready on port 8080', flush=True); time.sleep(120)")
MCP_SDK_AGENT_SESSION = """
import anyio, asyncio, sys, time
from mcp import Client, StdioServerParameters

async def main(py, jobstate, root, code):
    params = StdioServerParameters(command=py, args=[jobstate, "--root", root, "mcp"])
    async with Client(params) as client:
        progress = []
        async def on_progress(value, total, message):
            progress.append(message or "")
        r = await client.call_tool("run", {"command": [py, "-c", code], "ready": "^ready on port", "until": 30},
                                   progress_callback=on_progress)
        doc = r.structured_content
        print("run", r.is_error, doc["state"], doc["matched"]["line"])
        print("progress", len(progress) >= 1, any("starting" in m for m in progress))
        started = time.monotonic()
        with anyio.move_on_after(1.5):
            await client.call_tool("wait", {"job_id": doc["job_id"], "until": 50})
        print("cancelled", time.monotonic() - started < 5)
        r = await client.call_tool("status", {"job_id": doc["job_id"]})
        print("status", r.structured_content["state"])
        r = await client.call_tool("kill", {"job_id": doc["job_id"]})
        print("kill", r.structured_content["state"])
        closing = time.monotonic()
    print("closed", time.monotonic() - closing < 4)

asyncio.run(main(*sys.argv[1:]))
"""
MCP_TS_SDK_AGENT_SESSION = """
const path = require("path");
const sdk = path.join(process.env.JOBSTATE_MCP_NODE_DIR, "node_modules", "@modelcontextprotocol", "sdk", "dist", "cjs");
const { Client } = require(path.join(sdk, "client", "index.js"));
const { StdioClientTransport } = require(path.join(sdk, "client", "stdio.js"));

async function main(py, jobstate, root, code) {
  const client = new Client({ name: "jobstate-test", version: "0" });
  await client.connect(new StdioClientTransport({ command: py, args: [jobstate, "--root", root, "mcp"] }));
  console.log("tools", (await client.listTools()).tools.map((t) => t.name).sort().join(" "));
  const progress = [];
  let r = await client.callTool({ name: "run", arguments: { command: [py, "-c", code], ready: "^ready on port", until: 30 } },
                                undefined, { onprogress: (p) => progress.push(p.message || ""), timeout: 60000 });
  const doc = r.structuredContent;
  console.log("run", r.isError, doc.state, doc.matched.line);
  console.log("progress", progress.length >= 1, progress.some((m) => m.includes("starting")));
  const controller = new AbortController();
  const started = Date.now();
  setTimeout(() => controller.abort(), 1500);
  try {
    await client.callTool({ name: "wait", arguments: { job_id: doc.job_id, until: 50 } }, undefined,
                          { signal: controller.signal, timeout: 60000 });
    console.log("cancelled", false);
  } catch (e) {
    console.log("cancelled", Date.now() - started < 5000);
  }
  r = await client.callTool({ name: "status", arguments: { job_id: doc.job_id } });
  console.log("status", r.structuredContent.state);
  r = await client.callTool({ name: "kill", arguments: { job_id: doc.job_id } });
  console.log("kill", r.structuredContent.state);
  const closing = Date.now();
  await client.close();
  console.log("closed", Date.now() - closing < 4000);
}
main(...process.argv.slice(2)).catch((e) => { console.error(e); process.exit(1); });
"""


# A job that prints the variables whose name has TOKEN in it, one a line.
PRINT_TOKENS = py("import os; print(sorted(k + '=' + v for k, v in os.environ.items() if 'TOKEN' in k))")


class McpTests(JobTestCase):
    def start_server(self, **env):
        proc = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "mcp"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, **env))
        self.addCleanup(proc.wait, 30)
        self.addCleanup(proc.stderr.close)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(lambda: proc.stdin.closed or proc.stdin.close())
        return proc

    def rpc(self, proc, msg_id, method, params=None):
        message = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            message["params"] = params
        return self.raw(proc, json.dumps(message))

    def raw(self, proc, line):
        proc.stdin.write(line.encode() + b"\n")
        proc.stdin.flush()
        return json.loads(proc.stdout.readline())

    def call(self, proc, msg_id, name, arguments):
        reply = self.rpc(proc, msg_id, "tools/call", {"name": name, "arguments": arguments})
        result = reply["result"]
        self.assertEqual(json.loads(result["content"][0]["text"]), result["structuredContent"])
        return result

    def test_bytes_that_are_not_utf8_reach_strict_parsers(self):
        job = job_with_bytes_not_utf8(self)
        proc = self.start_server()
        for msg_id, (name, args) in enumerate([("list", {"all": True}), ("status", {"job_id": job.id}),
                                               ("wait", {"job_id": job.id, "until": 1})]):
            message = {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
                       "params": {"name": name, "arguments": args}}
            proc.stdin.write(json.dumps(message).encode() + b"\n")
            proc.stdin.flush()
            result = strict_json(self, proc.stdout.readline())["result"]
            doc = result["structuredContent"]
            self.assertEqual(json.loads(result["content"][0]["text"]), doc)
            assert_shown_as_replacement(self, doc["jobs"][0] if name == "list" else doc)
        self.assertEqual(job.spec().argv[-1], "caf\udce9")  # the job file keeps the byte
        proc.stdin.close()

    def test_jobs_do_not_inherit_the_serve_token(self):
        proc = self.start_server(JOBSTATE_SERVE_TOKEN="MYSECRETTOKEN123")
        doc = self.call(proc, 1, "run", {"command": PRINT_TOKENS, "until": 30})["structuredContent"]
        self.assertEqual(doc["state"], "exited", doc)
        self.assertEqual(doc["stdout"].strip(), "[]")
        proc.stdin.close()

    def test_every_tool_error_has_a_hint(self):
        running = self.run_job(ready_then_sleep())
        proc = self.start_server()
        cases = [("status", {}), ("status", {"job_id": 5}), ("status", {"job_id": ".."}),
                 ("status", {"job_id": "abc", "bogus": 1}), ("status", {"job_id": "0123456789"}),
                 ("run", {"command": []}), ("run", {"command": "echo"}), ("run", {"command": ["x"], "until": -1}),
                 ("run", {"command": ["x"], "stream": "stdout"}), ("run", {"command": ["x"], "restart": "maybe"}),
                 ("run", {"command": ["x"], "ready": "("}), ("run", {"command": ["x"], "stdin": "a", "stdin_file": "b"}),
                 ("run", {"command": ["x"], "stdin_file": "/nonexistent/file"}), ("run", {"command": ["x"], "tags": [""]}),
                 ("kill", {"job_id": running.id, "signal": "NOPE"}), ("delete", {"job_id": running.id}),
                 ("list", {"state": "bogus"}), ("list", {"limit": 1.5}), ("tail", {"job_id": running.id, "lines": -1})]
        for msg_id, (name, args) in enumerate(cases):
            result = self.call(proc, msg_id, name, args)
            error = result["structuredContent"].get("error") or {}
            self.assertTrue(result["isError"], (name, args, result))
            self.assertTrue(error.get("hint"), (name, args, error))
        proc.stdin.close()

    def test_absurd_settings_are_refused_at_start(self):
        for name, value in (("JOBSTATE_MCP_MAX_LINE", "9999999999999999G"), ("JOBSTATE_MCP_MAX_LINE", "garbage"),
                            ("JOBSTATE_MCP_MAX_LINE", "-1"), ("JOBSTATE_MCP_MAX_LINE", "1"),
                            ("JOBSTATE_MCP_DEFAULT_UNTIL", "soon"), ("JOBSTATE_MCP_DEFAULT_UNTIL", "1e400"),
                            ("JOBSTATE_MCP_MAX_UNTIL", "-5"), ("JOBSTATE_MCP_MAX_UNTIL", "nan")):
            proc = subprocess.run([PY, JOBSTATE, "--root", self.root, "mcp"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                                  env=dict(os.environ, **{name: value}))
            self.assertEqual(proc.returncode, 1, (name, value, proc.stdout, proc.stderr))
            error = json.loads(proc.stdout)["error"]
            self.assertEqual(error["code"], "invalid_argument", (name, value, error))
            self.assertIn(name, error["message"])
            self.assertTrue(error.get("hint"), error)

    def test_a_reused_id_is_refused_and_the_first_call_stays_cancellable(self):
        job = self.run_job(ready_then_sleep())
        proc = self.start_server()
        lines = self.replies(proc)

        def call(msg_id, name, args, meta=None):
            params = {"name": name, "arguments": args}
            if meta:
                params["_meta"] = meta
            self.send_line(proc, json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
                                             "params": params}).encode())
        call("dup", "wait", {"job_id": job.id, "until": 3}, {"progressToken": "p"})
        reply = self.next_reply(lines)  # the first progress notification: the call is under way
        self.assertEqual(reply.get("method"), "notifications/progress", reply)
        call("dup", "status", {"job_id": job.id})
        while True:
            reply = self.next_reply(lines)
            if reply.get("method") != "notifications/progress":
                break
        self.assertEqual((reply["id"], reply["error"]["code"]), ("dup", -32600), reply)
        self.assertIn("dup", reply["error"]["message"])
        self.send_line(proc, json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                         "params": {"requestId": "dup"}}).encode())
        call("later", "wait", {"job_id": job.id, "until": 4})  # answers after the first would have
        while True:
            reply = self.next_reply(lines)
            self.assertNotEqual(reply.get("id"), "dup", "the cancelled call answered")
            if reply.get("id") == "later":
                break
        self.assertEqual(reply["result"]["structuredContent"]["state"], "running")
        proc.stdin.close()

    def test_run_takes_a_queue_dependencies_and_a_restart_policy(self):
        proc = self.start_server()
        self.rpc(proc, 1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                         "clientInfo": {"name": "test", "version": "0"}})
        tools = {t["name"]: t for t in self.rpc(proc, 2, "tools/list")["result"]["tools"]}
        self.assertLessEqual({"queue", "after", "after_any", "restart", "max_restarts", "restart_delay"},
                             set(tools["run"]["inputSchema"]["properties"]))
        first = self.call(proc, 3, "run", {"command": py("import sys; sys.exit(2)"), "restart": "on-failure",
                                           "max_restarts": 1, "restart_delay": 0.01, "until": 10})["structuredContent"]
        self.assertEqual((first["state"], first["exit_code"], first["restarts"], first["last_exit"]["exit_code"]),
                         ("exited", 2, 1, 2))
        jobstate.set_queue("q", parallel=1, paused=True, root=self.root)
        doc = self.call(proc, 4, "run", {"command": HELLO, "queue": "q", "after": [first["job_id"]],
                                         "after_any": True})["structuredContent"]
        self.assertEqual((doc["state"], doc["queue"], doc["waiting"]["for"], doc["waiting"]["position"]),
                         ("created", "q", "queue", 1))
        result = self.call(proc, 5, "run", {"command": ["true"], "restart": "sometimes"})
        self.assertEqual((result["isError"], result["structuredContent"]["error"]["code"]), (True, "invalid_argument"))
        jobstate.set_queue("q", paused=False, root=self.root)
        self.assertEqual(jobstate.Job(doc["job_id"], self.root).wait(10).exit_code, 0)
        proc.stdin.close()

    def test_session(self):
        proc = self.start_server()
        reply = self.rpc(proc, 1, "initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                                 "clientInfo": {"name": "test", "version": "0"}})
        self.assertEqual(reply["result"]["protocolVersion"], "2025-06-18")
        self.assertIn("tools", reply["result"]["capabilities"])
        proc.stdin.write(b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
        self.assertEqual(self.rpc(proc, 2, "ping")["result"], {})
        tools = self.rpc(proc, 3, "tools/list")["result"]["tools"]
        self.assertEqual(sorted(t["name"] for t in tools),
                         ["delete", "kill", "list", "restart", "run", "status", "tail", "wait"])
        for tool in tools:
            self.assertEqual(tool["inputSchema"]["type"], "object")
        result = self.call(proc, 4, "run", {"command": py("print('hello')"), "until": 10})
        doc = result["structuredContent"]
        self.assertEqual((result["isError"], doc["state"], doc["stdout"].strip()), (False, "exited", "hello"))
        for msg_id, (name, args) in enumerate([("status", {}), ("tail", {"lines": 1}), ("wait", {"until": 1}),
                                               ("kill", {})], start=5):
            result = self.call(proc, msg_id, name, dict(args, job_id=doc["job_id"]))
            self.assertFalse(result["isError"], result)
            self.assertEqual(result["structuredContent"]["type"], name)
        result = self.call(proc, 9, "list", {"all": True})
        self.assertEqual(result["structuredContent"]["count"], 1)
        proc.stdin.close()
        self.assertEqual(proc.wait(30), 0)
        self.assertEqual(proc.stderr.read(), b"")

    def test_version_negotiation_and_protocol_errors(self):
        proc = self.start_server()
        reply = self.rpc(proc, 1, "initialize", {"protocolVersion": "1999-01-01", "capabilities": {}})
        self.assertEqual(reply["result"]["protocolVersion"], "2025-11-25")
        self.assertEqual(self.raw(proc, "not json")["error"]["code"], -32700)
        self.assertEqual(self.raw(proc, "[1, 2]")["error"]["code"], -32600)
        self.assertEqual(self.rpc(proc, 2, "no/such")["error"]["code"], -32601)
        self.assertEqual(self.rpc(proc, 3, "server/discover", {})["error"]["code"], -32601)
        self.assertEqual(self.rpc(proc, 4, "tools/list", [1])["error"]["code"], -32602)
        self.assertEqual(self.rpc(proc, 5, "tools/call", {"name": "nope"})["error"]["code"], -32602)
        for msg_id, args in enumerate([{"job_id": ".."}, {"job_id": "abc", "bogus": 1}, {}, {"job_id": 5}], 6):
            result = self.call(proc, msg_id, "status", args)
            self.assertTrue(result["isError"])
            self.assertIn(result["structuredContent"]["error"]["code"], ("invalid_job_id", "invalid_argument"))

    def test_waits_are_bounded_and_closing_the_transport_keeps_jobs(self):
        proc = self.start_server(JOBSTATE_MCP_MAX_UNTIL="0.2")
        started = time.monotonic()
        doc = self.call(proc, 1, "run", {"command": ready_then_sleep(), "until": 30})["structuredContent"]
        self.assertEqual(doc["state"], "running")
        doc = self.call(proc, 2, "wait", {"job_id": doc["job_id"], "until": 30})["structuredContent"]
        self.assertEqual(doc["state"], "running")
        self.assertLess(time.monotonic() - started, 10)
        proc.kill()
        proc.wait(10)
        self.assertEqual(jobstate.open_job(doc["job_id"], self.root).state().status, jobstate.JobStatus.RUNNING)

    # -- hostile input: every request is answered, nothing kills the server --

    def replies(self, proc):
        """The server's output lines in a queue, so that a silent server fails a
        test (`next_reply` times out) instead of hanging it."""
        lines = queue.Queue()

        def pump():
            for line in proc.stdout:
                lines.put(line)
            lines.put(b"")
        threading.Thread(target=pump, daemon=True).start()
        return lines

    def next_reply(self, lines, timeout_s=30):
        try:
            line = lines.get(timeout=timeout_s)
        except queue.Empty:
            self.fail("no answer within %s s" % timeout_s)
        self.assertTrue(line, "the server closed its output (it died)")
        return json.loads(line, parse_constant=strict_json_constant)  # NaN/Infinity are not JSON

    def send_line(self, proc, line):
        proc.stdin.write(line + b"\n")
        proc.stdin.flush()

    def test_hostile_lines_are_answered_and_the_server_keeps_serving(self):
        job = self.run_job(py("print('x')"))
        proc = self.start_server()
        lines = self.replies(proc)
        ping = b'{"jsonrpc":"2.0","id":%s,"method":"ping"}'
        call = b'{"jsonrpc":"2.0","id":"t","method":"tools/call","params":%s}'
        deep = b'{"jsonrpc":"2.0","id":"d","method":"ping","params":{"x":%s}}'
        depth = jobstate._MCP_MAX_DEPTH - 2  # the request object and params hold the rest
        in_string = json.dumps({"s": '"' + "[" * 1000 + "\\", "x": "x"}).encode()  # brackets in strings: no depth
        # (line, None for silence, or (id, error code or None for a result, words in the message))
        hostile = [
            (b"not json", (None, -32700, "")), (b"\xff\xfe{}", (None, -32700, "")),
            (b"\xef\xbb\xbf" + ping % b"1", (1, None, "")),  # a BOM may be ignored (RFC 8259)
            (b"[" * 100000, (None, -32700, "nest")), (b"{\"a\":" * 100000, (None, -32700, "nest")),
            (b"{\"a\":" * 300 + b"1" + b"}" * 300, (None, -32700, "nest")),
            (deep % (b"[" * (depth + 1) + b"]" * (depth + 1)), (None, -32700, "nest")),
            (deep % (b"[" * depth + b"]" * depth), ("d", None, "")),
            (b'{"jsonrpc":"2.0","id":"s","method":"ping","params":%s}' % in_string, ("s", None, "")),
            (ping % b"1e400", (None, -32700, "")), (ping % b"NaN", (None, -32700, "")),
            (ping % (b"9" * 5000), (None, -32700, "")), (ping % b"1.5", (1.5, None, "")),
            (b"[]", (None, -32600, "batch")), (b"[" + ping % b"2" + b"]", (None, -32600, "batch")),
            (b"5", (None, -32600, "")), (b'"ping"', (None, -32600, "")), (b"null", (None, -32600, "")),
            (b"true", (None, -32600, "")),
            (ping % b'{"a":1}', (None, -32600, "id")), (ping % b"[1]", (None, -32600, "id")),
            (ping % b"true", (None, -32600, "id")), (ping % b"null", (None, -32600, "id")),
            (b'{"jsonrpc":"1.0","id":"h1","method":"ping"}', ("h1", -32600, "jsonrpc")),
            (b'{"id":"h2","method":"ping"}', ("h2", -32600, "jsonrpc")),
            (b'{"jsonrpc":"2.0","id":"h3","method":5}', ("h3", -32600, "method")),
            (b'{"jsonrpc":"2.0","id":"h4","method":["ping"]}', ("h4", -32600, "method")),
            (b'{"jsonrpc":"2.0","id":"h5","method":null}', ("h5", -32600, "method")),
            (b'{"jsonrpc":"2.0","id":"h6"}', ("h6", -32600, "method")),
            (b'{"jsonrpc":"2.0","id":"h7","method":"ping","params":"x"}', ("h7", -32602, "params")),
            (b'{"jsonrpc":"2.0","id":"h8","method":"ping","params":[1]}', ("h8", -32602, "params")),
            (b'{"jsonrpc":"2.0","id":"h9","method":"%s"}' % (b"x" * 100000), ("h9", -32601, "")),
            (call % b'{"name":["run"]}', ("t", -32602, "status")),
            (call % b'{"name":{"run":1}}', ("t", -32602, "status")),
            (call % b'{"name":5}', ("t", -32602, "status")), (call % b'{"name":null}', ("t", -32602, "status")),
            (call % b'{}', ("t", -32602, "status")), (call % b'{"name":"nope"}', ("t", -32602, "status")),
            (call % b'"run"', ("t", -32602, "params")),
            # Notifications (no id) are never answered, however malformed ...
            (b'{"jsonrpc":"2.0","method":5}', None), (b'{"jsonrpc":"1.0","method":"ping"}', None),
            (b'{"method":"ping","params":"x"}', None), (b'{"jsonrpc":"2.0","method":"nope"}', None),
            (b'{"jsonrpc":"2.0","method":"tools/call","params":{"name":["run"]}}', None),
            # ... nor are responses (we send no requests; answering one could start a ping-pong).
            (b'{"jsonrpc":"2.0","id":"r","result":{}}', None),
            (b'{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}', None),
            (b"   ", None),
        ]
        for number, (line, expected) in enumerate(hostile):
            self.send_line(proc, line)
            self.send_line(proc, ping % ('"ping-%d"' % number).encode())
            self.send_line(proc, call.replace(b'"t"', b'"status-%d"' % number)
                           % json.dumps({"name": "status", "arguments": {"job_id": job.id}}).encode())
            wanted = {"ping-%d" % number, "status-%d" % number} | ({expected[0]} if expected else set())
            got = {}
            for _ in wanted:
                reply = self.next_reply(lines)
                self.assertEqual(reply["jsonrpc"], "2.0")
                self.assertIn(reply.get("id", "missing"), wanted, (line[:80], reply))
                self.assertNotIn(reply["id"], got, (line[:80], reply))
                got[reply["id"]] = reply
            self.assertEqual(got["ping-%d" % number]["result"], {}, line[:80])
            status = got["status-%d" % number]["result"]
            self.assertEqual((status["isError"], status["structuredContent"]["job_id"]), (False, job.id))
            if expected:
                msg_id, code, words = expected
                reply = got[msg_id]
                if code is None:
                    self.assertEqual(reply["result"], {}, line[:80])
                else:
                    self.assertEqual(reply["error"]["code"], code, (line[:80], reply))
                    self.assertIn(words, reply["error"]["message"], line[:80])
                    self.assertLess(len(reply["error"]["message"]), 300)
        self.send_line(proc, ping % b'"last"')
        self.assertEqual(self.next_reply(lines)["id"], "last")  # nothing left unread from the rounds
        proc.stdin.close()
        self.assertEqual(proc.wait(30), 0)
        self.assertEqual(proc.stderr.read(), b"")

    def test_tool_arguments_must_be_an_object(self):
        proc = self.start_server()
        for msg_id, arguments in enumerate([[], 0, "", False, "x", [1], 5, 1.5]):
            result = self.call(proc, msg_id, "list", arguments)
            self.assertTrue(result["isError"], arguments)
            self.assertEqual(result["structuredContent"]["error"]["code"], "invalid_argument")
        self.assertFalse(self.call(proc, 10, "list", None)["isError"])  # absent, as the SDK sends it
        reply = self.rpc(proc, 11, "tools/call", {"name": "list"})
        self.assertFalse(reply["result"]["isError"])

    def peak_rss(self, proc):
        """The process's peak resident size in bytes (Linux), else None."""
        try:
            with open("/proc/%d/status" % proc.pid) as f:
                return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
        except OSError:
            return None

    def test_an_overlong_line_is_refused_without_reading_it_whole(self):
        proc = self.start_server()
        lines = self.replies(proc)
        self.send_line(proc, b'{"jsonrpc":"2.0","id":"before","method":"ping"}')
        self.assertEqual(self.next_reply(lines)["id"], "before")
        peak_before = self.peak_rss(proc)
        cap = jobstate._MCP_MAX_LINE
        self.send_line(proc, b"x" * (8 * cap))
        reply = self.next_reply(lines)
        self.assertEqual((reply["id"], reply["error"]["code"]), (None, -32700))
        self.assertIn(str(cap), reply["error"]["message"])
        if peak_before is not None:  # a capped piece was held (readline joins its chunks: twice), never the line
            self.assertLess(self.peak_rss(proc) - peak_before, 3 * cap)
        padded = b'{"jsonrpc":"2.0","id":"pad","method":"ping","params":{"x":"%s"}}'
        self.send_line(proc, padded % (b"x" * cap))
        self.assertEqual(self.next_reply(lines)["error"]["code"], -32700)
        self.send_line(proc, padded % (b"x" * (cap - 100)))  # a line within the cap is served
        self.assertEqual(self.next_reply(lines), {"jsonrpc": "2.0", "id": "pad", "result": {}})

    def test_the_line_cap_can_be_set(self):
        proc = self.start_server(JOBSTATE_MCP_MAX_LINE="1k")
        lines = self.replies(proc)
        self.send_line(proc, b'{"jsonrpc":"2.0","id":"a","method":"ping","params":{"x":"%s"}}' % (b"x" * 1000))
        self.assertEqual(self.next_reply(lines)["error"]["code"], -32700)
        self.send_line(proc, b'{"jsonrpc":"2.0","id":"b","method":"ping","params":{"x":"%s"}}' % (b"x" * 900))
        self.assertEqual(self.next_reply(lines)["id"], "b")

    def test_a_bug_in_a_handler_is_an_internal_error(self):
        # Fault injection: no real input reaches these (that would be a bug to fix);
        # the catch-all must still answer instead of leaving the client waiting.
        class Broken(jobstate._McpServer):
            def list_tools(self, params):
                raise RuntimeError("boom")

            def call_tool(self, msg_id, params):
                raise RuntimeError("bang")
        out = io.BytesIO()
        requests = [{"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
                    {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "status"}},
                    {"jsonrpc": "2.0", "id": 3, "method": "ping"}]
        stdin = io.BytesIO(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
        with contextlib.redirect_stderr(io.StringIO()):
            Broken(self.root, out).serve(stdin)
        replies = {r["id"]: r for r in map(json.loads, out.getvalue().splitlines())}
        self.assertEqual((replies[1]["error"]["code"], replies[2]["error"]["code"]), (-32603, -32603))
        self.assertIn("boom", replies[1]["error"]["message"])
        self.assertEqual(replies[3]["result"], {})

    def test_wait_match_and_run_ready(self):
        proc = self.start_server()
        tools = {t["name"]: t for t in self.rpc(proc, 1, "tools/list")["result"]["tools"]}
        self.assertLessEqual({"ready", "stream"}, set(tools["run"]["inputSchema"]["properties"]))
        self.assertLessEqual({"match", "stream"}, set(tools["wait"]["inputSchema"]["properties"]))
        result = self.call(proc, 2, "run", {"command": SERVER, "ready": r"listening on port \d+", "until": 30})
        doc = result["structuredContent"]
        self.assertEqual((result["isError"], doc["state"]), (False, "running"), doc)
        self.assertEqual(doc["matched"], {"stream": "stdout", "line": "listening on port 8080", "offset": 30})
        job_id = doc["job_id"]
        doc = self.call(proc, 3, "wait", {"job_id": job_id, "match": "^warning", "stream": "stderr",
                                          "until": 5})["structuredContent"]
        self.assertEqual(doc["matched"], {"stream": "stderr", "line": "warning: debug build", "offset": 0})
        self.assertIsNone(self.call(proc, 4, "wait", {"job_id": job_id, "until": 0})["structuredContent"]["matched"])
        bad = [("run", {"command": ["true", "x"], "ready": "("}), ("wait", {"job_id": job_id, "match": "("}),
               ("wait", {"job_id": job_id, "match": "x", "stream": "both"}),
               ("wait", {"job_id": job_id, "stream": "stdout"}), ("run", {"command": ["true", "x"], "stream": "stdout"})]
        for msg_id, (name, args) in enumerate(bad, 5):
            result = self.call(proc, msg_id, name, args)
            self.assertTrue(result["isError"], args)
            self.assertEqual(result["structuredContent"]["error"]["code"], "invalid_argument", args)
        self.assertEqual(jobstate._list_job_ids(self.root), [job_id], "a job was made for a bad ready")

    def test_an_exponential_match_is_refused(self):
        proc = self.start_server()
        job = self.run_job(py("import time; print(%r, flush=True); time.sleep(60)" % ("a" * 27 + "b")))
        self.wait_log(job, "ab")
        for msg_id, (name, args) in enumerate((("wait", {"job_id": job.id, "match": "(a+)+$", "until": 1}),
                                                ("run", {"command": TRUE, "ready": "(a+)+$", "until": 1})), 1):
            doc = self.call(proc, msg_id, name, args)["structuredContent"]
            self.assertEqual(doc.get("error", {}).get("code"), "invalid_argument", doc)
            self.assertTrue(doc["error"]["hint"])
        self.assertEqual(jobstate._list_job_ids(self.root), [job.id])

    def tools(self, proc, msg_id=100):
        return {t["name"]: t for t in self.rpc(proc, msg_id, "tools/list")["result"]["tools"]}

    def test_tools_declare_output_schemas_and_annotations(self):
        proc = self.start_server()
        tools = self.tools(proc)
        self.assertEqual(sorted(tools), ["delete", "kill", "list", "restart", "run", "status", "tail", "wait"])
        for name in ("status", "tail", "list", "wait"):
            self.assertIs(tools[name]["annotations"]["readOnlyHint"], True, name)
        for name in ("kill", "delete", "restart"):
            self.assertIs(tools[name]["annotations"]["destructiveHint"], True, name)
        for tool in tools.values():
            self.assertEqual(tool["outputSchema"]["type"], "object")
        self.assertNotEqual(validate({"ok": True}, tools["status"]["outputSchema"]), [], "the schema checks nothing")
        doc = self.call(proc, 1, "run", {"command": py("print('hi')"), "until": 20})["structuredContent"]
        job_id = doc["job_id"]
        calls = [("status", {"job_id": job_id}), ("tail", {"job_id": job_id}), ("wait", {"job_id": job_id}),
                 ("wait", {"job_id": job_id, "match": "hi"}), ("kill", {"job_id": job_id}), ("list", {"all": True}),
                 ("restart", {"job_id": job_id, "until": 20}), ("delete", {"job_id": job_id}),
                 ("status", {"job_id": ".."}), ("run", {"command": ["true", "x"], "ready": "("})]
        for msg_id, (name, args) in enumerate(calls, 2):
            result = self.call(proc, msg_id, name, args)
            self.assertEqual(validate(result["structuredContent"], tools[name]["outputSchema"]), [], (name, result))
        self.assertEqual(validate(doc, tools["run"]["outputSchema"]), [])

    def test_progress_notifications_during_a_long_wait(self):
        proc = self.start_server()
        lines = self.replies(proc)
        job = self.run_job(py("import time; print('warming up', flush=True); time.sleep(60)"))
        self.wait_log(job, "warming up")
        request = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {
            "name": "wait", "arguments": {"job_id": job.id, "until": 2.5}, "_meta": {"progressToken": "p1"}}}
        self.send_line(proc, json.dumps(request).encode())
        progress = []
        reply = self.next_reply(lines)
        while reply.get("method") == "notifications/progress":
            progress.append(reply["params"])
            reply = self.next_reply(lines)
        self.assertEqual((reply["id"], reply["result"]["structuredContent"]["state"]), (1, "running"))
        self.assertIn(len(progress), (2, 3), "at most one a second, and some: %r" % progress)
        self.assertEqual({p["progressToken"] for p in progress}, {"p1"})
        self.assertEqual(sorted(p["progress"] for p in progress), [p["progress"] for p in progress])
        self.assertEqual(len({p["progress"] for p in progress}), len(progress), "progress must increase")
        for p in progress:
            self.assertIn("warming up", p["message"])
        request["id"], request["params"]["_meta"] = 2, {}
        self.send_line(proc, json.dumps(request).encode())
        self.assertEqual(self.next_reply(lines)["id"], 2, "progress without a progressToken")

    def test_cancel_ends_a_pending_wait_and_the_job_runs_on(self):
        proc = self.start_server()
        lines = self.replies(proc)
        job = self.run_job(py("import time; time.sleep(60)"))
        started = time.monotonic()
        for msg_id, args in ((7, {"job_id": job.id, "until": 50}), (8, {"job_id": job.id, "until": 50, "match": "x"})):
            self.send_line(proc, json.dumps({"jsonrpc": "2.0", "id": msg_id, "method": "tools/call",
                                             "params": {"name": "wait", "arguments": args}}).encode())
            self.send_line(proc, json.dumps({"jsonrpc": "2.0", "method": "notifications/cancelled",
                                             "params": {"requestId": msg_id, "reason": "the user moved on"}}).encode())
        self.send_line(proc, b'{"jsonrpc":"2.0","id":9,"method":"ping"}')
        self.assertEqual(self.next_reply(lines)["id"], 9)
        proc.stdin.close()
        self.assertEqual(proc.wait(10), 0)  # it waits for its pending calls: none is left
        self.assertLess(time.monotonic() - started, 10, "the cancelled waits ran on")
        rest = []
        while True:
            line = lines.get(timeout=5)
            if not line:
                break
            rest.append(json.loads(line))
        self.assertEqual(rest, [], "a cancelled request is not answered")
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)

    def test_restart_and_delete_tools_and_stdin_file(self):
        proc = self.start_server()
        with open(os.path.join(self.tmp, "in.txt"), "wb") as f:
            f.write(b"from a file\n")
        doc = self.call(proc, 1, "run", {"command": CAT, "stdin_file": os.path.join(self.tmp, "in.txt"),
                                         "until": 20})["structuredContent"]
        self.assertEqual((doc["state"], doc["stdout"]), ("exited", "from a file\n"), doc)
        doc = self.call(proc, 2, "run", {"command": CAT, "cwd": self.tmp, "stdin_file": "in.txt",
                                         "until": 20})["structuredContent"]
        self.assertEqual(doc["stdout"], "from a file\n", "a relative stdin_file is found in cwd")
        job_id = doc["job_id"]
        doc = self.call(proc, 3, "restart", {"job_id": job_id, "until": 20})["structuredContent"]
        self.assertEqual((doc["type"], doc["state"], doc["stdout"]), ("restart", "exited", "from a file\n"))
        doc = self.call(proc, 4, "delete", {"job_id": job_id})["structuredContent"]
        self.assertEqual((doc["type"], doc["deleted"]), ("delete", 1))
        self.assertEqual(self.call(proc, 5, "status", {"job_id": job_id})["structuredContent"]["error"]["code"],
                         "job_not_found")
        running = self.run_job(py("import time; time.sleep(60)"))
        for msg_id, (name, args, code) in enumerate([
                ("run", {"command": CAT, "stdin": "x", "stdin_file": "in.txt", "cwd": self.tmp}, "invalid_argument"),
                ("run", {"command": CAT, "stdin_file": os.path.join(self.tmp, "missing")}, "invalid_argument"),
                ("delete", {"job_id": running.id}, "invalid_state")], 6):
            result = self.call(proc, msg_id, name, args)
            self.assertEqual((result["isError"], result["structuredContent"]["error"]["code"]), (True, code), name)

    @unittest.skipUnless(os.environ.get("JOBSTATE_MCP_PYTHON"), "set JOBSTATE_MCP_PYTHON to a Python with `mcp`")
    def test_official_sdk_client(self):
        script = os.path.join(self.tmp, "client.py")
        with open(script, "w") as f:
            f.write(MCP_SDK_CLIENT)
        out = subprocess.run([os.environ["JOBSTATE_MCP_PYTHON"], script, PY, JOBSTATE, self.root],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr.decode()[-2000:])
        self.assertEqual(out.stdout.decode().splitlines(), [
            "protocol 2025-11-25", "tools delete kill list restart run status tail wait", "run False exited hi",
            "wait exited", "tail hi", "kill False", "list 1", "error True invalid_job_id"])

    @unittest.skipUnless(os.environ.get("JOBSTATE_MCP_PYTHON"), "set JOBSTATE_MCP_PYTHON to a Python with `mcp`")
    def test_official_sdk_reads_bytes_that_are_not_utf8(self):
        job = job_with_bytes_not_utf8(self)
        script = os.path.join(self.tmp, "not_utf8.py")
        with open(script, "w") as f:
            f.write(MCP_SDK_NOT_UTF8)
        out = subprocess.run([os.environ["JOBSTATE_MCP_PYTHON"], script, PY, JOBSTATE, self.root, job.id],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=120)
        self.assertEqual(out.returncode, 0, out.stderr.decode()[-2000:])
        self.assertEqual(out.stdout.decode().splitlines(), ["list False 'caf\\ufffd'", "status False 'caf\\ufffd'"])

    def agent_session(self, argv, script, name):
        """Run an SDK's agent session; its transcript goes to stderr for the record."""
        path = os.path.join(self.tmp, name)
        with open(path, "w") as f:
            f.write(script)
        started = time.monotonic()
        out = subprocess.run(argv + [path, PY, JOBSTATE, self.root, DEV_SERVER], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=180)
        self.assertEqual(out.returncode, 0, out.stderr.decode()[-3000:])
        lines = out.stdout.decode().splitlines()
        sys.stderr.write("\n[transcript] %s, %.1f s: %s\n" % (name, time.monotonic() - started, " | ".join(lines)))
        self.assertEqual(jobstate._list_job_ids(self.root) and
                         jobstate.open_job(jobstate._list_job_ids(self.root)[0], self.root).state().status,
                         jobstate.JobStatus.KILLED)
        return lines

    @unittest.skipUnless(os.environ.get("JOBSTATE_MCP_PYTHON"), "set JOBSTATE_MCP_PYTHON to a Python with `mcp`")
    def test_official_sdk_agent_session(self):
        lines = self.agent_session([os.environ["JOBSTATE_MCP_PYTHON"]], MCP_SDK_AGENT_SESSION, "session.py")
        self.assertEqual(lines, ["run False running ready on port 8080", "progress True True", "cancelled True",
                                 "status running", "kill killed", "closed True"])

    @unittest.skipUnless(os.environ.get("JOBSTATE_MCP_NODE_DIR") and shutil.which("node"),
                         "set JOBSTATE_MCP_NODE_DIR to a directory whose node_modules has @modelcontextprotocol/sdk")
    def test_official_typescript_sdk_agent_session(self):
        lines = self.agent_session(["node"], MCP_TS_SDK_AGENT_SESSION, "session.cjs")
        self.assertEqual(lines, ["tools delete kill list restart run status tail wait",
                                 "run false running ready on port 8080", "progress true true", "cancelled true",
                                 "status running", "kill killed", "closed true"])


class ServeTestCase(JobTestCase):
    """Starts `serve` as a process and talks to it; the HTTP and web page classes share it."""

    def start_server(self, token=None, bind="127.0.0.1:0", args=(), **env_vars):
        """Start `serve` (without JOBSTATE_SERVE_TOKEN unless `token`); returns its URL and
        remembers its port, token and process."""
        doc, proc = self.launch_server(token, bind, args, **env_vars)
        self.assertEqual(doc["type"], "serve", doc)
        self.ready, self.server, self.port, self.token = doc, proc, doc["port"], doc.get("token") or token
        return doc["url"]

    def launch_server(self, token=None, bind="127.0.0.1:0", args=(), **env_vars):
        env = dict(os.environ, **env_vars)
        env.pop("JOBSTATE_SERVE_TOKEN", None)
        if token:
            env["JOBSTATE_SERVE_TOKEN"] = token
        log = open(os.path.join(self.tmp, "serve-%d.log" % len(os.listdir(self.tmp))), "w+b")
        self.addCleanup(log.close)
        proc = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "serve", "--bind", bind] + list(args),
                                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        self.addCleanup(self.assert_no_traceback, log)
        self.addCleanup(proc.stdout.close)
        self.addCleanup(proc.wait, 30)
        self.addCleanup(lambda: proc.poll() is not None or proc.terminate())
        line = proc.stdout.readline()
        return (json.loads(line) if line else None), proc

    def assert_no_traceback(self, log):
        log.seek(0)
        self.assertNotIn(b"Traceback", log.read())

    def request(self, method, url, body=None, token=SERVER_TOKEN, raw=None):
        import urllib.error
        import urllib.request
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        token = self.token if token is SERVER_TOKEN else token
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def send(self, method, target, body=None, headers=None, port=None, raw=False):
        """A request with the server's Host and token and, with a body, a JSON Content-Type
        and its Content-Length; `headers` adds or replaces headers (None drops one)."""
        base = {"Host": "127.0.0.1:%d" % self.port}
        if self.token:
            base["Authorization"] = "Bearer " + self.token
        if body is not None:
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            base.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
        base.update(headers or {})
        pairs = [(k, v) for k, v in base.items() if v is not None]
        return http_exchange(port or self.port, method, target, pairs, body, raw=raw)

    def assert_error(self, reply, status, code, context=None):
        got_status, headers, doc = reply
        self.assertIsNotNone(doc, "no JSON envelope for %r" % (context,))
        self.assertEqual((got_status, doc["ok"], doc["type"], doc["error"]["code"]), (status, False, "error", code),
                         context)
        self.assertTrue(doc["error"].get("hint"), ("every error has a hint", str(context)[:200], doc))
        return headers, doc


class HttpTests(ServeTestCase):
    @unittest.skipUnless(POSIX and os.path.isdir("/proc/self/fd"), "which files a process holds open is read from "
                         "/proc (Wine shows Linux's /proc to Windows programs, with Linux's pids)")
    def test_a_restart_during_an_http_match_wait_matches_on_the_new_run(self):
        job, gate = ReadinessTests.gated_go(self)
        url = self.start_server()
        replies = []
        thread = threading.Thread(target=lambda: replies.append(self.request(
            "GET", url + "/jobs/%s/wait?match=%s&until=60" % (job.id, "%5EGO%24"))))
        thread.start()
        self.addCleanup(thread.join, 70)
        fds = "/proc/%d/fd" % self.server.pid

        def holds_lock_open():  # the waiter blocks on the job lock once it has looked at the logs
            try:
                return any(os.readlink(os.path.join(fds, fd)) == job.paths.lock for fd in os.listdir(fds))
            except OSError:  # an fd closed while we looked
                return False
        wait_for(holds_lock_open, 10, "the server's waiter to block on the job lock")
        first_start = ReadinessTests.restart_and_open_gate(self, job, gate)
        thread.join(70)
        status, doc = replies[0]
        self.assertEqual((status, doc["state"], (doc["matched"] or {}).get("line")), (200, "running", "GO"), doc)
        self.assertNotEqual(doc["started_at"], first_start)

    def test_bytes_that_are_not_utf8_reach_strict_parsers(self):
        job = job_with_bytes_not_utf8(self)
        self.start_server()
        for target in ("/jobs?all=1", "/jobs/" + job.id, "/jobs/%s/definition" % job.id):
            status, _, data = self.send("GET", target, raw=True)
            doc = strict_json(self, data)
            self.assertEqual(status, 200, doc)
            if "jobs" not in doc:
                self.assertEqual(doc["env"], {"K\ufffd": "v\ufffd"})
            assert_shown_as_replacement(self, doc["jobs"][0] if "jobs" in doc else doc)
        status, doc = self.request("POST", "http://127.0.0.1:%d/jobs" % self.port,
                                   {"command": ["true"], "cwd": "\udce9\ud800"})
        self.assertEqual((status, doc["error"]["code"]), (400, "invalid_argument"))
        self.assertIn("hint", doc["error"])

    def test_null_means_not_given(self):
        # As over MCP (the same argument check): JSON null for an optional argument is its absence.
        url = self.start_server()
        status, doc = self.request("POST", url + "/jobs", {"command": HELLO, "queue": None, "ready": None,
                                                          "timeout": None, "restart": None, "until": 10})
        self.assertEqual((status, doc.get("state"), doc.get("queue"), doc.get("stdout")),
                         (200, "exited", None, "hello\n"), doc)
        status, doc = self.request("POST", url + "/jobs", {"command": None})
        self.assertEqual((status, doc["error"]["code"]), (400, "invalid_argument"), doc)
        self.assertIn("command", doc["error"]["message"])
        self.assertEqual(jobstate._check_arguments("wait", {"job_id": "x", "match": None}), {"job_id": "x"})

    def test_jobs_do_not_inherit_the_serve_token(self):
        url = self.start_server(token="MYSECRETTOKEN123")
        for target in ("/jobs", "/exec"):
            status, doc = self.request("POST", url + target, {"command": PRINT_TOKENS, "until": 30})
            self.assertEqual((status, doc["state"]), (200, "exited"), doc)
            self.assertEqual(doc["stdout"].strip(), "[]", target)

    @unittest.skipUnless(jobstate._LINUX, "counts the server's threads in /proc")
    def test_slow_connections_cannot_hold_every_handler_thread(self):
        """Slowloris: more connections than handler threads, each trickling a byte
        of a request that never ends (reconnecting when dropped); a well-formed
        request, with or without a token, is still answered."""
        import socket
        self.start_server()
        stop, lock, socks = threading.Event(), threading.Lock(), []

        def connect():
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
            sock.sendall(b"G")
            return sock

        def trickle():
            while not stop.wait(0.5):
                with lock:
                    for i, sock in enumerate(socks):
                        try:
                            sock.sendall(b"E")
                        except OSError:
                            sock.close()
                            try:
                                socks[i] = connect()
                            except OSError:
                                pass
        with lock:
            socks.extend(connect() for _ in range(jobstate._HTTP_MAX_THREADS + 6))
        trickler = threading.Thread(target=trickle, daemon=True)
        trickler.start()
        try:
            wait_for(lambda: len(os.listdir("/proc/%d/task" % self.server.pid)) > jobstate._HTTP_MAX_THREADS,
                     30, "every handler thread taken")
            time.sleep(1)  # the trickle is under way
            for target, token in (("/health", None), ("/jobs?all=1", self.token)):
                headers = [("Host", "127.0.0.1:%d" % self.port)]
                if token:
                    headers.append(("Authorization", "Bearer " + token))
                status, _, doc = http_exchange(self.port, "GET", target, headers, timeout=40)
                self.assertEqual((status, doc["ok"]), (200, True), target)
        finally:
            stop.set()
            trickler.join(10)
            for sock in socks:
                sock.close()

    def test_absurd_settings_are_refused_at_start(self):
        for value in ("garbage", "-5", "1e400", "nan"):
            doc, proc = self.launch_server(JOBSTATE_SERVE_IDLE_TIMEOUT=value)
            self.assertEqual(proc.wait(30), 1, (value, doc))
            self.assertEqual(doc["error"]["code"], "invalid_argument", (value, doc))
            self.assertIn("JOBSTATE_SERVE_IDLE_TIMEOUT", doc["error"]["message"])
            self.assertTrue(doc["error"].get("hint"), doc)

    def test_repeated_query_parameters_are_refused_everywhere(self):
        """One rule: a parameter given twice is a 400, except tag (one per tag).  The page's
        ?token= given twice is a failed sign-in (test_wrong_login_token_is_401_without_cookie)."""
        job = self.run_job(py("print('x')"))
        job.wait(30)
        self.start_server()
        for method, target in (("GET", "/jobs?limit=1&limit=5"), ("GET", "/jobs?all=1&all=0"),
                               ("GET", "/jobs?limit=&limit=5"), ("GET", "/jobs/%s?x=1&x=2"),
                               ("GET", "/jobs/%s/tail?lines=1&lines=2"), ("GET", "/jobs/%s/wait?until=1&until=0"),
                               ("GET", "/jobs/%s/follow?lines=1&lines=2"),
                               ("GET", "/jobs/%s/log?stream=stdout&stream=stderr"),
                               ("GET", "/jobs/%s/definition?a=1&a=1"), ("GET", "/tail/%s?tail_lines=1&tail_lines=2"),
                               ("POST", "/jobs/%s/kill?no_wait=1&no_wait=0"), ("GET", "/health?a=1&a=2")):
            target = target.replace("%s", job.id)
            _, doc = self.assert_error(self.send(method, target, {} if method == "POST" else None), 400,
                                       "invalid_argument", target)
            self.assertIn("more than once", doc["error"]["message"], target)
        status, _, doc = self.send("GET", "/jobs?all=1&tag=a&tag=b")
        self.assertEqual((status, doc["count"]), (200, 0))

    def test_health_carries_the_capabilities(self):
        url = self.start_server()
        status, doc = self.request("GET", url + "/health")
        self.assertEqual((status, doc["type"]), (200, "health"))
        self.assertEqual(validate(doc, jobstate._document_schemas()["health"]), [])
        self.assertEqual(doc["capabilities"], self.cli("doctor")[1]["capabilities"])

    def test_post_jobs_takes_a_queue_dependencies_and_a_restart_policy(self):
        url = self.start_server()
        status, first = self.request("POST", url + "/jobs", {"command": py("import sys; sys.stdout.buffer.write(b'a\\n')"), "restart": "always",
                                                             "max_restarts": 1, "restart_delay": 0.01, "until": 10})
        self.assertEqual((status, first["state"], first["restarts"], first["stdout"]), (200, "exited", 1, "a\na\n"))
        jobstate.set_queue("q", parallel=1, paused=True, root=self.root)
        status, doc = self.request("POST", url + "/jobs", {"command": ["echo", "b"], "queue": "q",
                                                           "after": [first["job_id"][:8]]})
        self.assertEqual((status, doc["state"], doc["waiting"]["for"], doc["waiting"]["queue"]),
                         (200, "created", "queue", "q"))
        status, doc = self.request("POST", url + "/jobs", {"command": ["true"], "after": ["0123456789"]})
        self.assertEqual((status, doc["error"]["code"]), (404, "job_not_found"))
        status, doc = self.request("POST", url + "/jobs", {"command": ["true"], "max_restarts": -1})
        self.assertEqual((status, doc["error"]["code"]), (400, "invalid_argument"))
        jobstate.set_queue("q", paused=False, root=self.root)

    def test_endpoints(self):
        url = self.start_server()
        status, doc = self.request("GET", url + "/health")
        self.assertEqual((status, doc["type"]), (200, "health"))
        status, doc = self.request("POST", url + "/jobs", {"command": py("print('web')"), "until": 10,
                                                           "tags": ["web.api"]})
        self.assertEqual((status, doc["state"], doc["stdout"].strip(), doc["tags"]), (200, "exited", "web", ["web.api"]))
        job_id = doc["job_id"]
        for path, kind in (("/jobs/" + job_id, "status"), ("/jobs/%s/tail?lines=1" % job_id, "tail"),
                           ("/jobs/%s/wait?until=1" % job_id, "wait"), ("/jobs?all=1&tag=web.*", "list")):
            status, doc = self.request("GET", url + path)
            self.assertEqual((status, doc["type"]), (200, kind), path)
        self.assertEqual(doc["count"], 1)
        status, doc = self.request("POST", url + "/jobs/%s/kill" % job_id, {"signal": "TERM"})
        self.assertEqual((status, doc["type"]), (200, "kill"))
        status, doc = self.request("DELETE", url + "/jobs/" + job_id)
        self.assertEqual((status, doc["deleted"]), (200, 1))
        cases = [("GET", "/jobs/" + job_id, None, 404, "job_not_found"),
                 ("GET", "/jobs/..", None, 400, "invalid_job_id"),
                 ("POST", "/jobs", {"command": ["x"], "bogus": 1}, 400, "invalid_argument"),
                 ("POST", "/jobs", {"command": "not a list"}, 400, "invalid_argument"),
                 ("GET", "/jobs?bogus=1", None, 400, "invalid_argument"),
                 ("GET", "/nope", None, 404, "not_found")]
        for method, path, body, code, error in cases:
            status, doc = self.request(method, url + path, body)
            self.assertEqual((status, doc["error"]["code"]), (code, error), path)
        running = self.run_job(py("import time; time.sleep(60)"))
        status, doc = self.request("DELETE", url + "/jobs/" + running.id)
        self.assertEqual((status, doc["error"]["code"]), (409, "invalid_state"))

    def test_wait_match_and_post_ready(self):
        from urllib.parse import quote
        url = self.start_server()
        status, doc = self.request("POST", url + "/jobs", {"command": SERVER, "ready": r"listening on port \d+",
                                                           "until": 30})
        self.assertEqual((status, doc["state"]), (200, "running"), doc)
        self.assertEqual(doc["matched"], {"stream": "stdout", "line": "listening on port 8080", "offset": 30})
        job_id = doc["job_id"]
        path = "/jobs/%s/wait?match=%s&stream=stderr&until=5" % (job_id, quote(r"^warning: \w+ build$"))
        status, doc = self.request("GET", url + path)
        self.assertEqual((status, doc["type"], doc["state"]), (200, "wait", "running"), doc)
        self.assertEqual(doc["matched"], {"stream": "stderr", "line": "warning: debug build", "offset": 0})
        for method, path, body in (("GET", "/jobs/%s/wait?match=%s" % (job_id, quote("(")), None),
                                   ("GET", "/jobs/%s/wait?match=x&stream=both" % job_id, None),
                                   ("POST", "/jobs", {"command": ["true", "x"], "ready": "("})):
            status, doc = self.request(method, url + path, body)
            self.assertEqual((status, doc["error"]["code"]), (400, "invalid_argument"), path)
        self.assertEqual(jobstate._list_job_ids(self.root), [job_id])

    def test_an_exponential_wait_match_is_refused_and_health_answers(self):
        from urllib.parse import quote
        url = self.start_server()
        job = self.run_job(py("import time; print(%r, flush=True); time.sleep(60)" % ("a" * 27 + "b")))
        self.wait_log(job, "ab")
        status, doc = self.request("GET", url + "/jobs/%s/wait?match=%s&until=1" % (job.id, quote("(a+)+$")))
        self.assertEqual((status, doc["error"]["code"]), (400, "invalid_argument"), doc)
        self.assertTrue(doc["error"].get("hint"))
        self.assertEqual(self.request("GET", url + "/health")[0], 200)

    def follow(self, url, job_id, accept=None, query=""):
        """An open GET /jobs/{id}/follow: (connection, response)."""
        import http.client
        from urllib.parse import urlsplit
        where = urlsplit(url)
        conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
        self.addCleanup(conn.close)
        headers = {"Authorization": "Bearer " + self.token} if self.token else {}
        if accept:
            headers["Accept"] = accept
        conn.request("GET", "/jobs/%s/follow%s" % (job_id, query), headers=headers)
        return conn, conn.getresponse()

    @unittest.skipUnless(POSIX, "mkfifo")
    def test_follow_streams_the_output_live_and_ends_with_the_job(self):
        url = self.start_server()
        gate = fifo_gate(self)
        job = self.run_job(py("import sys\nsys.stdout.write('tick 0\\n'); sys.stdout.flush()\nopen(%r).read()\n"
                              "sys.stderr.write('tick 1\\n')\n" % gate))
        _, resp = self.follow(url, job.id)
        self.assertEqual((resp.status, resp.getheader("Transfer-Encoding")), (200, "chunked"))
        self.assertTrue(resp.getheader("Content-Type").startswith("text/plain"), resp.getheader("Content-Type"))
        self.assertEqual(resp.readline(), b"tick 0\n")
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING, "the output came live, not at the end")
        open_fifo_gate(gate)
        self.assertEqual(resp.read(), b"tick 1\n")  # ends when the job does
        self.assertEqual(job.state().status, jobstate.JobStatus.EXITED)

    def test_follow_as_server_sent_events(self):
        url = self.start_server()
        job = self.run_job(py("import sys; sys.stdout.buffer.write(b'x\\ny\\n'); sys.stderr.buffer.write(b'e\\r\\n')"))
        job.wait(20)
        _, resp = self.follow(url, job.id, accept="text/event-stream")
        self.assertEqual(resp.status, 200)
        self.assertTrue(resp.getheader("Content-Type").startswith("text/event-stream"))
        events = []
        for block in resp.read().decode().split("\n\n"):
            fields = dict(line.split(": ", 1) for line in block.splitlines() if line)
            if fields:
                events.append((fields["event"], json.loads(fields["data"])))
        text = {name: "".join(d["text"] for e, d in events if e == name) for name in ("stdout", "stderr")}
        self.assertEqual(text, {"stdout": "x\ny\n", "stderr": "e\r\n"})
        self.assertEqual(events[-1][0], "end")
        self.assertEqual((events[-1][1]["state"], events[-1][1]["exit_code"]), ("exited", 0))
        status, doc = self.request("GET", url + "/jobs/%s/follow" % ("f" * 32))
        self.assertEqual((status, doc["error"]["code"]), (404, "job_not_found"))

    def test_a_follower_going_away_never_touches_the_job(self):
        url = self.start_server()
        job = self.run_job(py("import sys, time\nfor i in range(3000):\n"
                              "    sys.stdout.write('tick %d\\n' % i); sys.stdout.flush(); time.sleep(0.02)\n"))
        conn, resp = self.follow(url, job.id)
        self.assertTrue(resp.readline().startswith(b"tick"))
        conn.sock.shutdown(2)
        conn.close()
        self.wait_log(job, "tick 20")  # the job goes on writing after its follower left
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)
        self.assertEqual(self.request("GET", url + "/health")[0], 200)
        _, resp = self.follow(url, job.id, query="?lines=1")
        self.assertTrue(resp.readline().startswith(b"tick"))

    def test_agent_exec_paths(self):
        url = self.start_server()
        started = time.monotonic()
        status, doc = self.request("POST", url + "/exec", {"command": py("import time\nprint('up', flush=True)\n"
                                                                         "time.sleep(60)"), "wait": False})
        self.assertEqual((status, doc["type"], doc["state"]), (200, "run", "running"), doc)
        self.assertLess(time.monotonic() - started, 5, "wait: false still waited")
        job_id = doc["job_id"]
        status, doc = self.request("GET", url + "/status/" + job_id)
        self.assertEqual((status, doc["type"], doc["state"]), (200, "status", "running"))
        self.wait_log(jobstate.open_job(job_id, self.root), "up")
        status, doc = self.request("GET", url + "/tail/%s?lines=1" % job_id)
        self.assertEqual((status, doc["type"], lf(doc["stdout"])), (200, "tail", "up\n"))
        waiter = {}
        thread = threading.Thread(target=lambda: waiter.update(doc=self.request("GET", url + "/wait/" + job_id)[1]))
        thread.start()
        status, doc = self.request("POST", url + "/kill/%s?no_wait=true" % job_id)
        self.assertEqual((status, doc["type"], doc["signal_sent"]), (200, "kill", "SIGTERM"))
        thread.join(30)
        self.assertEqual(waiter["doc"]["state"], "killed", "GET /wait/{id} waits for the end, as wait --forever")
        other = self.run_job(py("import time; time.sleep(60)"))
        status, doc = self.request("POST", url + "/jobs/%s/kill" % other.id, {"no_wait": True})
        self.assertEqual((status, doc["type"]), (200, "kill"))
        status, doc = self.request("POST", url + "/exec", {"command": ["true", "x"], "wait": "no"})
        self.assertEqual((status, doc["error"]["code"]), (400, "invalid_argument"))

    def test_token_guards_every_endpoint_but_health(self):
        url = self.start_server(token="s3cret")
        for method, path in (("GET", "/jobs"), ("POST", "/jobs"), ("GET", "/jobs/abc"),
                             ("POST", "/jobs/abc/kill"), ("DELETE", "/jobs/abc"), ("GET", "/nope"),
                             ("GET", "/jobs/abc/follow"), ("POST", "/exec"), ("GET", "/status/abc")):
            for token in (None, "wrong", "s3cre", "s3cret "):
                status, doc = self.request(method, url + path, {} if method == "POST" else None, token=token)
                self.assertEqual((status, doc["error"]["code"]), (401, "unauthorized"), (method, path, token))
        self.assertEqual(self.request("GET", url + "/health", token=None)[0], 200)
        self.assertEqual(self.request("GET", url + "/jobs", token="s3cret")[0], 200)
        self.assertEqual(jobstate._list_job_ids(self.root), [])

    def test_body_too_large(self):
        url = self.start_server()
        status, doc = self.request("POST", url + "/jobs", raw=b" " * (jobstate._HTTP_MAX_BODY + 1))
        self.assertEqual((status, doc["error"]["code"]), (413, "payload_too_large"))

    # -- safe by default: a generated token, serve.json --------------------------------

    def test_serve_without_a_token_makes_one(self):
        url = self.start_server()
        doc_token = self.token
        self.assertIsInstance(doc_token, str)
        self.assertGreaterEqual(len(doc_token), 32)
        info_path = os.path.join(self.root, "serve.json")
        with open(info_path) as f:
            self.assertEqual(json.load(f), {"url": url, "token": doc_token, "pid": self.server.pid})
        if POSIX:
            self.assertEqual(os.stat(info_path).st_mode & 0o777, 0o600)
        for headers in ({"Authorization": None}, {"Authorization": "Bearer wrong"},
                        {"Authorization": "Bearer " + doc_token[:-1]}, {"Authorization": doc_token}):
            self.assert_error(self.send("GET", "/jobs", headers=headers), 401, "unauthorized", headers)
            self.assert_error(self.send("POST", "/jobs", {"command": py("pass")}, headers=headers),
                              401, "unauthorized", headers)
        self.assertEqual(jobstate._list_job_ids(self.root), [])
        self.assertEqual(self.send("GET", "/health", headers={"Authorization": None})[0], 200)
        self.assertEqual(self.send("GET", "/jobs")[0], 200)
        if POSIX:  # SIGTERM is a clean stop; Windows' terminate() is not
            self.server.terminate()
            self.assertEqual(self.server.wait(30), 0)
            self.assertFalse(os.path.exists(info_path), "serve.json outlived its server")

    def test_a_given_token_is_used_and_written_for_clients(self):
        self.start_server(token="given-token-123")
        ready = self.ready
        self.assertEqual((ready["auth"], ready["token"]), (True, None), "the caller's secret is not echoed")
        with open(ready["token_file"]) as f:
            self.assertEqual(json.load(f)["token"], "given-token-123")
        self.assertEqual(self.send("GET", "/jobs")[0], 200)

    def test_no_token_is_explicit_and_loopback_only(self):
        env = {k: v for k, v in os.environ.items() if k != "JOBSTATE_SERVE_TOKEN"}
        for bind, extra in (("0.0.0.0:0", {}), ("127.0.0.1:0", {"JOBSTATE_SERVE_TOKEN": "t"})):
            proc = subprocess.run([PY, JOBSTATE, "--root", self.root, "serve", "--bind", bind, "--no-token"],
                                  env=dict(env, **extra), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=30)
            doc = json.loads(proc.stdout)
            self.assertEqual((proc.returncode, doc["error"]["code"]), (1, "invalid_argument"), bind)
        self.start_server(args=["--no-token"])
        self.assertIsNone(self.token)
        with open(os.path.join(self.root, "serve.json")) as f:
            self.assertIsNone(json.load(f)["token"])
        status, _, doc = self.send("POST", "/jobs", {"command": py("print('open')"), "until": 10})
        self.assertEqual((status, doc["stdout"].strip()), (200, "open"))

    # -- browsers: cross-site requests, DNS rebinding, CORS ----------------------------

    def test_cross_site_simple_post_launches_nothing(self):
        marker = os.path.join(self.tmp, "pwned")
        evil = json.dumps({"command": py("open(%r, 'w').close()" % marker), "until": 5}).encode()
        victim = self.run_job(py("import time; time.sleep(60)"))
        for args in ([], ["--no-token"]):
            self.start_server(args=args)
            for extra in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {}):
                # What fetch(url, {method: "POST", mode: "no-cors", body}) sends: no preflight, no token.
                headers = dict(extra, **{"Content-Type": "text/plain;charset=UTF-8", "Authorization": None})
                for target in ("/jobs", "/jobs/%s/kill" % victim.id):
                    status, response_headers, doc = self.send("POST", target, evil, headers=headers)
                    self.assertIn(status, (401, 403, 415), (args, extra, target))
                    self.assertFalse(doc["ok"])
                    self.assertIsNone(response_headers.get("Access-Control-Allow-Origin"))
        self.assertEqual(jobstate._list_job_ids(self.root), [victim.id], "a cross-site request launched a job")
        self.assertFalse(os.path.exists(marker))
        self.assertEqual(victim.state().status, jobstate.JobStatus.RUNNING)

    def test_dns_rebinding_host_is_forbidden(self):
        secret = "secret-%s" % os.getpid()
        job = self.run_job(py("print(%r)" % secret))
        job.wait(10)
        for args in ([], ["--no-token"]):
            self.start_server(args=args)
            for host in ("evil.example:19263", "evil.example", "127.0.0.1.evil.example", "localhost.evil.example",
                         "0.0.0.0:%d" % self.port, "[::2]:80", "::1", "", "127.0.0.1@evil.example"):
                for target in ("/jobs?all=1", "/jobs/" + job.id, "/jobs/%s/tail" % job.id, "/health"):
                    status, _, doc = reply = self.send("GET", target, headers={"Host": host})
                    self.assert_error(reply, 403, "forbidden", (args, host, target))
                    self.assertNotIn(secret, json.dumps(doc))
            # HTTP/1.0 without a Host header at all
            status, doc = raw_exchange(self.port, b"GET /jobs?all=1 HTTP/1.0\r\n\r\n")
            self.assertEqual((status, doc["error"]["code"]), (403, "forbidden"))
            for host in ("localhost:%d" % self.port, "LOCALHOST", "127.0.0.1", "127.9.9.9:1", "[::1]:%d" % self.port):
                status, _, doc = self.send("GET", "/jobs/%s/tail" % job.id, headers={"Host": host})
                self.assertEqual((status, doc["stdout"].strip()), (200, secret), host)

    def test_host_rules(self):
        allowed = jobstate._host_is_allowed
        for header in ("localhost", "localhost:80", "127.0.0.1", "127.0.0.1:19263", "127.1.2.3", "[::1]",
                       "[::1]:19263", "LocalHost:1"):
            self.assertTrue(allowed(header, "127.0.0.1"), header)
        for header in (None, "", "evil.example", "evil.example:19263", "localhost.", "a.localhost", "::1",
                       "[::1", "127.0.0.1:port", "127.0.0.1:1:2", "0.0.0.0", "10.0.0.5", "user@localhost",
                       "localhost/x", "[evil.example]"):
            self.assertFalse(allowed(header, "127.0.0.1"), header)
        self.assertTrue(allowed("box.lan:19263", "box.lan"))
        self.assertTrue(allowed("10.0.0.5:19263", "10.0.0.5"))
        self.assertFalse(allowed("10.0.0.6:19263", "10.0.0.5"))
        self.assertTrue(allowed("10.0.0.6:19263", "0.0.0.0"), "a wildcard bind answers on any address")
        self.assertTrue(allowed("[fe80::1]:19263", "::"))
        self.assertFalse(allowed("evil.example", "0.0.0.0"), "names can be rebound, addresses cannot")

    def test_allowed_origin_gets_cors_and_others_get_403(self):
        app = "http://app.example:3000"
        self.start_server(args=["--allow-origin", app, "--allow-origin", "https://ui.example"])
        status, headers, doc = self.send("GET", "/jobs", headers={"Origin": app})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (200, app))
        self.assertIn("Origin", headers["Vary"])
        status, headers, _ = self.send("OPTIONS", "/jobs", headers={
            "Origin": app, "Access-Control-Request-Method": "POST", "Authorization": None,
            "Access-Control-Request-Headers": "authorization,content-type"})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (204, app))
        self.assertIn("POST", headers["Access-Control-Allow-Methods"])
        self.assertIn("authorization", headers["Access-Control-Allow-Headers"].lower())
        self.assertIn("content-type", headers["Access-Control-Allow-Headers"].lower())
        status, headers, doc = self.send("GET", "/jobs", headers={"Origin": app, "Authorization": None})
        self.assertEqual((status, headers["Access-Control-Allow-Origin"]), (401, app))
        for origin in ("http://evil.example", "http://app.example", "https://app.example:3000", app + "/",
                       "HTTP://APP.EXAMPLE:3000x", "null"):
            for method in ("GET", "OPTIONS"):
                headers, _ = self.assert_error(self.send(method, "/jobs", headers={"Origin": origin}),
                                               403, "forbidden", (method, origin))
                self.assertIsNone(headers.get("Access-Control-Allow-Origin"))
        status, headers, _ = self.send("GET", "/jobs")
        self.assertEqual(status, 200)
        self.assertIsNone(headers.get("Access-Control-Allow-Origin"))
        for bad in ("*", "http://app.example/", "http://app.example/path", "app.example", ""):
            ready, proc = self.launch_server(args=["--allow-origin", bad])
            self.assertEqual((ready["ok"], ready["error"]["code"]), (False, "invalid_argument"), bad)
            self.assertEqual(proc.wait(30), 1)

    def test_post_bodies_must_be_json(self):
        self.start_server()
        command = {"command": py("pass")}
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             None, "", "application/jsonp", "text/json"):
            for target in ("/jobs", "/jobs/abc/kill"):
                self.assert_error(self.send("POST", target, command, headers={"Content-Type": content_type}),
                                  415, "unsupported_media_type", (content_type, target))
        self.assertEqual(jobstate._list_job_ids(self.root), [])
        status, _, doc = self.send("POST", "/jobs", command,
                                   headers={"Content-Type": "Application/JSON; charset=utf-8"})
        self.assertEqual((status, doc["type"]), (200, "run"))

    # -- a robust server: backlog, threads, idle connections, malformed input ----------

    @unittest.skipUnless(POSIX, "stops the server with SIGSTOP")
    def test_many_clients_connecting_at_once_all_get_answers(self):
        import select
        import socket
        self.start_server()
        # While the server is stopped only the kernel's listen queue holds new connections.
        os.kill(self.server.pid, signal.SIGSTOP)
        self.addCleanup(os.kill, self.server.pid, signal.SIGCONT)
        socks = []
        for _ in range(60):
            sock = socket.socket()
            self.addCleanup(sock.close)
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", self.port))
            socks.append(sock)
        pending, deadline = set(socks), time.monotonic() + 3
        while pending and time.monotonic() < deadline:
            for sock in select.select([], list(pending), [], 0.1)[1]:
                self.assertEqual(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR), 0)
                pending.discard(sock)
        self.assertEqual(len(pending), 0, "%d of 60 connections were not queued" % len(pending))
        os.kill(self.server.pid, signal.SIGCONT)
        request = ("GET /health HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % self.port).encode()
        for sock in socks:
            sock.setblocking(True)
            sock.settimeout(30)
            sock.sendall(request)
        for sock in socks:
            reply = b""
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
            self.assertTrue(reply.startswith(b"HTTP/1.1 200 "), reply[:200])

    @unittest.skipUnless(jobstate._LINUX, "counts the server's threads in /proc")
    def test_handler_threads_are_bounded_and_idle_connections_closed(self):
        import select
        import socket
        self.start_server(JOBSTATE_SERVE_IDLE_TIMEOUT="1")
        socks = [socket.create_connection(("127.0.0.1", self.port), timeout=30) for _ in range(100)]
        for sock in socks:
            self.addCleanup(sock.close)
        peak, closed, deadline = 0, set(), time.monotonic() + 20
        while len(closed) < len(socks) and time.monotonic() < deadline:
            peak = max(peak, len(os.listdir("/proc/%d/task" % self.server.pid)))
            for sock in select.select([s for s in socks if s not in closed], [], [], 0.05)[0]:
                self.assertEqual(sock.recv(1), b"")
                closed.add(sock)
        self.assertLessEqual(peak, 64 + 3, "one thread per idle connection")
        self.assertEqual(len(closed), len(socks), "idle connections were never closed")
        self.assertEqual(self.send("GET", "/health")[0], 200)

    @unittest.skipUnless(POSIX, "SIGTERM is a clean stop on POSIX only")
    def test_sigterm_under_load_stops_serve(self):
        """A SIGTERM that lands while the accepting loop starts a handler thread must still stop serve."""
        import http.client
        for _ in range(8):
            self.start_server()
            port, stop, answered = self.port, threading.Event(), []

            def hammer():
                while not stop.is_set():
                    try:
                        answered.append(raw_exchange(port, b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n", 5))
                    except (OSError, http.client.HTTPException):  # the server is going away
                        pass
            clients = [threading.Thread(target=hammer) for _ in range(4)]
            for client in clients:
                client.start()
            try:
                wait_for(lambda: len(answered) >= 20, 10, "requests in flight")
                self.server.terminate()
                self.assertEqual(self.server.wait(10), 0, "serve did not stop on SIGTERM")
            finally:
                stop.set()
                for client in clients:
                    client.join()
            self.assertFalse(os.path.exists(os.path.join(self.root, "serve.json")))

    def test_idle_connection_is_closed(self):
        import socket
        self.start_server(JOBSTATE_SERVE_IDLE_TIMEOUT="0.5")
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            started = time.monotonic()
            try:
                data = sock.recv(1)
            except socket.timeout:
                data = None
            self.assertEqual(data, b"", "the server kept an idle connection open")
            self.assertLess(time.monotonic() - started, 5)

    def test_malformed_requests_get_4xx_envelopes(self):
        self.start_server()
        cmd = py("pass")
        nested = b"[" * 100000
        bad = [
            ("DELETE", "/jobs", None, {}, 405, "method_not_allowed"),
            ("PUT", "/jobs", {"command": cmd}, {}, 405, "method_not_allowed"),
            ("PATCH", "/jobs/abc", {}, {}, 405, "method_not_allowed"),
            ("GET", "/jobs/abc/kill", None, {}, 405, "method_not_allowed"),
            ("POST", "/health", {}, {}, 405, "method_not_allowed"),
            ("BREW", "/jobs", None, {}, 405, "method_not_allowed"),
            ("GET", "/jobs/abc/nope", None, {}, 404, "not_found"),
            ("GET", "http://127.0.0.1/jobs", None, {}, 404, "not_found"),
            ("POST", "/jobs", nested, {}, 400, "invalid_argument"),
            ("POST", "/jobs", b'{"command": ' + nested + b"}", {}, 400, "invalid_argument"),
            ("POST", "/jobs", b'{"command": ["x"], "until": Infinity}', {}, 400, "invalid_argument"),
            ("POST", "/jobs", b'{"command": ["x"], "until": NaN}', {}, 400, "invalid_argument"),
            ("POST", "/jobs", b'{"command": ["x"], "until": -Infinity}', {}, 400, "invalid_argument"),
            ("POST", "/jobs", b'{"command": ["x"], "timeout": 1e400}', {}, 400, "invalid_argument"),
            ("POST", "/jobs", b'{"command": ["\xff\xfe"]}', {}, 400, "invalid_argument"),
            ("POST", "/jobs", b'["not", "an", "object"]', {}, 400, "invalid_argument"),
            ("POST", "/jobs", {"command": cmd}, {"Content-Length": "abc"}, 400, "invalid_argument"),
            ("POST", "/jobs", {"command": cmd}, {"Content-Length": "-5"}, 400, "invalid_argument"),
            ("POST", "/jobs", {"command": cmd}, {"Content-Length": "+9"}, 400, "invalid_argument"),
            ("POST", "/jobs", b"5\r\nhello\r\n0\r\n\r\n", {"Content-Length": None, "Transfer-Encoding": "chunked"},
             400, "invalid_argument"),
            ("POST", "/jobs", {"command": []}, {}, 400, "invalid_argument"),
            ("POST", "/jobs", {"command": cmd, "cwd": "/tmp/\x00x"}, {}, 400, "invalid_argument"),
            ("POST", "/jobs", {"command": cmd, "stdin": "\ud800"}, {}, 400, "invalid_argument"),
            ("POST", "/jobs", {"command": ["\ud800"]}, {}, 400, "invalid_argument"),
            ("POST", "/jobs", {"command": cmd, "\ud800": 1}, {}, 400, "invalid_argument"),
            ("GET", "/jobs?cwd=%00", None, {}, 400, "invalid_argument"),
        ]
        for name, value in (("until", 1e12), ("until", 1e9), ("until", -1), ("timeout", -0.5), ("kill_after", -1),
                            ("max_bytes", -1), ("max_bytes", 2 ** 64), ("until", True), ("max_bytes", 1.5)):
            bad.append(("POST", "/jobs", {"command": cmd, name: value}, {}, 400, "invalid_argument"))
        bad.append(("POST", "/jobs/abc/kill", {"kill_after": -1}, {}, 400, "invalid_argument"))
        for query in ("until=inf", "until=nan", "until=-1", "until=1e12", "until=Infinity", "max_bytes=-1",
                      "max_bytes=1e3"):
            bad.append(("GET", "/jobs/abc/wait?" + query, None, {}, 400, "invalid_argument"))
        for query in ("lines=-1", "max_bytes=-1", "lines=nan"):
            bad.append(("GET", "/jobs/abc/tail?" + query, None, {}, 400, "invalid_argument"))
        for query in ("limit=-1", "limit=inf", "all=maybe", "state=bogus", "limit=a", "bogus=1", "cwd=%00"):
            bad.append(("GET", "/jobs?" + query, None, {}, 400, "invalid_argument"))
        # The tester's list of errors that came without a hint.
        bad += [("POST", "/jobs", b"{not json", {}, 400, "invalid_argument"),
                ("POST", "/jobs", b"[1]", {}, 400, "invalid_argument"),
                ("POST", "/jobs", {"command": cmd, "timeout": "1"}, {}, 400, "invalid_argument"),
                ("POST", "/jobs", b'{"command": ["x"], "until": 1' + b"0" * 5000 + b"}", {}, 400, "invalid_argument"),
                ("POST", "/jobs", b"\xff{}", {}, 400, "invalid_argument"),
                ("POST", "/jobs", b" " * (jobstate._HTTP_MAX_BODY + 1), {}, 413, "payload_too_large"),
                ("POST", "/jobs", b"{}", {"Content-Type": "text/plain"}, 415, "unsupported_media_type"),
                ("POST", "/exec", {"command": cmd, "wait": "no"}, {}, 400, "invalid_argument"),
                ("POST", "/jobs", {}, {}, 400, "invalid_argument"),
                ("POST", "/jobs", {"command": cmd, "stream": "both"}, {}, 400, "invalid_argument"),
                ("GET", "/jobs/abc/tail?lines=a", None, {}, 400, "invalid_argument"),
                ("GET", "/jobs/abc/wait?match=(", None, {}, 404, "job_not_found"),
                ("GET", "/jobs/abc", None, {}, 404, "job_not_found"),
                ("GET", "/jobs/abc/log?stream=x", None, {}, 400, "invalid_argument"),
                ("GET", "/jobs", None, {"Authorization": "Bearer wrong"}, 401, "unauthorized"),
                ("GET", "/jobs", None, {"Host": "evil.example"}, 403, "forbidden")]
        for method, target, body, headers, status, code in bad:
            self.assert_error(self.send(method, target, body, headers=headers), status, code, (method, target, body))
        post = "POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n" % (self.port, self.token)
        for data in (b"HELLO\r\n\r\n", b"GET /jobs HTTP/9.9\r\nHost: localhost\r\n\r\n",
                     b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n",
                     post.encode() + b"Content-Type: application/json\r\nContent-Length: 2\r\n"
                     b"Content-Length: 2\r\n\r\n{}",
                     post.encode() + b"Content-Type: application/json\r\nContent-Length: -2\r\n\r\n{}"):
            status, doc = raw_exchange(self.port, data)
            self.assertTrue((400 <= status < 500 or status == 505) and doc["ok"] is False, (data[:30], status, doc))
            self.assertTrue(doc["error"].get("hint"), (data[-60:], doc))
        self.assertEqual(jobstate._list_job_ids(self.root), [], "a malformed request launched a job")
        # The server still serves, and JSON Schema's "integer" includes 5.0.
        status, _, doc = self.send("POST", "/jobs", {"command": cmd, "until": 10, "max_bytes": 100.0})
        self.assertEqual((status, doc["state"]), (200, "exited"))

    def test_a_short_body_is_answered(self):
        import http.client
        import socket
        self.start_server()
        body = json.dumps({"command": py("pass")}).encode()
        head = ("POST /jobs HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nAuthorization: Bearer %s\r\n"
                "Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                % (self.port, self.token, len(body) + 10))
        with socket.create_connection(("127.0.0.1", self.port), timeout=30) as sock:
            sock.sendall(head.encode() + body)
            sock.shutdown(socket.SHUT_WR)
            resp = http.client.HTTPResponse(sock)
            resp.begin()
            doc = json.loads(resp.read())
        self.assertEqual((resp.status, doc["error"]["code"]), (400, "invalid_argument"))
        self.assertTrue(doc["error"].get("hint"), doc)
        self.assertEqual(jobstate._list_job_ids(self.root), [])

    def test_numeric_arguments_follow_their_schema(self):
        """_check_arguments (MCP and HTTP) enforces each parameter's JSON Schema range,
        and durations have the CLI's range."""
        checked = 0
        for operation, (_, params, required) in jobstate._OPERATIONS.items():
            base = {name: (["x"] if name == "command" else "abc") for name in required}
            for name, param in params.items():
                if param["type"] not in ("number", "integer"):
                    continue
                checked += 1
                self.assertEqual(param["minimum"], 0, (operation, name))
                high = param.get("maximum", param.get("exclusiveMaximum"))
                self.assertIsNotNone(high, (operation, name))
                for value in (-1, -0.001, float("inf"), float("-inf"), float("nan"), True, False, "5",
                              high + 1, 10 ** 30):
                    with self.assertRaises(jobstate.InvalidArgumentError, msg=(operation, name, value)):
                        jobstate._check_arguments(operation, dict(base, **{name: value}))
                if name not in required:  # null is "not given"
                    self.assertNotIn(name, jobstate._check_arguments(operation, dict(base, **{name: None})))
                if "exclusiveMaximum" in param:
                    with self.assertRaises(jobstate.InvalidArgumentError):
                        jobstate._check_arguments(operation, dict(base, **{name: high}))
                for value in (0, 1, 2.0):
                    jobstate._check_arguments(operation, dict(base, **{name: value}))
                if param["type"] == "number":
                    self.assertEqual(param["exclusiveMaximum"], 10 ** 9)
                    jobstate._parse_duration(high - 1, name)
                    with self.assertRaises(jobstate.InvalidArgumentError):
                        jobstate._parse_duration(high, name)
        self.assertGreaterEqual(checked, 10)


# The page's Content-Security-Policy, exactly as served (README, "The web page").
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'")


class WebHttpTests(ServeTestCase):
    """The web page's login, cookie, headers and endpoints, over plain HTTP."""

    def login(self):
        """Visit the login URL serve printed; returns the `Cookie` header value it set."""
        from urllib.parse import urlsplit
        target = urlsplit(self.ready["login_url"])
        status, headers, _ = self.send("GET", target.path + "?" + target.query, headers={"Authorization": None})
        self.assertEqual(status, 303)
        return headers["Set-Cookie"].split(";", 1)[0]

    def as_page(self, cookie, **extra):
        """The headers the page's own fetch() sends: the cookie, no token, X-Jobstate."""
        return dict({"Cookie": cookie, "Authorization": None, "X-Jobstate": "1"}, **extra)

    def test_login_url_sets_a_strict_httponly_cookie_and_redirects(self):
        url = self.start_server()
        self.assertEqual(self.ready["login_url"], "%s/?token=%s" % (url, self.token))
        status, headers, _ = self.send("GET", "/?token=" + self.token, headers={"Authorization": None})
        self.assertEqual((status, headers["Location"]), (303, "/"))
        cookies = headers.get_all("Set-Cookie")
        self.assertEqual(len(cookies), 1)
        name_value, *attributes = [part.strip() for part in cookies[0].split(";")]
        name, value = name_value.split("=", 1)
        self.assertEqual(name, "jobstate_%d" % self.port, "one cookie per port: two servers must not collide")
        self.assertNotIn(self.token, value, "the cookie is a MAC of the token, never the token")
        self.assertGreaterEqual(len(value), 32)
        self.assertEqual(sorted(a.lower() for a in attributes), ["httponly", "path=/", "samesite=strict"])
        page = {"Cookie": name_value, "Authorization": None}
        status, headers, _ = self.send("GET", "/", headers=page)
        self.assertEqual((status, headers["Content-Type"]), (200, "text/html; charset=utf-8"))
        self.assertIsNone(headers.get("Set-Cookie"))
        status, _, doc = self.send("GET", "/jobs?all=1", headers=self.as_page(name_value))
        self.assertEqual((status, doc["type"]), (200, "list"))
        # The cookie authenticates only requests that carry X-Jobstate (a cross-origin page
        # cannot add it without a preflight, which it never gets).
        self.assert_error(self.send("GET", "/jobs?all=1", headers=page), 401, "unauthorized")
        self.assert_error(self.send("GET", "/jobs?all=1", headers=dict(page, Cookie=name_value + "x")), 401,
                          "unauthorized")
        # A bearer token opens the page too, and --no-token needs no login at all.
        self.assertEqual(self.send("GET", "/")[0], 200)
        self.start_server(args=["--no-token"])
        self.assertEqual(self.ready["login_url"], self.ready["url"] + "/")
        self.assertEqual(self.send("GET", "/")[0], 200)

    def test_wrong_login_token_is_401_without_cookie(self):
        self.start_server()
        for target in ("/?token=wrong", "/?token=", "/?token=" + self.token[:-1], "/?token=" + self.token + "x",
                       "/?token=%s&token=wrong" % self.token, "/", "/?token=%00"):
            status, headers, _ = self.send("GET", target, headers={"Authorization": None})
            self.assertEqual((status, headers["Content-Type"]), (401, "text/html; charset=utf-8"), target)
            self.assertIsNone(headers.get("Set-Cookie"), target)
            self.assertEqual(headers["Content-Security-Policy"], PAGE_CSP)
        self.start_server(token="chosen-by-the-caller")
        self.assertIsNone(self.ready["login_url"], "a caller's secret is never echoed")
        status, headers, _ = self.send("GET", "/?token=chosen-by-the-caller", headers={"Authorization": None})
        self.assertEqual((status, headers["Location"]), (303, "/"))
        self.send("GET", "/?token=chosen-by-the-caller&x=1", headers={"Authorization": None})
        status, headers, _ = self.send("GET", "/?%74oken=chosen-by-the-caller", headers={"Authorization": None})
        self.assertEqual((status, headers["Location"]), (303, "/"))
        if POSIX:  # the request log does not echo it either (SIGTERM: a clean stop that flushes it)
            self.server.terminate()
            self.assertEqual(self.server.wait(30), 0)
            logs = [name for name in os.listdir(self.tmp) if name.startswith("serve-")]
            for name in logs:
                with open(os.path.join(self.tmp, name), "rb") as f:
                    text = f.read()
                self.assertNotIn(b"chosen-by-the-caller", text)
            self.assertIn(b"token=***", text)

    def test_page_and_assets_carry_the_security_headers(self):
        import html.parser
        self.start_server()
        cookie = self.login()
        replies = {path: http_exchange(self.port, "GET", path, [("Host", "127.0.0.1:%d" % self.port),
                                                                 ("Cookie", cookie)], raw=True)
                   for path in ("/", "/app.js", "/app.css")}
        types = {"/": "text/html; charset=utf-8", "/app.js": "text/javascript; charset=utf-8",
                 "/app.css": "text/css; charset=utf-8"}
        for path, (status, headers, body) in replies.items():
            self.assertEqual((status, headers["Content-Type"]), (200, types[path]), path)
            self.assertEqual(headers["Content-Security-Policy"], PAGE_CSP, path)
            self.assertEqual(headers["X-Content-Type-Options"], "nosniff", path)
            self.assertEqual(headers["Referrer-Policy"], "no-referrer", path)
            self.assertEqual(headers["X-Frame-Options"], "DENY", path)
            self.assertGreater(len(body), 1000, path)
        # The script needs the page's sign-in (SPEC: every endpoint but /health needs the token): the
        # cookie, which a <script> sends without X-Jobstate, or the token. The style is the sign-in
        # page's too, so it is served without one. Host rules apply to both.
        self.assert_error(self.send("GET", "/app.js", headers={"Authorization": None}), 401, "unauthorized")
        self.assertEqual(self.send("GET", "/app.js")[0], 200)
        self.assert_error(self.send("GET", "/app.js", headers={"Authorization": None, "Cookie": cookie,
                                                               "Sec-Fetch-Site": "cross-site"}), 403, "forbidden")
        self.assertEqual(self.send("GET", "/app.css", headers={"Authorization": None})[0], 200)
        self.assert_error(self.send("GET", "/app.js", headers={"Host": "evil.example"}), 403, "forbidden")
        self.assert_error(self.send("GET", "/app.css", headers={"Host": "evil.example"}), 403, "forbidden")
        status, headers, doc = self.send("GET", "/jobs")
        self.assertEqual((headers["X-Content-Type-Options"], headers["Cache-Control"]), ("nosniff", "no-store"))

        class Inline(html.parser.HTMLParser):
            found = []

            def handle_starttag(self, tag, attrs):
                names = {name for name, _ in attrs}
                if tag == "script" and "src" not in names or tag == "style":
                    self.found.append(tag)
                self.found += [name for name in names if name == "style" or name.startswith("on")]

            def handle_data(self, data):
                if self.lasttag == "script" and data.strip():
                    self.found.append("script text")
        parser = Inline()
        parser.feed(replies["/"][2].decode("utf-8"))
        self.assertEqual(parser.found, [], "inline script or style: the CSP would block it")
        script = replies["/app.js"][2].decode("utf-8")
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(",
                     "setAttribute(\"style\"", ".cssText", "javascript:"):
            self.assertNotIn(sink, script, "job data must go in as text")

    def test_a_cookie_never_makes_a_cross_site_request_work(self):
        victim = self.run_job(py("import time; time.sleep(60)"))
        self.start_server()
        cookie = self.login()
        command = {"command": py("pass")}
        own = "http://127.0.0.1:%d" % self.port
        for extra in ({"Origin": "http://evil.example"}, {"Origin": "null"}, {"Origin": "http://localhost:%d" % self.port},
                      {"Origin": own + ".evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                      {"Sec-Fetch-Site": "same-site"}, {"Host": "evil.example:%d" % self.port}):
            for method, target, body in (("GET", "/jobs?all=1", None), ("POST", "/jobs", command),
                                         ("POST", "/jobs/%s/kill" % victim.id, {}),
                                         ("POST", "/jobs/%s/restart" % victim.id, {}),
                                         ("DELETE", "/jobs/" + victim.id, None),
                                         ("GET", "/jobs/%s/log?stream=stdout" % victim.id, None)):
                status, headers, doc = self.send(method, target, body, headers=self.as_page(cookie, **extra))
                self.assertEqual((status, (doc or {}).get("error", {}).get("code")), (403, "forbidden"),
                                 (extra, method, target))
                self.assertIsNone(headers.get("Access-Control-Allow-Origin"))
        # What a cross-site form or no-cors fetch can send: no X-Jobstate, or a form content type.
        for extra in ({"X-Jobstate": None}, {"Content-Type": "text/plain"},
                      {"Content-Type": "application/x-www-form-urlencoded"}):
            status, _, doc = self.send("POST", "/jobs/%s/kill" % victim.id, {}, headers=self.as_page(cookie, **extra))
            self.assertIn(status, (401, 415), extra)
        self.assertEqual(jobstate._list_job_ids(self.root), [victim.id], "a cross-site request launched a job")
        self.assertEqual(victim.state().status, jobstate.JobStatus.RUNNING)
        # The page's own requests (same origin, as a browser sends them) work.
        same = self.as_page(cookie, Origin=own, **{"Sec-Fetch-Site": "same-origin"})
        status, _, doc = self.send("POST", "/jobs/%s/kill" % victim.id, {"signal": "KILL"}, headers=same)
        self.assertEqual((status, doc["type"]), (200, "kill"))
        self.assertEqual(victim.wait(10).status, jobstate.JobStatus.KILLED)

    def test_log_ranges_are_byte_exact(self):
        make_text = '"".join("line %04d \\u00e9\\u20ac\\U0001F600\\n" % i for i in range(6000))'
        data = eval(make_text).encode("utf-8")
        job = self.run_job(py("import sys; sys.stdout.buffer.write(%s.encode()); sys.stderr.write('e' * 10)"
                              % make_text))
        self.assertEqual(job.wait(20).status, jobstate.JobStatus.EXITED)
        self.start_server()
        base = "/jobs/%s/log?" % job.id

        def read(query, job_id=job.id):
            status, headers, body = self.send("GET", "/jobs/%s/log?%s" % (job_id, query), raw=True)
            self.assertEqual((status, headers["Content-Type"]), (200, "application/octet-stream"), query)
            self.assertEqual(headers["Cache-Control"], "no-store")
            rng = tuple(int(headers[h]) for h in ("X-Log-Start", "X-Log-End", "X-Log-Size"))
            self.assertEqual(rng[1] - rng[0], len(body), query)
            return rng, body
        size = len(data)
        self.assertEqual(read("stream=stdout"), ((size - 65536, size, size), data[-65536:]))
        self.assertEqual(read("stream=stdout&length=100"), ((size - 100, size, size), data[-100:]))
        self.assertEqual(read("stream=stdout&offset=0&length=7"), ((0, 7, size), data[:7]))
        self.assertEqual(read("stream=stdout&offset=12345&length=1000"), ((12345, 13345, size), data[12345:13345]))
        self.assertEqual(read("stream=stdout&offset=%d&length=10" % (size - 3)), ((size - 3, size, size), data[-3:]))
        self.assertEqual(read("stream=stdout&offset=%d" % (size + 50)), ((size, size, size), b""))
        self.assertEqual(read("stream=stdout&offset=5&length=0"), ((5, 5, size), b""))
        self.assertEqual(read("stream=stderr&offset=0"), ((0, 10, 10), b"e" * 10))
        pieces, start = [], 0  # the whole log in pieces that split characters: byte for byte
        while start < size:
            (start, end, _), body = read("stream=stdout&offset=%d&length=%d" % (start, 999))
            pieces.append(body)
            start = end
        self.assertEqual(b"".join(pieces), data)
        (_, _, full_size), full = read("stream=full&offset=0&length=1048576")
        self.assertTrue(b"[STDOUT] line 0000 " in full and b"[STDERR] eeeeeeeeee" in full, full[-200:])
        self.assertEqual(full_size, os.path.getsize(job.paths.full_log))
        created = jobstate.create(py("pass"), root=self.root)
        for stream in ("stdout", "stderr", "full"):
            self.assertEqual(read("stream=" + stream, created.id), ((0, 0, 0), b""), "a job that never ran")
        for query in ("", "stream=bogus", "stream=", "stream=stdout.log", "stream=../state.json",
                      "stream=stdout&offset=-1", "stream=stdout&offset=abc", "stream=stdout&offset=1e3",
                      "stream=stdout&offset=1.5", "stream=stdout&offset=%d" % (2 ** 53), "stream=stdout&length=-1",
                      "stream=stdout&length=1048577", "stream=stdout&length=", "stream=stdout&lines=3",
                      "stream=stdout&stream=bogus"):
            self.assert_error(self.send("GET", base + query), 400, "invalid_argument", query)
        self.assert_error(self.send("GET", "/jobs/ffff0000ffff0000ffff0000ffff0000/log?stream=stdout"), 404,
                          "job_not_found")
        self.assert_error(self.send("GET", "/jobs/../log?stream=stdout"), 400, "invalid_job_id")
        self.assert_error(self.send("POST", base + "stream=stdout", {}), 405, "method_not_allowed")

    @unittest.skipUnless(POSIX, "symlinks")
    def test_log_endpoint_never_follows_a_symlink(self):
        secret = os.path.join(self.tmp, "secret")
        with open(secret, "w") as f:
            f.write("top secret")
        job = self.run_job(py("print('x')"))
        job.wait(10)
        self.start_server()
        for path in (job.paths.stdout_log, job.paths.full_log):
            os.unlink(path)
            os.symlink(secret, path)
        os.unlink(job.paths.stderr_log)
        os.mkdir(job.paths.stderr_log)
        for stream in ("stdout", "full", "stderr"):
            status, _, body = self.send("GET", "/jobs/%s/log?stream=%s&offset=0" % (job.id, stream), raw=True)
            self.assertEqual(status, 500, stream)
            self.assertNotIn(b"top secret", body)
            self.assertEqual(json.loads(body)["error"]["code"], "state_unreadable")

    def test_unchanged_lists_are_answered_304(self):
        self.start_server()
        job = self.run_job(py("pass"))
        job.wait(10)
        status, headers, doc = self.send("GET", "/jobs?all=1")
        etag = headers["ETag"]
        self.assertEqual((status, doc["count"]), (200, 1))
        self.assertRegex(etag, r'\A"[0-9a-f]{16,}"\Z')
        status, headers, body = self.send("GET", "/jobs?all=1", headers={"If-None-Match": etag}, raw=True)
        self.assertEqual((status, body, headers["ETag"]), (304, b"", etag))
        self.assertEqual(self.send("GET", "/jobs/" + job.id, headers={"If-None-Match": etag})[0], 200)
        self.run_job(py("pass")).wait(10)
        status, headers, doc = self.send("GET", "/jobs?all=1", headers={"If-None-Match": etag})
        self.assertEqual((status, doc["count"]), (200, 2))
        self.assertNotEqual(headers["ETag"], etag)

    def test_restart_definition_and_notifications(self):
        sink = os.path.join(self.tmp, "events.jsonl")
        job = self.run_job(py("print('run')"), env={"API_KEY": "hunter2", "MODE": "x"}, masks=["API_KEY"],
                           timeout_s=90, tags=["web"], notify_file=sink)
        job.wait(10)
        self.start_server()

        def delivered():
            try:
                return not jobstate._read_json(job.paths.event)["pending"]
            except (OSError, ValueError):
                return False
        wait_for(delivered, 10, "the notification's result")
        status, _, doc = self.send("GET", "/jobs/%s/definition" % job.id)
        self.assertEqual((status, doc["type"], doc["command"], doc["timeout_s"], doc["tags"], doc["notify_file"]),
                         (200, "definition", py("print('run')"), 90, ["web"], sink))
        self.assertEqual(validate(doc, jobstate._response_schema("definition")), [])
        self.assertEqual(doc["env"], {"API_KEY": "***", "MODE": "x"})
        self.assertNotIn("hunter2", json.dumps(doc))
        status, _, doc = self.send("GET", "/jobs/%s/notifications" % job.id)
        self.assertEqual((status, doc["type"], doc["recorded"], doc["pending"]), (200, "notifications", True, False))
        self.assertEqual([(d["sink"], d["target"], d["ok"]) for d in doc["deliveries"]], [("file", sink, True)])
        self.assertEqual(doc["event"]["state"], "exited")
        self.assertEqual(validate(doc, jobstate._response_schema("notifications")), [])
        other = self.run_job(py("pass"))
        other.wait(10)
        status, _, doc = self.send("GET", "/jobs/%s/notifications" % other.id)
        self.assertEqual((doc["recorded"], doc["pending"], doc["event"], doc["deliveries"]), (False, None, None, []))
        first_start = job.state().started_at
        status, _, doc = self.send("POST", "/jobs/%s/restart" % job.id, {"until": 10})
        self.assertEqual((status, doc["type"], doc["state"], lf(doc["stdout"])), (200, "restart", "exited", "run\n"))
        self.assertNotEqual(job.state().started_at, first_start)
        for body, code in (({"signal": "BOGUS"}, "invalid_signal"), ({"until": -1}, "invalid_argument"),
                           ({"bogus": 1}, "invalid_argument"), ({"kill_after": "x"}, "invalid_argument")):
            self.assert_error(self.send("POST", "/jobs/%s/restart" % job.id, body), 400, code, body)
        self.assert_error(self.send("GET", "/jobs/%s/restart" % job.id), 405, "method_not_allowed")
        self.assert_error(self.send("GET", "/jobs/%s/definition?x=1" % job.id), 400, "invalid_argument")


# -- the page in a real browser: headless Chromium over the DevTools protocol ---------

def note(line):
    """A figure worth keeping (the browser tests' timings), on stderr."""
    sys.stderr.write("\n[web] %s\n" % line)


def find_browser():
    """Chromium for WebPageTests: JOBSTATE_BROWSER (CI sets it, so a missing browser
    fails there instead of skipping), else chromium on PATH."""
    return os.environ.get("JOBSTATE_BROWSER") or shutil.which("chromium") or shutil.which("chromium-browser")


class DevTools:
    """One page of headless Chromium, driven over the DevTools protocol: a WebSocket
    client written with the standard library, so this file imports nothing else."""

    def __init__(self, testcase, binary, log_path):
        import urllib.request
        profile = tempfile.mkdtemp(prefix="jobstate-chromium-")
        testcase.addCleanup(shutil.rmtree, profile, True)
        log = open(log_path, "wb")
        testcase.addCleanup(log.close)
        self.proc = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--remote-debugging-port=0", "--user-data-dir=" + profile, "--window-size=1280,900", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        testcase.addCleanup(self.close)
        port_file = os.path.join(profile, "DevToolsActivePort")

        def devtools_port():
            try:
                with open(port_file) as f:
                    lines = f.read().split()
            except OSError:
                return None
            return int(lines[0]) if len(lines) == 2 else None
        port = wait_for(devtools_port, 30, "Chromium's DevTools port (log: %s)" % log_path)
        with urllib.request.urlopen("http://127.0.0.1:%d/json/list" % port, timeout=30) as resp:
            page = next(t for t in json.loads(resp.read()) if t["type"] == "page")
        self.connect(page["webSocketDebuggerUrl"])
        self.events, self.dialogs, self.next_id = [], [], 0
        for domain in ("Page", "Runtime", "Log"):
            self.call(domain + ".enable")

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the browser and its renderers, in their own session
        self.proc.wait(30)
        if getattr(self, "sock", None):
            self.sock.close()

    # -- the WebSocket (RFC 6455): client frames masked, server frames not ----------------

    def connect(self, url):
        import base64
        import socket
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n"
                           % (parts.path, parts.hostname, parts.port, key)).encode())
        self.reader = self.sock.makefile("rb")
        status = self.reader.readline()
        assert b" 101 " in status, status
        while self.reader.readline() not in (b"\r\n", b""):
            pass

    def send_text(self, text):
        import struct
        payload = text.encode("utf-8")
        size = len(payload)
        if size < 126:
            header = bytes([0x81, 0x80 | size])
        elif size < 1 << 16:
            header = bytes([0x81, 0x80 | 126]) + struct.pack(">H", size)
        else:
            header = bytes([0x81, 0x80 | 127]) + struct.pack(">Q", size)
        mask = os.urandom(4)
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes((mask * (size // 4 + 1))[:size], "big"))
        self.sock.sendall(header + mask + masked.to_bytes(size, "big"))

    def receive_text(self):
        import struct
        message = b""
        while True:
            first, second = self.reader.read(2)
            size = second & 0x7F
            if size == 126:
                size = struct.unpack(">H", self.reader.read(2))[0]
            elif size == 127:
                size = struct.unpack(">Q", self.reader.read(8))[0]
            data = self.reader.read(size)
            if first & 0x0F == 8:
                raise EOFError("the browser closed the DevTools connection")
            message += data
            if first & 0x80:
                return message.decode("utf-8")

    # -- the protocol ------------------------------------------------------------------------

    def call(self, method, **params):
        self.next_id += 1
        call_id = self.next_id
        self.send_text(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.receive_text())
            if message.get("id") == call_id:
                if "error" in message:
                    raise AssertionError("%s: %s" % (method, message["error"]))
                return message["result"]
            if message.get("method") == "Page.javascriptDialogOpening":
                # An alert() would stop the page: record it, and dismiss it so the test goes on.
                self.dialogs.append(message["params"])
                self.next_id += 1
                self.send_text(json.dumps({"id": self.next_id, "method": "Page.handleJavaScriptDialog",
                                           "params": {"accept": False}}))
            elif "method" in message:
                self.events.append(message)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError("%s: %s" % (expression, result["exceptionDetails"]))
        return result["result"].get("value")

    def wait_until(self, expression, timeout_s=10.0):
        return wait_for(lambda: self.evaluate(expression), timeout_s, expression)

    def text(self, selector):
        return self.evaluate("(document.querySelector(%s) || {}).textContent" % json.dumps(selector))

    def click(self, selector):
        """A real mouse click in the middle of the element, as a person makes it."""
        x, y = self.wait_until("(() => { const e = document.querySelector(%s); if (!e || e.disabled) return null;"
                               " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
                               " return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null; })()"
                               % json.dumps(selector))
        self.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def press(self, key, code, key_code, text=""):
        for kind in ("keyDown", "keyUp"):
            self.call("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                      text=text if kind == "keyDown" else "")

    def screenshot(self, path):
        import base64
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        with open(path, "wb") as f:
            f.write(data)
        return len(data)

    def problems(self):
        """Errors the page logged (a CSP violation among them) and exceptions it threw."""
        return [e["params"] for e in self.events if e["method"] == "Runtime.exceptionThrown" or
                (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]


@unittest.skipUnless(POSIX and find_browser(), "needs Chromium (Debian's chromium; .ci/run installs it)")
class WebPageTests(ServeTestCase):
    """The page as a person uses it, in headless Chromium: log in with the token URL,
    watch a job, read its output, kill, restart and delete it."""

    def setUp(self):
        super().setUp()
        self.started = time.monotonic()
        self.addCleanup(lambda: note("%s: %.1fs" % (self.id().rsplit(".", 1)[-1], time.monotonic() - self.started)))

    def open_browser(self):
        self.start_server()
        browser = DevTools(self, find_browser(), os.path.join(self.tmp, "chromium.log"))
        browser.call("Page.navigate", url=self.ready["login_url"])
        browser.wait_until("location.pathname === '/' && location.search === '' && !!document.querySelector('#jobs')")
        return browser

    def screenshot(self, browser, name):
        """A screenshot in the test's directory, and in JOBSTATE_SCREENSHOTS when set (to look at)."""
        path = os.path.join(self.tmp, name)
        size = browser.screenshot(path)
        keep = os.environ.get("JOBSTATE_SCREENSHOTS")
        if keep:
            os.makedirs(keep, exist_ok=True)
            shutil.copy(path, os.path.join(keep, name))
        return size

    def row(self, job_id, cell):
        return "(document.querySelector('#jobs tr[data-job-id=\"%s\"] .%s') || {}).textContent" % (job_id, cell)

    def test_watch_a_job_and_kill_it_from_the_page(self):
        hostile_command = "<img src=x onerror=alert(1)>"
        hostile_dir = os.path.join(self.tmp, "<img src=y onerror=alert(2)>")
        os.mkdir(hostile_dir)
        hostile = self.run_job([hostile_command], cwd=hostile_dir)
        hostile.wait(10)
        browser = self.open_browser()
        self.assertEqual(browser.evaluate("document.cookie"), "", "the session cookie is HttpOnly")
        browser.wait_until(self.row(hostile.id, "command"))
        self.assertEqual(browser.evaluate(self.row(hostile.id, "command")), hostile_command)
        self.assertEqual(browser.evaluate(self.row(hostile.id, "cwd")), hostile_dir)
        self.assertEqual(browser.evaluate("document.querySelectorAll('img, b').length"), 0)
        job = self.run_job(py("import time\nfor i in range(10 ** 6):\n    print('tick %d' % i, flush=True)\n"
                              "    time.sleep(0.2)"), tags=["web.demo"])
        launched = time.monotonic()
        browser.wait_until(self.row(job.id, "state") + " === '\u25cf running'", 5)
        note("the new job appeared on the page after %.2fs" % (time.monotonic() - launched))
        self.assertLess(time.monotonic() - launched, 3)
        self.assertIn("running 1", browser.text("#counts"))
        self.assertGreater(self.screenshot(browser, "web-list.png"), 20000)
        # To the job's page with the keyboard: its link, then Enter.
        browser.evaluate("document.querySelector('#jobs tr[data-job-id=\"%s\"] .id a').focus()" % job.id)
        browser.press("Enter", "Enter", 13, "\r")
        browser.wait_until("location.hash === '#/job/%s'" % job.id)
        browser.wait_until("document.querySelector('#output').textContent.includes('tick 2\\n')")
        shown = browser.text("#output").count("tick")
        browser.wait_until("document.querySelector('#output').textContent.includes('tick %d\\n')" % (shown + 3))
        self.assertIn("web.demo", browser.text("#definition"))
        self.assertGreater(self.screenshot(browser, "web-job.png"), 20000)
        browser.evaluate("document.querySelector('#signal').value = 'TERM'")
        browser.click("#kill")
        browser.wait_until("document.querySelector('#job-state').textContent.includes('killed')", 10)
        state = job.state()
        self.assertEqual((state.status, state.signal), (jobstate.JobStatus.KILLED, "SIGTERM"))
        self.assertIn("SIGTERM", browser.text("#job-verdict"))
        self.screenshot(browser, "web-job-killed.png")
        self.assertEqual(browser.dialogs, [], "a dialog opened: job data ran as code")
        self.assertEqual(browser.problems(), [])

    def test_a_page_of_another_site_cannot_drive_serve(self):
        """The trust issue's witness, in a real browser: a page of another origin on
        the same host (so the session cookie is same-site and goes along) sends what
        browsers send without asking, a text/plain form POST and no-cors fetches to
        run a command and to kill a job.  Nothing runs and nothing is killed."""
        import html
        import http.server
        marker = os.path.join(self.tmp, "pwned")
        browser = self.open_browser()  # signed in: the cookie is there to be abused
        victim = self.run_job(ready_then_sleep())
        self.wait_log(victim, "ready")
        target = "http://127.0.0.1:%d" % self.port
        body = json.dumps({"command": ["touch", marker]})
        field = body[:-1] + ', "x": "'  # a text/plain form posts name=value: {"command": [...], "x": "="}
        page = ("<!doctype html><title>evil</title>"
                "<form id=f method=POST enctype=text/plain action='%s/jobs'><input name='%s' value='\"}'></form>"
                "<script>Promise.allSettled(["
                "fetch('%s/jobs', {method: 'POST', mode: 'no-cors', credentials: 'include', body: %s}),"
                "fetch('%s/jobs/%s/kill', {method: 'POST', mode: 'no-cors', credentials: 'include', body: '{}'})"
                "]).then(() => { document.title = 'sent'; document.getElementById('f').submit(); });</script>"
                % (target, html.escape(field, quote=True), target, json.dumps(body), target, victim.id)).encode()

        class EvilSite(http.server.BaseHTTPRequestHandler):
            timeout = 5  # a connection the browser opens ahead and leaves idle is dropped

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def log_message(self, *args):
                pass
        # Threads: one idle connection (browsers open some ahead) must not hold up the rest or shutdown.
        evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), EvilSite)
        evil.daemon_threads = True
        self.addCleanup(evil.server_close)
        threading.Thread(target=evil.serve_forever, daemon=True).start()
        self.addCleanup(evil.shutdown)
        browser.call("Page.navigate", url="http://127.0.0.1:%d/" % evil.server_address[1])
        browser.wait_until("location.href.startsWith(%s)" % json.dumps(target + "/jobs"), 15)  # the form went
        self.assertFalse(os.path.exists(marker), "a cross-site page ran a command")
        self.assertEqual(jobstate._list_job_ids(self.root), [victim.id], "a cross-site page created a job")
        self.assertIs(victim.state().status, jobstate.JobStatus.RUNNING, "a cross-site page killed a job")

    def test_earlier_output_actions_phone_and_dark_mode(self):
        make_text = '"".join("%05d: \\u00e9\\u20ac\\U0001F600 %s\\n" % (i, "x" * (i % 50)) for i in range(4000))'
        text = eval(make_text)
        job = self.run_job(py("import sys; sys.stdout.buffer.write(%s.encode())" % make_text))
        self.assertEqual(job.wait(20).status, jobstate.JobStatus.EXITED)
        browser = self.open_browser()
        browser.call("Page.navigate", url=self.ready["url"] + "/#/job/" + job.id)
        browser.wait_until("document.querySelector('#output').textContent.endsWith(%s)" % json.dumps(text[-100:]))
        browser.wait_until("!document.querySelector('#load-earlier').hidden")  # more than one read's worth
        for _ in range(10):  # 64 KiB a click
            browser.click("#load-earlier")
            browser.wait_until("!document.querySelector('#load-earlier').disabled")
            if browser.evaluate("document.querySelector('#load-earlier').hidden"):
                break
        self.assertEqual(browser.text("#output"), text, "the output, loaded backwards, differs")
        size = len(text.encode("utf-8"))
        self.assertIn("bytes 0\u2013%d of %d" % (size, size), browser.text("#log-range"))
        browser.click("#tab-full")
        browser.wait_until("document.querySelector('#output').textContent.includes('[STDOUT] 03999: ')")
        first_start = job.state().started_at
        browser.click("#restart")
        wait_for(lambda: job.state().started_at != first_start and job.state().status.is_terminal, 20, "the restart")
        browser.click("#delete")
        browser.wait_until("document.querySelector('#confirm').open")
        browser.click("#confirm-delete")
        browser.wait_until("location.hash === '#/' || location.hash === ''")
        with self.assertRaises(jobstate.JobNotFoundError):
            jobstate.open_job(job.id, self.root)
        # A phone: no sideways scrolling.  Dark mode: a dark background.
        other = self.run_job(py("print('phone')"), cwd=self.tmp, tags=["a.very.long.tag.name"])
        other.wait(10)
        browser.call("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=2, mobile=True)
        browser.call("Emulation.setEmulatedMedia", features=[{"name": "prefers-color-scheme", "value": "dark"}])
        browser.wait_until(self.row(other.id, "state"))
        self.assertLessEqual(browser.evaluate("document.documentElement.scrollWidth"), 390)
        background = browser.evaluate("getComputedStyle(document.body).backgroundColor")
        self.assertLess(sum(int(v) for v in background[background.index("(") + 1:-1].split(",")[:3]), 200, background)
        self.assertGreater(self.screenshot(browser, "web-phone-dark.png"), 20000)
        self.assertEqual(browser.dialogs, [])
        self.assertEqual(browser.problems(), [])

# ---------------------------------------------------------------------------
# Text rendering (section 11)
# ---------------------------------------------------------------------------


def fixed_view(**changes):
    """A status-shaped document with fixed values (no wall clock involved)."""
    view = {"job_id": "01a225fa035071929ed7ec44e131a446", "state": "exited", "exit_code": 0, "signal": None,
            "timed_out": False, "duration_ms": 1520, "created_at": "2026-11-29T03:18:00.000Z",
            "started_at": "2026-11-29T03:18:04.123Z", "finished_at": "2026-11-29T03:18:05.643Z",
            "pid": 41877, "error": None, "command": ["make", "test"], "cwd": "/src", "env": {},
            "tags": ["ci.test"], "stdout_log_path": "/r/x/stdout.log", "stderr_log_path": "/r/x/stderr.log",
            "warnings": [], "queue": None, "waiting": None, "restarts": 0, "last_exit": None,
            "crash_looping": False}
    view.update(changes)
    return view


NOW = jobstate._parse_time("2026-11-29T03:20:00.000Z")


class TextRenderingTests(JobTestCase):
    def test_list_table(self):
        jobs = [fixed_view(), fixed_view(job_id="01a225fa0350" + "1" * 20, state="killed", exit_code=None,
                                         signal="SIGTERM", duration_ms=125000, tags=[],
                                         created_at="2026-11-27T03:20:00.000Z")]
        for job in jobs:
            del job["env"]
        doc = jobstate._envelope("list", {"root": "/r", "jobs": jobs, "count": 2, "truncated": True,
                                          "skipped": 0, "warnings": []})
        lines = jobstate._render_text(doc, color=False, now=NOW).splitlines()
        self.assertEqual(lines[0].split(), ["ID", "STATE", "EXIT", "CREATED", "DURATION", "COMMAND", "TAGS"])
        self.assertEqual(lines[1].split(), ["01a225fa0350", "exited", "0", "2m", "ago", "1.5s", "make", "test",
                                            "ci.test"])
        self.assertEqual(lines[2].split(), ["01a225fa0350", "killed", "SIGTERM", "2d", "ago", "2m05s", "make",
                                            "test"])
        self.assertEqual(lines[1].index("exited"), lines[0].index("STATE"), "columns are not aligned")
        self.assertEqual(lines[-1], "(more: raise --limit)")

    def test_status_and_verdicts(self):
        text = jobstate._render_text(jobstate._envelope("status", fixed_view()), color=False, now=NOW)
        self.assertIn("state:     exited", text)
        self.assertIn("command:   make test", text)
        cases = [(fixed_view(), "job 01a225fa0350 exited with code 0 after 1.5s"),
                 (fixed_view(exit_code=3), "job 01a225fa0350 exited with code 3 after 1.5s"),
                 (fixed_view(state="killed", exit_code=None, signal="SIGKILL", timed_out=True),
                  "job 01a225fa0350 was killed by SIGKILL after 1.5s (timeout)"),
                 (fixed_view(state="failed", exit_code=None, error={"stage": "spawn", "message": "command not found: x"}),
                  "job 01a225fa0350 failed (spawn): command not found: x"),
                 (fixed_view(state="running", exit_code=None), "job 01a225fa0350 is running (pid 41877)")]
        for view, expected in cases:
            self.assertEqual(jobstate._verdict(view, color=False), expected)
        self.assertEqual(jobstate._verdict(fixed_view(), color=True), "\x1b[32m%s\x1b[0m" % cases[0][1])

    def test_warnings_and_uncounted_processes(self):
        view = fixed_view(state="killed", exit_code=None, signal="SIGTERM", signal_sent="SIGTERM",
                          processes_signalled=1, processes_alive=None,
                          warnings=[jobstate._warning("pids_unverifiable", "no /proc here")])
        lines = jobstate._render_text(jobstate._envelope("kill", view), color=False, now=NOW).splitlines()
        self.assertIn("signalled: SIGTERM to 1 process(es), unknown left", lines)
        self.assertEqual(lines[-1], "warning: no /proc here")

    def test_text_mode_keeps_exit_codes_and_errors_go_to_stderr(self):
        proc = subprocess.run([PY, JOBSTATE, "--root", self.root, "--format", "text", "status", "abcd"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual((proc.returncode, proc.stdout), (1, b""))
        self.assertIn(b"error: no job 'abcd'", proc.stderr)
        self.assertIn(b"hint:", proc.stderr)
        env = dict(os.environ, JOBSTATE_FORMAT="text")
        proc = subprocess.run([PY, JOBSTATE, "--root", self.root, "run", "--exit-code", "--"] +
                              py("print('out'); raise SystemExit(3)"),
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self.assertEqual(proc.returncode, 3)
        self.assertEqual(proc.stdout.decode().splitlines()[0], "out")
        self.assertIn("exited with code 3", proc.stdout.decode())

    def test_control_characters_from_jobs_are_escaped(self):
        nasty = "\x1b[2J\x07\r"
        code = ("import sys; sys.stdout.buffer.write(b'\\x1b[31mred\\xc2\\x9b\\n\\tindented\\n'); "
                "sys.stderr.buffer.write(b'\\x1b]0;title\\x07\\n')")
        command = [PY, "-c", code, nasty]
        _, ran, _ = self.cli("run", "--tag", "t", "--", *command)
        job_id = ran["job_id"]
        self.cli("kill", job_id)

        def assert_clean(text, args, allowed="\n"):
            bad = [c for c in text if (ord(c) < 0x20 or 0x7f <= ord(c) < 0xa0) and c not in allowed]
            self.assertEqual(bad, [], (args, text))
        for args in (["run", "--", *command], ["wait", job_id], ["tail", job_id], ["status", job_id],
                     ["kill", job_id], ["run", "--", "\x1b[2Jno-such-cmd", "arg"],
                     ["run", "--stdin-file", os.path.join(self.tmp, "\x1b[2J"), "--", "true"],
                     ["status", "\x1b[2J"], ["list", "--all"]):
            _, out, err = self.cli_capture("--format", "text", *args)
            assert_clean(out, args, allowed="\n\t" if args[0] in ("run", "wait", "tail") else "\n")
            assert_clean(err, args)
            self.assertIn("\\x1b", out + err, args)
        _, out, _ = self.cli_capture("--format", "text", "tail", job_id)
        self.assertIn("\\x1b[31mred\\x9b\n\tindented", out)
        _, out, _ = self.cli_capture("--format", "text", "status", job_id)
        self.assertIn("\\x1b[2J\\x07\\r", out)

    @unittest.skipIf(jobstate._WINDOWS, "pseudo-terminals are POSIX")
    def test_colours_only_on_a_terminal_and_never_with_no_color(self):
        import pty
        self.cli("run", "--", "echo", "x")

        def render(env):
            master, slave = pty.openpty()
            proc = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "--format", "text", "list", "--all"],
                                    stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env)
            os.close(slave)
            out = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
            os.close(master)
            proc.wait(30)
            return out
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
        self.assertIn(b"\x1b[32mexited\x1b[0m", render(env))
        self.assertNotIn(b"\x1b[", render(dict(env, NO_COLOR="1")))
        proc = subprocess.run([PY, JOBSTATE, "--root", self.root, "--format", "text", "list", "--all"],
                              env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        self.assertNotIn(b"\x1b[", proc.stdout)

    @unittest.skipIf(jobstate._WINDOWS, "uses a FIFO as the gate")
    def test_run_follow_streams_lines_as_they_are_written(self):
        # The child blocks after its first line until we open the gate: proof
        # that the line reached us while the job was still running.
        gate = os.path.join(self.tmp, "gate")
        os.mkfifo(gate)
        code = ("import time\n"
                "print('tick 0', flush=True)\n"
                "open(%r).read()\n"
                "for i in (1, 2):\n"
                "    time.sleep(0.1); print('tick', i, flush=True)\n" % gate)
        proc = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "run", "--follow", "--exit-code", "--"] + py(code),
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.assertEqual(proc.stdout.readline(), b"tick 0\n")
        with open(gate, "w") as f:
            f.write("go\n")
        rest, _ = proc.communicate(timeout=30)
        self.assertEqual((proc.returncode, rest), (0, b"tick 1\ntick 2\n"))

    def test_help_teaches(self):
        commands = ("run", "wait", "tail", "kill", "list", "gc", "serve")
        procs = [subprocess.Popen([PY, JOBSTATE, command, "--help"], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
                 for command in commands]  # side by side: each is mostly an interpreter start
        for command, proc in zip(commands, procs):
            text = proc.communicate(timeout=60)[0].decode()
            self.assertEqual(proc.returncode, 0)
            self.assertEqual(text.count("python3 jobstate.py " + command) +
                             text.count("python3 jobstate.py --format text " + command), 2, command)

# ---------------------------------------------------------------------------
# CLI (section 12)
# ---------------------------------------------------------------------------


class CommandLineTests(JobTestCase):
    def test_contradictory_or_ignored_options_are_refused(self):
        job = jobstate.create(["true"], root=self.root)
        sink = os.path.join(self.tmp, "events")
        cases = ((["run", "--until", "1", "--forever", "--", "true"], "--forever"),
                 (["wait", job.id, "--forever", "--until", "1"], "--forever"),
                 (["run", "--no-wait", "--forever", "--", "true"], "--forever"),
                 (["run", "--max-restarts", "3", "--", "true"], "--restart"),
                 (["run", "--restart-delay", "3", "--", "true"], "--restart"),
                 (["run", "--restart", "never", "--max-restarts", "3", "--", "true"], "--restart"),
                 (["run", "--restart", "always", "--restart-delay", "61", "--", "true"], "60"),
                 (["run", "--output-file", sink, "--", "true"], "--output-pattern"),
                 (["run", "--output-command", "cat", "--", "true"], "--output-pattern"),
                 (["run", "--output-pattern", "", "--output-file", sink, "--", "true"], "--output-pattern"),
                 (["create", "--output-pattern", "", "--", "true"], "--output-pattern"),
                 (["queue", "pause", "nosuch"], "queue set"),
                 (["queue", "resume", "nosuch"], "queue set"))
        for args, hint in cases:
            status, doc, raw = self.cli(*args)
            self.assertEqual((status, doc and doc["error"]["code"]), (1, "invalid_argument"), (args, raw))
            self.assertIn(hint, doc["error"]["message"] + doc["error"]["hint"], args)
        self.assertEqual(jobstate._list_job_ids(self.root), [job.id])
        self.assertFalse(os.path.exists(os.path.join(self.root, ".queues")))
        for kw in ({"max_restarts": 2}, {"restart_delay_s": 2}, {"restart": "on-failure", "restart_delay_s": 99999999},
                   {"output_file": sink}, {"output_command": "cat"}, {"output_pattern": ""}):
            with self.assertRaises(jobstate.InvalidArgumentError, msg=kw):
                jobstate.create(["true"], root=self.root, **kw)
        with self.assertRaises(jobstate.InvalidArgumentError):
            jobstate.set_queue("nosuch", paused=True, root=self.root)
        with unittest.mock.patch.dict(os.environ, JOBSTATE_CONTAINMENT="of"):  # a typo of off
            status, doc, _ = self.cli("run", "--", "true")
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), doc)
            self.assertIn("JOBSTATE_CONTAINMENT=off", doc["error"]["hint"])
            with self.assertRaises(jobstate.InvalidArgumentError):
                job.start()
        self.assertEqual(jobstate._list_job_ids(self.root), [job.id])
        self.assertEqual(job.state().status, jobstate.JobStatus.CREATED)
        # The bounds themselves are fine.
        status, doc, _ = self.cli("create", "--restart", "always", "--restart-delay", "60", "--max-restarts", "0",
                                  "--output-pattern", "x", "--output-file", sink, "--", "true")
        self.assertEqual(status, 0, doc)

    def test_bytes_that_are_not_utf8_reach_strict_parsers(self):
        job = job_with_bytes_not_utf8(self)
        for args in (["status", job.id], ["list", "--all"], ["status", job.id, "--pretty"]):
            _, _, proc = self.cli_process(*args)
            doc = strict_json(self, proc.stdout)
            assert_shown_as_replacement(self, doc["jobs"][0] if "jobs" in doc else doc)

    def test_every_error_envelope_has_a_hint(self):
        a_file = os.path.join(self.tmp, "a-file")
        with open(a_file, "w") as f:
            f.write("x")
        created = jobstate.create(TRUE, root=self.root)
        running = self.run_job(py("import time; time.sleep(60)"))
        cases = [["run", "--env", "FOO", "--"] + TRUE, ["run", "--env", "=x", "--"] + TRUE,
                 ["run", "--stdin-file", "/nonexistent", "--"] + TRUE, ["run", "--stdin-file", self.tmp, "--"] + TRUE,
                 ["run", "--stdin", "x", "--stdin-file", a_file, "--"] + TRUE,
                 ["run", "--max-restarts", "-1", "--restart", "always", "--"] + TRUE,
                 ["list", "--limit", "-1"], ["tail", created.id, "--lines", "-1"], ["gc", "--max-jobs", "-1"],
                 ["queue", "set", "x", "--parallel", "-1"], ["kill", created.id], ["delete", running.id]]
        for args in cases:
            status, doc, _ = self.cli(*args)
            self.assertEqual(status, 1, args)
            self.assertTrue(doc["error"].get("hint"), (args, doc))
        for root in (a_file, ""):  # a root that is a file; an empty one
            proc = subprocess.run([PY, JOBSTATE, "--root", root, "list"], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30,
                                  env=dict(os.environ, JOBSTATE_ROOT=self.root))
            doc = json.loads(proc.stdout)
            self.assertEqual((proc.returncode, doc["ok"]), (1, False), root)
            self.assertTrue(doc["error"].get("hint"), doc)
        self.assertIn("empty", doc["error"]["message"], "--root '' fell back to $JOBSTATE_ROOT")

    def test_a_duration_out_of_range_is_exit_1_however_it_is_written(self):
        for value in ("-1", "1e9", "1e400", "2e7m"):
            status, doc, _ = self.cli("run", "--timeout", value, "--", *TRUE)
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), value)
            self.assertIn("out of range", doc["error"]["message"])
        for value in ("soon", "nan", "1e", "0x10"):  # not a duration at all: a usage error
            status, doc, _ = self.cli("run", "--timeout", value, "--", *TRUE)
            self.assertEqual(status, 2, value)
        self.assertEqual(jobstate._list_job_ids(self.root), [])

    def test_agent_exec_option_names(self):
        job = self.run_job(py("print('a'); print('b')"))
        job.wait(20)
        self.assertEqual(lf(self.cli("tail", job.id, "--tail-lines", "1")[1]["stdout"]), "b\n")
        status, doc, _ = self.cli("run", "--wait=false", "--", *py("import time; time.sleep(60)"))
        self.assertEqual((status, doc["state"]), (0, "running"))
        for option in ("--wait", "--wait=true", "--wait=1"):
            status, doc, _ = self.cli("run", option, "--", *py("print('x')"))
            self.assertEqual((status, doc["state"]), (0, "exited"), option)
        self.assertEqual(self.cli("run", "--wait=maybe", "--", "true", "x")[0], 2)
        status, doc, _ = self.cli("run", "--wait=true", "--no-wait", "--", "true", "x")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"))
        status, doc, _ = self.cli("wait", job.id, "--poll", "5")  # accepted; waits wake on the job's end anyway
        self.assertEqual((status, doc["state"]), (0, "exited"))
        os.environ["JOBSTATE_TEST_INHERITED"] = "yes"
        self.addCleanup(os.environ.pop, "JOBSTATE_TEST_INHERITED", None)
        status, doc, _ = self.cli("run", "--inherit-env", "--",
                                  *py("import os; print(os.environ['JOBSTATE_TEST_INHERITED'])"))
        self.assertEqual((status, lf(doc["stdout"])), (0, "yes\n"))
        status, doc, _ = self.cli("run", "--inherit-env", "--no-inherit-env", "--", "true", "x")
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"))
        for option, value, hint in (("--shell-wrapper", "bash -lc", "-- bash -lc"), ("--progress-every", "5", "tail")):
            status, doc, _ = self.cli("run", option, value, "--", "true", "x")
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), option)
            self.assertIn(hint, doc["error"]["hint"], option)
        self.assertEqual(len(jobstate._list_job_ids(self.root)), 6, "a refused option still made a job")

    def test_notify_commands_learn_the_event_type(self):
        seen = os.path.join(self.tmp, "seen.txt")
        command = "%s -c \"import os; open(%r, 'a').write(os.environ['JOBSTATE_EVENT_TYPE'])\"" % (PY, seen)
        job = self.run_job(py("pass"), notify_command=command)
        LifecycleTests.completion_record(self, job)
        with open(seen) as f:
            self.assertEqual(f.read(), "job.finished")

    def test_skill_prints_and_installs_a_guide_for_agents(self):
        status, text, _ = self.cli_capture("skill")
        self.assertEqual(status, 0)
        self.assertTrue(text.startswith("---\nname: jobstate\ndescription: "), text[:200])
        front, body = text[4:].split("\n---\n", 1)
        self.assertGreater(len(dict(line.split(": ", 1) for line in front.splitlines())["description"]), 40)
        for needle in ("--ready", "wait", "--match", "kill", "tail", "matched", JOBSTATE):
            self.assertIn(needle, body)
        for code in jobstate._error_codes():
            self.assertIn(code, body, "the guide lists every error code")
        target = os.path.join(self.tmp, "skills")
        os.mkdir(target)
        status, doc, _ = self.cli("skill", "--install", target)
        self.assertEqual((status, doc["type"]), (0, "skill"), doc)
        self.assertEqual(doc["path"], os.path.join(target, "jobstate", "SKILL.md"))
        with open(doc["path"], encoding="utf-8") as f:
            self.assertEqual(f.read(), text)
        status, doc, _ = self.cli("skill", "--install", os.path.join(JOBSTATE, "not-a-dir"))
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"))

    @unittest.skipUnless(POSIX, "SIGUSR1 is POSIX")
    def test_kill_with_a_non_terminating_signal_answers_a_consistent_state(self):
        for _ in range(3):
            job = self.run_job(["sleep", "60"])
            status, doc, _ = self.cli("kill", job.id, "--signal", "USR1")
            self.assertEqual(status, 0, doc)
            if doc["processes_alive"] == 0:  # the default action of USR1 ended it: the answer says so
                self.assertNotEqual(doc["state"], "running", doc)
                self.assertEqual(doc["signal"], "SIGUSR1", doc)

    def test_skill_install_makes_no_tree_and_never_writes_through_a_symlink(self):
        missing = os.path.join(self.tmp, "no", "such", "dir")
        status, doc, _ = self.cli("skill", "--install", missing)
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_argument"), doc)
        self.assertTrue(doc["error"]["hint"])
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "no")), "skill --install made the path")
        if not POSIX:
            return
        skills, victim = os.path.join(self.tmp, "skills"), os.path.join(self.tmp, "victim")
        with open(victim, "w") as f:
            f.write("precious")
        os.makedirs(os.path.join(skills, "jobstate"))
        os.symlink(victim, os.path.join(skills, "jobstate", "SKILL.md"))
        status, doc, _ = self.cli("skill", "--install", skills)
        self.assertEqual(status, 0, doc)
        with open(victim) as f:
            self.assertEqual(f.read(), "precious", "written through the symlink")
        self.assertFalse(os.path.islink(doc["path"]))
        os.remove(doc["path"])
        os.rmdir(os.path.join(skills, "jobstate"))
        os.symlink(self.tmp, os.path.join(skills, "jobstate"))  # a symlinked folder: refused
        status, doc, _ = self.cli("skill", "--install", skills)
        self.assertEqual((status, doc["error"]["code"]), (1, "io_error"), doc)
        self.assertFalse(os.path.exists(os.path.join(self.tmp, "SKILL.md")))

    @unittest.skipUnless(shutil.which("bash"), "exercising the completions needs bash")
    def test_completions_are_generated_from_the_parser(self):
        commands = [name for name, *_ in jobstate._COMMANDS]
        for shell in ("bash", "zsh", "fish"):
            status, script, _ = self.cli_capture("completions", shell)
            self.assertEqual(status, 0, shell)
            for word in commands + ["--ready", "--match", "--output-pattern", "--max-bytes", "--until"]:
                self.assertIn("-l " + word[2:] if shell == "fish" and word[:2] == "--" else word, script, (shell, word))
        status, _, err = self.cli_capture("completions", "tcsh")
        self.assertEqual(status, 2)
        _, script, _ = self.cli_capture("completions", "bash")

        def complete(*words):
            probe = ("set -e; %s\nCOMP_WORDS=(%s); COMP_CWORD=%d; _jobstate; printf '%%s\\n' \"${COMPREPLY[@]}\""
                     % (script, " ".join("'%s'" % w for w in words), len(words) - 1))
            out = subprocess.run(["bash", "-c", probe], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
            self.assertEqual(out.returncode, 0, out.stderr)
            return out.stdout.decode().split()
        self.assertEqual(complete("jobstate", "wa"), ["wait"])
        self.assertIn("--stream", complete("jobstate", "wait", "--st"))
        self.assertEqual(complete("jobstate", "wait", "abc", "--stream", ""), ["stdout", "stderr", "either"])
        self.assertEqual(sorted(complete("jobstate", "notify", "")), ["set"])
        self.assertIn("--output-pattern", complete("jobstate", "notify", "set", "--output-p"))
        self.assertIn("--ready", complete("jobstate", "--root", "/tmp/x", "run", "--re"))
        for shell in ("zsh", "fish"):
            if shutil.which(shell):
                _, script, _ = self.cli_capture("completions", shell)
                check = subprocess.run([shell, "-n"], input=script.encode(), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, timeout=30)
                self.assertEqual(check.returncode, 0, check.stderr)

    def test_run_envelope(self):
        status, doc, _ = self.cli("run", "--", *HELLO)
        self.assertEqual(status, 0)
        self.assertEqual((doc["schema_version"], doc["ok"], doc["type"]), ("1.0", True, "run"))
        self.assertEqual((doc["state"], doc["exit_code"], doc["stdout"]), ("exited", 0, "hello\n"))
        for key in ("job_id", "signal", "duration_ms", "started_at", "finished_at", "stderr", "stdout_range",
                    "stderr_range", "stdout_total_bytes", "stderr_total_bytes", "encoding",
                    "stdout_log_path", "stderr_log_path", "elapsed_ms", "tags", "error", "timed_out"):
            self.assertIn(key, doc)

    def test_same_keys_in_every_state(self):
        _, created, _ = self.cli("create", "--", "true", "x")
        _, status_doc, _ = self.cli("status", created["job_id"])
        _, ran, _ = self.cli("run", "--", *py("pass"))
        _, done, _ = self.cli("status", ran["job_id"])
        self.assertEqual(done["state"], "exited")
        self.assertEqual(set(status_doc), set(done))
        self.assertEqual(status_doc["state"], "created")

    def test_shell_string(self):
        status, doc, _ = self.cli("run", "--", SHELL_STRING)
        self.assertEqual((doc["exit_code"], doc["stdout"], doc["stderr"]), (4, "a" + SHELL_EOL, "b" + SHELL_EOL))

    def test_exit_code_flag(self):
        status, doc, _ = self.cli("run", "--exit-code", "--", *py("import sys; sys.exit(7)"))
        self.assertEqual(status, 7)
        status, doc, _ = self.cli("wait", "--exit-code", doc["job_id"])
        self.assertEqual(status, 7)
        status, doc, _ = self.cli("run", "--exit-code", "--timeout", "0.1", "--", *py("import time; time.sleep(30)"))
        self.assertEqual(status, 128 + 15)

    def test_usage_errors_exit_2_with_json(self):
        for args in (["bogus"], ["run", "--nope", "--", "x"], ["status"], ["run"]):
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["ok"], doc["error"]["code"]), (2, False, "invalid_argument"), args)

    def test_validation_errors_exit_1(self):
        cases = [(["run", "--timeout", "-5", "--", "x"], "invalid_argument"),
                 (["run", "--tag", "bad tag", "--", "x"], "invalid_tag"),
                 (["run", "--stdin", "abc", "--stdin-max-bytes", "2", "--", "cat"], "stdin_too_large"),
                 (["status", "zz"], "invalid_job_id"),
                 (["status", "abcd"], "job_not_found"),
                 (["list", "--tag", "a..b"], "invalid_tag")]
        for args, code in cases:
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, code), args)
            self.assertIn("hint", doc["error"]) if code != "job_not_found" else None
        self.assertEqual(jobstate._list_job_ids(self.root), [], "a rejected run left a job behind")

    def test_malformed_option_values_are_usage_errors(self):
        # A value that does not parse as its option's type is a usage error (exit 2); one
        # that parses but is out of range or unknown is a validation error (exit 1).
        job = jobstate.create(py("pass"), root=self.root)
        usage = [["list", "--limit", "abc"], ["ps", "--limit", "1.5"], ["tail", job.id, "--lines", "x"],
                 ["tail", job.id, "--max-bytes", "x"], ["wait", job.id, "--until", "x"],
                 ["wait", job.id, "--max-bytes", "12q"], ["run", "--timeout", "soon", "--", "x"],
                 ["run", "--kill-after", "x", "--", "x"], ["run", "--until", "x", "--", "x"],
                 ["run", "--max-bytes", "x", "--", "x"], ["run", "--stdin-max-bytes", "x", "--", "x"],
                 ["create", "--timeout", "1h30", "--", "x"], ["start", job.id, "--until", "x"],
                 ["restart", job.id, "--kill-after", "x"], ["kill", job.id, "--kill-after", "x"],
                 ["gc", "--max-jobs", "x"], ["gc", "--max-bytes", "x"], ["gc", "--older-than", "x"]]
        for args in usage:
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["ok"], doc["error"]["code"]), (2, False, "invalid_argument"), args)
            option = next(a for a in args if a.startswith("--") and a != "--")
            self.assertIn(option, doc["error"]["message"], args)
        invalid = [(["list", "--limit", "-1"], "invalid_argument"), (["tail", job.id, "--lines", "-1"], "invalid_argument"),
                   (["run", "--timeout", "2000000000", "--", "x"], "invalid_argument"),
                   (["wait", job.id, "--until", "-1"], "invalid_argument"), (["gc", "--max-jobs", "-1"], "invalid_argument"),
                   (["tail", job.id, "--max-bytes", "-1"], "invalid_argument"),
                   (["run", "--max-bytes", "-1", "--", "x"], "invalid_argument"),
                   (["start", job.id, "--max-bytes", "-1"], "invalid_argument"),
                   (["kill", job.id, "--signal", "NOPE"], "invalid_signal"),
                   (["run", "--tag", "bad tag", "--", "x"], "invalid_tag")]
        for args, code in invalid:
            status, doc, _ = self.cli(*args)
            self.assertEqual((status, doc["error"]["code"]), (1, code), args)
        self.assertEqual(jobstate._list_job_ids(self.root), [job.id], "a rejected command launched a job")
        self.assertEqual(job.state().status, jobstate.JobStatus.CREATED)

    def test_empty_or_malformed_job_ids_are_invalid_job_id_on_every_command(self):
        os.makedirs(self.root)
        for bad in ("", "zz", " 0"):
            for args in (["delete", bad], ["delete", "--dry-run", bad], ["delete", "--all", bad], ["rm", bad],
                         ["status", bad], ["wait", bad], ["tail", bad], ["kill", bad], ["start", bad],
                         ["restart", bad], ["tag", "set", bad, "--tag", "x"]):
                status, doc, _ = self.cli(*args)
                self.assertEqual((status, doc["error"]["code"]), (1, "invalid_job_id"), args)

    def test_list_skips_job_directories_without_a_readable_definition(self):
        missing = jobstate.create(py("pass"), root=self.root)
        os.unlink(missing.paths.meta)
        corrupt = jobstate.create(py("pass"), root=self.root)
        with open(corrupt.paths.meta, "wb") as f:
            f.write(b"{not json")
        os.mkdir(os.path.join(self.root, jobstate.new_job_id()))  # a bare directory
        _, good, _ = self.cli("run", "--", *py("pass"))
        no_state = jobstate.create(py("pass"), root=self.root)
        os.unlink(no_state.paths.state)
        _, doc, _ = self.cli("list", "--all")
        states = {j["job_id"]: j["state"] for j in doc["jobs"]}
        self.assertEqual(states, {good["job_id"]: "exited", no_state.id: "unknown"})
        self.assertEqual((doc["count"], doc["skipped"]), (2, 3))
        _, doc, _ = self.cli("list", "--all", "--state", "running")
        self.assertEqual((doc["jobs"], doc["skipped"]), ([], 3))
        _, doc, _ = self.cli("list", "--all", "--limit", "1")  # stops before the older, broken ones
        self.assertEqual((doc["count"], doc["truncated"], doc["skipped"]), (1, True, 0))
        _, schema, _ = self.cli("schema")
        self.assertIn("skipped", schema["schemas"]["list"]["required"])
        _, text, _ = self.cli_capture("--format", "text", "list", "--all")
        self.assertIn("3 job directories skipped", text)

    @unittest.skipUnless(POSIX and os.path.isdir("/proc"), "SIGINT, and /proc/locks to see the observer wait")
    def test_ctrl_c_while_observing_prints_where_the_job_stands(self):
        def interrupt(*args):
            proc = subprocess.Popen([PY, JOBSTATE, "--root", self.root] + list(args), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            self.addCleanup(proc.kill)
            return proc

        def stop(proc):
            wait_for(lambda: waiting_for_a_lock(proc.pid), 10, "the CLI to be waiting on the job")
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=20)
            self.assertEqual(proc.returncode, 130, err)
            self.assertNotIn(b"Traceback", err)
            return out.decode(), err.decode()
        proc = interrupt("run", "--until", "60", "--", *ready_then_sleep())
        job = wait_for(lambda: [jobstate.Job(i, self.root) for i in jobstate._list_job_ids(self.root)],
                       10, "the job directory")[0]
        self.wait_log(job, "ready")
        out, err = stop(proc)
        self.assertEqual(len(out.splitlines()), 1, out)
        doc = json.loads(out)
        self.assertEqual((doc["ok"], doc["type"], doc["job_id"], doc["state"], doc["stdout"]),
                         (True, "run", job.id, "running", "ready\n"))
        self.assertIn(job.id, err)
        for args, kind in ((["wait", "--forever", job.id], "wait"),):
            out, _ = stop(interrupt(*args))
            doc = json.loads(out)
            self.assertEqual((doc["type"], doc["job_id"], doc["state"]), (kind, job.id, "running"))
        out, err = stop(interrupt("--format", "text", "wait", "--forever", job.id[:10]))
        self.assertIn("job %s is running" % job.id[:12], out)
        self.assertIn(job.id, err)
        state = job.state()
        self.assertEqual(state.status, jobstate.JobStatus.RUNNING)
        self.assertTrue(pid_alive(state.pid), "the job was stopped with its observer")

    @unittest.skipUnless(POSIX, "sh, and removing the current directory")
    def test_a_deleted_current_directory_is_invalid_argument(self):
        gone = os.path.join(self.tmp, "gone")
        script = 'cd "$1" && rmdir "$1" && shift && exec "$@"'
        for args in (["run", "--", "echo", "x"], ["create", "--", "echo", "x"], ["list"], ["ps"],
                     ["delete", "--all"], ["run", "--cwd", "relative", "--", "echo", "x"]):
            os.mkdir(gone)
            proc = subprocess.run(["sh", "-c", script, "sh", gone, PY, JOBSTATE, "--root", self.root] + args,
                                  stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  timeout=30)
            doc = json.loads(proc.stdout)
            self.assertEqual((proc.returncode, doc["error"]["code"]), (1, "invalid_argument"), (args, doc))
            self.assertIn("--cwd", doc["error"]["hint"])
            self.assertNotIn(b"Traceback", proc.stderr)
        os.mkdir(gone)
        proc = subprocess.run(["sh", "-c", script, "sh", gone, PY, JOBSTATE, "--root", self.root, "run",
                               "--cwd", self.tmp, "--", "echo", "x"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        self.assertEqual((proc.returncode, json.loads(proc.stdout)["stdout"]), (0, "x\n"), proc.stderr)

    @unittest.skipUnless(POSIX and hasattr(os, "fork"), "RLIMIT_NOFILE")
    def test_launch_failure_keeps_the_supervisor_log_inline(self):
        import resource
        failures = []
        for limit in range(6, 16):
            def limited(limit=limit):
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            proc = subprocess.run([PY, JOBSTATE, "--root", self.root, "run", "--", "echo", "x"],
                                  preexec_fn=limited, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=60)
            doc = json.loads(proc.stdout)
            if not doc["ok"] and doc["error"]["code"] == "launch_failed":
                failures.append(doc["error"])
        if not failures:
            self.skipTest("no file-descriptor limit made the launch fail here")
        for error in failures:
            details = error.get("details") or {}
            self.assertIsInstance(details.get("supervisor_log_tail"), str, error)
            self.assertLessEqual(len(details["supervisor_log_tail"].encode()), 4096)
            pointers = [error.get("hint", "")] + [v for k, v in details.items() if k != "supervisor_log_tail"]
            for word in " ".join(map(str, pointers)).split():
                if "supervisor.log" in word:
                    self.assertTrue(os.path.exists(word), "the error points at a removed file: %s" % word)
        self.assertTrue(any("Too many open files" in e["details"]["supervisor_log_tail"] for e in failures),
                        failures)
        for job_id in jobstate._list_job_ids(self.root):
            jobstate._read_spec(jobstate.JobPaths(self.root, job_id))

    def test_stdin_variants(self):
        _, doc, _ = self.cli("run", "--stdin", "from flag", "--", *CAT)
        self.assertEqual(doc["stdout"], "from flag")
        path = os.path.join(self.tmp, "in.bin")
        with open(path, "wb") as f:
            f.write(b"\x00\xffbinary")
        _, doc, _ = self.cli("run", "--stdin-file", path, "--", *CAT)
        with open(doc["stdout_log_path"], "rb") as f:
            self.assertEqual(f.read(), b"\x00\xffbinary")
        status, doc, proc = self.cli_process("run", "--stdin", "-", "--", *CAT, input=b"dash")
        self.assertEqual(doc["stdout"], "dash")
        status, doc, proc = self.cli_process("run", "--", *CAT, input=b"piped")
        self.assertEqual(doc["stdout"], "piped")
        status, doc, proc = self.cli_process("run", "--", *CAT)  # /dev/null: nothing forwarded
        self.assertEqual((doc["stdout"], doc["state"]), ("", "exited"))

    def test_mask_hides_values(self):
        _, doc, _ = self.cli("run", "--env", "TOKEN=hunter2", "--mask", "TOKEN", "--", *py("pass"))
        self.assertEqual(doc["env"], {"TOKEN": "***"})
        _, doc, raw = self.cli("status", doc["job_id"])
        self.assertNotIn("hunter2", raw)

    def test_list_scope_filters_and_limit(self):
        a, b = os.path.join(self.tmp, "a"), os.path.join(self.tmp, "b")
        os.mkdir(a)
        os.mkdir(b)
        ids = {}
        for name, cwd, tags in (("a1", a, ["ci.lint"]), ("a2", a, ["ci.test"]), ("b1", b, ["dev"])):
            _, doc, _ = self.cli("run", "--cwd", cwd, *sum((["--tag", t] for t in tags), []), "--", *py("pass"))
            ids[name] = doc["job_id"]
        _, doc, _ = self.cli("list", "--cwd", a)
        self.assertEqual([j["job_id"] for j in doc["jobs"]], [ids["a2"], ids["a1"]])
        _, doc, _ = self.cli("list", "--all", "--limit", "2")
        self.assertEqual((doc["count"], doc["truncated"]), (2, True))
        _, doc, _ = self.cli("list", "--all", "--tag", "ci.*")
        self.assertEqual(sorted(j["job_id"] for j in doc["jobs"]), sorted([ids["a1"], ids["a2"]]))
        _, doc, _ = self.cli("list", "--all", "--tag", "ci.*", "--tag", "ci.lint")
        self.assertEqual([j["job_id"] for j in doc["jobs"]], [ids["a1"]])
        _, doc, _ = self.cli("list", "--all", "--state", "running")
        self.assertEqual(doc["jobs"], [])
        old = os.getcwd()
        os.chdir(b)
        self.addCleanup(os.chdir, old)
        _, doc, _ = self.cli("list")
        self.assertEqual([j["job_id"] for j in doc["jobs"]], [ids["b1"]])

    def test_ps_lists_running(self):
        job = self.run_job(py("import time; time.sleep(30)"))
        _, done, _ = self.cli("run", "--", *py("pass"))
        _, doc, _ = self.cli("ps", "--all")
        self.assertEqual([j["job_id"] for j in doc["jobs"]], [job.id])

    def test_delete(self):
        running = self.run_job(py("import time; time.sleep(30)"))
        status, doc, _ = self.cli("delete", running.id)
        self.assertEqual((status, doc["error"]["code"]), (1, "invalid_state"))
        self.assertTrue(os.path.isdir(running.paths.dir))
        _, done, _ = self.cli("run", "--cwd", self.tmp, "--", *py("pass"))
        status, doc, _ = self.cli("rm", "--all", "--dry-run")
        self.assertEqual(status, 0)
        status, doc, _ = self.cli("delete", done["job_id"])
        self.assertEqual((status, doc["jobs"][0]["action"]), (0, "deleted"))
        self.assertFalse(os.path.exists(os.path.join(self.root, done["job_id"])))

    def test_delete_all_only_terminal_jobs_of_this_directory(self):
        here, elsewhere = os.path.join(self.tmp, "here"), os.path.join(self.tmp, "elsewhere")
        os.mkdir(here)
        os.mkdir(elsewhere)
        _, mine, _ = self.cli("run", "--cwd", here, "--", *py("pass"))
        _, other, _ = self.cli("run", "--cwd", elsewhere, "--", *py("pass"))
        running = self.run_job(py("import time; time.sleep(30)"), cwd=here)
        old = os.getcwd()
        os.chdir(here)
        self.addCleanup(os.chdir, old)
        _, doc, _ = self.cli("delete", "--all", "--dry-run")
        self.assertEqual(doc["deleted"], 1)
        self.assertTrue(os.path.isdir(os.path.join(self.root, mine["job_id"])))
        _, doc, _ = self.cli("delete", "--all")
        actions = {j["job_id"]: j["action"] for j in doc["jobs"]}
        self.assertEqual(actions, {mine["job_id"]: "deleted", running.id: "skipped"})
        self.assertTrue(os.path.isdir(os.path.join(self.root, other["job_id"])))

    def test_tags(self):
        _, doc, _ = self.cli("create", "--tag", "a.b", "--", "true", "x")
        status, out, _ = self.cli("tag", "set", doc["job_id"], "--tag", "x", "--tag", "y.z", "--tag", "x")
        self.assertEqual((status, out["tags"]), (0, ["x", "y.z"]))
        _, out, _ = self.cli("status", doc["job_id"])
        self.assertEqual(out["tags"], ["x", "y.z"])
        _, out, _ = self.cli("tag", "set", doc["job_id"])
        self.assertEqual(out["tags"], [])

    def test_no_wait_returns_running(self):
        status, doc, _ = self.cli("run", "--no-wait", "--", *py("import time; time.sleep(30)"))
        self.assertEqual((status, doc["state"]), (0, "running"))
        self.assertIsInstance(doc["pid"], int)

    def test_end_to_end_process(self):
        status, doc, proc = self.cli_process("run", "--", *HELLO)
        self.assertEqual((status, doc["stdout"]), (0, "hello\n"))
        self.assertEqual(proc.stderr, b"")
        status, doc, proc = self.cli_process("--pretty", "status", doc["job_id"][:8])
        self.assertEqual(doc["state"], "exited")
        self.assertIn(b"\n  ", proc.stdout)

    def test_doctor_looks_and_creates_nothing(self):
        status, doc, _ = self.cli("doctor")
        self.assertEqual((status, doc["type"], doc["root"]), (0, "doctor", self.root))
        caps = doc["capabilities"]
        self.assertEqual((caps["root"]["path"], caps["root"]["exists"]), (self.root, False))
        self.assertFalse(os.path.exists(self.root), "doctor created the root")
        self.assertEqual(caps["dies_with_launcher"], False)
        for item in caps["missing"]:
            self.assertTrue(item["costs"] and item["detail"], item)
        status, out, _ = self.cli_capture("--format", "text", "doctor")
        self.assertEqual(status, 0)
        self.assertIn("pid identity:  %s" % caps["pid_identity"], out)

    def test_version_and_help(self):
        proc = subprocess.run([PY, JOBSTATE, "--version"], stdout=subprocess.PIPE, check=True)
        self.assertIn(jobstate.__version__.encode(), proc.stdout)
        proc = subprocess.run([PY, JOBSTATE, "--help"], stdout=subprocess.PIPE, check=True)
        self.assertIn(b"kill", proc.stdout)
        self.assertNotIn(b"_supervise", proc.stdout)

# ---------------------------------------------------------------------------
# Restricted environments (Linux, as root): namespaces, seccomp, read-only and lying roots
# ---------------------------------------------------------------------------


def restricted_skip_reason():
    """Why the restricted-environment matrix cannot run here, or None."""
    if not jobstate._LINUX:
        return "Linux only: mount and PID namespaces"
    if os.geteuid() != 0:
        return "needs root: it mounts /proc, tmpfs and read-only bind mounts in private namespaces"
    if not shutil.which("unshare"):
        return "needs unshare (util-linux)"
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if probe.returncode != 0:
        return "unshare --mount is refused here (a container without CAP_SYS_ADMIN?)"
    return None


# The job of every environment: a main process, its child and a grandchild
# (`sleep`), all in the job's process group; the child names all three.
RESTRICTED_TREE = (
    "import os, subprocess, sys, time\n"
    "if sys.argv[1:] == ['child']:\n"
    "    grandchild = subprocess.Popen(['sleep', '300'])\n"
    "    print('ready', os.getppid(), os.getpid(), grandchild.pid, flush=True)\n"
    "    time.sleep(300)\n"
    "else:\n"
    "    subprocess.Popen([sys.executable, os.path.abspath(__file__), 'child'])\n"
    "    time.sleep(300)\n")

# Runs inside the environment: every operation through the CLI as its own
# process (argv prefix given), then one JSON line with what each answered.
RESTRICTED_DRIVER = (
    "import json, os, subprocess, sys, time\n"
    "prefix, root, tree = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]\n"
    "def cli(*args):\n"
    "    p = subprocess.run(prefix + ['--root', root] + list(args), stdin=subprocess.DEVNULL,\n"
    "                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)\n"
    "    try:\n"
    "        doc = json.loads(p.stdout)\n"
    "    except ValueError:\n"
    "        doc = None\n"
    "    return {'status': p.returncode, 'doc': doc, 'stdout': p.stdout.decode(errors='replace')[-2000:],\n"
    "            'stderr': p.stderr.decode(errors='replace')[-2000:]}\n"
    "def alive(pid):\n"
    "    try:\n"
    "        with open('/proc/%d/stat' % pid, 'rb') as f:\n"
    "            return f.read().rsplit(b') ', 1)[1][:1] != b'Z'\n"
    "    except OSError:\n"
    "        return False\n"
    "steps = {'doctor': cli('doctor'), 'pid': os.getpid()}\n"
    "steps['run'] = cli('run', '--no-wait', '--', sys.executable, tree)\n"
    "doc = steps['run']['doc'] or {}\n"
    "if doc.get('ok'):\n"
    "    job, deadline = doc['job_id'], time.monotonic() + 20\n"
    "    while True:\n"
    "        tail = cli('tail', job)\n"
    "        if 'ready' in ((tail['doc'] or {}).get('stdout') or '') or time.monotonic() > deadline:\n"
    "            break\n"
    "        time.sleep(0.05)\n"
    "    steps['tail'] = tail\n"
    "    steps['status'] = cli('status', job)\n"
    "    steps['kill'] = cli('kill', job)\n"
    "    steps['wait'] = cli('wait', '--until', '10', job)\n"
    "    words = (tail['doc'] or {}).get('stdout', '').split()\n"
    "    pids = [int(w) for w in words[1:4]] if words[:1] == ['ready'] else []\n"
    "    steps['tree'] = pids\n"
    "    if os.path.exists('/proc/self/stat'):\n"
    "        deadline = time.monotonic() + 10\n"
    "        while any(map(alive, pids)) and time.monotonic() < deadline:\n"
    "            time.sleep(0.05)\n"
    "        steps['alive_inside'] = [p for p in pids if alive(p)]\n"
    "print(json.dumps(steps))\n")

# Replaces the platform layer's flock by one that always says "taken", as a
# filesystem that ignores flock would; then runs the CLI.
LYING_FLOCK_CLI = (
    "import sys, importlib.util as u\n"
    "s = u.spec_from_file_location('jobstate', sys.argv[1])\n"
    "m = sys.modules['jobstate'] = u.module_from_spec(s)\n"
    "s.loader.exec_module(m)\n"
    "m._process_layer.lock = lambda fd, exclusive, blocking: True\n"
    "sys.exit(m.main(sys.argv[2:]))\n")

# Installs a seccomp filter (what an older container runtime's profile does)
# that answers ENOSYS to pidfd_open, EPERM to prctl and EPERM to fcntl's
# F_SETPIPE_SZ, then execs argv: every process below, supervisors and jobs
# included, inherits it.
SECCOMP_EXEC = (
    "import ctypes, errno, os, platform, struct, sys\n"
    "arch, prctl_nr, fcntl_nr = {'x86_64': (0xC000003E, 157, 72), 'aarch64': (0xC00000B7, 167, 25)}[\n"
    "    platform.machine()]\n"
    "LD_ABS, JEQ, RET, ALLOW, ERRNO = 0x20, 0x15, 0x06, 0x7FFF0000, 0x00050000\n"
    "def op(code, k, jt=0, jf=0):\n"
    "    return struct.pack('HBBI', code, jt, jf, k)\n"
    "prog = b''.join([op(LD_ABS, 4), op(JEQ, arch, 1, 0), op(RET, ALLOW), op(LD_ABS, 0),\n"
    "                 op(JEQ, 434, 0, 1), op(RET, ERRNO | errno.ENOSYS),\n"
    "                 op(JEQ, 435, 0, 1), op(RET, ERRNO | errno.ENOSYS),\n"
    "                 op(JEQ, prctl_nr, 0, 1), op(RET, ERRNO | errno.EPERM),\n"
    "                 op(JEQ, fcntl_nr, 0, 3), op(LD_ABS, 24), op(JEQ, 1031, 0, 1), op(RET, ERRNO | errno.EPERM),\n"
    "                 op(RET, ALLOW)])\n"
    "class Fprog(ctypes.Structure):\n"
    "    _fields_ = [('len', ctypes.c_ushort), ('filter', ctypes.c_void_p)]\n"
    "buf = ctypes.create_string_buffer(prog, len(prog))\n"
    "fprog = Fprog(len(prog) // 8, ctypes.addressof(buf))\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(fprog), 0, 0):\n"
    "    sys.exit('seccomp: %s' % os.strerror(ctypes.get_errno()))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n")


def missing_facilities(doc):
    return {m["facility"] for m in doc["capabilities"]["missing"]}


@unittest.skipIf(restricted_skip_reason(), restricted_skip_reason() or "")
class RestrictedEnvironmentTests(JobTestCase):
    """The same five operations in each restricted place jobstate must work in:
    run, status, tail, kill of a tree with a grandchild, wait; and what
    `doctor` says there.  Every environment is a private namespace (or a
    seccomp filter) around a driver process, bounded in time."""

    TIMEOUT_S = 120

    def setUp(self):
        super().setUp()
        self.tree = os.path.join(self.tmp, "tree.py")
        self.driver = os.path.join(self.tmp, "driver.py")
        for path, text in ((self.tree, RESTRICTED_TREE), (self.driver, RESTRICTED_DRIVER)):
            with open(path, "w") as f:
                f.write(text)

    def drive(self, wrapper=(), prefix=None, python=PY, env=None):
        """Run the driver inside `wrapper` (an argv prefix: unshare, a shell, seccomp) and
        return what each operation answered."""
        prefix = prefix or [python, JOBSTATE]
        argv = list(wrapper) + [python, self.driver, json.dumps(prefix), self.root, self.tree]
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=self.TIMEOUT_S, env=env)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace")[-3000:])
        steps = json.loads(proc.stdout.decode().splitlines()[-1])
        return steps

    def assert_operations_work(self, steps, signalled_at_least=1):
        """run, tail, status, kill, wait all answered ok, and the whole tree is gone."""
        for name in ("run", "tail", "status", "kill", "wait"):
            self.assertIn(name, steps, "no %s step: run answered %r" % (name, steps["run"]))
            doc = steps[name]["doc"]
            self.assertTrue(doc and doc["ok"], "%s: %s %s" % (name, steps[name]["stdout"], steps[name]["stderr"]))
        self.assertEqual(steps["run"]["doc"]["state"], "running")
        self.assertEqual(steps["status"]["doc"]["state"], "running")
        self.assertEqual(len(steps["tree"]), 3, steps["tail"]["doc"]["stdout"])
        self.assertGreaterEqual(steps["kill"]["doc"]["processes_signalled"], signalled_at_least)
        self.assertEqual((steps["wait"]["doc"]["state"], steps["wait"]["doc"]["signal"]), ("killed", "SIGTERM"))
        if "alive_inside" in steps:
            self.assertEqual(steps["alive_inside"], [], "processes of the tree survived the kill")

    def assert_tree_gone_here(self, steps):
        wait_for(lambda: not any(pid_alive(p) for p in steps["tree"]), 10, "the job's tree to be gone")

    def doctor(self, steps):
        doc = steps["doctor"]["doc"]
        self.assertTrue(doc and doc["ok"], steps["doctor"])
        self.assertEqual(validate(doc, jobstate._document_schemas()["doctor"]), [])
        return doc["capabilities"]

    def test_python_without_ctypes(self):
        """A build without _ctypes: a _ctypes that cannot be imported, first on the
        path of every process (supervisors run with -S, which keeps PYTHONPATH)."""
        stub = os.path.join(self.tmp, "no_ctypes")
        os.mkdir(stub)
        with open(os.path.join(stub, "_ctypes.py"), "w") as f:
            f.write("raise ImportError(\"No module named '_ctypes'\", name='_ctypes')\n")
        env = dict(os.environ, PYTHONPATH=stub)
        check = subprocess.run([PY, "-S", "-c", "import ctypes"], env=env, stderr=subprocess.PIPE)
        self.assertNotEqual(check.returncode, 0, "the stub does not hide ctypes")
        steps = self.drive(env=env)
        self.assert_operations_work(steps)
        self.assert_tree_gone_here(steps)
        caps = self.doctor(steps)
        self.assertIn("ctypes", missing_facilities(steps["doctor"]["doc"]))
        self.assertNotIn("subreaper", caps["tree_discovery"])
        self.assertEqual(caps["pid_identity"], "proc-start-time")
        with open(jobstate.JobPaths(self.root, steps["run"]["doc"]["job_id"]).supervisor_log) as f:
            said = [line for line in f if " missing ctypes " in line]  # (3.8 also lacks pidfd: its own line)
        self.assertEqual(len(said), 1, said)  # once, by the supervisor that started the job
        self.assertIn("missing ctypes (ImportError", said[0])

    def test_read_only_copy_without_bytecode(self):
        """jobstate.py copied into a read-only directory with no compiled bytecode, and
        a cache directory that cannot be written either: supervisors compile it each
        time; the job runs, and doctor says what it costs."""
        source = os.path.join(self.tmp, "vendor")
        os.mkdir(source)
        shutil.copy(JOBSTATE, source)
        env = dict(os.environ, HOME=self.tmp, XDG_CACHE_HOME=os.path.join(source, "cache"))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"', "sh", source]
        steps = self.drive(wrapper, prefix=[PY, os.path.join(source, "jobstate.py")], env=env)
        self.assert_operations_work(steps)
        self.assertIn("bytecode_cache", missing_facilities(steps["doctor"]["doc"]))
        self.assertEqual(os.listdir(source), ["jobstate.py"])

    def test_pidfd_prctl_and_pipe_size_refused_by_seccomp(self):
        """An older runtime's seccomp profile: pidfd_open and clone3 answer ENOSYS,
        prctl and F_SETPIPE_SZ EPERM, for the launcher, the supervisors and the
        jobs alike.  Without clone3 a job's child still enters its cgroup (it
        moves there before it execs), and doctor says what that costs."""
        import platform
        if platform.machine() not in ("x86_64", "aarch64"):
            self.skipTest("the seccomp filter knows the syscall numbers of x86_64 and aarch64 only")
        steps = self.drive(wrapper=[PY, "-c", SECCOMP_EXEC])
        self.assert_operations_work(steps, signalled_at_least=3)
        self.assert_tree_gone_here(steps)
        caps = self.doctor(steps)
        contained = cgroup2_unwritable_reason() is None
        expected = {"pidfd", "prctl", "pipe_size"} | ({"clone3"} if contained else set())
        self.assertTrue(expected <= missing_facilities(steps["doctor"]["doc"]), caps["missing"])
        with open(os.path.join(self.root, steps["run"]["doc"]["job_id"], "state.json")) as f:
            self.assertEqual(json.load(f)["containment"], "cgroup" if contained else "process-group")
        self.assertEqual(caps["signal_delivery"], "verified-kill")
        self.assertNotIn("subreaper", caps["tree_discovery"])

    def test_hidepid_for_a_user(self):
        """A non-root user (nobody) under /proc mounted with hidepid=2: its own
        processes stay visible, so its own jobs lose nothing."""
        python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
        if not python or not shutil.which("setpriv"):
            self.skipTest("needs setpriv and a python3 that the user nobody may run (%s is under /root)" % PY)
        os.chown(self.tmp, 65534, 65534)
        # The cleanup, as root, may act on nobody's root only once it is root's again.
        self.addCleanup(lambda: os.path.isdir(self.root) and os.chown(self.root, os.getuid(), -1))
        env = dict(os.environ, HOME=self.tmp)
        env.pop("XDG_CACHE_HOME", None)
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t proc -o hidepid=2 proc /proc && exec setpriv --reuid=65534 --regid=65534 '
                   '--clear-groups -- "$@"', "sh"]
        steps = self.drive(wrapper, python=python, env=env)
        self.assert_operations_work(steps, signalled_at_least=3)
        self.assert_tree_gone_here(steps)
        caps = self.doctor(steps)
        self.assertEqual(caps["proc"], "hidepid")
        self.assertNotIn("proc", missing_facilities(steps["doctor"]["doc"]))

    def test_no_proc(self):
        """/proc replaced by an empty tmpfs in a private mount namespace: no pid can
        be verified, so the supervisor signals its own (unreaped) child's group."""
        wrapper = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                   'mount -t tmpfs none /proc && exec "$@"', "sh"]
        steps = self.drive(wrapper)
        self.assert_operations_work(steps)
        self.assert_tree_gone_here(steps)
        caps = self.doctor(steps)
        self.assertIn("proc", missing_facilities(steps["doctor"]["doc"]))
        self.assertEqual((caps["proc"], caps["pid_identity"], caps["signal_delivery"]),
                         ("absent", "none", "supervisor"))
        kill = steps["kill"]["doc"]
        self.assertIsNone(kill["processes_alive"], "nothing can be counted without /proc")
        self.assertIn("pids_unverifiable", [w["code"] for w in kill["warnings"]])

    def test_no_proc_kill_of_a_job_without_supervisor_is_an_error(self):
        """Without /proc and without a live supervisor, nothing can be signalled:
        an error with a hint, never ok with the job running on."""
        job = jobstate.create(["sleep", "300"], root=self.root)
        state = job.state()
        state.job.status, state.pid = jobstate.JobStatus.RUNNING, 1
        jobstate._write_state(job.paths, state)
        hold_job_lock(self, job)  # the state stays `running` (no supervisor_lost)
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount -t tmpfs none /proc && exec "$@"', "sh",
                               PY, JOBSTATE, "--root", self.root, "kill", "--no-wait", job.id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        doc = json.loads(proc.stdout)
        self.assertFalse(doc["ok"], "kill claimed a success it did not have: %s" % doc)
        self.assertEqual((proc.returncode, doc["error"]["code"]), (1, "kill_failed"), doc)
        self.assertIn("/proc", doc["error"]["hint"])

    def test_flock_that_lies(self):
        """A filesystem whose flock always succeeds (simulated in the platform layer):
        every command refuses the root, naming its filesystem; doctor says why."""
        steps = self.drive(prefix=[PY, "-c", LYING_FLOCK_CLI, JOBSTATE])
        run = steps["run"]["doc"]
        self.assertEqual((steps["run"]["status"], run["error"]["code"]), (1, "io_error"), run)
        self.assertIn("--root", run["error"]["hint"])
        self.assertEqual(jobstate._list_job_ids(self.root), [], "a job was made on a root whose locks lie")
        root = self.doctor(steps)["root"]
        self.assertEqual((root["lock"]["kind"], root["lock"]["trusted"]), ("flock", False))
        self.assertIn("%s filesystem mounted at %s" % (root["filesystem"], root["mount_point"]),
                      run["error"]["message"])
        self.assertIn("two conflicting locks", root["lock"]["reason"])

    def test_read_only_root(self):
        """A root bind-mounted read-only: reads work and say what they could not
        record; writes fail with a clear io_error; kill still stops the tree."""
        done = self.run_job(HELLO)
        done.wait(10)
        running = self.run_job([PY, self.tree])
        self.wait_log(running, "ready")
        pids = [int(w) for w in open(running.paths.stdout_log).read().split()[1:4]]
        lost = jobstate.create(["true"], root=self.root)
        state = lost.state()
        state.job.status = jobstate.JobStatus.RUNNING  # no supervisor holds its lock: supervisor_lost
        jobstate._write_state(lost.paths, state)
        script = os.path.join(self.tmp, "ro.py")
        with open(script, "w") as f:
            f.write("import json, subprocess, sys\n"
                    "def cli(*args):\n"
                    "    p = subprocess.run([sys.executable, %r, '--root', %r] + list(args), stdout=subprocess.PIPE,\n"
                    "                       stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, timeout=60)\n"
                    "    return {'status': p.returncode, 'doc': json.loads(p.stdout or 'null'),\n"
                    "            'stderr': p.stderr.decode(errors='replace')[-2000:]}\n"
                    "d, r, l = sys.argv[1:4]\n"
                    "print(json.dumps({'doctor': cli('doctor'), 'schema': cli('schema'), 'list': cli('list', '--all'),\n"
                    "    'status_done': cli('status', d), 'status_running': cli('status', r), 'status_lost': cli('status', l),\n"
                    "    'tail': cli('tail', r), 'wait_done': cli('wait', '--until', '5', d),\n"
                    "    'wait_running': cli('wait', '--until', '0.3', r), 'wait_lost': cli('wait', '--until', '5', l),\n"
                    "    'run': cli('run', '--', 'true'), 'kill': cli('kill', r)}))\n" % (JOBSTATE, self.root))
        proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                               'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"',
                               "sh", self.root, PY, script, done.id, running.id, lost.id],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=self.TIMEOUT_S)
        self.assertEqual(proc.returncode, 0, proc.stderr.decode(errors="replace")[-3000:])
        steps = json.loads(proc.stdout)
        for name in ("doctor", "schema", "list", "status_done", "status_running", "status_lost", "tail",
                     "wait_done", "wait_running", "wait_lost", "kill"):
            self.assertTrue(steps[name]["doc"] and steps[name]["doc"]["ok"], "%s: %r" % (name, steps[name]))
        self.assertEqual(steps["status_running"]["doc"]["state"], "running")
        self.assertEqual(steps["wait_done"]["doc"]["state"], "exited")
        self.assertEqual(steps["wait_running"]["doc"]["state"], "running")
        for name in ("status_lost", "wait_lost"):
            doc = steps[name]["doc"]
            self.assertEqual((doc["state"], doc["error"]["stage"]), ("failed", "supervisor_lost"))
            self.assertIn("state_not_updated", [w["code"] for w in doc["warnings"]])
        self.assertIn("state_not_updated", [w["code"] for w in steps["list"]["doc"]["warnings"]])
        self.assertEqual(steps["status_done"]["doc"]["warnings"], [])
        self.assertIn("ready", steps["tail"]["doc"]["stdout"])
        run = steps["run"]["doc"]
        self.assertEqual((steps["run"]["status"], run["error"]["code"]), (1, "io_error"), run)
        self.assertIn("read-only", run["error"]["message"].lower())
        self.assertGreaterEqual(steps["kill"]["doc"]["processes_signalled"], 3)
        self.assertIn("kill_request_not_written", [w["code"] for w in steps["kill"]["doc"]["warnings"]])
        wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "the tree to be gone")
        self.assertEqual(running.wait(10).status, jobstate.JobStatus.KILLED)
        with open(lost.paths.state) as f:
            self.assertEqual(json.load(f)["job"]["status"], "running", "a read-only root was written")
        self.assertFalse(self.doctor(steps)["root"]["writable"])

    def pid_namespace(self):
        return ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc"]

    def test_pid_namespace(self):
        """A new PID namespace with its own /proc (a container): the driver is its
        init, each CLI call an ordinary process in it."""
        steps = self.drive(self.pid_namespace())
        self.assertEqual(steps["pid"], 1)
        self.assert_operations_work(steps, signalled_at_least=3)
        self.assertFalse(self.doctor(steps)["dies_with_launcher"])

    def test_launcher_as_pid_1_keeps_observing(self):
        """`docker run image python jobstate.py run --no-wait ...`: returning would
        kill the job, so run observes it to its end and says why."""
        argv = self.pid_namespace() + [PY, JOBSTATE, "--root", self.root, "run", "--no-wait", "--",
                                       PY, "-c", "import time; time.sleep(0.5); print('done')"]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        doc = json.loads(proc.stdout)
        self.assertEqual((doc["state"], doc["stdout"]), ("exited", "done\n"), doc)
        self.assertEqual([w["code"] for w in doc["warnings"]], ["launcher_is_pid_1"])
        self.assertIn(b"--detach-anyway", proc.stderr)

    def test_launcher_as_pid_1_detach_anyway_is_warned(self):
        argv = self.pid_namespace() + [PY, JOBSTATE, "--root", self.root, "run", "--no-wait", "--detach-anyway",
                                       "--", "sleep", "300"]
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        doc = json.loads(proc.stdout)
        self.assertEqual((proc.returncode, doc["state"]), (0, "running"), doc)
        self.assertEqual([w["code"] for w in doc["warnings"]], ["dies_with_launcher"])
        # As said: the namespace ended with its init, and the job with it.
        state = jobstate.open_job(doc["job_id"], self.root).wait(10)
        self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "supervisor_lost"))

# ---------------------------------------------------------------------------
# The fault, load and hostile-input campaign (make torture runs it in full)
# ---------------------------------------------------------------------------


FULL_TORTURE = os.environ.get("JOBSTATE_TORTURE") == "1"


def scaled(short, full):
    return full if FULL_TORTURE else short


def report(line):
    """Figures for the campaign's record, on stderr (the runner keeps stdout for results)."""
    sys.stderr.write("\n[torture] %s\n" % line)


def supervisor_pids(root, job_id=None):
    """Live supervisors of jobs under root (or of one job): the processes that
    hold a job's lock file open.  (A supervisor forked by a forkserver carries
    the forkserver's command line, so its argv names no job.)"""
    if not os.path.isdir(root):
        return []
    locks = {os.path.join(root, d, "lock") for d in os.listdir(root) if job_id in (None, d)}
    pids = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir("/proc/%s/fd" % name)
            held = {os.readlink("/proc/%s/fd/%s" % (name, fd)) for fd in fds}
        except OSError:
            continue
        if held & locks and pid_alive(int(name)):
            pids.append(int(name))
    return pids


@unittest.skipIf(jobstate._WINDOWS, "POSIX only: /proc, SIGKILL, rlimits")
class Torture(JobTestCase):
    LINES = 20000
    PRINTER = ("import sys, time\n"
               "for i in range(%d):\n"
               "    sys.stdout.write('line %%d\\n' %% i)\n"
               "    if i %% 2000 == 0: sys.stdout.flush(); time.sleep(0.02)\n"
               "sys.stdout.flush(); time.sleep(0.3)\n" % LINES)

    def assert_consistent(self, job):
        """The invariants that must hold after any crash."""
        state = job.wait(15)  # never hangs: a lost supervisor is detected through its lock
        doc = json.load(open(job.paths.state))
        self.assertEqual(jobstate.JobState.from_dict(doc).status, state.status)
        self.assertIn(state.status, (jobstate.JobStatus.EXITED, jobstate.JobStatus.FAILED,
                                     jobstate.JobStatus.KILLED))
        if state.status is jobstate.JobStatus.FAILED:
            self.assertEqual(state.error.stage, "supervisor_lost")
        with open(job.paths.stdout_log, "rb") as f:
            lines = f.read().split(b"\n")
        complete = lines[:-1]
        self.assertEqual(complete, [b"line %d" % i for i in range(len(complete))], "log is not a clean prefix")
        if state.status is jobstate.JobStatus.EXITED:
            self.assertEqual(len(complete), self.LINES)
        return state, len(complete)

    def test_supervisor_killed_at_random_points(self):
        import random
        rng = random.Random(int(os.environ.get("JOBSTATE_TORTURE_SEED", "1")))
        outcomes, leftovers = {}, 0
        for _ in range(scaled(4, 40)):
            job = self.run_job(py(self.PRINTER))
            time.sleep(rng.uniform(0, 0.5))  # a random point in the job's life, not a synchronization
            try:
                os.kill(job.state().supervisor_pid, signal.SIGKILL)
            except (ProcessLookupError, TypeError):
                pass  # already finished
            state, lines = self.assert_consistent(job)
            outcomes[state.status.value] = outcomes.get(state.status.value, 0) + 1
            leftovers += len(marker_pids(job.id))
            job.kill("KILL")
            self.assertEqual(marker_pids(job.id), [])
        report("supervisor SIGKILL at random points: %s; job processes left running after the crash "
               "(then stopped by kill): %d" % (outcomes, leftovers))

    def test_supervisor_killed_before_its_acknowledgement(self):
        results = []
        for _ in range(scaled(3, 20)):
            launcher = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "run", "--no-wait", "--", "sleep", "5"],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            # The launcher holds the lock too until the supervisor has it (and on
            # Linux the supervisor starts as its fork): kill only the other holder.
            killed = wait_for(lambda: [pid for pid in supervisor_pids(self.root) if pid != launcher.pid]
                              or launcher.poll() is not None, 10, "a supervisor")
            if killed is not True:
                for pid in killed:
                    os.kill(pid, signal.SIGKILL)
            out, err = launcher.communicate(timeout=30)
            doc = json.loads(out)
            self.assertEqual(err, b"")
            results.append(doc["state"] if doc["ok"] else doc["error"]["code"])
            for job_id in jobstate._list_job_ids(self.root):
                job = jobstate.Job(job_id, self.root)
                self.assertNotEqual(job.wait(10).status, jobstate.JobStatus.RUNNING)
                job.kill("KILL")
                job.delete()
        self.assertTrue(set(results) <= {"launch_failed", "failed", "running"}, results)
        report("supervisor SIGKILL during launch: %s" % results)

    def test_killing_observers_never_touches_the_job(self):
        gate = fifo_gate(self)
        code = "print('ready', flush=True)\nopen(%r).read()\nprint('done', flush=True)\n" % gate
        launcher = subprocess.Popen([PY, JOBSTATE, "--root", self.root, "run", "--forever", "--"] + py(code),
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(launcher.communicate)
        job = wait_for(lambda: [jobstate.Job(i, self.root) for i in jobstate._list_job_ids(self.root)], 10,
                       "the job")[0]
        self.wait_log(job, "ready")
        observers = [subprocess.Popen([PY, JOBSTATE, "--root", self.root] + args + [job.id],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                     for args in (["wait", "--forever"], ["tail", "--follow"])]
        for proc in [launcher] + observers:
            proc.kill()
        for proc in observers:
            proc.communicate()
        self.assertEqual(job.state().status, jobstate.JobStatus.RUNNING)
        open_fifo_gate(gate)
        state = job.wait(15)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertEqual(job.tail().stdout, "ready\ndone\n")

    def test_concurrent_launches_from_threads_and_processes(self):
        processes, threads, per_thread = scaled((2, 4, 3), (4, 16, 8))
        code = ("import sys, threading\n"
                "sys.path.insert(0, %r)\n"
                "import jobstate\n"
                "ids = []\n"
                "def launch():\n"
                "    for _ in range(%d):\n"
                "        ids.append(jobstate.run(['echo', '1'], root=%r).id)\n"
                "workers = [threading.Thread(target=launch) for _ in range(%d)]\n"
                "[w.start() for w in workers]; [w.join() for w in workers]\n"
                "print('\\n'.join(ids))\n" % (HERE, per_thread, self.root, threads))
        started = time.monotonic()
        procs = [subprocess.Popen([PY, "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE) for _ in range(processes)]
        ids = []
        for proc in procs:
            out, err = proc.communicate(timeout=600)
            self.assertEqual(proc.returncode, 0, err.decode()[-2000:])
            ids += out.decode().split()
        launched = time.monotonic() - started
        expected = processes * threads * per_thread
        self.assertEqual((len(ids), len(set(ids))), (expected, expected))
        self.assertEqual(sorted(ids), jobstate._list_job_ids(self.root)[::-1])
        for job_id in ids:
            state = jobstate.Job(job_id, self.root).wait(60)
            self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0), job_id)
        report("%d jobs from %d processes x %d threads: all distinct, all exited 0; launched in %.1fs"
               % (expected, processes, threads, launched))

    def test_a_queue_of_500_jobs_from_several_processes(self):
        if not FULL_TORTURE:
            self.skipTest("make torture only (QueueTests queues 60 in make test)")
        figures = queue_storm(self, 500, processes=5, parallel=4)
        report("queue of %(jobs)d jobs, --parallel 4, queued from 5 processes at once: max running %(max_running)d, "
               "order violations %(order_violations)d, slot freed -> next job's start: median %(latency_median_ms).1f ms, "
               "max %(latency_max_ms).1f ms; queued in %(launch_s).1fs, drained in %(drain_s).1fs" % figures)
        self.assertEqual((figures["max_running"], figures["order_violations"]), (4, 0), figures)

    def test_concurrent_commands_on_one_job(self):
        job = self.run_job(ready_then_sleep(30), tags=["t"])
        self.wait_log(job, "ready")
        commands = [["kill"], ["restart", "--no-wait"], ["tag", "set", "--tag", "x"], ["status"],
                    ["restart", "--no-wait"], ["delete"], ["status"], ["kill", "--signal", "KILL"]]
        commands = commands * scaled(1, 4)
        procs = []
        for args in commands:
            argv = ([PY, JOBSTATE, "--root", self.root] + args[:1] + (args[1:2] if args[0] == "tag" else [])
                    + [job.id] + (args[2:] if args[0] == "tag" else args[1:]))
            procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE))
        codes = {}
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            self.assertEqual(err, b"")
            doc = json.loads(out)
            key = doc["type"] if doc["ok"] else doc["error"]["code"]
            codes[key] = codes.get(key, 0) + 1
        if os.path.isdir(job.paths.dir):
            jobstate._read_state(job.paths)
            jobstate._read_spec(job.paths)
            self.assertLessEqual(len(supervisor_pids(self.root)), 1)
        report("concurrent kill/restart/tag/status/delete on one job: %s" % codes)

    def test_output_fills_the_disk(self):
        mount = os.path.join(self.tmp, "tiny")
        os.mkdir(mount)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", mount],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            self.skipTest("cannot mount a tmpfs here: %s" % proc.stderr.decode().strip())
        self.addCleanup(subprocess.run, ["umount", "-l", mount])
        root = os.path.join(mount, "root")
        job = jobstate.run(py("import sys\nprint('start', flush=True)\nsys.stdout.write('x' * 5000000)\n"),
                           root=root)
        state = job.wait(30)
        self.assertEqual((state.status, state.exit_code), (jobstate.JobStatus.EXITED, 0))
        self.assertEqual(state.error.stage, "output")
        self.assertIn("No space left", state.error.message)
        with open(job.paths.supervisor_log) as f:
            self.assertIn("No space left", f.read())
        jobstate._read_spec(job.paths)
        self.assertTrue(open(job.paths.stdout_log, "rb").read().startswith(b"start\n"))
        job.delete()
        self.assertEqual(jobstate.run(py("print('after')"), root=root).wait(10).exit_code, 0)

    def test_too_few_file_descriptors_or_an_unwritable_root(self):
        import resource

        def limited():
            resource.setrlimit(resource.RLIMIT_NOFILE, (12, 12))
        proc = subprocess.run([PY, JOBSTATE, "--root", self.root, "run", "--", "echo", "x"], preexec_fn=limited,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        limited_doc = json.loads(proc.stdout)
        self.assertNotIn(b"Traceback", proc.stderr)
        if not limited_doc["ok"]:
            self.assertIn(limited_doc["error"]["code"], ("io_error", "launch_failed", "internal_error"))
        for job_id in jobstate._list_job_ids(self.root):  # no half-made job: each one is readable
            jobstate._read_spec(jobstate.JobPaths(self.root, job_id))
        blocker = os.path.join(self.tmp, "a-file")
        open(blocker, "w").close()
        status, doc, _ = self.cli("--root", os.path.join(blocker, "root"), "run", "--", "echo", "x")
        self.assertEqual((status, doc["error"]["code"]), (1, "io_error"))
        report("RLIMIT_NOFILE=12: %s" % (limited_doc["state"] if limited_doc["ok"] else limited_doc["error"]["code"]))

    def test_hostile_job_ids(self):
        os.makedirs(self.root)
        for bad in ("a/b", "..", "a\0b", "\u00e9\u00e9", "x" * 10000, "0" * 32 + "/..", " 0", "0 "):
            status, doc, _ = self.cli("status", bad)
            self.assertEqual((status, doc["error"]["code"]), (1, "invalid_job_id"), repr(bad)[:40])
            status, doc, _ = self.cli("delete", bad)
            self.assertEqual(doc["error"]["code"], "invalid_job_id")
        self.assertEqual(sorted(os.listdir(self.tmp)), ["root"])

    def test_argv_bytes_and_size(self):
        every_byte = bytes(range(1, 256))
        arg = os.fsdecode(every_byte)
        code = "import os, sys; sys.stdout.buffer.write(b'|'.join(os.fsencode(a) for a in sys.argv[1:]))"
        job = self.run_job(py(code) + [arg, "x=y\nz"])
        job.wait(10)
        with open(job.paths.stdout_log, "rb") as f:
            self.assertEqual(f.read(), every_byte + b"|x=y\nz")
        big = ["a" * 100000] * 10  # 1 MB of argv in arguments under the kernel's per-argument cap
        job = self.run_job(py("import sys; print(sum(map(len, sys.argv[1:])))") + big)
        job.wait(20)
        self.assertEqual(job.tail().stdout, "1000000\n")

    def test_a_huge_line_without_newline(self):
        size = scaled(10, 100) * 1000 * 1000
        job = self.run_job(py("import sys; sys.stdout.write('y' * %d)" % size))
        state = job.wait(60)
        self.assertTrue(state.logs_drained)
        tail = job.tail(lines=5, max_bytes=100)
        self.assertEqual((tail.stdout, tail.stdout_range, tail.stdout_total_bytes), ("y" * 100, (size - 100, size), size))
        self.assertEqual(os.path.getsize(job.paths.stdout_log), size)

    def test_planted_symlinks_are_never_followed(self):
        victim = os.path.join(self.tmp, "victim.txt")
        with open(victim, "w") as f:
            f.write("precious")
        job = jobstate.create(py("print('output')"), root=self.root)
        os.symlink(victim, job.paths.stdout_log)
        state = job.start().wait(10)
        self.assertEqual(open(victim).read(), "precious")
        self.assertEqual((state.status, state.error.stage), (jobstate.JobStatus.FAILED, "logs"))
        self.assertIsNone(state.pid, "a child was started with nowhere safe for its output")
        elsewhere = os.path.join(self.tmp, "elsewhere")
        os.mkdir(elsewhere)
        with open(os.path.join(elsewhere, "keep"), "w") as f:
            f.write("keep")
        planted = "f" * 32
        os.symlink(elsewhere, os.path.join(self.root, planted))
        status, doc, _ = self.cli("list", "--all")
        self.assertNotIn(planted, [j["job_id"] for j in doc["jobs"]])
        status, doc, _ = self.cli("delete", planted)
        self.assertEqual((status, doc["error"]["code"]), (1, "job_not_found"))
        self.cli("gc", "--older-than", "0", "--max-jobs", "0")
        self.assertEqual(os.listdir(elsewhere), ["keep"])

    @unittest.skipUnless(POSIX and os.geteuid() == 0, "needs root to give the root away")
    def test_root_owned_by_someone_else_is_refused(self):
        os.makedirs(self.root)
        os.chown(self.root, 65534, 65534)
        self.addCleanup(os.chown, self.root, 0, 0)  # so that the cleanup may list it
        status, doc, _ = self.cli("run", "--", "echo", "x")
        self.assertEqual((status, doc["error"]["code"]), (1, "io_error"))
        self.assertIn("owned by uid 65534", doc["error"]["message"])

    def test_soak(self):
        short, long_running, lasting_s = scaled((60, 5, 120), (2000, 50, 1200))
        # Long enough to outlast the soak; no longer, so that one the cleanup missed (under
        # Wine it holds the suite's output pipe) cannot outlast make test-windows's timeout.
        long_jobs = [self.run_job(py("import time; time.sleep(%d)" % lasting_s)) for _ in range(long_running)]
        stop, errors = threading.Event(), []

        def hammer():
            while not stop.is_set():
                for args in (["list", "--all", "--limit", "20"], ["status", long_jobs[0].id]):
                    status, doc, _ = self.cli(*args)
                    if status != 0:
                        errors.append(doc)
        observer = threading.Thread(target=hammer)
        observer.start()
        try:
            fds_before = len(os.listdir("/proc/self/fd"))
            for i in range(short):
                self.run_job(["true"]).wait(30)  # the soak is in jobstate, not in the job
        finally:
            stop.set()
            observer.join()
        self.assertEqual(errors, [])
        self.assertLessEqual(len(os.listdir("/proc/self/fd")), fds_before + 2, "file descriptors leak")
        sup_fds = [len(os.listdir("/proc/%d/fd" % pid)) for pid in supervisor_pids(self.root)]
        self.assertEqual(len(sup_fds), long_running)
        self.assertLessEqual(max(sup_fds), min(sup_fds) + 1)
        self.assertEqual(zombie_children(os.getpid()), [])
        report("soak: %d short jobs with %d running and list/status hammering: 0 errors, supervisor fds %s"
               % (short, long_running, sorted(set(sup_fds))))

# ---------------------------------------------------------------------------
# Runner: "N passed, N failed, N skipped" as the last line
# ---------------------------------------------------------------------------
#
# Most of a test's time is spent waiting on processes (interpreter starts, a
# job's end), so the whole suite runs its tests in worker processes, several
# at once: each worker takes the next test when it finishes one.  Tests share
# nothing but the machine (each has its own root).  JOBSTATE_TEST_WORKERS sets
# the number (1: in this process, one after another, as a named class always runs).


def _worker_count():
    default = 4 if POSIX else 1  # under Wine, processes are slow to start and Wine itself is the bottleneck
    value = os.environ.get("JOBSTATE_TEST_WORKERS", "")
    return int(value) if value.isdigit() and int(value) > 0 else default


def _test_names(suite):
    for item in suite:
        if isinstance(item, unittest.TestCase):
            yield item.id().split(".", 1)[1]  # "Class.test_method", loadable by name
        else:
            yield from _test_names(item)


def _problem(kind, test, text):
    """One failure as unittest reports it."""
    return "%s\n%s: %s\n%s\n%s\n" % ("=" * 70, kind, test, "-" * 70, text)


def _outcome(result, seconds):
    """One test's result as a JSON line: counts, its letter, and the report of any failure."""
    report = "".join(_problem(kind, test, text) for kind, problems in (("ERROR", result.errors),
                                                                        ("FAIL", result.failures))
                     for test, text in problems)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    letter = "E" if result.errors else "F" if failed else "s" if result.skipped else "."
    return json.dumps({"run": result.testsRun, "failed": failed, "skipped": len(result.skipped),
                       "letter": letter, "seconds": round(seconds, 2), "report": report})


def _serve_tests(module, names):
    """--worker: run the tests named on `names` (our stdin), one per line; one JSON line each on stdout."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what tests print goes to stderr; stdout carries only answers
    loader = unittest.TestLoader()
    for name in names:
        result = unittest.TestResult()
        started = time.monotonic()
        loader.loadTestsFromName(name.strip(), module).run(result)
        answers.write(_outcome(result, time.monotonic() - started) + "\n")
        answers.flush()
    return 0


def _run_in_workers(names, count, verbose):
    """Every test, `count` at a time in worker processes; the counts and reports as unittest gives them."""
    pending, lock, outcomes = list(reversed(names)), threading.Lock(), []

    def next_name():
        with lock:
            return pending.pop() if pending else None

    def finished(name, line):
        outcome = json.loads(line) if line else {
            "run": 1, "failed": 1, "skipped": 0, "letter": "E", "seconds": 0,
            "report": _problem("ERROR", name, "its worker process died")}
        with lock:
            outcomes.append(outcome)
            sys.stdout.write("%s ... %s (%.1f s)\n" % (name, outcome["letter"], outcome["seconds"]) if verbose
                             else outcome["letter"])
            sys.stdout.flush()

    def drive():
        name = next_name()
        while name is not None:  # a worker that dies is replaced
            with subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, universal_newlines=True) as worker:
                while name is not None:
                    try:
                        worker.stdin.write(name + "\n")
                        worker.stdin.flush()
                        line = worker.stdout.readline()
                    except OSError:
                        line = ""
                    finished(name, line)
                    name = next_name()
                    if not line:
                        break
                worker.stdin.close()

    started = time.monotonic()
    drivers = [threading.Thread(target=drive) for _ in range(min(count, len(names)))]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join()
    sys.stdout.write("\n" + "".join(outcome["report"] for outcome in outcomes))
    run = sum(outcome["run"] for outcome in outcomes)
    print("-" * 70 + "\nRan %d tests in %.3fs (%d workers)\n" % (run, time.monotonic() - started, count))
    return run, sum(outcome["failed"] for outcome in outcomes), sum(outcome["skipped"] for outcome in outcomes)


def _run_here(suite, verbose):
    result = unittest.TextTestRunner(verbosity=2 if verbose else 1).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    return result.testsRun, failed, len(result.skipped)


def _main(argv):
    import unittest.mock  # noqa: F401  (used by StoreTests through unittest.mock)
    module = sys.modules[__name__]
    # A suite started in the background (`cmd &` in a script) inherits SIGINT
    # ignored, and so would every CLI a test starts: the Ctrl-C tests need the default.
    if POSIX and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    worker = argv == ["--worker"]
    names = os.fdopen(os.dup(0), "r") if worker else None  # a worker's orders, kept apart
    # Tests never read our stdin; a harness's idle pipe must not leak into CLI runs.
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    if worker:
        return _serve_tests(module, names)
    loader, verbose = unittest.TestLoader(), not os.environ.get("CI")
    if argv:
        suite = unittest.TestSuite(loader.loadTestsFromName(name, module) for name in argv)
    else:
        suite = loader.loadTestsFromModule(module)
    names = list(_test_names(suite))
    count = 1 if argv else _worker_count()
    run, failed, skipped = _run_in_workers(names, count, verbose) if count > 1 else _run_here(suite, verbose)
    print("%d passed, %d failed, %d skipped" % (run - failed - skipped, failed, skipped))
    return 1 if failed or not run else 0


import unittest.mock  # noqa: E402  (after the helpers, so the module reads top-down)

if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

#!/usr/bin/env python3
"""jobstate against its own floors, all measured in one run (`make bench`).

    python3 .ci/bench.py [--runs 15] [--bytes 256MiB] [--mem-jobs 4] [--launches 200] [--jobs 10000]

Each row is one path a user takes, its floor (what the same machine needs at
least to do that work without jobstate: a bare interpreter start, a direct
Popen, a write straight to a file), jobstate's figure, their ratio and the
target.  Figures are medians of --runs samples; a floor's samples alternate with
jobstate's, so load from elsewhere on the machine hits both alike.  Every child
runs this interpreter (sys.executable), never a `python3` shim.  Needs nothing
outside the repo; the peers comparison is `make bench-peers` (optional).

A benchmark, not a test: it exits 0 whatever the figures (--strict: 1 when a
target is missed).  Linux only (PSS comes from /proc/PID/smaps_rollup).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
import jobstate  # noqa: E402

PY = sys.executable
JOBSTATE = os.path.join(HERE, "jobstate.py")
MIB = 1024 * 1024
BLOCK = 64 * 1024  # the throughput child writes lines of this size, each numbered

# Writes argv[1] bytes as numbered 64 KiB lines, so a lost, doubled or moved block shows.
WRITER = ("import sys\n"
          "fill = bytes(b for b in range(256) if b != 10) * 300\n"
          "out = sys.stdout.buffer\n"
          "for i in range(int(sys.argv[1]) // %d):\n"
          "    out.write(b'%%016d' %% i + fill[:%d] + b'\\n')\n" % (BLOCK, BLOCK - 17))


def expected_block(i):
    fill = bytes(b for b in range(256) if b != 10) * 300
    return b"%016d" % i + fill[:BLOCK - 17] + b"\n"


def progress(message):
    sys.stderr.write("[bench] %s\n" % message)
    sys.stderr.flush()


def run_quiet(argv, **kw):
    return subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          check=True, **kw)


def seconds(fn):
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def alternate(floor, ours, runs, settle=lambda: None):
    """Median seconds of floor() and ours(), called in turns; settle() runs
    after each of ours, untimed."""
    floor_s, ours_s = [], []
    for _ in range(runs):
        floor_s.append(seconds(floor))
        ours_s.append(seconds(ours))
        settle()
    return statistics.median(floor_s), statistics.median(ours_s)


class Rows:
    def __init__(self):
        self.rows = []
        self.missed = 0

    def add(self, path, floor_label, floor, ours, ratio, target, met):
        if met is False:
            self.missed += 1
        self.rows.append((path, floor_label, floor, ours, ratio, target,
                          "" if met is None else ("yes" if met else "**no**")))

    def print(self):
        print("| path | floor | floor figure | jobstate | ratio | target | met |")
        print("|---|---|---|---|---|---|---|")
        for row in self.rows:
            print("| %s |" % " | ".join(row))


def ms(s):
    return "%.1f ms" % (s * 1000) if s >= 0.01 else "%.3f ms" % (s * 1000)


# -- CLI launches -------------------------------------------------------------


def cli_launch(rows, tmp, runs):
    root = os.path.join(tmp, "cli")
    launched = []

    def launch(argv, env=None, cwd=None):
        out = run_quiet(argv, env=env, cwd=cwd).stdout
        launched.append(json.loads(out)["job_id"])

    def settle():
        # Finished jobs' supervisors must not compete with the next sample.
        while launched:
            jobstate.open_job(launched.pop(), root).wait(30)

    def ours_script():
        launch([PY, JOBSTATE, "--root", root, "run", "--no-wait", "--", "true"])

    floor_script = [PY, "-c", "import subprocess; compile(open(%r, 'rb').read(), %r, 'exec'); "
                              "subprocess.Popen(['true'])" % (JOBSTATE, JOBSTATE)]
    progress("script: python jobstate.py run --no-wait -- true (%d runs)" % runs)
    ours_script()  # warm the page cache and the supervisor's own bytecode cache
    settle()
    floor, ours = alternate(lambda: run_quiet(floor_script), ours_script, runs, settle)
    rows.add("`python jobstate.py run --no-wait -- true`",
             "`python -c` compiling jobstate.py, then `Popen(['true'])`",
             ms(floor), ms(ours), "%.2fx" % (ours / floor), "≤ 1.10x", ours / floor <= 1.10)

    # The module from a directory of its own, so its bytecode cache stays out of the repo.
    module_dir = os.path.join(tmp, "module")
    os.mkdir(module_dir)
    shutil.copy(JOBSTATE, module_dir)
    env = dict(os.environ, PYTHONPATH=module_dir)
    env.pop("PYTHONDONTWRITEBYTECODE", None)

    def ours_module():
        launch([PY, "-m", "jobstate", "--root", root, "run", "--no-wait", "--", "true"], env=env, cwd=tmp)

    floor_module = [PY, "-c", "import subprocess; subprocess.Popen(['true'])"]
    progress("module: python -m jobstate run --no-wait -- true (%d runs)" % runs)
    ours_module()  # writes the bytecode cache
    settle()
    floor, ours = alternate(lambda: run_quiet(floor_module, env=env, cwd=tmp), ours_module, runs, settle)
    rows.add("`python -m jobstate run --no-wait -- true` (cached bytecode)",
             "`python -c \"import subprocess; subprocess.Popen(['true'])\"`",
             ms(floor), ms(ours), "%.2fx" % (ours / floor), "≤ 1.20x", ours / floor <= 1.20)


# -- From a warm process --------------------------------------------------------


def warm_launches(rows, tmp, launches):
    root = os.path.join(tmp, "api")
    # Warm-up: the first launch of a process forks directly, the second starts
    # its forkserver; from then on every launch goes through the forkserver.
    for _ in range(2):
        jobstate.run(["true"], root=root).wait(30)
    progress("API: %d launches of jobstate.run(['true']) and of Popen(['true'])" % launches)
    jobs, procs, ours_s, floor_s = [], [], [], []
    for _ in range(launches):
        floor_s.append(seconds(lambda: procs.append(subprocess.Popen(["true"]))))
        ours_s.append(seconds(lambda: jobs.append(jobstate.run(["true"], root=root))))
    for proc in procs:
        proc.wait()
    for job in jobs:
        job.wait(60)
    floor, ours = statistics.median(floor_s), statistics.median(ours_s)
    rows.add("a launch from a warm process: `jobstate.run(['true'])`", "`subprocess.Popen(['true'])`, same process",
             ms(floor), ms(ours), "%.1fx" % (ours / floor), "≤ 3 ms", ours <= 0.003)
    rows.add("%d such launches, one after another" % launches, "%d `Popen` calls" % launches,
             "%.2f s" % sum(floor_s), "%.2f s" % sum(ours_s), "%.1fx" % (sum(ours_s) / sum(floor_s)),
             "< %.1f s" % (0.6 * launches / 200), sum(ours_s) < 0.6 * launches / 200)
    return jobs[-1].id, root


def warm_observation(rows, job_id, root, runs):
    state_path = jobstate.open_job(job_id, root).paths.state

    def per_call(fn, calls=200):
        samples = []
        for _ in range(runs):
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            samples.append((time.perf_counter() - started) / calls)
        return statistics.median(samples)

    def read_state_json():
        with open(state_path, "rb") as f:
            json.load(f)

    progress("status/wait of a finished job (%d x 200 calls each)" % runs)
    floor = per_call(read_state_json)
    for label, fn in (("`open_job(id).state()`", lambda: jobstate.open_job(job_id, root).state()),
                      ("`open_job(id).wait()`", lambda: jobstate.open_job(job_id, root).wait())):
        ours = per_call(fn)
        rows.add("%s of a finished job, warm process" % label, "`json.load` of its state.json",
                 ms(floor), ms(ours), "%.1fx" % (ours / floor), "≤ 0.3 ms", ours <= 0.0003)


# -- Memory ---------------------------------------------------------------------


def memory_kib(pid):
    """(PSS, RSS) of a process, KiB."""
    found = {}
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                found[key] = int(rest.split()[0])
    return found["Pss"], found["Rss"]


def is_watcher(pid):
    """A CLI-launched supervisor, once it runs its own interpreter (after the exec)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return b"_supervise" in f.read().split(b"\0")
    except OSError:
        return False


def settled(pids, check, timeout_s=20):
    deadline = time.monotonic() + timeout_s
    while not all(check(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise SystemExit("bench: processes %s did not settle" % pids)
        time.sleep(0.05)
    time.sleep(0.5)  # let a fresh interpreter finish its start-up allocations
    return pids


def per_extra_process(start, count, check=lambda pid: True):
    """Start count processes with start() -> pid: MiB of PSS each one past the
    first adds (what sharing leaves to pay), and the median RSS of one (MiB)."""
    total_pss = lambda pids: sum(memory_kib(pid)[0] for pid in pids)  # noqa: E731
    pids = settled([start()], check)
    alone = total_pss(pids)
    pids = settled(pids + [start() for _ in range(count - 1)], check)
    extra = (total_pss(pids) - alone) / (count - 1) / 1024
    return extra, statistics.median(memory_kib(pid)[1] for pid in pids) / 1024


def memory(rows, tmp, count):
    root = os.path.join(tmp, "memory")
    progress("memory: supervisors of 1 then %d running `sleep` jobs; bare `python -S` sleepers likewise" % count)
    bare, jobs = [], []

    def start_bare():
        bare.append(subprocess.Popen([PY, "-S", "-c", "import time; time.sleep(300)"], stdin=subprocess.DEVNULL))
        return bare[-1].pid

    def start_job():
        doc = json.loads(run_quiet([PY, JOBSTATE, "--root", root, "run", "--no-wait", "--", "sleep", "300"]).stdout)
        jobs.append(jobstate.open_job(doc["job_id"], root))
        return jobs[-1].state().supervisor_pid

    try:
        floor_pss, floor_rss = per_extra_process(start_bare, count)
        pss, rss = per_extra_process(start_job, count, is_watcher)
    finally:
        for proc in bare:
            proc.kill()
            proc.wait()
        for job in jobs:
            job.kill("KILL")
    rows.add("memory of one more running job (PSS of its supervisor)", "one more bare `python -S` sleeping",
             "%.1f MiB" % floor_pss, "%.1f MiB" % pss, "%.1fx" % (pss / floor_pss), "≤ 5 MiB", pss <= 5)
    rows.add("the RSS of one such supervisor", "a bare `python -S` sleeping", "%.1f MiB" % floor_rss,
             "%.1f MiB" % rss, "%.1fx" % (rss / floor_rss), "≤ 10.5 MiB", rss <= 10.5)


# -- Output capture -----------------------------------------------------------------


def all_bytes_there(path, nbytes):
    if os.path.getsize(path) != nbytes:
        return False
    with open(path, "rb") as f:
        return all(f.read(BLOCK) == expected_block(i) for i in range(nbytes // BLOCK))


def throughput(rows, tmp, nbytes, runs):
    root = os.path.join(tmp, "throughput")
    child = [PY, "-c", WRITER, str(nbytes)]
    plain = os.path.join(tmp, "plain.out")
    progress("output: %d MiB through jobstate and straight to a file (%d runs each)" % (nbytes // MIB, runs))
    floor_s, ours_s, intact = [], [], True

    def straight_to_a_file():
        with open(plain, "wb") as out:
            subprocess.run(child, stdin=subprocess.DEVNULL, stdout=out, check=True)

    for _ in range(runs):
        floor_s.append(seconds(straight_to_a_file))
        intact = intact and all_bytes_there(plain, nbytes)
        os.remove(plain)
        started = time.perf_counter()
        job = jobstate.run(child, root=root)
        state = job.wait()
        ours_s.append(time.perf_counter() - started)
        intact = intact and state.exit_code == 0 and state.logs_drained and \
            all_bytes_there(job.paths.stdout_log, nbytes)
        job.delete()
    floor, ours = nbytes / statistics.median(floor_s), nbytes / statistics.median(ours_s)
    ratio = ours / floor
    rows.add("%d MiB of output captured (`jobstate.run`, then `wait`)%s"
             % (nbytes // MIB, "" if intact else ": **bytes lost or changed in stdout.log**"),
             "the same child writing straight to a file", "%.0f MB/s" % (floor / 1e6), "%.0f MB/s" % (ours / 1e6),
             "%.2fx" % ratio, "≥ 0.6x, every byte in stdout.log", ratio >= 0.6 and intact)


# -- A root with many jobs ---------------------------------------------------------------


def fill_root(root, count):
    """count finished jobs, written the way a supervisor leaves them (no processes needed)."""
    template = jobstate.create(["true", "x"], root=root)
    state = jobstate._read_state(template.paths)
    state.job.status, state.result.exit_code = jobstate.JobStatus.EXITED, 0
    state.finished_at = jobstate._utc_now()
    jobstate._write_state(template.paths, state)
    for i in range(count - 1):
        job_id = "%012x" % (int(template.id[:12], 16) - count + i) + template.id[12:]
        shutil.copytree(template.paths.dir, os.path.join(root, job_id))
        with open(os.path.join(root, job_id, "state.json"), "r+") as f:
            doc = json.load(f)
            doc["job"]["id"] = job_id
            f.seek(0)
            f.truncate()
            json.dump(doc, f)
    return template.id


def many_jobs(rows, tmp, count, runs):
    progress("a root with %d jobs: list and status" % count)
    small, big = os.path.join(tmp, "one"), os.path.join(tmp, "many")
    one = fill_root(small, 1)
    newest = fill_root(big, count)
    oldest = sorted(jobstate._list_job_ids(big))[0]
    cli = lambda root, args: lambda: run_quiet([PY, JOBSTATE, "--root", root] + args)  # noqa: E731
    for label, args, target in (("`status` of the newest job", ["status", newest], 1.1),
                                ("`status` of the oldest job", ["status", oldest], 1.1),
                                ("`list --all` (limit 50)", ["list", "--all"], None),
                                ("`list` of another directory (reads every meta.json)",
                                 ["list", "--cwd", "/nonexistent"], None)):
        floor, ours = alternate(cli(small, ["status", one]), cli(big, args), runs)
        rows.add("%s among %d jobs" % (label, count), "`status` in a root with 1 job", ms(floor), ms(ours),
                 "%.2fx" % (ours / floor), "≤ %.1fx" % target if target else "", ours / floor <= target if target
                 else None)


def size(text):
    units = {"": 1, "k": 1024, "kib": 1024, "m": MIB, "mib": MIB, "g": 1024 * MIB, "gib": 1024 * MIB}
    number = text.rstrip("kKmMgGiIbB")
    nbytes = int(float(number) * units[text[len(number):].lower()])
    return max(BLOCK, nbytes - nbytes % BLOCK)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=int(os.environ.get("JOBSTATE_BENCH_RUNS", 15)),
                        help="samples per median (default 15, or $JOBSTATE_BENCH_RUNS)")
    parser.add_argument("--bytes", type=size, default=size(os.environ.get("JOBSTATE_BENCH_BYTES", "256MiB")),
                        help="output captured per run, e.g. 1GiB (default 256MiB, or $JOBSTATE_BENCH_BYTES)")
    parser.add_argument("--tp-runs", type=int, default=3, help="runs of the output capture (default 3)")
    parser.add_argument("--mem-jobs", type=int, default=4, help="running jobs for the memory figure (default 4)")
    parser.add_argument("--launches", type=int, default=200, help="launches from a warm process (default 200)")
    parser.add_argument("--jobs", type=int, default=10000, help="jobs in the big root (default 10000; 0: skip)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args()
    if not sys.platform.startswith("linux"):
        parser.error("Linux only (/proc)")
    tmp = tempfile.mkdtemp(prefix="jobstate-bench-")
    rows = Rows()
    started = time.monotonic()
    try:
        cli_launch(rows, tmp, args.runs)
        job_id, root = warm_launches(rows, tmp, args.launches)
        warm_observation(rows, job_id, root, args.runs)
        memory(rows, tmp, max(2, args.mem_jobs))
        throughput(rows, tmp, args.bytes, args.tp_runs)
        if args.jobs:
            many_jobs(rows, tmp, args.jobs, max(3, args.runs // 2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("jobstate %s, Python %s (%s), %d CPUs; medians of %d runs; %.0f s in all"
          % (jobstate.__version__, sys.version.split()[0], PY, os.cpu_count(), args.runs,
             time.monotonic() - started))
    print()
    rows.print()
    return 1 if args.strict and rows.missed else 0


if __name__ == "__main__":
    sys.exit(main())

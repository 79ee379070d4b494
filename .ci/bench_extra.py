#!/usr/bin/env python3
"""Figures the peers harness (../shared/bench/bench_peers.py) does not measure.

    python3 .ci/bench_extra.py [--jobs 10000] [--mass 200]

1. 200 jobs launched from one Python process through the API (jobstate.run).
2. `list --all` and `status` in a root holding 10,000 jobs, against a root with one job.
Medians of wall-clock times of real CLI calls; a benchmark, never a test.
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

CLI = [sys.executable, os.path.join(HERE, "jobstate.py")]


def median_ms(argv, runs=7):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL, check=True)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def fill_root(root, count):
    """count finished jobs, written the way a supervisor leaves them (no processes needed)."""
    template = jobstate.create(["true", "x"], root=root)
    state = jobstate.read_state(template.paths)
    state.job.status, state.result.exit_code = jobstate.JobStatus.EXITED, 0
    state.finished_at = jobstate._utc_now()
    jobstate.write_state(template.paths, state)
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10000)
    parser.add_argument("--mass", type=int, default=200)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="jobstate-bench-")
    try:
        root = os.path.join(tmp, "mass")
        started = time.perf_counter()
        jobs = [jobstate.run(["true", "x"], root=root) for _ in range(args.mass)]
        launched = time.perf_counter() - started
        for job in jobs:
            job.wait(60)
        finished = time.perf_counter() - started
        print("| figure | value |\n|---|---|")
        print("| %d jobs launched through the API, one process | %.2f s (%.1f ms each); all finished %.2f s |"
              % (args.mass, launched, launched / args.mass * 1000, finished))
        small, big = os.path.join(tmp, "one"), os.path.join(tmp, "many")
        one = fill_root(small, 1)
        newest = fill_root(big, args.jobs)
        oldest = sorted(jobstate._list_job_ids(big))[0]
        rows = [("`list --all` (limit 50)", ["list", "--all"]), ("`status` of the newest job", ["status", newest]),
                ("`status` of the oldest job", ["status", oldest]),
                ("`list` of another directory (reads every meta.json)", ["list", "--cwd", "/nonexistent"])]
        base = median_ms(CLI + ["--root", small, "status", one])
        print("| `status` in a root with 1 job | %.1f ms |" % base)
        for label, argv in rows:
            ms = median_ms(CLI + ["--root", big] + argv)
            print("| %s among %d jobs | %.1f ms (%.2fx of status in a 1-job root) |" % (label, args.jobs, ms, ms / base))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

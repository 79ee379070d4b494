# jobstate: stdlib only.  `make test` needs nothing installed; `make check` installs
# vermin (pinned) into $(PYTHON) when it is missing; `make test-windows` installs Wine
# and two Windows interpreters once (network: Debian packages and the Python package
# index); `make bench-peers` is optional and needs a harness that is not in this repo.
PYTHON ?= python3

.PHONY: test check torture bench bench-peers test-windows

test:
	$(PYTHON) test_jobstate.py

# vermin runs through $(PYTHON) itself: a pip-installed console script may not be on PATH.
VERMIN_VERSION = 1.9.2
check:
	$(PYTHON) -m py_compile jobstate.py test_jobstate.py
	@$(PYTHON) -c 'import sys; from vermin.constants import VERSION; sys.exit(VERSION != "$(VERMIN_VERSION)")' 2>/dev/null || \
	    $(PYTHON) -m pip install --quiet --disable-pip-version-check vermin==$(VERMIN_VERSION) || \
	    { echo "make check needs vermin $(VERMIN_VERSION): $(PYTHON) -m pip install vermin==$(VERMIN_VERSION) (or PYTHON=a venv's python)" >&2; exit 1; }
	$(PYTHON) -c 'import sys; from vermin import main; sys.argv[0] = "vermin"; main()' \
	    -t=3.8- --no-tips --violations jobstate.py test_jobstate.py
	$(PYTHON) test_jobstate.py StaticTests

# The fault, load and hostile-input campaign in full (make test runs a short form).
torture:
	JOBSTATE_TORTURE=1 $(PYTHON) test_jobstate.py Torture

# jobstate against its own floors (interpreter start, direct Popen, plain file), one
# table from one run, under 3 minutes.  More: make bench BENCH_ARGS="--bytes 1GiB --runs 31"
BENCH_ARGS ?=
bench:
	$(PYTHON) .ci/bench.py $(BENCH_ARGS)

# Optional: side by side with other job runners (task-spooler, supervisord, pm2, ...),
# through a peers harness kept outside this repo (PEERS_BENCH; by default where the
# project's CI lays it beside the clone), with the peers installed by that harness's
# own setup script.  Without the harness this says so and does nothing.
PEERS_BENCH ?= ../shared/bench/bench_peers.py
bench-peers:
	@if [ -f "$(PEERS_BENCH)" ]; then \
	    $(PYTHON) "$(PEERS_BENCH)" --jobstate jobstate.py; \
	else \
	    echo "bench-peers: no peers harness at $(PEERS_BENCH) (optional, not part of this repo): skipped"; \
	fi

# The same suite in Windows CPython 3.8 and 3.12 under Wine: the Windows layer for
# real (Job Objects, LockFileEx, cmd /c).  .ci/setup-wine installs Wine and both
# interpreters once (idempotent).  Under Wine every Windows process, detached
# supervisors included, inherits the Unix stdout and stderr of the first `wine`, so a
# run whose output went to a pipe would not end before its last job: each run writes
# to a file, is bounded by timeout, and the Wine server is stopped at the end.
WINE_SERIES ?= 3.8 3.12
WINE_TIMEOUT ?= 600

# Wine itself fails now and then (CreateProcess "WinError 1359 Internal error" was
# seen once in about ten runs), so a failed suite runs once more; both results are
# printed, and the target fails unless the second run passes.
test-windows:
	@root="$${JOBSTATE_WINE_ROOT:-$${XDG_CACHE_HOME:-$$HOME/.cache}/jobstate-wine}"; \
	PYTHON="$(PYTHON)" bash .ci/setup-wine $(WINE_SERIES) || exit 1; \
	status=0; summary=""; \
	for v in $(WINE_SERIES); do \
	    for attempt in 1 2; do \
	        echo "== test_jobstate.py in Windows CPython $$v under Wine (run $$attempt)"; \
	        out="$$(mktemp)"; err="$$(mktemp)"; \
	        env -u JOBSTATE_ROOT -u JOBSTATE_MCP_PYTHON timeout -k 10 $(WINE_TIMEOUT) \
	            "$$root/bin/winpython$$v" test_jobstate.py </dev/null >"$$out" 2>"$$err"; \
	        rc=$$?; \
	        tr -d '\r' <"$$err"; tr -d '\r' <"$$out"; \
	        last="$$(tr -d '\r' <"$$out" | grep -E '^[0-9]+ passed, [0-9]+ failed, [0-9]+ skipped$$' | tail -n 1)"; \
	        rm -f "$$out" "$$err"; \
	        [ -n "$$last" ] || last="no summary line (exit status $$rc)"; \
	        case $$rc in 124|137) last="no result within $(WINE_TIMEOUT)s (a Wine process kept the run open)";; esac; \
	        summary="$$summary$$(printf '\nWindows CPython %s, run %s: %s' "$$v" "$$attempt" "$$last")"; \
	        ok=0; echo "$$last" | grep -Eq '^[0-9]+ passed, 0 failed, [0-9]+ skipped$$' && [ $$rc -eq 0 ] && ok=1; \
	        [ $$ok -eq 1 ] && break; \
	        WINEPREFIX="$$root/prefix" wineserver -k 2>/dev/null || true; \
	    done; \
	    [ $$ok -eq 1 ] || status=1; \
	done; \
	WINEPREFIX="$$root/prefix" wineserver -k 2>/dev/null || true; \
	printf '%s\n' "$$summary" | sed 1d; \
	exit $$status

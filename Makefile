# jobstate: stdlib only.  `make test` needs nothing installed; `make check` needs vermin
# (installed by .ci/run).
PYTHON ?= python3

.PHONY: test check torture bench test-windows

test:
	$(PYTHON) test_jobstate.py

check:
	$(PYTHON) -m py_compile jobstate.py test_jobstate.py
	vermin -t=3.8- --no-tips --violations jobstate.py test_jobstate.py
	$(PYTHON) test_jobstate.py StaticTests

# The fault, load and hostile-input campaign in full (make test runs a short form).
torture:
	JOBSTATE_TORTURE=1 $(PYTHON) test_jobstate.py Torture

# Side by side with the peers (install them once: sudo sh ../shared/bench/setup_peers.sh),
# then the figures the harness lacks (API mass launch, a 10,000-job root).
bench:
	$(PYTHON) ../shared/bench/bench_peers.py --jobstate jobstate.py
	$(PYTHON) .ci/bench_extra.py

# The same suite in Windows CPython 3.8 and 3.12 under Wine: the Windows layer for
# real (Job Objects, LockFileEx, cmd /c).  The setup script installs Wine and both
# interpreters once (idempotent).  Every Wine process inherits the Unix stderr of the
# first one, detached supervisors included (../shared/wine/NOTES.md, W11), so each run
# writes to a file, is bounded by timeout, and the Wine server is stopped at the end.
WINE_SERIES ?= 3.8 3.12
WINE_TIMEOUT ?= 600

# Wine itself fails now and then (CreateProcess "WinError 1359 Internal error" was
# seen once in about ten runs), so a failed suite runs once more; both results are
# printed, and the target fails unless the second run passes.
test-windows:
	@root="$${JOBSTATE_WINE_ROOT:-$${XDG_CACHE_HOME:-$$HOME/.cache}/jobstate-wine}"; \
	for v in $(WINE_SERIES); do \
	    WINPY_SERIES=$$v bash ../shared/wine/setup-wine-python.sh >/dev/null || exit 1; \
	done; \
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

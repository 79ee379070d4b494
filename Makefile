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

bench:
	$(PYTHON) ../shared/bench/bench_peers.py --jobstate jobstate.py

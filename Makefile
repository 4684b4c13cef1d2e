# The two commands of the README: `make up` and `make test`. Both install what they need.
PY := .venv/bin/python

.PHONY: up down status test bench lock audit
up:
	@scripts/bootstrap.sh
	@$(PY) -m deployments.stack up

down:
	@$(PY) -m deployments.stack down

status:
	@$(PY) -m deployments.stack status

test:
	@scripts/bootstrap.sh
	@$(PY) -m ruff check .
	@$(PY) -m mypy
	@$(MAKE) --no-print-directory audit
	@$(PY) -m pytest

# The figures of the README's "Benchmarks": the alert path on both Prefect databases (alert ->
# first task; on PostgreSQL also sustained remediations at 1-16 alerts/s, 1/2/4 runners, server
# CPU per run and the 10,000-delivery storm), then what one run costs, fault -> healthy, approvals.
bench:
	@scripts/bootstrap.sh
	@$(PY) bench/alert_intake.py --database sqlite --parts latency
	@$(PY) bench/alert_intake.py --database postgres
	@$(PY) bench/run_cost.py
	@$(PY) bench/service_down.py
	@$(PY) bench/approval.py

# requirements.lock pins every Python package of the project and of its test extras, with the
# hashes of their files; scripts/bootstrap.sh installs only from it. After changing a dependency
# in pyproject.toml run `make lock` (keeps the other pins); `make lock LOCK_ARGS=--upgrade`, or
# LOCK_ARGS='--upgrade-package NAME', moves pins to the newest releases that resolve.
LOCK_TOOLS := .state/lock-tools
LOCK_ARGS ?=
lock:
	@mkdir -p .state
	@test -x $(LOCK_TOOLS)/bin/pip-compile || { python3 -m venv $(LOCK_TOOLS) \
	  && $(LOCK_TOOLS)/bin/pip install -q 'pip-tools==7.6.2' >.state/lock-tools.log 2>&1; } \
	  || { tail -20 .state/lock-tools.log; echo "make lock: could not install pip-tools" >&2; exit 1; }
	@CUSTOM_COMPILE_COMMAND="make lock" $(LOCK_TOOLS)/bin/pip-compile --quiet --generate-hashes \
	  --allow-unsafe --extra test --strip-extras --no-emit-index-url --no-emit-find-links $(LOCK_ARGS) \
	  -o requirements.lock pyproject.toml
	@echo "make lock: requirements.lock written; scripts/bootstrap.sh installs it at the next make up/test"

# Known vulnerabilities of the locked packages (pip-audit, PyPI's vulnerability data), without
# installing anything. Found ones fail `make test`: upgrade the package (`make lock
# LOCK_ARGS='--upgrade-package NAME'`), or accept one here with its reason, e.g.
#   AUDIT_IGNORE += --ignore-vuln GHSA-xxxx-xxxx-xxxx  # why it cannot reach us, until when
# Packages the service could not be asked about are reported as NOT AUDITED, which passes
# unless AUDIT_REQUIRED=1 (README, "Tests": this machine kind cannot reach the service).
AUDIT_IGNORE :=
AUDIT_REQUIRED ?= 0
audit:
	@mkdir -p .state
	@rm -f .state/pip-audit.json
	@$(PY) -m pip_audit -r requirements.lock --require-hashes --disable-pip --progress-spinner off \
	  --format json --output .state/pip-audit.json $(AUDIT_IGNORE) >.state/pip-audit.log 2>&1; \
	  AUDIT_REQUIRED=$(AUDIT_REQUIRED) $(PY) -c "$$AUDIT_REPORT" $$? .state/pip-audit.json .state/pip-audit.log

define AUDIT_REPORT
import json, os, sys
rc, report, log = int(sys.argv[1]), sys.argv[2], sys.argv[3]
required = os.environ.get("AUDIT_REQUIRED") == "1"
verdict = "fails make test" if required else "passes (AUDIT_REQUIRED=1 makes it fail)"
try:
    with open(report) as f:
        deps = json.load(f)["dependencies"]
except (OSError, ValueError, KeyError):
    with open(log) as f:
        text = f.read()
    tail = " | ".join(text.strip().splitlines()[-2:])[-400:]
    if "ConnectionError" in text or "your network may be blocking" in text:
        print(f"pip-audit: NOT AUDITED: the vulnerability service cannot be reached ({tail}); {verdict}")
        sys.exit(1 if required else 0)
    print(f"pip-audit: FAILED to run (exit {rc}): {tail} (log: {log})")
    sys.exit(1)
vulnerable = [d for d in deps if d.get("vulns")]
skipped = [d for d in deps if "skip_reason" in d]
for d in vulnerable:
    for v in d["vulns"]:
        fixed = ", ".join(v.get("fix_versions") or []) or "no release yet"
        print(f"pip-audit: {d['name']} {d['version']}: {v['id']} {' '.join(v.get('aliases') or [])} "
              f"(fixed in {fixed}): {(v.get('description') or '').splitlines()[0][:200]}")
if vulnerable or (rc != 0 and not skipped):
    print(f"pip-audit: FAILED: {sum(len(d['vulns']) for d in vulnerable)} known vulnerabilities in "
          f"{len(vulnerable)} locked packages (full report: {report}, log: {log})")
    sys.exit(1)
audited = len(deps) - len(skipped)
if skipped:
    print(f"pip-audit: NOT AUDITED: {len(skipped)} of {len(deps)} locked packages: the vulnerability "
          f"service did not answer for them (\"{skipped[0]['skip_reason']}\"); "
          + (f"{audited} audited, no known vulnerability in them; " if audited else "none audited; ")
          + verdict)
    sys.exit(1 if required else 0)
print(f"pip-audit: {audited} locked packages audited, no known vulnerability")
endef
export AUDIT_REPORT

# The two commands of the README: `make up` and `make test`. Both install what they need.
PY := .venv/bin/python

.PHONY: up down status test bench
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
	@$(PY) -m pytest

bench:
	@scripts/bootstrap.sh
	@$(PY) bench/service_down.py
	@$(PY) bench/alert_intake.py

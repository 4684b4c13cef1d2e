"""The alert gateway's commands.

    python -m gateway serve                       run the gateway (uvicorn) on RUNBOOKS_GATEWAY_HOST:PORT
    python -m gateway runner [--gateway URL]      run a runner: execute the runs the gateway queues
    python -m gateway send-test SOURCE [FILE]     send a test alert, signed/authenticated as that
                                                  source must be (default body: a ServiceDown alert)
    python -m gateway recent [-n 20]              the latest alerts and what each started

send-test finds the gateway ``make up`` started, and its secrets, in the state dir
(``<state dir>/gateway/local.json``); with ``--url`` it posts there, signing with the
RUNBOOKS_GATEWAY_* settings (or the recorded secrets, if the URL is the recorded one).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
from pydantic import SecretStr, ValidationError

from gateway.errors import GatewayConfigError
from gateway.local import load_local, local_state_path
from gateway.models import SOURCES
from gateway.settings import GatewaySettings
from gateway.signatures import GRAFANA_TIMESTAMP, SENTRY_TIMESTAMP, hmac_sha256_hex

log = logging.getLogger("gateway")


def build_app(settings: GatewaySettings):
    from gateway.app import create_app
    from gateway.intake import AlertIntake, Dispatcher
    from gateway.routing import Router
    from gateway.store import AlertStore

    settings.check_can_start()  # before anything is created
    if settings.dispatch == "runner" and settings.runner_token is None:
        raise GatewayConfigError("runner dispatch needs RUNBOOKS_GATEWAY_RUNNER_TOKEN: the runner "
                                 "processes (`python -m gateway runner`) present it to take runs "
                                 "(`make up` generates one); or set RUNBOOKS_GATEWAY_DISPATCH")
    unverified = settings.unverified_sources()
    if unverified:
        log.warning("accepting alerts WITHOUT verification from %s (RUNBOOKS_GATEWAY_INSECURE_SOURCES, "
                    "loopback only); set their secrets before exposing the gateway", ", ".join(unverified))
    store = AlertStore(settings.store_path, retention_days=settings.retention_days)
    router = Router.from_file(settings.routes_file)
    try:
        router.targets.inventory()  # parsed now, not by the first burst of deliveries
    except Exception as exc:  # no inventory yet (the lab writes it): each delivery says so
        log.warning("the inventory cannot be read yet (%s); alerts are checked against it once it can",
                    type(exc).__name__)
    dispatcher = Dispatcher(store, mode=settings.dispatch, max_queued=settings.max_queued_runs,
                            lease_s=settings.runner_lease_s)
    app = create_app(settings, AlertIntake(store, router, dispatcher),
                     runners=dispatcher if settings.dispatch == "runner" else None)
    app.router.on_startup.append(lambda: _recover_in_background(dispatcher))
    if settings.dispatch == "runner":
        app.router.on_shutdown.append(_settle_in_background(dispatcher, settings.runner_lease_s / 3))
    if settings.sweep_interval_s:
        stop_sweeping = _sweep_in_background(settings.sweep_interval_s)
        app.router.on_shutdown.append(stop_sweeping)
    app.router.on_shutdown.append(dispatcher.shutdown)
    app.router.on_shutdown.append(store.close)
    return app


def _recover_in_background(dispatcher) -> None:
    """Finish what a previous gateway left open, without delaying the intake."""
    import logging
    import threading

    def recover() -> None:
        try:
            dispatcher.recover()
        except Exception:
            logging.getLogger("gateway").exception(
                "recovering open incidents failed; they stay open in the intake store - restart "
                "the gateway once the Prefect API is reachable")

    threading.Thread(target=recover, name="recover-incidents", daemon=True).start()


def _settle_in_background(dispatcher, interval_s: float):
    """Every ``interval_s``: settle the runs of runners whose claims lapsed. Returns the
    function that stops it."""
    import threading

    stop = threading.Event()

    def settle() -> None:
        while not stop.wait(interval_s):
            try:
                dispatcher.settle_expired_claims()
            except Exception:
                log.exception("settling lapsed runner claims failed; trying again in %.0f s", interval_s)

    threading.Thread(target=settle, name="settle-runner-claims", daemon=True).start()
    return stop.set


def _sweep_in_background(interval_s: float):
    """Every ``interval_s``: close the records of runs whose process died (a worker killed
    with its runs, a lost machine). Returns the function that stops it."""
    import threading

    from incident.settings import get_settings
    from incident.sweeper import sweep_abandoned_runs

    stop = threading.Event()

    def sweep() -> None:
        while not stop.wait(interval_s):
            try:
                sweep_abandoned_runs(get_settings().stale_run_after_s)
            except httpx.TransportError as exc:  # the Prefect API is away: nothing to sweep now
                log.warning("the sweep for dead runs could not reach the Prefect API (%s); it runs "
                            "again in %s s", type(exc).__name__, interval_s)
            except Exception:
                log.exception("the sweep for dead runs failed; it runs again in %s s", interval_s)

    threading.Thread(target=sweep, name="sweep-dead-runs", daemon=True).start()
    return stop.set


@contextmanager
def serving(settings: GatewaySettings, runners: int = 1) -> Iterator[str]:
    """Serve the gateway in a thread of this process (tests, benchmarks); yields its URL.

    Runner dispatch: ``runners`` runners execute its runs in threads of this process too
    (0: none, for runner processes started apart); without a runner token one is made up."""
    import secrets
    import threading
    import time

    import uvicorn

    from gateway.runner import Runner

    if settings.dispatch == "runner" and settings.runner_token is None:
        settings = settings.model_copy(update={"runner_token": SecretStr(secrets.token_urlsafe(24))})
    server = uvicorn.Server(uvicorn.Config(build_app(settings), host=settings.host,
                                           port=settings.port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="gateway", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the gateway did not start on {url}; see the log above")
        time.sleep(0.1)
    embedded = [Runner(url, settings.runner_token, name=f"embedded-{i + 1}",  # type: ignore[arg-type]
                       max_parallel=settings.max_parallel_runs, max_waiting=settings.max_waiting_runs,
                       claim_wait_s=2.0).start()
                for i in range(runners if settings.dispatch == "runner" else 0)]
    try:
        yield url
    finally:
        for runner in embedded:
            runner.stop()
        server.should_exit = True
        thread.join(timeout=60)


def serve(settings: GatewaySettings) -> None:
    import uvicorn

    try:
        app = build_app(settings)
    except GatewayConfigError as exc:
        sys.exit(f"error: {exc}")
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", access_log=False)


def run_runner(settings: GatewaySettings, url: str | None) -> int:
    from gateway.runner import serve_runner

    if settings.runner_token is None:
        sys.exit("error: a runner needs RUNBOOKS_GATEWAY_RUNNER_TOKEN, the gateway's runner token "
                 "(`make up` keeps it in <state dir>/gateway/local.json)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_runner(url or settings.gateway_url or f"http://{settings.host}:{settings.port}",
                 settings.runner_token, settings.max_parallel_runs, settings.max_waiting_runs)
    return 0


def service_down_alert(service: str = "web", status: str = "firing") -> dict:
    """An Alertmanager v4 body like the lab's real Alertmanager sends for ServiceDown."""
    now = datetime.now(timezone.utc).isoformat()
    labels = {"alertname": "ServiceDown", "service": service, "severity": "critical"}
    return {
        "version": "4", "groupKey": '{}:{alertname="ServiceDown"}', "truncatedAlerts": 0,
        "status": status, "receiver": "runbooks", "groupLabels": {"alertname": "ServiceDown"},
        "commonLabels": labels, "commonAnnotations": {}, "externalURL": "http://127.0.0.1:9093",
        "alerts": [{"status": status, "labels": labels,
                    "annotations": {"summary": f"{service} is down (test alert)"},
                    "startsAt": now, "endsAt": "0001-01-01T00:00:00Z",
                    "generatorURL": "http://127.0.0.1:9090/graph", "fingerprint": ""}],
    }


def signed_headers(source: str, body: bytes, settings: GatewaySettings,
                   now: float | None = None) -> dict[str, str]:
    """The headers a real sender of ``source`` adds, computed with our configured secrets
    (signature timestamps: ``now``, default the current time)."""
    headers = {"Content-Type": "application/json"}
    stamp = str(int(time.time() if now is None else now))

    def secret(value: SecretStr | None) -> str:
        return value.get_secret_value() if value else ""

    if source == "alertmanager" and settings.alertmanager_bearer_token:
        headers["Authorization"] = f"Bearer {secret(settings.alertmanager_bearer_token)}"
    elif source == "alertmanager" and settings.alertmanager_basic_password:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{settings.alertmanager_basic_username}:{secret(settings.alertmanager_basic_password)}"
            .encode()).decode()
    elif source == "grafana" and settings.grafana_secret:
        headers[GRAFANA_TIMESTAMP] = stamp
        headers["X-Grafana-Alerting-Signature"] = hmac_sha256_hex(
            settings.grafana_secret, f"{stamp}:".encode() + body)
    elif source == "sentry" and settings.sentry_client_secret:
        headers[SENTRY_TIMESTAMP] = stamp
        headers["Sentry-Hook-Signature"] = hmac_sha256_hex(settings.sentry_client_secret, body)
    elif source == "pagerduty":
        headers["X-Webhook-Id"] = str(uuid.uuid4())
        if settings.pagerduty_secret:
            headers["X-PagerDuty-Signature"] = "v1=" + hmac_sha256_hex(settings.pagerduty_secret, body)
    elif source == "opsgenie" and settings.opsgenie_secret:
        headers[settings.opsgenie_secret_header] = secret(settings.opsgenie_secret)
    elif source == "cloudevents":
        headers["Content-Type"] = "application/cloudevents+json"
        if settings.cloudevents_bearer_token:
            headers["Authorization"] = f"Bearer {secret(settings.cloudevents_bearer_token)}"
    return headers


def find_gateway(settings: GatewaySettings, url: str | None,
                 state: Path | None = None) -> tuple[str, GatewaySettings]:
    """The gateway to send to and the settings to sign with; exits with what to do if none runs.

    ``url`` given: that gateway, signed with the recorded secrets when it is the recorded
    gateway, else with ``settings``. Otherwise the gateway ``make up`` recorded in the state dir.
    """
    path = state or local_state_path()
    local = load_local(path)
    if url:
        if local is not None and local.url.rstrip("/") == url.rstrip("/"):
            return url, local.settings()
        return url, settings
    if local is None:
        sys.exit(f"no running gateway found: {path} does not exist (it is written by `make up`). "
                 "Start the stack with `make up`, or pass --url http://HOST:PORT with the "
                 "gateway's RUNBOOKS_GATEWAY_* secrets in the environment")
    try:
        alive = httpx.get(f"{local.url}/healthz", timeout=3.0).status_code == 200
    except httpx.TransportError:
        alive = False
    if not alive:
        sys.exit(f"the gateway recorded in {path} ({local.url}) does not answer: start it with "
                 "`make up` (`make status` shows what runs), or pass --url to send elsewhere")
    return local.url, local.settings()


def send_test(settings: GatewaySettings, source: str, file: Path | None, url: str | None,
              state: Path | None = None) -> int:
    if file is None and source != "alertmanager":
        sys.exit(f"send-test {source} needs a FILE with a {source} webhook body "
                 "(examples: ../shared/payloads/)")
    body = file.read_bytes() if file else json.dumps(service_down_alert()).encode()
    base, signing = find_gateway(settings, url, state)
    try:
        resp = httpx.post(f"{base}/alerts/{source}", content=body,
                          headers=signed_headers(source, body, signing), timeout=10.0)
    except httpx.TransportError as exc:
        sys.exit(f"could not reach the gateway at {base} ({type(exc).__name__}: {exc}); check that it "
                 "runs (`make status`) and the URL")
    print(f"{resp.status_code} {resp.reason_phrase}")
    try:
        print(json.dumps(resp.json(), indent=2))
    except ValueError:
        print(resp.text)
    return 0 if resp.status_code == 202 else 1


def recent(settings: GatewaySettings, n: int) -> int:
    from gateway.store import AlertStore

    if not settings.store_path.exists():
        sys.exit(f"no intake database at {settings.store_path}: has the gateway received anything?")
    rows = AlertStore(settings.store_path, retention_days=settings.retention_days).recent_alerts(n)
    # dispositions: opened, attached (joined an open incident), duplicate, unrouted, acknowledged,
    # resolved (the incident's last firing alert), resolved-partial (others still fire), resolved-unknown
    print(f"{'received (UTC)':19}  {'source':12} {'status':8} {'disposition':16} {'incident':20} "
          f"{'outcome':22} summary / reason")
    for r in rows:
        outcome = r["outcome"] or (r["incident_status"] or "")
        print(f"{r['received_at'][:19]:19}  {r['source']:12} {r['status']:8} {r['disposition']:16} "
              f"{r['incident_id'] or '-':20} {outcome[:22]:22} {_what(r)}")
    return 0


#: dispositions whose reason says what became of the incident (joined it, it stays open)
_REASON_SHOWN = ("attached", "resolved-partial")


def _what(row: dict) -> str:
    """The alert's summary (or the reason it started nothing), with what it did to its incident."""
    text = row["summary"] or row["reason"] or ""
    if row["disposition"] in _REASON_SHOWN and row["reason"] and row["summary"]:
        return f"{row['summary']} ({row['reason']})"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("serve", help="run the gateway")
    p = sub.add_parser("send-test", help="send a test alert, correctly signed")
    p.add_argument("source", choices=SOURCES)
    p.add_argument("file", nargs="?", type=Path, help="webhook body (default: a ServiceDown alert)")
    p.add_argument("--url", help="gateway base URL (default: from settings)")
    p = sub.add_parser("runner", help="run a runner: execute the runs the gateway queues")
    p.add_argument("--gateway", help="the gateway's URL (default: RUNBOOKS_GATEWAY_GATEWAY_URL, "
                                     "else http://RUNBOOKS_GATEWAY_HOST:PORT)")
    p = sub.add_parser("recent", help="list recent alerts and what each started")
    p.add_argument("-n", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        sys.exit(f"error: invalid gateway settings: {problems}")
    if args.cmd == "serve":
        serve(settings)
        return 0
    if args.cmd == "runner":
        return run_runner(settings, args.gateway)
    if args.cmd == "send-test":
        return send_test(settings, args.source, args.file, args.url)
    return recent(settings, args.n)


if __name__ == "__main__":
    sys.exit(main())

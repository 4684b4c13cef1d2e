"""Hostile input at scale (issue #10): the real gateway, fuzzed, answers 2xx or a clear 4xx.

The app under test is the one ``python -m gateway serve`` runs (``gateway.__main__.build_app``):
real parsers, signatures, router (routes.yaml) and SQLite intake store in a temporary
directory, dispatch mode ``shadow`` (incidents are decided and recorded, no flow run is ever
started). Every source has a secret, so every request goes through signature checks.
Requests go in-process over ASGI.

Two kinds of fuzzing, all with ``derandomize=True`` (the same cases on every run):

* schemathesis, from the gateway's own OpenAPI description: positive and negative bodies
  for every ``POST /alerts/<source>``, sent unsigned, correctly signed or forged;
* hypothesis properties: forged signatures (random, empty-key HMAC, wrong secret,
  truncated, ...), replayed deliveries (same body and signature twice, stale Grafana
  timestamps), hostile label text (shell, SQL, markdown/HTML) read back from the store,
  byte-level garbage (invalid UTF-8, UTF-16/32, deep nesting, huge numbers), structure-aware
  mutations of the real payloads in ``shared/payloads``, hostile and huge headers, huge
  bodies, and empty secrets.

Every answer is a 2xx or a 4xx with ``error`` and ``detail``, never a 5xx (nor a parser crash
logged behind a 4xx). Accepted hostile text reads back from the store exactly as sent, and an
incident is only opened for a service of the inventory (a one-service inventory written here).
Every test counts the cases it executed; the last test checks that the module ran at least
``MIN_TOTAL_CASES`` of them. After each batch ``/healthz`` must still answer 200, no canary
file a shell payload would create may exist, and no flow run may have been recorded.

Note: schemathesis' pytest plugin ends every ASGI lifespan it started when a test ends (the
gateway's shutdown closes its store), so each schemathesis test gets a gateway of its own.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import itertools
import json
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, status_code_conformance

from gateway.__main__ import build_app, signed_headers
from gateway.models import SOURCES
from gateway.settings import GatewaySettings
from incident.settings import REPO_ROOT
from tests.gateway.conftest import PAYLOADS_DIR, payload_files

MIN_TOTAL_CASES = 10_000
# Failure reports of nested hypothesis strategies can have long reprs; they are only printed then.
pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")

#: max_examples of each hypothesis run (a test may hold several runs, e.g. one per mode).
EXAMPLES = {
    "openapi": 100,            # per source and generation mode: 6 x 2 x 100 = 1200
    "openapi_healthz": 20,     # GET /healthz has no inputs: hypothesis stops when exhausted
    "forged": 3000,
    "replay": 500,
    "stale_timestamp": 300,
    "hostile_labels": 1300,
    "garbage_bodies": 2400,
    "mutated_payloads": 1300,
    "hostile_headers": 800,
    "huge_bodies": 40,
    "empty_secrets": 60,
}

#: Counted by each test, per executed case (one hypothesis example = one case).
CASES: Counter[str] = Counter()
#: What the gateway did that is worth knowing but is not (yet) a failure; printed at the end.
OBSERVED: Counter[str] = Counter()

SECRETS = {
    "alertmanager_bearer_token": "fz-am-bearer-7f3a91",
    "alertmanager_basic_password": "fz-am-basic-2c81",
    "grafana_secret": "fz-grafana-hmac-55d0",
    "sentry_client_secret": "fz-sentry-client-a41e",
    "pagerduty_secret": "fz-pagerduty-v3-90bc",
    "opsgenie_secret": "fz-opsgenie-shared-1d77",
    "cloudevents_bearer_token": "fz-ce-bearer-6e2f",
}
AM_USER = "alertmanager"
HMAC_HEADERS = {"grafana": "X-Grafana-Alerting-Signature", "sentry": "Sentry-Hook-Signature",
                "pagerduty": "X-PagerDuty-Signature"}
HMAC_SECRETS = {"grafana": SECRETS["grafana_secret"], "sentry": SECRETS["sentry_client_secret"],
                "pagerduty": SECRETS["pagerduty_secret"]}
TOKEN_SECRETS = {"alertmanager": SECRETS["alertmanager_bearer_token"],
                 "cloudevents": SECRETS["cloudevents_bearer_token"],
                 "opsgenie": SECRETS["opsgenie_secret"]}
GRAFANA_TIMESTAMP = "X-Grafana-Alerting-Signature-Timestamp"
ROUTED_ALERTNAMES = ("ServiceDown", "PostgresConnectionsExhausted", "PostgresLockContention",
                     "RedisDown", "DiskSpaceLow")
INVENTORY_SERVICES = ("web",)

INVENTORY_YAML = """\
# A minimal inventory for the gateway fuzz tests: one service, nothing reachable.
services:
  web:
    environment: drill
    owner: sre-fuzz
    health_url: http://127.0.0.1:9/health
"""


def fuzz(name: str) -> settings:
    return settings(max_examples=EXAMPLES[name], derandomize=True, database=None, deadline=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


# --------------------------------------------------------------------------------------------
# The gateway under test
# --------------------------------------------------------------------------------------------

class _ErrorLog(logging.Handler):
    """ERROR records of the ``gateway`` logger: parser crashes hidden behind a 422, intake
    failures behind a 503."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@dataclass
class Gateway:
    app: Any
    settings: GatewaySettings
    portal: BlockingPortal
    client: httpx.AsyncClient
    db: sqlite3.Connection
    canary_dir: Path
    errors: _ErrorLog
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self.ids)}"

    def send(self, path: str, body: Any = b"", headers: list[tuple[Any, Any]] | None = None,
             method: str = "POST") -> httpx.Response:
        async def go() -> httpx.Response:
            return await self.client.request(method, path, content=body, headers=headers or [])
        return self.portal.call(go)

    # -- the store, read back through its own SQLite file (read-only connection) -------------
    def count(self, sql: str, *args: Any) -> int:
        return self.db.execute(sql, args).fetchone()[0]

    def deliveries(self) -> int:
        return self.count("SELECT COUNT(*) FROM deliveries")

    def incidents(self) -> int:
        return self.count("SELECT COUNT(*) FROM incidents")

    def rows(self, delivery_id: str) -> list[sqlite3.Row]:
        return self.db.execute(
            "SELECT a.body, a.disposition, a.summary, a.incident_id, i.target, i.flow_run_id"
            " FROM alerts a JOIN deliveries d ON d.id = a.delivery"
            " LEFT JOIN incidents i ON i.incident_id = a.incident_id"
            " WHERE d.delivery_id = ? ORDER BY a.id", (delivery_id,)).fetchall()

    def parser_crashes(self, since: int) -> list[str]:
        return [r.getMessage() + (f" ({r.exc_info[1]!r})" if r.exc_info else "")
                for r in self.errors.records[since:]]

    # -- what must hold after every batch ------------------------------------------------------
    def assert_still_sound(self, batch: str) -> None:
        health = self.send("/healthz", method="GET")
        assert health.status_code == 200, f"/healthz after {batch}: {health.status_code} {health.text}"
        assert health.json()["status"] == "ok", health.text
        assert all(health.json()["verification"].values()), \
            f"a source stopped verifying after {batch}: {health.text}"
        assert_no_canary(self.canary_dir)
        tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"deliveries", "alerts", "seen", "incidents"} <= tables, f"store tables gone: {tables}"
        started = self.count("SELECT COUNT(*) FROM incidents WHERE flow_run_id IS NOT NULL")
        assert started == 0, f"{started} flow runs were recorded in shadow mode after {batch}"


def assert_no_canary(canary_dir: Path) -> None:
    created = sorted(p.name for p in canary_dir.iterdir())
    assert not created, f"a shell payload was executed: {created} exist in {canary_dir}"


def start_gateway(root: Path, stack: ExitStack, portal: BlockingPortal) -> Gateway:
    """The app ``python -m gateway serve`` runs, with its store under ``root``; closed by ``stack``."""
    canary_dir = root / "canary"
    canary_dir.mkdir()
    inventory = root / "inventory.yaml"
    inventory.write_text(INVENTORY_YAML)
    mp = stack.enter_context(pytest.MonkeyPatch.context())
    mp.setenv("RUNBOOKS_INVENTORY", str(inventory))
    settings = GatewaySettings(store=root / "alerts.db", dispatch="shadow",
                               routes_file=REPO_ROOT / "routes.yaml",
                               alertmanager_basic_username=AM_USER, **SECRETS)
    app = build_app(settings)

    async def make_client() -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
        return httpx.AsyncClient(transport=transport, base_url="http://gateway.test", timeout=60)

    client = portal.call(make_client)
    stack.callback(lambda: portal.call(client.aclose))
    db = sqlite3.connect(f"file:{settings.store_path}?mode=ro", uri=True, check_same_thread=False)
    db.row_factory = sqlite3.Row
    stack.callback(db.close)
    errors = _ErrorLog()
    gateway_log = logging.getLogger("gateway")
    gateway_log.addHandler(errors)
    stack.callback(gateway_log.removeHandler, errors)
    gateway = Gateway(app=app, settings=settings, portal=portal, client=client, db=db,
                      canary_dir=canary_dir, errors=errors)
    assert gateway.send("/healthz", method="GET").status_code == 200
    return gateway


@pytest.fixture(scope="module")
def portal() -> Iterator[BlockingPortal]:
    with start_blocking_portal() as running:
        yield running


@pytest.fixture(scope="module")
def gw(tmp_path_factory, portal: BlockingPortal) -> Iterator[Gateway]:
    """One gateway (and store) for the module's property tests."""
    with ExitStack() as stack:
        gateway = start_gateway(tmp_path_factory.mktemp("gateway-fuzz"), stack, portal)
        yield gateway
        gateway.assert_still_sound("the whole module")


# --------------------------------------------------------------------------------------------
# Signing, forging, checking answers
# --------------------------------------------------------------------------------------------

def hmac_hex(key: str | bytes, message: bytes) -> str:
    raw = key.encode() if isinstance(key, str) else key
    return hmac.new(raw, message, hashlib.sha256).hexdigest()


def valid_auth(source: str, body: bytes, settings: GatewaySettings) -> dict[str, str]:
    """What a real, correctly configured sender adds (the project's own send-test helper)."""
    headers = signed_headers(source, body, settings)
    headers.pop("Content-Type", None)
    headers.pop("X-Webhook-Id", None)
    return headers


def content_type(source: str) -> str:
    return "application/cloudevents+json" if source == "cloudevents" else "application/json"


FORGERIES = ("random-hex", "empty-key-hmac", "wrong-secret", "other-message", "flipped-digit",
             "truncated", "extended", "blank", "missing", "wrong-scheme", "wrong-timestamp",
             "latin1-junk", "empty-key-as-token")


def forged_auth(source: str, body: bytes, kind: str, junk: str) -> dict[str, str]:
    """Credentials that must not authenticate ``body`` for ``source`` (never equal to the
    valid ones after the gateway's strip/lower-casing)."""
    junk_hex = hashlib.sha256(("junk:" + junk).encode()).hexdigest()
    if source in HMAC_HEADERS:
        name, secret = HMAC_HEADERS[source], HMAC_SECRETS[source]
        good = hmac_hex(secret, body)
        flip = int(junk_hex[:2], 16) % 64
        value: str | None = {
            "random-hex": junk_hex,
            "empty-key-hmac": hmac_hex(b"", body),
            "empty-key-as-token": hmac_hex(b"", b""),
            "wrong-secret": hmac_hex(secret + "x" + junk, body),
            "other-message": hmac_hex(secret, body + b"\n"),
            "flipped-digit": good[:flip] + ("0" if good[flip] != "0" else "1") + good[flip + 1:],
            "truncated": good[: int(junk_hex[:2], 16) % 64],
            "extended": good + junk_hex[:1 + int(junk_hex[2], 16)],
            "blank": "",
            "missing": None,
            "wrong-scheme": ("v0=" if source == "pagerduty" else "sha256=") + good,
            "wrong-timestamp": hmac_hex(secret, f"{int(time.time()) - 3600}:".encode() + body),
            "latin1-junk": good[:-1] + "\u00ff",
        }[kind]
        headers: dict[str, str] = {}
        if value is not None:
            headers[name] = "v1=" + value if source == "pagerduty" and kind != "wrong-scheme" else value
        if source == "grafana" and kind == "wrong-timestamp":
            # signed for an hour ago, sent with the current timestamp
            headers[GRAFANA_TIMESTAMP] = str(int(time.time()))
        return headers
    token = TOKEN_SECRETS[source]
    value = {
        "random-hex": junk_hex,
        "empty-key-hmac": hmac_hex(b"", body),
        "empty-key-as-token": hmac_hex(b"", b""),
        "wrong-secret": token + "x" + junk_hex[:4],
        "other-message": "x" + token,
        "flipped-digit": token.upper(),
        "truncated": token[: int(junk_hex[:2], 16) % len(token)],
        "extended": token + junk_hex[:1 + int(junk_hex[2], 16)],
        "blank": "",
        "missing": None,
        "wrong-scheme": token,
        "wrong-timestamp": token[::-1],
        "latin1-junk": token[:-1] + "\u00ff",
    }[kind]
    if value is None:
        return {}
    if source == "opsgenie":
        if kind == "wrong-scheme":  # the right secret under another header name
            return {"X-Opsgenie-Secret-" + junk_hex[:4]: token}
        return {"X-Opsgenie-Secret": value}
    if kind == "wrong-scheme":
        scheme = ["Token", "Basic", "Digest", "Bearerx", "MAC"][int(junk_hex[:2], 16) % 5]
        return {"Authorization": f"{scheme} {token}" if scheme != "Basic" else
                "Basic " + base64.b64encode(f"{AM_USER}:{token}".encode()).decode()}
    if source == "alertmanager" and kind in ("other-message", "wrong-timestamp"):
        password = SECRETS["alertmanager_basic_password"]
        user, given = (AM_USER, password + "x") if kind == "other-message" else (junk or "root", password)
        if user == AM_USER and given == password:
            user = "x" + user
        creds = f"{user}:{given}".encode("utf-8", "surrogatepass")
        return {"Authorization": "Basic " + base64.b64encode(creds).decode()}
    return {"Authorization": f"Bearer {value}" if value else "Bearer"}


def header_list(*parts: dict[str, str] | list[tuple[Any, Any]]) -> list[tuple[bytes, bytes]]:
    """Headers as raw latin-1 bytes (what reaches an ASGI app), duplicates kept."""
    out: list[tuple[bytes, bytes]] = []
    for part in parts:
        items = part.items() if isinstance(part, dict) else part
        for name, value in items:
            out.append((name if isinstance(name, bytes) else name.encode("latin-1"),
                        value if isinstance(value, bytes) else value.encode("latin-1")))
    return out


def describe(path: str, headers: list[tuple[bytes, bytes]] | None, body: Any) -> str:
    shown = [(k.decode("latin-1"), v[:120].decode("latin-1") + ("..." if len(v) > 120 else ""))
             for k, v in headers or []]
    raw = body if isinstance(body, bytes) else b"<stream>"
    return f"POST {path}\nheaders: {shown}\nbody ({len(raw)} bytes): {raw[:300]!r}"


def assert_clear(gw: Gateway, response: httpx.Response, request: str, crashes_since: int) -> None:
    """2xx, or a 4xx whose JSON says what is wrong; never a 5xx; no parser crash behind a 422."""
    status = response.status_code
    assert status < 500, f"server error {status}: {response.text[:500]}\n{request}"
    assert 200 <= status < 300 or 400 <= status < 500, f"unexpected {status}\n{request}"
    answer = response.json()
    if status >= 400:
        assert answer.get("error") and answer.get("detail"), f"unclear {status}: {answer}\n{request}"
    crashes = gw.parser_crashes(crashes_since)
    assert not crashes, f"the gateway logged a crash: {crashes}\n{request}"


def post(gw: Gateway, source: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> httpx.Response:
    since = len(gw.errors.records)
    path = f"/alerts/{source}"
    try:
        response = gw.send(path, body, headers)
    except Exception as exc:  # raised out of the app: a real server answers 500
        raise AssertionError(f"server error 500 (unhandled {exc!r})\n{describe(path, headers, body)}") from exc
    assert_clear(gw, response, describe(path, headers, body), since)
    return response


def signed_post(gw: Gateway, source: str, body: bytes, *, delivery_id: str | None = None,
                extra: list[tuple[Any, Any]] | None = None,
                ctype: str | None = "default") -> httpx.Response:
    headers: dict[str, str] = valid_auth(source, body, gw.settings)
    if ctype is not None:
        headers["Content-Type"] = content_type(source) if ctype == "default" else ctype
    if delivery_id:
        headers["X-Webhook-Id"] = delivery_id
    return post(gw, source, body, header_list(headers, extra or []))


def dispositions(response: httpx.Response) -> list[str]:
    answer = response.json()
    return [a["disposition"] for a in answer.get("intake", {}).get("alerts", [])]


# --------------------------------------------------------------------------------------------
# Hostile text and payloads
# --------------------------------------------------------------------------------------------

SQL = ["'; DROP TABLE alerts; --", "'); DROP TABLE incidents; --", "\"; DELETE FROM seen; --",
       "' OR '1'='1", "1; UPDATE incidents SET flow_run_id = 'x'; --",
       "Robert'); DROP TABLE deliveries;--", "%' UNION SELECT body FROM alerts --", "\\'; --"]
MARKUP = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>",
          "[click](javascript:alert(1))", "**bold** _it_ `code` # heading\n---",
          "| a | b |\n|---|---|\n| <b>x</b> | y |", "![x](http://127.0.0.1:1/pixel.png)",
          "<!-- hidden -->", "&lt;&amp;&#x27;", "\u202egnp.exe", "```\nfenced\n```",
          "{{7*7}}", "${jndi:ldap://127.0.0.1:1/a}", "%s%n%x%d", "{labels.service}", "{0}",
          "../../../../etc/passwd", "\u0000", "\r\nX-Injected: 1", "\u2028\u2029", "\ufeff",
          "\U0001f525\u200d\U0001f9ef", "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>"]
SHELL = ["; touch {c}", "&& touch {c}", "|| touch {c}", "| tee {c}", "$(touch {c})", "`touch {c}`",
         "\ntouch {c}\n", "'; touch {c}; echo '", "\"; touch {c}; echo \"", "${IFS}touch${IFS}{c}",
         "$(printf pwned > {c})", "> {c}", "web; touch {c} #", "{labels.service}; touch {c}",
         "$((1+1))$(touch {c})", "web\u0000; touch {c}"]


def hostile_fragments(canary_dir: Path) -> list[str]:
    canaries = [str(canary_dir / "pwned"), str(canary_dir / "x")]
    shell = [s.replace("{c}", c) for s in SHELL for c in canaries]
    return shell + SQL + MARKUP


@functools.cache  # strategies are built once: building them per draw costs more than the requests
def hostile_text(canary_dir: Path, *, min_size: int = 0, latin1: bool = False) -> st.SearchStrategy[str]:
    fragments = hostile_fragments(canary_dir)
    alphabet = st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f") if latin1 \
        else st.characters(blacklist_categories=("Cs",))
    if latin1:
        fragments = [f for f in fragments if all(0x20 <= ord(ch) <= 0xFF for ch in f)]
    frag = st.sampled_from(range(len(fragments))).map(lambda i: fragments[i])  # short repr
    plain = st.text(alphabet, max_size=40)
    return st.one_of(
        frag,
        st.builds(lambda a, b, c: a + b + c, plain, frag, plain),
        st.lists(frag, min_size=2, max_size=4).map("".join),
        plain,
    ).filter(lambda s: len(s) >= min_size)


class Big(str):
    """A long repeated string (header value, label) that prints short in failure reports."""

    def __repr__(self) -> str:
        return f"Big({self[:1]!r} * {len(self)})"


def big(char: str) -> Any:
    return lambda n: Big(char * n)


class Raw:
    """JSON text spliced into a document as is (deep nesting, huge numbers, NaN ...)."""

    def __init__(self, text: str) -> None:
        self.text = text


def dumps(doc: Any, *, ensure_ascii: bool = True) -> bytes:
    raws: dict[str, str] = {}

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            token = f"\x00raw{len(raws)}\x00"
            raws[token] = value.text
            return token
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(doc), ensure_ascii=ensure_ascii)
    for token, raw in raws.items():
        text = text.replace(json.dumps(token, ensure_ascii=ensure_ascii), raw)
    return text.encode("utf-8", "surrogatepass")


def nested(depth: int, kind: str) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "null" + "}" * depth
    half = max(depth // 2, 1)
    return '[{"k":' * half + '"v"' + "}]" * half


RAW_VALUES = st.one_of(
    st.builds(lambda d, k: Raw(nested(d, k)), st.integers(1, 3000),
              st.sampled_from(["array", "object", "mixed"])),
    st.integers(300, 6000).map(lambda n: Raw("9" * n)),            # > 4300 digits: int() refuses
    st.sampled_from([Raw("1e400"), Raw("-1e400"), Raw("NaN"), Raw("Infinity"), Raw("-Infinity"),
                     Raw("-0"), Raw("1.0e-400"), Raw('"\\ud800"'), Raw('"\\udfff\\ud800"'),
                     Raw('"\\u0000"'), Raw("18446744073709551616"), Raw("-9223372036854775809")]),
)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**70, 2**70),
                         st.floats(allow_nan=False, allow_infinity=False),
                         st.text(max_size=30))


@functools.cache
def json_values(canary_dir: Path) -> st.SearchStrategy[Any]:
    leaves = st.one_of(json_scalars, hostile_text(canary_dir))
    return st.recursive(
        leaves,
        lambda kids: st.one_of(st.lists(kids, max_size=4),
                               st.dictionaries(st.one_of(st.text(max_size=10), hostile_text(canary_dir)),
                                               kids, max_size=4)),
        max_leaves=12)


def dumps_plain(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def templates(source: str) -> list[Path]:
    found = [p for p in payload_files() if p.parent.name == source]
    if not found:
        pytest.fail(f"no {source} payloads in {PAYLOADS_DIR}; set RUNBOOKS_SHARED_DIR")
    return found


ALL_TEMPLATES = {source: [json.loads(p.read_bytes()) for p in templates(source)] for source in SOURCES}
TEMPLATE_BODIES = {source: [dumps_plain(t) for t in docs] for source, docs in ALL_TEMPLATES.items()}


def template(source: str) -> st.SearchStrategy[Any]:
    """One of the real payloads of ``source`` (drawn by index: short reprs in reports)."""
    return st.sampled_from(range(len(ALL_TEMPLATES[source]))).map(lambda i: ALL_TEMPLATES[source][i])


def template_body(source: str) -> st.SearchStrategy[bytes]:
    return st.sampled_from(range(len(TEMPLATE_BODIES[source]))).map(lambda i: TEMPLATE_BODIES[source][i])

STARTS = "2026-01-01T00:00:00Z"


@st.composite
def hostile_alert(draw: st.DrawFn, canary_dir: Path, uid: str, source: str
                  ) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """A well-formed delivery of ``source`` whose text fields are hostile, and the label
    pairs the store must keep verbatim for each of its alerts."""
    text = hostile_text(canary_dir)
    nonempty = hostile_text(canary_dir, min_size=1)
    alertname = draw(st.one_of(st.sampled_from(ROUTED_ALERTNAMES), nonempty))
    service = draw(st.one_of(st.sampled_from(INVENTORY_SERVICES), nonempty))
    labels = draw(st.dictionaries(nonempty, text, max_size=5))
    labels.update({"alertname": alertname, "service": service, "fuzz_case": uid})
    pool = draw(st.lists(text, min_size=1, max_size=3))
    fields = itertools.cycle(pool)

    def free_text() -> str:  # the other free-text fields, from a small drawn pool
        return next(fields)

    summary = free_text()
    if source in ("alertmanager", "grafana"):
        n = draw(st.integers(1, 3))
        alerts = [{"status": "firing", "labels": {**labels, "fuzz_alert": str(i)},
                   "annotations": {"summary": summary, "description": free_text()},
                   "startsAt": STARTS, "endsAt": "0001-01-01T00:00:00Z",
                   "generatorURL": free_text(), "fingerprint": free_text()} for i in range(n)]
        doc: dict[str, Any] = {
            "version": "4", "groupKey": free_text(), "status": "firing", "receiver": free_text(),
            "groupLabels": {"alertname": alertname}, "commonLabels": {"alertname": alertname},
            "commonAnnotations": {"summary": summary}, "externalURL": "http://127.0.0.1:9093",
            "truncatedAlerts": 0, "alerts": alerts}
        if source == "grafana":
            doc.update({"orgId": 1, "state": "alerting", "title": free_text(), "message": free_text()})
        return doc, [a["labels"] for a in alerts]
    if source == "cloudevents":
        doc = {"specversion": "1.0", "id": uid, "source": draw(nonempty), "type": "io.fuzz.alert",
               "subject": free_text(), "time": STARTS, "datacontenttype": "application/json",
               "data": {"status": "firing", "labels": labels,
                        "annotations": {"summary": summary}, "startsAt": STARTS}}
        return doc, [labels]
    if source == "opsgenie":
        details = draw(st.dictionaries(nonempty, text, max_size=5))
        details["service"] = service
        tags = draw(st.lists(nonempty.filter(lambda t: "," not in t), max_size=3))
        entity = free_text()
        doc = {"action": "Create", "integrationId": "fz", "integrationName": free_text(),
               "source": {"name": free_text(), "type": "web"},
               "alert": {"alertId": uid, "alias": f"fz-{uid}", "message": alertname,
                         "tags": tags, "tinyId": "1", "entity": entity, "details": details,
                         "priority": "P1", "createdAt": 1767225600000, "source": free_text(),
                         "description": free_text()}}
        overridden = {"alertname", "alias", "entity", "origin", "priority", "tags"}
        expect = {k: v for k, v in details.items() if k not in overridden}
        expect["alertname"] = alertname
        if entity:
            expect["entity"] = entity
        if tags:
            expect["tags"] = ",".join(tags)
        return doc, [expect]
    if source == "pagerduty":
        policy = free_text()
        doc = {"event": {"id": uid, "event_type": "incident.triggered", "resource_type": "incident",
                         "occurred_at": STARTS, "agent": {"summary": free_text(), "type": "user_reference"},
                         "client": None,
                         "data": {"id": f"P{uid}", "type": "incident", "title": alertname,
                                  "number": 1, "status": "triggered", "urgency": "high",
                                  "html_url": free_text(),
                                  "service": {"id": free_text(), "summary": service},
                                  "escalation_policy": {"summary": policy}}}}
        expect = {"alertname": alertname, "service": service, "urgency": "high"}
        if policy:
            expect["escalation_policy"] = policy
        return doc, [expect]
    assert source == "sentry"
    doc = {"action": "created", "installation": {"uuid": "fz"},
           "actor": {"type": "application", "id": "sentry", "name": free_text()},
           "data": {"issue": {"id": uid, "title": alertname, "culprit": free_text(), "level": "error",
                              "platform": "python", "status": "unresolved", "shortId": f"FZ-{uid}",
                              "project": {"slug": service, "name": free_text()},
                              "firstSeen": STARTS, "web_url": free_text()}}}
    return doc, [{"alertname": alertname, "project": service, "level": "error"}]


def check_stored_verbatim(gw: Gateway, response: httpx.Response, delivery_id: str,
                          expected: list[dict[str, str]]) -> None:
    """The store holds the hostile text as plain text, and nothing was started."""
    rows = gw.rows(delivery_id)
    answer = response.json()
    assert len(rows) == answer["alerts"] == len(expected), (rows, answer)
    assert [r["disposition"] for r in rows] == dispositions(response)
    for row, want in zip(rows, expected):
        labels = json.loads(row["body"])["labels"]
        for key, value in want.items():
            assert labels.get(key) == value, f"label {key!r}: stored {labels.get(key)!r}, sent {value!r}"
        if row["disposition"] == "opened":
            assert row["flow_run_id"] is None, f"a run was started in shadow mode: {dict(row)}"
            assert row["target"] in INVENTORY_SERVICES, \
                f"an incident was opened for {row['target']!r}, not a service of the inventory"
            OBSERVED["incidents opened (shadow, inventory targets)"] += 1
        elif row["disposition"] == "unrouted":
            OBSERVED["alerts left unrouted"] += 1


# --------------------------------------------------------------------------------------------
# 1. schemathesis: the OpenAPI description, positive and negative, signed or not
# --------------------------------------------------------------------------------------------

@pytest.fixture
def openapi_gw(tmp_path_factory, portal: BlockingPortal) -> Iterator[Gateway]:
    """A gateway of its own per schemathesis test: schemathesis runs the app's lifespan and
    ends it (closing the store) when the test that started it ends."""
    with ExitStack() as stack:
        gateway = start_gateway(tmp_path_factory.mktemp("gateway-openapi"), stack, portal)
        yield gateway


@pytest.fixture
def openapi(openapi_gw: Gateway):
    return schemathesis.openapi.from_asgi("/openapi.json", openapi_gw.app)


class _Sign(requests.auth.AuthBase):
    """Signs (or forges) the bytes schemathesis actually sends."""

    def __init__(self, gw: Gateway, source: str, mode: str, junk: str) -> None:
        self.gw, self.source, self.mode, self.junk = gw, source, mode, junk

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        body = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else body
        if self.mode == "valid":
            headers = valid_auth(self.source, body, self.gw.settings)
        else:
            headers = forged_auth(self.source, body, self.mode, self.junk)
        request.headers.update(headers)
        request.headers["X-Webhook-Id"] = self.gw.next_id("oa")
        return request


@pytest.mark.parametrize("source", SOURCES)
def test_openapi_fuzz_never_5xx(openapi_gw: Gateway, openapi, source: str):
    gw = openapi_gw
    operation = openapi[f"/alerts/{source}"]["POST"]
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        before = gw.deliveries()
        forged_accepted: list[str] = []

        @fuzz("openapi")
        @given(case=operation.as_strategy(generation_mode=mode),
               auth=st.sampled_from(("valid", "valid", "none") + FORGERIES), junk=st.text(max_size=8))
        def run(case, auth: str, junk: str) -> None:
            since = len(gw.errors.records)
            count = gw.deliveries()
            response = case.call(auth=None if auth == "none" else _Sign(gw, source, auth, junk))
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
            assert response.status_code < 500, response.text
            assert not gw.parser_crashes(since), gw.parser_crashes(since)
            if auth != "valid":
                assert response.status_code >= 400, f"{auth} credentials accepted: {response.text}"
                if gw.deliveries() != count:
                    forged_accepted.append(auth)
            CASES[f"openapi-{source}"] += 1  # counted once the case ran through

        run()
        assert not forged_accepted, f"unauthenticated deliveries were stored: {forged_accepted}"
        assert gw.deliveries() >= before
        gw.assert_still_sound(f"openapi {source} {mode.value}")


def test_openapi_fuzz_healthz(openapi_gw: Gateway, openapi):
    gw = openapi_gw
    operation = openapi["/healthz"]["GET"]  # no inputs: nothing to negate, a handful of cases

    @fuzz("openapi_healthz")
    @given(case=operation.as_strategy(generation_mode=GenerationMode.POSITIVE))
    def run(case) -> None:
        response = case.call()
        case.validate_response(response, checks=[not_a_server_error, status_code_conformance])
        assert response.status_code == 200
        CASES["openapi-healthz"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("openapi healthz")


# --------------------------------------------------------------------------------------------
# 2. forged signatures never authenticate, whatever the body
# --------------------------------------------------------------------------------------------

def test_forged_credentials_are_refused_and_nothing_is_stored(gw: Gateway):
    secrets = list(SECRETS.values())

    @fuzz("forged")
    @given(data=st.data(), source=st.sampled_from(SOURCES), kind=st.sampled_from(FORGERIES),
           junk=st.text(max_size=12), ctype=st.sampled_from(["application/json", None, "text/plain"]))
    def run(data, source: str, kind: str, junk: str, ctype: str | None) -> None:
        body = data.draw(st.one_of(template_body(source), st.binary(max_size=300)), "body")
        headers = forged_auth(source, body, kind, junk)
        note(f"forged headers: {headers}")
        if ctype:
            headers["Content-Type"] = ctype
        headers["X-Webhook-Id"] = gw.next_id("forged")
        count = gw.deliveries()
        response = post(gw, source, body, header_list(headers))
        assert 400 <= response.status_code < 500, \
            f"{kind} credentials accepted for {source}: {response.status_code} {response.text[:300]}"
        assert gw.deliveries() == count, "a delivery with forged credentials was stored"
        expected = [hmac_hex(HMAC_SECRETS[source], body)] if source in HMAC_SECRETS else []
        for secret in secrets + expected:
            assert secret not in response.text, "the answer leaks a secret or the expected signature"
        CASES["forged"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("forged credentials")


def test_empty_secret_is_not_a_secret(tmp_path_factory):
    """A secret configured as "" must not make an empty-key HMAC (or an empty token) valid:
    refused when the settings are made, or every such request refused."""
    root = tmp_path_factory.mktemp("gateway-empty-secrets")
    empty = {name: "" for name in SECRETS}
    try:
        settings = GatewaySettings(store=root / "alerts.db", dispatch="shadow",
                                   routes_file=REPO_ROOT / "routes.yaml", **empty)
        app = build_app(settings)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError: refused up front
        CASES["empty_secrets"] += 1
        OBSERVED[f"empty secrets refused in the settings: {type(exc).__name__}"] += 1
        return
    with start_blocking_portal() as portal:
        async def make_client() -> httpx.AsyncClient:
            return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")

        client = portal.call(make_client)
        accepted: list[str] = []

        @fuzz("empty_secrets")
        @given(source=st.sampled_from(SOURCES), data=st.data())
        def run(source: str, data) -> None:
            body = data.draw(template_body(source))
            headers = {"Content-Type": content_type(source)}
            if source in HMAC_HEADERS:
                sig = hmac_hex(b"", body)
                headers[HMAC_HEADERS[source]] = f"v1={sig}" if source == "pagerduty" else sig
            elif source == "opsgenie":
                headers["X-Opsgenie-Secret"] = ""
            else:
                headers["Authorization"] = "Bearer "
            response = portal.call(lambda: client.post(f"/alerts/{source}", content=body, headers=headers))
            assert response.status_code < 500, response.text
            if response.status_code < 400:
                accepted.append(f"{source}: {sorted(headers)} -> {response.status_code}")
            CASES["empty_secrets"] += 1  # counted once the case ran through

        try:
            run()
        finally:
            portal.call(client.aclose)
    assert not accepted, ("with secrets set to '', requests signed with an empty key (or an empty "
                          f"token) were accepted: {sorted(set(accepted))}")


# --------------------------------------------------------------------------------------------
# 3. replays: the same body and signature twice; stale Grafana timestamps
# --------------------------------------------------------------------------------------------

def test_replayed_delivery_opens_nothing_new(gw: Gateway):
    @fuzz("replay")
    @given(data=st.data(), source=st.sampled_from(SOURCES))
    def run(data, source: str) -> None:
        uid = gw.next_id("replay")
        doc, _ = data.draw(hostile_alert(gw.canary_dir, uid, source), "doc")
        body = dumps(doc)
        headers = valid_auth(source, body, gw.settings)
        headers.update({"Content-Type": content_type(source), "X-Webhook-Id": uid})
        raw = header_list(headers)
        first = post(gw, source, body, raw)
        incidents, stored = gw.incidents(), gw.count(
            "SELECT COUNT(*) FROM alerts WHERE disposition != 'duplicate'")
        again = post(gw, source, body, raw)  # byte for byte the same request
        # and again with fresh signature timestamps (Sentry's timestamp is not signed)
        fresh = {k: (str(int(time.time()) + 1) if k.endswith("Timestamp") else v) for k, v in headers.items()}
        later = post(gw, source, body, header_list(fresh))
        for replay in (again, later):
            if replay.status_code < 300:
                assert set(dispositions(replay)) <= {"duplicate"}, \
                    f"a replay was not a duplicate: {dispositions(first)} then {dispositions(replay)}"
        assert gw.incidents() == incidents, "a replay opened an incident"
        assert gw.count("SELECT COUNT(*) FROM alerts WHERE disposition != 'duplicate'") == stored
        CASES["replay"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("replays")


def test_stale_or_bogus_grafana_timestamps_are_refused(gw: Gateway):
    now = int(time.time())

    @fuzz("stale_timestamp")
    @given(data=st.data(),
           ts=st.one_of(  # the gateway's default signature_max_age_s is 300 s
               st.integers(600, 20 * 365 * 86400).map(lambda age: str(now - age)),
               st.integers(600, 10**6).map(lambda ahead: str(now + ahead)),
               st.sampled_from(["0", "-1", "1e10", "99999999999999999999", "", " ", "\u00b2",
                                "2026-01-01T00:00:00Z", "nan"]),
               hostile_text(gw.canary_dir, latin1=True)))
    def run(data, ts: str) -> None:
        uid = gw.next_id("stale")
        doc, _ = data.draw(hostile_alert(gw.canary_dir, uid, "grafana"), "doc")
        body = dumps(doc)
        headers = header_list({
            "Content-Type": "application/json", "X-Webhook-Id": uid,
            "X-Grafana-Alerting-Signature": hmac_hex(SECRETS["grafana_secret"], f"{ts.strip()}:".encode() + body),
            GRAFANA_TIMESTAMP: ts})
        incidents = gw.incidents()
        first = post(gw, "grafana", body, headers)
        # correctly signed, but 10 minutes or more off the gateway's clock (or not a Unix time)
        assert first.status_code == 401, f"stale or bogus timestamp {ts!r} accepted: {first.text[:300]}"
        again = post(gw, "grafana", body, headers)
        assert again.status_code == 401, again.text[:300]
        assert gw.incidents() == incidents
        CASES["stale_timestamp"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("stale timestamps")


# --------------------------------------------------------------------------------------------
# 4. hostile label text: accepted, stored verbatim, never executed, nothing started
# --------------------------------------------------------------------------------------------

def test_hostile_label_text_is_stored_as_plain_text(gw: Gateway):
    accepted: Counter[str] = Counter()

    @fuzz("hostile_labels")
    @given(data=st.data(), source=st.sampled_from(SOURCES), ascii_only=st.booleans())
    def run(data, source: str, ascii_only: bool) -> None:
        uid = gw.next_id("hostile")
        doc, expected = data.draw(hostile_alert(gw.canary_dir, uid, source), "doc")
        response = signed_post(gw, source, dumps(doc, ensure_ascii=ascii_only), delivery_id=uid)
        if response.status_code == 202 and response.json().get("alerts"):
            accepted[source] += 1
            check_stored_verbatim(gw, response, uid, expected)
        assert_no_canary(gw.canary_dir)
        CASES["hostile_labels"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("hostile labels")
    # the property must not hold vacuously: most of these well-formed deliveries are accepted
    assert sum(accepted.values()) >= EXAMPLES["hostile_labels"] // 2, accepted
    assert set(accepted) == set(SOURCES), accepted


# --------------------------------------------------------------------------------------------
# 5. byte-level garbage, correctly signed (so that it reaches the parsers)
# --------------------------------------------------------------------------------------------

BAD_UTF8 = [b"\xff", b"\xfe\xff", b"\xc0\x80", b"\x80", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80",
            b"\xf8\x88\x80\x80\x80", b"\xc3", b"\xa0\xa1"]
ENCODINGS = ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be", "utf-8-sig",
             "latin-1", "cp1252", "utf-7"]


@st.composite
def garbage_body(draw: st.DrawFn, source: str, canary_dir: Path) -> bytes:
    real = dumps(draw(template(source)), ensure_ascii=False)
    kind = draw(st.sampled_from(["binary", "bad-utf8", "encoding", "deep", "number", "truncated",
                                 "bom", "duplicate-keys", "scalar", "nul", "random-json"]))
    if kind == "binary":
        return draw(st.binary(max_size=600))
    if kind == "bad-utf8":
        at = draw(st.integers(0, len(real)))
        return real[:at] + draw(st.sampled_from(BAD_UTF8)) + real[at:]
    if kind == "encoding":
        doc = json.loads(real)
        text = json.dumps({**doc, "note": draw(hostile_text(canary_dir)) + "\u00e9\u20ac"} if isinstance(doc, dict)
                          else doc, ensure_ascii=False)
        return text.encode(draw(st.sampled_from(ENCODINGS)), "replace")
    if kind == "deep":
        inner = nested(draw(st.integers(1, 5000)), draw(st.sampled_from(["array", "object", "mixed"])))
        return draw(st.sampled_from([inner.encode(), b'{"alerts": ' + inner.encode() + b"}",
                                     b'{"data": ' + inner.encode() + b"}",
                                     b'{"event": {"data": ' + inner.encode() + b"}}"]))
    if kind == "number":
        number = draw(st.one_of(st.integers(1, 8000).map(lambda n: "7" * n),
                                st.sampled_from(["1e999999", "-1e400", "NaN", "Infinity", "0e0", "-0"])))
        return draw(st.sampled_from(["{n}", '{{"alerts": [{{"status": "firing", "labels": {{"a": {n}}}}}]}}',
                                     '{{"action": "Create", "alert": {{"alertId": "a", "createdAt": {n}}}}}',
                                     '{{"specversion": "1.0", "id": {n}, "source": "s", "type": "t"}}']
                                    )).format(n=number).encode()
    if kind == "truncated":
        return real[: draw(st.integers(0, len(real)))]
    if kind == "bom":
        return draw(st.sampled_from([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff"])) + real
    if kind == "duplicate-keys":
        return b'{"alerts": [], "alerts": [{"status": "firing", "labels": {"a": "1", "a": {}}}],' \
               + real[1:]
    if kind == "scalar":
        return draw(st.sampled_from([b"", b" ", b"\n\t", b"null", b"true", b"0", b'""', b"[]", b"{}", b"[{}]",
                                     b'{"":""}', b"\x00", b"{\x00}", b"\xef\xbb\xbf", b"/*x*/{}", b"{},{}"]))
    if kind == "nul":
        at = draw(st.integers(0, len(real)))
        return real[:at] + b"\x00" + real[at:]
    return dumps(draw(json_values(canary_dir)), ensure_ascii=draw(st.booleans()))


def test_garbage_bodies_never_5xx(gw: Gateway):
    @fuzz("garbage_bodies")
    @given(data=st.data(), source=st.sampled_from(SOURCES),
           ctype=st.sampled_from(["default", "application/json; charset=utf-16", None]))
    def run(data, source: str, ctype: str | None) -> None:
        body = data.draw(garbage_body(source, gw.canary_dir), "body")
        signed_post(gw, source, body, delivery_id=gw.next_id("garbage"), ctype=ctype)
        CASES["garbage_bodies"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("garbage bodies")


# --------------------------------------------------------------------------------------------
# 6. structure-aware mutations of the real payloads
# --------------------------------------------------------------------------------------------

def _paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _paths(value, prefix + (key,))
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            yield from _paths(value, prefix + (i,))


def _replace(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    head, rest = path[0], path[1:]
    copy = dict(doc) if isinstance(doc, dict) else list(doc)
    copy[head] = _replace(doc[head], rest, value)
    return copy


def _delete(doc: Any, path: tuple) -> Any:
    if not path:
        return doc
    if len(path) == 1:
        copy = dict(doc) if isinstance(doc, dict) else list(doc)
        del copy[path[0]]
        return copy
    return _replace(doc, path[:1], _delete(doc[path[0]], path[1:]))


@st.composite
def mutated_payload(draw: st.DrawFn, source: str, canary_dir: Path) -> Any:
    doc: Any = draw(template(source))
    values = st.one_of(json_values(canary_dir), RAW_VALUES, hostile_text(canary_dir),
                       st.integers(1_000, 100_000).map(big("A")))
    for _ in range(draw(st.integers(1, 4))):
        paths = list(_paths(doc))
        path = paths[draw(st.integers(0, len(paths) - 1))]
        action = draw(st.sampled_from(["replace", "replace", "delete", "add-key", "wrap"]))
        if action == "replace":
            doc = _replace(doc, path, draw(values))
        elif action == "delete" and path:
            doc = _delete(doc, path)
        elif action == "add-key":
            target = _get(doc, path)
            if isinstance(target, dict):
                doc = _replace(doc, path, {**target, draw(hostile_text(canary_dir)): draw(values)})
            elif isinstance(target, list):
                doc = _replace(doc, path, target + [draw(values)])
        elif action == "wrap":
            doc = _replace(doc, path, [_get(doc, path)] if draw(st.booleans()) else {"x": _get(doc, path)})
    return doc


def _get(doc: Any, path: tuple) -> Any:
    for part in path:
        doc = doc[part]
    return doc


def test_mutated_real_payloads_never_5xx(gw: Gateway):
    @fuzz("mutated_payloads")
    @given(data=st.data(), source=st.sampled_from(SOURCES), ascii_only=st.booleans())
    def run(data, source: str, ascii_only: bool) -> None:
        doc = data.draw(mutated_payload(source, gw.canary_dir), "doc")
        uid = gw.next_id("mutated")
        response = signed_post(gw, source, dumps(doc, ensure_ascii=ascii_only), delivery_id=uid)
        answer = response.json()
        if response.status_code == 202 and answer.get("alerts"):
            assert len(gw.rows(uid)) == answer["alerts"], "202 but the alerts are not in the store"
        assert_no_canary(gw.canary_dir)
        CASES["mutated_payloads"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("mutated payloads")


# --------------------------------------------------------------------------------------------
# 7. hostile and huge headers
# --------------------------------------------------------------------------------------------

LATIN1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f")
TOKEN = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_"), min_size=1, max_size=20)
CONTENT_TYPES = ["application/json", "application/json; charset=utf-8", "application/json; charset=utf-16",
                 "application/json; charset=latin-1", "APPLICATION/JSON", "application/json;;;",
                 "application/cloudevents+json", "application/cloudevents-batch+json", "application/x+json",
                 "application/+json", "text/json", "text/plain", "application/x-www-form-urlencoded",
                 "multipart/form-data; boundary=x", "application/xml", "*/*", "application/*", ";", " ",
                 "application/json, text/plain", "application/json\t; charset=utf-8", "json"]
CONTENT_LENGTHS = ["0", "1", "-1", "abc", " 12 ", "1e3", "0x10", "\u00b2", "\u00b9", "\u00b3",
                   "99999999999999999999999", "1048577", "+5", "5, 5", ""]


@st.composite
def hostile_headers(draw: st.DrawFn, source: str) -> tuple[str, list[tuple[str, str]]]:
    """How to authenticate (valid, duplicated, forged first, huge, none) and the other headers."""
    auth_mode = draw(st.one_of(st.sampled_from(["valid", "valid", "duplicated", "forged-first", "none"]),
                               st.sampled_from([1024, 65536, 262144, 1048576]).map(lambda n: f"huge-{n}")))
    headers: list[tuple[str, str]] = []
    ctype = draw(st.one_of(st.none(), st.sampled_from(CONTENT_TYPES), st.text(LATIN1, max_size=60)))
    if ctype is not None:
        headers.append(("Content-Type", ctype))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["content-length", "delivery-id", "huge", "many", "ce-binary",
                                     "sentry-resource", "hostile"]))
        if kind == "content-length":
            headers.append(("Content-Length", draw(st.sampled_from(CONTENT_LENGTHS))))
        elif kind == "delivery-id":
            name = draw(st.sampled_from(["X-Webhook-Id", "Request-ID", "X-Request-ID"]))
            headers.append((name, draw(st.one_of(st.text(LATIN1, max_size=50),
                                                 st.integers(201, 1 << 20).map(big("i"))))))
        elif kind == "huge":
            headers.append(("X-" + draw(TOKEN), draw(st.sampled_from([8192, 65536, 1 << 20]).map(big("h")))))
        elif kind == "many":
            headers += [(f"X-Fuzz-{i}", str(i)) for i in range(draw(st.integers(10, 2000)))]
        elif kind == "ce-binary":
            headers += [("ce-specversion", draw(st.sampled_from(["1.0", "0.3", "", "1.0\u00ff"]))),
                        ("ce-id", draw(st.text(LATIN1, max_size=30))),
                        ("ce-source", draw(st.text(LATIN1, max_size=30))),
                        ("ce-type", draw(st.text(LATIN1, max_size=30))),
                        ("ce-time", draw(st.sampled_from(["2026-01-01T00:00:00Z", "yesterday", ""])))]
        elif kind == "sentry-resource":
            headers.append(("Sentry-Hook-Resource", draw(st.one_of(
                st.sampled_from(["issue", "event_alert", "metric_alert", "installation", ""]),
                st.text(LATIN1, max_size=30)))))
        else:
            headers.append((draw(TOKEN), draw(st.text(LATIN1, max_size=200))))
    return auth_mode, headers


def with_auth(source: str, body: bytes, settings: GatewaySettings, auth_mode: str,
              others: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    auth = valid_auth(source, body, settings)
    headers: list[tuple[str, str]] = []
    if auth_mode == "forged-first":
        headers += list(forged_auth(source, body, "random-hex", "x").items())
    if auth_mode in ("valid", "duplicated", "forged-first"):
        headers += list(auth.items())
    if auth_mode == "duplicated":
        headers += list(auth.items())
    if auth_mode.startswith("huge-"):
        size = int(auth_mode.removeprefix("huge-"))
        headers += [(name, "v1=" + "a" * size if name == "X-PagerDuty-Signature" else
                     ("Bearer " + "a" * size if name == "Authorization" else "a" * size))
                    for name in auth]
    return header_list(headers, others)


def test_hostile_headers_never_5xx(gw: Gateway):
    @fuzz("hostile_headers")
    @given(data=st.data(), source=st.sampled_from(SOURCES))
    def run(data, source: str) -> None:
        body = data.draw(template_body(source), "body")
        auth_mode, others = data.draw(hostile_headers(source), "headers")
        post(gw, source, body, with_auth(source, body, gw.settings, auth_mode, others))
        CASES["hostile_headers"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("hostile headers")


# --------------------------------------------------------------------------------------------
# 8. huge bodies: around and far over the limit, with and without Content-Length
# --------------------------------------------------------------------------------------------

def test_huge_bodies_are_413_or_handled(gw: Gateway):
    limit = gw.settings.max_body_bytes

    @fuzz("huge_bodies")
    @given(source=st.sampled_from(SOURCES), size=st.sampled_from([limit - 1, limit, limit + 1, 2 * limit, 8 * limit]),
           shape=st.sampled_from(["padding", "string", "alerts", "deep-ish"]), chunked=st.booleans(),
           signed=st.booleans())
    def run(source: str, size: int, shape: str, chunked: bool, signed: bool) -> None:
        body = _huge(shape, size)
        headers = {"Content-Type": content_type(source), "X-Webhook-Id": gw.next_id("huge")}
        headers.update(valid_auth(source, body, gw.settings) if signed else
                       forged_auth(source, body, "random-hex", "huge"))
        content: Any = body
        if chunked:
            def chunks() -> Iterator[bytes]:
                for i in range(0, len(body), 65536):
                    yield body[i:i + 65536]
            content = _async_iter(chunks())
        since = len(gw.errors.records)
        response = gw.send(f"/alerts/{source}", content, header_list(headers))
        assert_clear(gw, response, describe(f"/alerts/{source}", header_list(headers), body[:300]), since)
        if len(body) > limit:
            assert response.status_code == 413, f"{len(body)} bytes > {limit}: {response.status_code}"
        elif not signed:
            assert 400 <= response.status_code < 500
        CASES["huge_bodies"] += 1  # counted once the case ran through

    run()
    gw.assert_still_sound("huge bodies")


def _huge(shape: str, size: int) -> bytes:
    if shape == "padding":
        core = b'{"alerts": [{"status": "firing", "labels": {"alertname": "Huge"}}]}'
        return core[:-1] + b" " * (size - len(core)) + b"}"
    if shape == "string":
        head, tail = b'{"alerts": [{"status": "firing", "labels": {"alertname": "Huge", "x": "', b'"}}]}'
        return head + b"x" * (size - len(head) - len(tail)) + tail
    if shape == "alerts":
        one = b'{"status": "firing", "labels": {"alertname": "Huge", "i": "%08d"}}'
        items, total, i = [], 20, 0
        while total + len(one) + 2 <= size:
            items.append(one % i)
            total += len(one) + 2
            i += 1
        body = b'{"alerts": [' + b", ".join(items) + b"]}"
        return body + b" " * (size - len(body))
    inner = ("[" * 500 + "]" * 500).encode()
    body = b'{"alerts": [], "x": [' + b",".join([inner] * max(1, (size - 40) // (len(inner) + 1))) + b"]}"
    return body + b" " * max(0, size - len(body))


async def _async_iter(chunks: Iterator[bytes]):
    for chunk in chunks:
        yield chunk


# --------------------------------------------------------------------------------------------
# The total
# --------------------------------------------------------------------------------------------

def test_total_fuzz_cases(gw: Gateway):
    """Runs last (pytest keeps file order): at least MIN_TOTAL_CASES cases were executed."""
    expected = {f"openapi-{s}" for s in SOURCES} | {
        "openapi-healthz", "forged", "empty_secrets", "replay", "stale_timestamp", "hostile_labels",
        "garbage_bodies", "mutated_payloads", "hostile_headers", "huge_bodies"}
    missing = expected - set(CASES)
    if missing:
        pytest.skip(f"only part of the module ran (not run: {sorted(missing)}); the total needs all")
    total = sum(CASES.values())
    print(f"\ngateway fuzz cases: {total} {dict(sorted(CASES.items()))}")
    print(f"observed: {dict(OBSERVED)}")
    gw.assert_still_sound("the total")
    assert total >= MIN_TOTAL_CASES, f"only {total} fuzz cases ran: {dict(CASES)}"

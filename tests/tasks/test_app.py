"""The app's admin API, metrics and upstream client: parsing on its own, the calls against the lab."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest

from incident.errors import ConfigurationError
from incident.inventory import load_target
from tasks.app import (
    leave_degraded_mode, parse_app_metrics, parse_retry_after, probe_upstream, read_app_metrics,
    read_app_status, set_degraded_mode,
)

METRICS = """\
# TYPE labweb_info gauge
labweb_info{version="1.1",role="web"} 1
# TYPE labweb_http_requests_total counter
labweb_http_requests_total{handler="price",code="200"} 40
labweb_http_requests_total{handler="price",code="502"} 7
# TYPE labweb_upstream_requests_total counter
labweb_upstream_requests_total 47
# TYPE labweb_upstream_failures_total counter
labweb_upstream_failures_total{reason="rate_limited"} 5
labweb_upstream_failures_total{reason="error"} 2
labweb_upstream_failures_total{reason="timeout"} 0
labweb_upstream_failures_total{reason="refused"} 0
labweb_upstream_retry_after_seconds 3
labweb_circuit_breaker_open 1
labweb_degraded 0
process_resident_memory_bytes 1.2e+07
"""


def test_metrics_are_parsed_by_name_and_label():
    m = parse_app_metrics("http://x/metrics", METRICS)
    assert m.version == "1.1" and m.price_requests == {"200": 40, "502": 7}
    assert m.upstream_requests == 47 and m.upstream_failures_total == 7
    assert m.upstream_failures["rate_limited"] == 5 and m.upstream_retry_after_s == 3
    assert m.circuit_breaker_open is True and m.degraded is False
    assert m.resident_memory_bytes == 12_000_000 and m.cpu_seconds is None
    assert "rate_limited 5, error 2" in m.describe_upstream()


def test_retry_after_in_seconds_or_as_a_date():
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert parse_retry_after("3") == 3
    assert parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now) == 30
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


@pytest.mark.lab
def test_admin_status_metrics_and_the_changing_calls(prefect_api, healthy_lab):
    target = load_target("web", healthy_lab.inventory_path)
    status = read_app_status(target)
    assert status.breaker == "closed" and not status.degraded
    assert read_app_metrics(target).upstream_requests is not None
    probe = probe_upstream(target)
    assert probe.ok and probe.reason == "ok", probe.describe()

    try:
        on = set_degraded_mode(target, True)
        assert on.changed and "degraded mode on" in on.detail
        again = set_degraded_mode(target, True)
        assert not again.changed and again.detail.startswith("already on")
        assert read_app_status(target).degraded
    finally:
        off = set_degraded_mode(target, False)
    assert off.changed and not read_app_status(target).degraded
    out = leave_degraded_mode(target)
    assert not out.changed and out.detail.startswith("already out of degraded mode"), out.detail


@pytest.mark.lab
def test_a_wrong_admin_token_is_refused_without_showing_it(prefect_api, healthy_lab, tmp_path):
    target = load_target("web", healthy_lab.inventory_path)
    secret = tmp_path / "token"
    secret.write_text("definitely-not-the-admin-token")
    app = type(target.service.app).model_validate({**target.service.app.model_dump(),
                                                   "admin_token": f"file:{secret}"})
    wrong = target.model_copy(update={"service": target.service.model_copy(update={"app": app})})
    with pytest.raises(ConfigurationError, match="refused the admin token") as raised:
        read_app_status.fn(wrong)
    assert "definitely-not-the-admin-token" not in str(raised.value)

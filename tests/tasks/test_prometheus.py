"""Prometheus queries: the error-ratio PromQL, typed samples from the lab's real Prometheus,
and errors that say what to check."""

from __future__ import annotations

import pytest

from incident.errors import ConfigurationError, TargetUnreachableError
from incident.inventory import load_target
from tasks.prometheus import ErrorRatioQuery, error_ratio, error_ratio_query, run_query, shown
from tests.helpers import wait_for


def test_the_error_ratio_query_is_written_in_one_place():
    query = ErrorRatioQuery(selector={"service": 'we"b'}, window_s=30)
    assert query.expr == (
        '(sum(rate(labweb_http_requests_total{service="we\\"b",code=~"5.."}[30s])) or vector(0)) / '
        'sum(rate(labweb_http_requests_total{service="we\\"b"}[30s]))')
    with pytest.raises(ValueError, match="label names"):
        ErrorRatioQuery(selector={"bad-name": "x"}, window_s=5)


def test_a_prometheus_that_does_not_answer_says_which_url_and_what_to_check():
    with pytest.raises(TargetUnreachableError) as raised:
        run_query("http://user:hunter2@127.0.0.1:9", "up", timeout_s=1)
    message = str(raised.value)
    assert "http://127.0.0.1:9" in message and "/-/ready" in message and "app.prometheus_url" in message
    assert "hunter2" not in message
    assert shown("http://user:hunter2@127.0.0.1:9") == "http://127.0.0.1:9"


@pytest.mark.lab
def test_typed_samples_and_the_error_ratio_from_the_lab_prometheus(alert_pipeline, healthy_lab):
    lab, _ = alert_pipeline
    prometheus = lab.info.prometheus_url
    result = run_query(prometheus, 'up{service="web"}')
    assert result.samples and all(s.value in (0.0, 1.0) for s in result.samples)
    assert {s.labels["service"] for s in result.samples} == {"web"}

    target = load_target("web")
    assert error_ratio_query(target).window_s == target.service.app.error_rate_window_s
    wait_for(lambda: error_ratio(target).ratio is not None, "the lab's traffic in Prometheus", 30)
    rate = error_ratio(target)
    assert rate.ratio is not None and not rate.above(target.service.app.error_rate_threshold), rate.describe()
    assert "of requests answered 5xx over the last" in rate.describe()

    with pytest.raises(ConfigurationError, match="refused the query"):
        run_query(prometheus, "sum(")

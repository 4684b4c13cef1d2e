from __future__ import annotations

import pytest

from incident.errors import ConfigurationError
from tasks.http_checks import check_health


@pytest.mark.lab
def test_health_of_the_lab_service(lab):
    lab.reset_web()
    probe = check_health(lab.info.health_url)
    assert probe.healthy and probe.status_code == 200 and '"postgres":"ok"' in probe.body.replace(" ", "")


def test_nothing_listening_is_an_observation_not_an_error():
    probe = check_health("http://127.0.0.1:9/health", timeout_s=1)
    assert not probe.healthy and probe.status_code is None
    assert "ConnectError" in probe.error and "did not answer" in probe.describe()


def test_bad_url_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="health_url"):
        check_health("not a url://")

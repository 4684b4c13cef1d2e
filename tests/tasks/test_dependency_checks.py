from __future__ import annotations

import pytest
from prefect import flow

from incident.inventory import load_target
from tasks.postgres import check_postgres
from tasks.redis import check_redis

pytestmark = pytest.mark.lab


@flow
def _checks(target):
    return check_postgres(target), check_redis(target)


def test_dependencies_answer(prefect_api, lab):
    pg, rd = _checks(load_target("web", lab.inventory_path))
    assert pg.ok and pg.detail == "SELECT 1 answered"
    assert rd.ok and rd.detail == "PONG"


def test_wrong_password_fails_without_leaking_it(prefect_api, lab, tmp_path):
    target = load_target("web", lab.inventory_path)
    secret = tmp_path / "pw"
    secret.write_text("definitely-wrong-password")
    db = type(target.database).model_validate({**target.database.model_dump(), "password": f"file:{secret}"})
    pg, _ = _checks(target.model_copy(update={"database": db}))
    assert not pg.ok and "password authentication failed" in pg.detail
    assert "definitely-wrong-password" not in pg.detail

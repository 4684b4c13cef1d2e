"""The web service: one container (``lab-web:1.1``, host network) of the lab's dockerd,
whose ``/health`` checks PostgreSQL and Redis; and the faults that break it."""

from __future__ import annotations

from pathlib import Path

from lab.context import LabContext
from lab.docker import Docker
from lab.faults import fault
from lab.proc import LabError, http_get, port_in_use, wait_until


class Web:
    def __init__(self, ctx: LabContext, docker: Docker) -> None:
        self.ctx = ctx
        self.docker = docker

    @property
    def name(self) -> str:
        return self.ctx.container_name

    def _env(self) -> dict[str, str]:
        i = self.ctx.info
        return {
            "LABWEB_PORT": str(i.web_port),
            "LABWEB_PG": f"127.0.0.1:{i.pg_port}",
            "LABWEB_REDIS": f"127.0.0.1:{i.redis_port}",
        }

    def _get(self, client):
        import docker.errors

        try:
            return client.containers.get(self.name)
        except docker.errors.NotFound:
            return None

    def _run(self, client, image: str, previous: str):
        info = self.ctx.info
        old = self._get(client)
        if old is not None:
            old.remove(force=True)
        if port_in_use(info.web_port) and image != info.broken_image:
            raise LabError(f"web: port {info.web_port} on 127.0.0.1 is taken by another program")
        return client.containers.run(
            image,
            name=self.name,
            detach=True,
            network_mode="host",
            environment=self._env(),
            labels={"runbooks.previous-image": previous, "runbooks.service": "web"},
            restart_policy={"Name": "no"},
        )

    def _save_logs(self, container) -> Path:
        log = self.ctx.log("web")
        try:
            log.write_bytes(container.logs(stdout=True, stderr=True))
        except Exception:  # noqa: BLE001
            pass
        return log

    def _health_ok(self) -> bool:
        return http_get(self.ctx.info.health_url, 2)[0] == 200

    def up(self, restart_stopped: bool = False) -> str | None:
        """Create the container when there is none (or, ``restart_stopped``, when ``down``
        stopped it). One that exists but is down or unhealthy is left as it is - repairing it
        here would hide what a runbook did or did not do - and the returned line says so
        (None when it is healthy)."""
        client = self.docker.client()
        try:
            c = self._get(client)
            if c is None or (restart_stopped and c.attrs["State"].get("Status") != "running"):
                self.reset()
                return None
            status = c.attrs["State"].get("Status")
            if status == "running" and wait_until(self._health_ok, 10, 0.2):
                return None
            code, body = http_get(self.ctx.info.health_url, 2)
            self._save_logs(c)
            seen = (f"runs but {self.ctx.info.health_url} answers {code or 'nothing'} {body}".strip()
                    if status == "running" else f"is {status}")
            return (f"web: container {self.name} {seen}; left for the service-down runbook "
                    f"(log: {self.ctx.log('web')}); `python -m lab reset web-killed` repairs it by hand")
        finally:
            client.close()

    def kill(self) -> None:
        client = self.docker.client()
        try:
            c = self._get(client)
            if c is None:
                raise LabError(f"web: no container {self.name}")
            c.kill()
            if not wait_until(lambda: client.containers.get(self.name).status != "running", 10):
                raise self.ctx.fail("web", "container still running 10s after docker kill")
        finally:
            client.close()

    def deploy_broken(self) -> None:
        """Replace the container by the broken release (it exits at start), labelled so
        that a rollback goes back to the image that ran before."""
        client = self.docker.client()
        try:
            c = self._get(client)
            previous = c.attrs["Config"]["Image"] if c is not None else self.ctx.info.web_image
            new = self._run(client, self.ctx.info.broken_image, previous)

            def exited() -> bool:
                new.reload()
                return new.status == "exited"

            if not wait_until(exited, 15):
                raise self.ctx.fail("web", "broken release did not exit within 15s", self._save_logs(new))
            self._save_logs(new)
        finally:
            client.close()

    def reset(self, timeout: float = 30.0) -> None:
        """A fresh container of the current release (previous: the one before); waits for 200."""
        info = self.ctx.info
        client = self.docker.client()
        try:
            c = self._run(client, info.web_image, info.previous_image)
            if not wait_until(self._health_ok, timeout, 0.2):
                code, body = http_get(info.health_url, 2)
                log = self._save_logs(c)
                raise self.ctx.fail(
                    "web", f"{info.health_url} not 200 within {timeout:.0f}s (last: {code or ''} {body})", log
                )
        finally:
            client.close()

    def _running(self) -> tuple[str, dict[str, str]] | None:
        """(image, labels) of the web container if it runs; None with no engine, no container,
        or a container that is not running."""
        try:
            client = self.docker.client(timeout=5)
        except Exception:  # noqa: BLE001 - no engine: not running
            return None
        try:
            c = self._get(client)
            if c is None or c.attrs["State"].get("Status") != "running":
                return None
            return c.attrs["Config"]["Image"], dict(c.labels or {})
        except Exception:  # noqa: BLE001
            return None
        finally:
            client.close()

    def healthy(self) -> bool:
        """The service is back: its container runs and ``/health`` answers 200 (whatever the
        image: a rollback to the previous release heals a broken one)."""
        return self._running() is not None and http_get(self.ctx.info.health_url, 3)[0] == 200

    def at_baseline(self) -> bool:
        """The web service is as ``reset`` leaves it: the container runs the current release
        (labelled with the right previous image) and ``/health`` answers 200. A rollback
        to the previous image heals the outage but is not this baseline."""
        info = self.ctx.info
        running = self._running()
        if running is None:
            return False
        image, labels = running
        return (image == info.web_image and labels.get("runbooks.previous-image") == info.previous_image
                and http_get(info.health_url, 3)[0] == 200)

    def status(self) -> str:
        import docker.errors

        try:
            client = self.docker.client(timeout=5)
            c = client.containers.get(self.name)
        except docker.errors.NotFound:
            return "down (no container)"
        except Exception as exc:  # noqa: BLE001
            return f"unknown ({type(exc).__name__})"
        state = c.attrs["State"]
        if state.get("Status") != "running":
            return f"{state.get('Status')} (exit code {state.get('ExitCode')}, image {c.attrs['Config']['Image']})"
        code, body = http_get(self.ctx.info.health_url, timeout=3)
        if code == 200:
            return "up"
        return f"unhealthy ({code or body})"


# --------------------------------------------------------------------------- faults


def _reset_web(lab) -> None:
    lab.reset_web()


def _web_healthy(lab) -> bool:
    return lab.web.healthy()


def _web_at_baseline(lab) -> bool:
    return lab.web.at_baseline()


@fault("web-killed", scenario="service-down", alert="ServiceDown",
       description="docker kill the web container: nothing listens, /health stops answering; "
                   "a restart heals it",
       reset=_reset_web, healthy=_web_healthy, at_baseline=_web_at_baseline)
def _inject_web_killed(lab) -> None:
    lab.kill_web()


@fault("web-broken-release", scenario="service-down", alert="ServiceDown",
       description="deploy the broken release (lab-web:broken exits at start): a restart does not "
                   "help, a rollback to the previous image does",
       reset=_reset_web, healthy=_web_healthy, at_baseline=_web_at_baseline)
def _inject_web_broken_release(lab) -> None:
    lab.deploy_broken_web()

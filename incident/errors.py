"""One exception hierarchy for every runbook.

Every error names the target, what was observed, what was expected and the next
human step, so that a failed run in the Prefect UI tells the on-call engineer
what to do without reading code. Secrets never go into these messages.
"""

from __future__ import annotations


class RunbookError(Exception):
    """Base of every error this project raises on purpose."""

    #: Transient errors may be retried by tasks that only read; nothing else is retried.
    transient: bool = False

    def __init__(self, target: str, observed: str, expected: str, next_step: str) -> None:
        self.target = target
        self.observed = observed
        self.expected = expected
        self.next_step = next_step
        super().__init__(
            f"[{target}] observed: {observed}; expected: {expected}. Next step: {next_step}"
        )

    def __reduce__(self):  # keep pickling (Prefect stores exceptions) working
        return (self.__class__, (self.target, self.observed, self.expected, self.next_step))


class ConfigurationError(RunbookError):
    """The inventory, a policy file or a setting is wrong; a human must fix the file."""


class UnknownTargetError(ConfigurationError):
    """A flow was asked to act on a target that is not in the inventory."""


class SecretUnavailableError(ConfigurationError):
    """A secret reference could not be resolved (the value itself is never shown)."""


class TargetUnreachableError(RunbookError):
    """A system the runbook must talk to did not answer (engine, host, database)."""

    transient = True


class DockerEngineUnreachableError(TargetUnreachableError):
    pass


class SshError(TargetUnreachableError):
    pass


class HostKeyMismatchError(RunbookError):
    """The SSH host key is unknown or changed: never retried, never auto-accepted."""


class ContainerNotFoundError(RunbookError):
    pass


class ActionFailedError(RunbookError):
    """A changing step ran but did not have its expected effect."""


class NeedsHumanError(RunbookError):
    """The runbook went as far as it safely can; it escalated and a human must take over."""


class VerificationFailedError(NeedsHumanError):
    """The service did not prove healthy after remediation; a human must take over."""


class ApprovalTimedOutError(NeedsHumanError):
    """Nobody approved or rejected a destructive step in time; the step did not run (the message
    says what the run had changed before it)."""

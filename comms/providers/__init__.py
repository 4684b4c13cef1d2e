"""One module per provider, each following its provider's documented request schema."""

from comms.providers.base import Accepted, Call, Delivery, NotSent, Provider
from comms.providers.opsgenie import Opsgenie
from comms.providers.pagerduty import PagerDuty
from comms.providers.slack import Slack
from comms.providers.statuspage import Statuspage

__all__ = ["Accepted", "Call", "Delivery", "NotSent", "Opsgenie", "PagerDuty", "Provider", "Slack", "Statuspage"]

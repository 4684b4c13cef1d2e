"""Incident communications: PagerDuty, Opsgenie, Slack and Atlassian Statuspage.

    from comms import Message, Notifiers, render_text
    deliveries = Notifiers.from_settings().send(msg, earlier=previous_deliveries)

``comms.messages`` holds the message and the runbooks' templates, ``comms.notifiers`` the
dispatcher (bounded retries, one Delivery per provider, never raising for a provider's
failure), ``comms.providers`` one module per provider's API, ``comms.settings`` the
``RUNBOOKS_*`` settings (credentials are secret references, never values).
"""

from comms.messages import Kind, Message, next_update_at, render_status_page, render_text
from comms.notifiers import Delivery, Notifiers, RetryPolicy
from comms.settings import CommsSettings

__all__ = ["CommsSettings", "Delivery", "Kind", "Message", "Notifiers", "RetryPolicy", "next_update_at",
           "render_status_page", "render_text"]

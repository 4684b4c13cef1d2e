"""Slack incoming webhook: every message, as text plus Block Kit blocks.

``POST <webhook URL>`` with ``{text, blocks}``: a ``header`` block (plain text <= 150
characters), a ``section`` with the template's lines in mrkdwn (<= 3000) and a ``context``
block naming the incident and linking its run. ``text`` is the whole runbook template, the
fallback Slack shows in notifications. Slack answers 200 ``ok``; 400 ``invalid_payload`` /
``invalid_blocks`` / ``no_text``; 403 ``invalid_token`` / ``action_prohibited``; 404
``channel_not_found`` / ``no_service``; 410 ``channel_is_archived``; 429 with ``Retry-After``
(about one message per second per webhook); 500 ``rollup_error``. The webhook URL is the
credential: it is never shown.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from comms.messages import Message, fields, footer, render_text, title
from comms.providers.base import Accepted, Call, Delivery, NotSent, Provider, json_headers, truncate
from incident.inventory import SecretRef

MAX_HEADER, MAX_SECTION, MAX_TEXT = 150, 3000, 40000


def escape(text: str) -> str:
    """Slack's three control characters in mrkdwn and text."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def blocks(msg: Message) -> list[dict[str, Any]]:
    section = "\n".join(f"*{label}:* {escape(value)}" for label, value in fields(msg))
    context = escape(footer(msg)[0])
    if msg.run_url:
        context += f" · <{msg.run_url}|Prefect run>"
    return [
        {"type": "header", "text": {"type": "plain_text", "text": truncate(title(msg), MAX_HEADER)}},
        {"type": "section", "text": {"type": "mrkdwn", "text": truncate(section, MAX_SECTION)}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": truncate(context, MAX_SECTION)}]},
    ]


class Slack(Provider):
    name = "slack"

    def __init__(self, webhook_url: SecretRef) -> None:
        super().__init__(webhook_url, "RUNBOOKS_SLACK_WEBHOOK_URL")

    def secrets(self) -> list[str]:
        url = self._secret
        if not url:
            return []
        path = urlsplit(url).path  # the token part alone must not show either
        return [url] + ([path] if len(path) > 1 else [])

    def request(self, msg: Message, earlier: Sequence[Delivery]) -> Call | NotSent:
        url = self.secret()
        if urlsplit(url).scheme not in ("http", "https"):
            return NotSent(f"the secret behind {self.credential_setting} ({self.credential}) is not "
                           "an https:// webhook URL: store the URL Slack gave for the incoming webhook")
        payload = {"text": truncate(escape(render_text(msg)), MAX_TEXT), "blocks": blocks(msg)}
        return Call("post message", "POST", url, payload, json_headers())

    def accepted(self, call: Call, response: httpx.Response) -> Accepted:
        text = response.text.strip()
        return Accepted(f"{response.status_code} {self.scrub(truncate(text, 40)) or 'ok'}")

"""The spec's curls as written (only the VM id adapted), through the bridge to hypervisord."""
from __future__ import annotations

from .spec_examples import SPEC_EXPORT, SPEC_SCHEDULE, SPEC_WEBHOOK
from .stack import curl, post_json




def test_submit_for_an_unconfigured_provider_names_the_provider(bridge):
    answer = post_json(bridge, "/jobs/submit", SPEC_EXPORT)
    assert answer.status == 400, answer.body
    assert answer.json()["error"] == "InvalidArgument" and answer.json()["field"] == "provider"


def test_webhook_secrets_never_come_back(bridge):
    created = post_json(bridge, "/webhooks/configure", {**SPEC_WEBHOOK, "secret": "s3cr3t-value"})
    assert created.status == 200, created.body
    text = curl(bridge, "/webhooks").body
    assert "token123" not in text and "s3cr3t-value" not in text
    assert created.json()["has_secret"] is True


def test_bad_schedule_names_the_field(bridge):
    answer = post_json(bridge, "/schedules/create", {**SPEC_SCHEDULE, "cron": "every day"})
    assert answer.status == 400 and answer.json()["field"] == "cron", answer.body

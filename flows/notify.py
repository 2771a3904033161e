"""A notification whenever a pipeline run ends Failed: a Prefect automation on the server.

    python -m flows.notify --slack-webhook https://hooks.slack.com/services/...   # a Slack channel
    python -m flows.notify --webhook https://example.org/hook                     # any JSON webhook

With ``report.fail_on_regression: true`` a run whose report flags a regression ends Failed, so this
also notifies on regressions (the message carries the run's state message: the regressions). It
needs the Prefect server the runs report to (PREFECT_API_URL). Running it again replaces the block
``genai-pipeline-alerts`` and the automation ``genai-pipeline failed``; delete them in the UI
(Automations, Blocks) or with ``prefect automation delete 'genai-pipeline failed'``.
"""

from __future__ import annotations

import argparse
import sys

AUTOMATION = "genai-pipeline failed"
BLOCK = "genai-pipeline-alerts"
FLOWS = ("genai-pipeline", "genai-retraining")  # the flow of flows/pipeline.py and the scheduled one


def create_alert(block) -> str:
    """Save the notification ``block`` and (re)create the automation that uses it; returns the automation's id.

    The automation reacts to every ``prefect.flow-run.Failed`` event of the pipeline's flows and sends
    the run's name and state message through the block.
    """
    from prefect.automations import Automation
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    block_id = block.save(BLOCK, overwrite=True)
    while True:  # replace an earlier one
        try:
            Automation.read(name=AUTOMATION).delete()
        except ValueError:  # "Automation with name ... not found"
            break
    automation = Automation(
        name=AUTOMATION,
        description="Notify when a genai-pipeline run ends Failed (with report.fail_on_regression: on a regression)",
        trigger=EventTrigger(expect={"prefect.flow-run.Failed"}, posture=Posture.Reactive, threshold=1,
                             match_related={"prefect.resource.role": "flow", "prefect.resource.name": list(FLOWS)}),
        actions=[SendNotification(block_document_id=block_id, subject="genai-pipeline: run {{ flow_run.name }} failed",
                                  body="{{ flow.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
                                       "{{ flow_run.state.message }}")],
    ).create()
    return str(automation.id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.notify", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--slack-webhook", metavar="URL", help="a Slack incoming-webhook URL")
    where.add_argument("--webhook", metavar="URL", help="any URL that takes a JSON POST {\"text\": ...}")
    args = parser.parse_args(argv)
    from prefect.blocks.notifications import CustomWebhookNotificationBlock, SlackWebhook
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        print("error: no Prefect server configured: the automation lives on the server the runs report to "
              "(prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api)", file=sys.stderr)
        return 2
    if args.slack_webhook:
        block = SlackWebhook(url=args.slack_webhook)
    else:
        block = CustomWebhookNotificationBlock(name=BLOCK, url=args.webhook, allow_private_urls=True,
                                               json_data={"text": "{{subject}}: {{body}}"})
    automation = create_alert(block)
    print(f"automation {AUTOMATION!r} ({automation}) notifies through block {BLOCK!r} when a run of "
          f"{' or '.join(FLOWS)} ends Failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())

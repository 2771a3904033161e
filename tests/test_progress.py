"""Progress lines for long loops: done/total, rate and ETA, at most one per interval, none for quick work."""

from __future__ import annotations

import logging

from tasks.runtime import Progress


def test_progress_reports_done_rate_and_eta_at_most_once_per_interval(caplog):
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        quick = Progress("quick", 100, "steps", every=60.0, logger=logger)
        for done in range(1, 101):
            quick.update(done)
        assert caplog.messages == []  # finished well within the interval: nothing to say

        slow = Progress("pixelcnn: sampling", 4, "samples drawn", every=0.0, logger=logger)
        for done in range(1, 5):
            slow.update(done)
    assert len(caplog.messages) == 3  # 1/4, 2/4, 3/4; the last update is the step's own "done" line
    assert caplog.messages[0].startswith("pixelcnn: sampling: 1/4 samples drawn (")
    assert all("/s, ETA " in message for message in caplog.messages)

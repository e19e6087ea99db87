"""The capture writer's status file: what the UI learns of rows that could not be stored."""

from __future__ import annotations

import time

from storage import capture_status


def test_a_run_that_ended_while_rows_waited_counts_them_as_dropped_in_the_next(tmp_path):
    db_path = tmp_path / "kr.db"
    first = capture_status.StatusFile(db_path)
    first.update(dropped=3, waiting=7, failing_since=time.time(), error="database or disk is full")
    first.close()  # killed with 7 flows still in memory

    second = capture_status.StatusFile(db_path)
    status = capture_status.read(db_path)
    second.close()
    assert (status.dropped, status.waiting, status.failing_since) == (10, 0, None)
    assert status.last_drop_reason == "the proxy ended while it could not write them"


def test_news_of_a_failure_from_a_writer_that_has_gone_is_not_current(tmp_path):
    status = capture_status.CaptureStatus(waiting=4, failing_since=1.0, updated_at=time.time())
    assert status.failing_now(time.time())
    assert not status.failing_now(time.time() + capture_status.FRESH_SECONDS + 1)


def test_a_long_error_message_still_fits_the_file(tmp_path):
    db_path = tmp_path / "kr.db"
    handle = capture_status.StatusFile(db_path)
    handle.update(error="x" * 2000, failing_since=time.time(), waiting=1)
    handle.close()
    assert capture_status.path_of(db_path).stat().st_size == capture_status.SIZE
    assert capture_status.read(db_path).error == "x" * 80

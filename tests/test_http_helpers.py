"""kernel.http: the HTTP answer helpers every source plugin shares."""

from __future__ import annotations

import email.utils
import time

import pytest

from kernel.errors import PermanentError, TransientError
from kernel.http import check_status, retry_after_seconds, validator_of


class Answer:
    def __init__(self, **headers: str) -> None:
        self.headers = {k.replace("_", "-"): v for k, v in headers.items()}


def test_a_strong_etag_is_the_validator_and_a_weak_one_falls_back_to_last_modified() -> None:
    modified = "Wed, 21 Oct 2015 07:28:00 GMT"
    assert validator_of(Answer(etag='"abc"', last_modified=modified)) == '"abc"'
    assert validator_of(Answer(etag='W/"abc"', last_modified=modified)) == modified
    assert validator_of(Answer()) is None


def test_retry_after_reads_seconds_and_http_dates_and_ignores_garbage() -> None:
    assert retry_after_seconds({"retry-after": "7"}) == 7.0
    later = email.utils.formatdate(time.time() + 120, usegmt=True)
    assert 100 < (retry_after_seconds({"retry-after": later}) or 0) <= 121
    past = email.utils.formatdate(time.time() - 120, usegmt=True)
    assert retry_after_seconds({"retry-after": past}) == 0.0
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None


@pytest.mark.parametrize("status", [408, 429, 500, 503])
def test_overload_and_server_errors_are_transient_with_the_servers_delay(status: int) -> None:
    with pytest.raises(TransientError) as excinfo:
        check_status(status, {"retry-after": "3"}, "https://example.test/f")
    assert excinfo.value.retry_after == 3.0
    assert excinfo.value.reason == f"http_{status}"


@pytest.mark.parametrize(
    ("status", "words"),
    [(401, "requires credentials"), (403, "requires credentials"), (404, "Not found"),
     (410, "refused the request")],
)  # fmt: skip
def test_client_errors_are_permanent_with_a_sentence(status: int, words: str) -> None:
    with pytest.raises(PermanentError, match=words):
        check_status(status, {}, "https://example.test/f")


def test_success_and_redirect_statuses_pass() -> None:
    for status in (200, 206, 304):
        check_status(status, {}, "https://example.test/f")

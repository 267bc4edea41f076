"""One answer to "is the session over, and why" (cloudq/sessionend.py) and the tables of names
(cloudq/state.py) that the roles share instead of copying. The clients that ask are tested with
real processes: test_client_headless.py (a close during an outage) and test_gateway_browser.py
(the page shows the gateway's words)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cloudq.sessionend import REASONS, close_message, session_end
from cloudq.state import CloseReason, JobResult
from cloudq.tokens import hash_token
from cloudq.workers.worker import KNOWN_RESULTS

ROOT = Path(__file__).resolve().parent.parent
MINE = hash_token("my-token")


@pytest.mark.parametrize(
    ("state", "reason", "token", "over"),
    [
        (b"active", b"", hash_token("my-token").encode(), None),
        (b"disconnected", None, None, None),  # the client is away; the grace runs: still its session
        (b"sleeping", b"admin: maintenance", None, "admin: maintenance"),  # closing: over already
        (b"active", b"grace", None, "grace"),
        ("closed", "idle", None, "idle"),  # str or bytes, as each client reads them
        (b"closed", b"", None, "closed"),  # closed with no reason recorded
        (None, None, None, "closed"),  # the hash is gone
        (b"active", b"", hash_token("another").encode(), "taken_over"),
        (b"active", b"logout", hash_token("another").encode(), "logout"),  # the close says more
    ],
)
def test_session_end_says_whether_a_session_is_over_and_why(
    state: bytes | str | None, reason: bytes | str | None, token: bytes | None, over: str | None
) -> None:
    assert session_end(state, reason, token, MINE) == over


def test_without_the_clients_token_a_live_session_with_another_token_is_not_over() -> None:
    """The gateway's cookie lookup knows the token matches before it asks."""
    assert session_end(b"active", b"", hash_token("another").encode()) is None


def test_every_close_reason_has_its_words_and_a_detail_is_kept() -> None:
    assert set(REASONS) == set(CloseReason)
    fallback = close_message("no such reason")
    assert fallback == "the session was closed (no such reason)"
    assert all(close_message(r) == REASONS[r] != fallback for r in CloseReason)
    assert close_message("admin: maintenance") == "the session was closed by the operator: maintenance"
    assert close_message("admin: ") == REASONS[CloseReason.ADMIN]
    assert close_message("mount_failed: store unreachable") == (
        REASONS[CloseReason.MOUNT_FAILED] + " (store unreachable)"
    )


def _returned_strings(path: Path) -> set[str]:
    """Every string literal a function in ``path`` returns (``return "x"``)."""
    tree = ast.parse(path.read_text())
    return {
        node.value.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Return)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        and node.value.value
    }


def test_the_worker_counts_every_result_the_job_bodies_return_under_its_own_label() -> None:
    returned = {s for f in ("jobs.py", "data.py") for s in _returned_strings(ROOT / "workers" / f)}
    assert returned - set(JobResult) == set(), "a job body returns a result the JobResult enum lacks"
    assert returned <= KNOWN_RESULTS


def test_warnings_are_worded_once_and_the_page_keeps_no_table_of_its_own() -> None:
    from pathlib import Path

    from cloudq.sessionend import WARNINGS, warning_message

    assert warning_message("max_session") == WARNINGS["max_session"] and warning_message("odd") == "odd"
    page = (Path(__file__).parent.parent / "client" / "web" / "static" / "app.js").read_text()
    assert "max_session" not in page and WARNINGS["max_session"] not in page

"""The daemon's log formats: text and JSON lines, with the calling request's id."""

from __future__ import annotations

import json
import logging

import pytest

from kvstore import logs


@pytest.fixture
def capture(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield capsys
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_json_lines_carry_request_fields_and_extras(capture) -> None:  # type: ignore[no-untyped-def]
    logs.configure("info", "json")
    log = logging.getLogger("kvstore.test")
    log.info("outside any call")
    with logs.request_scope("Get", "abc"):
        log.warning("inside %s", "a call", extra={"keys": 3})
    log.debug("below the level")
    lines = capture.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines)
    assert first["message"] == "outside any call" and "request_id" not in first
    assert first["level"] == "info" and first["logger"] == "kvstore.test"
    assert first["time"].endswith("Z")
    assert second == {**second, "message": "inside a call", "rpc": "Get", "request_id": "abc"}
    assert second["keys"] == 3 and second["level"] == "warning"


def test_text_lines_name_the_call(capture) -> None:  # type: ignore[no-untyped-def]
    logs.configure("debug", "text")
    log = logging.getLogger("kvstore.test")
    with logs.request_scope("Put", "r1"):
        log.debug("stored")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    err = capture.readouterr().err
    assert " DEBUG kvstore.test [Put r1]: stored" in err
    assert "ERROR kvstore.test: failed" in err and "ValueError: boom" in err


def test_request_ids_are_fresh() -> None:
    ids = {logs.new_request_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 16 for i in ids)

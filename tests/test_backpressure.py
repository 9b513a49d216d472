"""Under overload, ingestion answers 503 + Retry-After instead of queueing without bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx

from peoplebase.app import PeoplebaseApp
from peoplebase.settings import Settings
from peoplebase.writer import Writer


def _batch(request: int, size: int = 2000) -> list[dict]:
    return [
        {"$token": "bp", "$distinct_id": f"r{request}-{i}", "$set": {"i": i, "pad": "x" * 60}}
        for i in range(size)
    ]


async def _flood(settings: Settings, requests: int) -> tuple[PeoplebaseApp, list[httpx.Response]]:
    app = PeoplebaseApp(settings)
    app.startup()
    transport = httpx.ASGITransport(app=app)
    http = httpx.AsyncClient(transport=transport, base_url="http://pb.test", timeout=120)
    warm = await http.post("/engage", json=_batch(-1, 200))  # the writer learns its speed
    assert warm.text == "1"
    answers = await asyncio.gather(*(http.post("/engage", json=_batch(r)) for r in range(requests)))
    await http.aclose()
    return app, list(answers)


async def test_expected_wait_past_the_limit_answers_503(tmp_path: Path) -> None:
    settings = Settings(db=str(tmp_path / "bp.db"), tokens="open", queue_wait=0.05, retry_after=3)
    app, answers = await _flood(settings, 24)
    try:
        refused = [i for i, r in enumerate(answers) if r.status_code == 503]
        accepted = [i for i, r in enumerate(answers) if r.status_code == 200]
        assert refused, "no request was refused although the queue was far past 0.05 s of work"
        assert accepted and len(refused) + len(accepted) == len(answers)
        for i in refused:
            assert answers[i].headers["retry-after"] == "3"
            assert answers[i].json()["status"] == "Service Unavailable"
        project = app.store.project_by_token("bp")
        assert project is not None
        for i in accepted:
            assert len(app.store.get_profiles(project.id, [f"r{i}-0", f"r{i}-1999"])) == 2
        for i in refused:
            assert app.store.get_profiles(project.id, [f"r{i}-0", f"r{i}-1999"]) == []
    finally:
        app.shutdown()


async def test_without_the_wait_limit_everything_queues(tmp_path: Path) -> None:
    settings = Settings(db=str(tmp_path / "nb.db"), tokens="open", queue_wait=0)
    app, answers = await _flood(settings, 6)
    try:
        assert [r.status_code for r in answers] == [200] * 6
    finally:
        app.shutdown()


def test_expected_wait_is_queue_over_speed(tmp_path: Path) -> None:
    from peoplebase.store.sqlite import SqliteStore

    w = Writer(SqliteStore(str(tmp_path / "w.db")), max_wait=1.0)
    assert w.expected_wait == 0.0  # nothing measured yet: no refusal on a guess
    w._speed_records, w._speed_seconds, w._queued_records = 10_000.0, 1.0, 5_000
    assert abs(w.expected_wait - 0.5) < 1e-9

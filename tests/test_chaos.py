"""The chaos run of benchmarks/chaos.py, short: 20 SIGKILLs under load from client processes.

Each backend gets its own run (SQLite file, fresh PostgreSQL database). After every restart the
stored profiles must equal the reference fold of the requests they hold, hold every acknowledged
request, and hold each request in all of its profiles or none. The longer run and its figures
are in docs/reliability.md.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import chaos

pytestmark = [pytest.mark.e2e, pytest.mark.all_backends]

KILLS = 20


@pytest.mark.parametrize(
    ("writer", "kills"),
    # the default writer (a child process, which also writes the query sessions each restart's
    # check reads through) gets the long run; the writer thread a shorter one
    [("process", KILLS), ("thread", 8)],
)
def test_sigkills_lose_no_acknowledged_update(
    writer: str, kills: int, db_url: str, tmp_path: Path
) -> None:
    report = chaos.run(
        db_url,
        kills=kills,
        clients=3,
        workdir=tmp_path,
        max_up=0.5,
        serve_args=("--writer", writer),
    )
    assert report.kills == kills
    assert report.checks == kills + 2
    assert report.acknowledged > kills  # every round took writes before its kill
    assert report.lost == 0 and report.half_applied == 0
    assert report.stored >= report.acknowledged
    assert report.unexpected_answers == []


def test_the_checker_catches_loss_and_half_applied_requests() -> None:
    """The invariants are real: a lost, a half-applied and a misordered request are caught."""
    rids = [1, 2, 3]
    per_profile: dict[str, list[int]] = {}
    for rid in rids:
        for p in chaos.profiles_of(rid):
            per_profile.setdefault(p, []).append(rid)
    good = {p: chaos.fold(ids) for p, ids in per_profile.items()}
    assert chaos.check(good, set(rids), set(rids), "good") == 3
    with pytest.raises(chaos.ChaosFailure, match="lost"):
        chaos.check(good, {1, 2, 3, 4}, {1, 2, 3, 4}, "lost")
    first = chaos.profiles_of(1)[0]
    half = {**good, first: chaos.fold([r for r in per_profile[first] if r != 1])}
    with pytest.raises(chaos.ChaosFailure, match="half-applied"):
        chaos.check(half, set(rids), {2, 3}, "half")
    wrong = {**good, first: {**good[first], "n": good[first]["n"] + 1}}
    with pytest.raises(chaos.ChaosFailure, match="reference fold"):
        chaos.check(wrong, set(rids), set(rids), "fold")

"""A resent record whose $time lay in the future is still recognised as a retry."""

from __future__ import annotations

import time

from peoplebase.merge import MemoryBackend, Merger
from peoplebase.records import Validator


def test_resent_future_record_applies_once() -> None:
    backend = MemoryBackend()
    merger = Merger()
    validator = Validator()
    now = time.time()
    raw = {"$token": "t", "$distinct_id": "u", "$time": now + 3600, "$add": {"n": 1}}
    for arrival in (now, now + 5):
        update = validator.validate(dict(raw), 0, arrival)
        merger.apply(backend, [[update]])  # type: ignore[list-item]
    assert backend.profile("t", "u")["n"] == 1  # type: ignore[index]
    fresh = validator.validate({**raw, "$add": {"n": 2}}, 0, now + 10)
    merger.apply(backend, [[fresh]])  # type: ignore[list-item]
    assert backend.profile("t", "u")["n"] == 3  # type: ignore[index]

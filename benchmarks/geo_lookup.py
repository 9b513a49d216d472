"""What geolocation adds to validating a record: `python -m benchmarks.geo_lookup`.

Validates the same `$set` record with no geolocator, with the embedded country data and with a
small city `.mmdb` (written by the test fixtures), for a loopback client (what the ingestion
benchmark sends) and for 1,000 different public client addresses. Prints the best of three
runs in microseconds per record. Needs the `dev` extra (mmdb-writer).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from peoplebase.geo import Geolocator
from peoplebase.geo_providers import CountryLookup, MmdbLookup
from peoplebase.records import Validator
from tests.geo_fixtures import write_city_db

RECORD = {"$token": "t", "$distinct_id": "d", "$set": {"plan": "pro", "n": 1}}


def per_record(validator: Validator, addresses: list[str | None], n: int) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(n):
            validator.validate(RECORD, 0, 1.7e9, False, addresses[i % len(addresses)])
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    n = parser.parse_args().records
    rnd = random.Random(1)
    public: list[str | None] = [
        f"{rnd.randint(1, 223)}.{rnd.randint(0, 255)}.{rnd.randint(0, 255)}.{rnd.randint(1, 254)}"
        for _ in range(1000)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        city = MmdbLookup(str(write_city_db(Path(tmp) / "city.mmdb")))
        cases = [
            ("no geolocation", Validator(), [None]),
            (
                "embedded data, loopback client",
                Validator(geo=Geolocator(CountryLookup())),
                ["127.0.0.1"],
            ),
            (
                "embedded data, 1,000 public client addresses",
                Validator(geo=Geolocator(CountryLookup())),
                public,
            ),
            ("city .mmdb, 1,000 public client addresses", Validator(geo=Geolocator(city)), public),
        ]
        print("| case | µs per record |\n|---|---|")
        for label, validator, addresses in cases:
            print(f"| {label} | {per_record(validator, addresses, n):.1f} |")


if __name__ == "__main__":
    main()

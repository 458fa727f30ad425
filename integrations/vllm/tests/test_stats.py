"""kvsieve's counters stay bounded however long the engine serves: aggregates are counters and
the per-request table keeps only the most recently updated requests."""

from kvsieve_vllm.stats import PER_REQUEST_LIMIT, Stats


def test_per_request_entries_are_bounded_and_keep_the_latest():
    s = Stats()
    for i in range(3 * PER_REQUEST_LIMIT):
        s.compressed(f"r{i}", 1000, 750, 20)
        if i % 7 == 0:
            s.failed["worker"] += 1
    assert len(s.per_request) == PER_REQUEST_LIMIT
    assert next(reversed(s.per_request)) == f"r{3 * PER_REQUEST_LIMIT - 1}"
    assert "r0" not in s.per_request
    # Touching an old entry makes it the most recent, so a live request is not evicted.
    s.request(f"r{2 * PER_REQUEST_LIMIT + 5}")["states"] = ["admitted"]
    for i in range(PER_REQUEST_LIMIT - 1):
        s.compressed(f"n{i}", 10, 5, 0)
    assert f"r{2 * PER_REQUEST_LIMIT + 5}" in s.per_request
    d = s.as_dict()
    assert d["compressions"] == 3 * PER_REQUEST_LIMIT + PER_REQUEST_LIMIT - 1
    assert abs(d["kept_ratio"] - (3 * PER_REQUEST_LIMIT * 250 + (PER_REQUEST_LIMIT - 1) * 5)
               / (3 * PER_REQUEST_LIMIT * 1000 + (PER_REQUEST_LIMIT - 1) * 10)) < 1e-12
    assert d["events_failed"] == {"worker": len(range(0, 3 * PER_REQUEST_LIMIT, 7))}

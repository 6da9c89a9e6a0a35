"""The reuse key's code fingerprint: a change to the numerics modules must be declared."""
from labtools import numerics


def test_numerics_sources_match_the_declared_fingerprint():
    got = numerics.sources_sha()
    assert got == numerics.SOURCES_SHA, (
        f"{', '.join(numerics.SOURCES)} changed (sha {got}, declared {numerics.SOURCES_SHA}). If numbers can "
        "change, bump numerics.VERSION and list the affected syncs in CHANGES (stored runs of those syncs stop "
        "being reused); if they cannot (comments, error handling: compare final weight digests), move the old "
        "SOURCES_SHA into SAME_NUMBERS_AS and set SOURCES_SHA to the new sha.")


def test_records_of_code_declared_equivalent_stay_current():
    from labtools import records

    for sha in numerics.same_numbers():
        m, _ = records.migrate({"world": 2, "processes": 2, "config": {"np": 2}, "numerics_version": numerics.VERSION,
                                "numerics_sources": sha, "other_cores": {}, "wall_time_kind": "x"})
        assert m["numerics_current"]
    m, _ = records.migrate({"world": 2, "processes": 2, "config": {"np": 2}, "numerics_version": numerics.VERSION,
                            "numerics_sources": "0" * 16, "other_cores": {}, "wall_time_kind": "x"})
    assert not m["numerics_current"]


def test_is_current_follows_the_declared_changes():
    v = numerics.VERSION
    assert numerics.is_current(v, "allreduce") and numerics.is_current(v, "epoch-average")
    assert numerics.is_current(1, "epoch-average")  # version 2 changed allreduce only
    assert not numerics.is_current(1, "allreduce")
    assert not numerics.is_current(None, "epoch-average")  # unknown code: never reused

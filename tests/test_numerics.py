"""The reuse key's code fingerprint: a change to the numerics modules must be declared."""
from labtools import numerics


def test_numerics_sources_match_the_declared_fingerprint():
    got = numerics.sources_sha()
    assert got == numerics.SOURCES_SHA, (
        f"{', '.join(numerics.SOURCES)} changed (sha {got}, declared {numerics.SOURCES_SHA}). If numbers can "
        "change, bump numerics.VERSION and list the affected syncs in CHANGES (stored runs of those syncs stop "
        "being reused); if they cannot (comments, error handling), set SOURCES_SHA to the new sha.")


def test_is_current_follows_the_declared_changes():
    v = numerics.VERSION
    assert numerics.is_current(v, "allreduce") and numerics.is_current(v, "epoch-average")
    assert numerics.is_current(1, "epoch-average")  # version 2 changed allreduce only
    assert not numerics.is_current(1, "allreduce")
    assert not numerics.is_current(None, "epoch-average")  # unknown code: never reused

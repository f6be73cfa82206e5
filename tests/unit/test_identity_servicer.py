"""Identity's proto conversions without a server: ResolveProfiles' batch decoding and answer,
and the cause MergeProfiles records for each caller."""

from __future__ import annotations

from uuid import uuid4

from profiles.identity.v1 import identity_service_pb2 as pb
from services.identity.errors import KeyMissing
from services.identity.model import ChangeCause, ProfileKey, Resolution
from services.identity.servicer import keys_from_proto, merge_cause, resolutions_to_proto
from shared.errors import FieldViolation


def test_keys_are_decoded_with_an_unset_key_kept_apart_from_an_empty_one() -> None:
    keys = [
        pb.ProfileKey(installation_id="i"),
        pb.ProfileKey(custom_id="bob"),
        pb.ProfileKey(),
        pb.ProfileKey(installation_id=""),
    ]
    assert keys_from_proto(keys) == [
        ProfileKey(installation_id="i"),
        ProfileKey(custom_id="bob"),
        ProfileKey(),
        ProfileKey(installation_id=""),
    ]


def test_a_resolved_item_reads_as_ok_without_carrying_a_status() -> None:
    known, created = uuid4(), uuid4()
    missing = KeyMissing("keys[3] missing", [FieldViolation("keys[3]", "missing", "KEY_MISSING")])
    response = resolutions_to_proto(
        [
            Resolution(known, identified=True, link_version=3),
            Resolution(created, created=True, link_version=1),
            Resolution(None, erased=True),
            missing,
        ]
    )
    ok, new, erased, invalid = response.results
    assert not ok.HasField("status")
    assert (ok.status.code, ok.status.message, list(ok.status.details)) == (0, "", [])
    assert (ok.profile_id, ok.identified, ok.link_version, ok.created) == (
        str(known),
        True,
        3,
        False,
    )
    assert (new.status.code, new.profile_id, new.created) == (0, str(created), True)
    assert (erased.status.code, erased.profile_id, erased.erased) == (0, "", True)
    assert invalid.status.code == 3  # INVALID_ARGUMENT
    assert not invalid.profile_id


def test_merges_by_the_internal_credential_are_token_reintegrations() -> None:
    assert merge_cause("internal") is ChangeCause.TOKEN_REINTEGRATION
    assert merge_cause("admin") is ChangeCause.OPERATOR_MERGE

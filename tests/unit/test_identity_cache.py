"""ResolutionCache's rules, without I/O: what it stores, what a change drops, and the fill that
raced a change."""

from __future__ import annotations

from uuid import UUID, uuid4

from services.identity.cache import (
    CacheInvalidationWorker,
    Listener,
    ResolutionCache,
    links_payload,
    parse_links_payload,
)
from services.identity.model import Resolution

PROJECT, OTHER_PROJECT = uuid4(), uuid4()


def enabled_cache(capacity: int = 100) -> ResolutionCache:
    cache = ResolutionCache(capacity)
    cache.enable()
    return cache


def test_a_stored_answer_is_returned_for_its_project_only() -> None:
    cache = enabled_cache()
    answer = Resolution(uuid4(), identified=True, link_version=3)
    cache.store(PROJECT, {"i1": answer}, cache.generation)
    assert cache.get(PROJECT.int, "i1") == answer
    assert cache.get(OTHER_PROJECT.int, "i1") is None


def test_a_cache_that_is_off_stores_nothing() -> None:
    cache = ResolutionCache()
    cache.store(PROJECT, {"i1": Resolution(uuid4())}, cache.generation)
    assert len(cache) == 0


def test_creations_are_not_stored() -> None:
    cache = enabled_cache()
    cache.store(PROJECT, {"i1": Resolution(uuid4(), created=True)}, cache.generation)
    assert cache.get(PROJECT.int, "i1") is None


def test_a_read_that_raced_a_change_is_not_stored() -> None:
    cache = enabled_cache()
    generation = cache.generation  # the read starts
    cache.invalidate_profiles(PROJECT, [uuid4()])  # a change commits meanwhile
    cache.store(PROJECT, {"i1": Resolution(uuid4())}, generation)
    assert cache.get(PROJECT.int, "i1") is None


def test_a_change_drops_every_installation_of_the_profiles_it_names() -> None:
    cache = enabled_cache()
    moved, kept = uuid4(), uuid4()
    cache.store(
        PROJECT,
        {"a": Resolution(moved), "b": Resolution(moved), "c": Resolution(kept)},
        cache.generation,
    )
    cache.store(OTHER_PROJECT, {"a": Resolution(moved)}, cache.generation)
    cache.invalidate_profiles(PROJECT, [moved])
    assert cache.get(PROJECT.int, "a") is None
    assert cache.get(PROJECT.int, "b") is None
    assert cache.get(PROJECT.int, "c") == Resolution(kept)
    assert cache.get(OTHER_PROJECT.int, "a") == Resolution(moved)


def test_an_installation_stored_again_on_another_profile_leaves_the_old_profiles_index() -> None:
    cache = enabled_cache()
    old, new = uuid4(), uuid4()
    cache.store(PROJECT, {"a": Resolution(old)}, cache.generation)
    cache.store(PROJECT, {"a": Resolution(new)}, cache.generation)
    cache.invalidate_profiles(PROJECT, [old])
    assert cache.get(PROJECT.int, "a") == Resolution(new)


def test_forgetting_installations_drops_them_and_refuses_reads_from_before() -> None:
    cache = enabled_cache()
    profile = uuid4()
    cache.store(PROJECT, {"a": Resolution(profile), "b": Resolution(profile)}, cache.generation)
    generation = cache.generation
    cache.forget_installations(PROJECT, ["a", "unknown"])
    assert cache.get(PROJECT.int, "a") is None
    assert cache.get(PROJECT.int, "b") == Resolution(profile)
    cache.store(PROJECT, {"a": Resolution(profile)}, generation)  # read before: refused
    assert cache.get(PROJECT.int, "a") is None
    cache.invalidate_profiles(PROJECT, [profile])  # the reverse index no longer names "a"
    assert len(cache) == 0


def test_disabling_forgets_everything() -> None:
    cache = enabled_cache()
    cache.store(PROJECT, {"a": Resolution(uuid4())}, cache.generation)
    generation = cache.generation
    cache.disable()
    assert len(cache) == 0
    cache.enable()
    cache.store(PROJECT, {"a": Resolution(uuid4())}, generation)  # read before: refused
    assert len(cache) == 0


def test_the_cache_stays_within_its_capacity() -> None:
    cache = enabled_cache(capacity=10)
    for n in range(25):
        cache.store(PROJECT, {f"i{n}": Resolution(uuid4())}, cache.generation)
        assert len(cache) <= 10


def test_a_payload_names_the_project_and_profiles() -> None:
    profiles = [uuid4(), uuid4()]
    assert parse_links_payload(links_payload(PROJECT, profiles)) == (PROJECT, profiles)


class _NoListener:
    async def lost(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def _listen(_on_payload: object) -> Listener:
    return _NoListener()


def test_a_notification_drops_the_named_profiles_and_a_garbled_one_drops_everything() -> None:
    cache = enabled_cache()
    worker = CacheInvalidationWorker(cache, _listen)
    moved, kept = uuid4(), uuid4()
    cache.store(PROJECT, {"a": Resolution(moved), "b": Resolution(kept)}, cache.generation)
    worker.on_payload(links_payload(PROJECT, [moved]))
    assert cache.get(PROJECT.int, "a") is None
    assert cache.get(PROJECT.int, "b") == Resolution(kept)
    worker.on_payload("not a payload")
    assert len(cache) == 0
    cache.store(PROJECT, {"c": Resolution(UUID(int=1))}, cache.generation)
    assert len(cache) == 1  # still caching after a garbled one


async def test_a_lost_listener_turns_the_cache_off_until_it_listens_again() -> None:
    cache = ResolutionCache()
    seen_enabled: list[int] = []

    async def listen(on_payload: object) -> Listener:
        cache.store(PROJECT, {"a": Resolution(uuid4())}, cache.generation)
        seen_enabled.append(len(cache))  # 0: not enabled before listening
        await worker.stop()
        return _NoListener()

    worker = CacheInvalidationWorker(cache, listen)
    await worker.run()
    assert seen_enabled == [0]
    cache.store(PROJECT, {"a": Resolution(uuid4())}, cache.generation)
    assert len(cache) == 0  # disabled once the listener is gone

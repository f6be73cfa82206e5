"""The segment and funnel forms suggest the project's event names: a <datalist> of the names
ListEventNames lists (the demo's custom events), tied to every event name box."""

from __future__ import annotations

import asyncio
import re

from profiles.client import open_channel
from profiles.query.v1 import query_service_pb2 as query_pb
from profiles.query.v1 import query_service_pb2_grpc as query_grpc
from tests.console.conftest import ConsoleSuite
from tests.console.test_console_hardening import http_sign_in
from tests.support.query import Suite


async def project_event_names(console_suite: ConsoleSuite) -> list[str]:
    channel = open_channel(console_suite.addresses["query"], console_suite.project.keys["read"])
    try:
        reply = await query_grpc.QueryServiceStub(channel).ListEventNames(
            query_pb.ListEventNamesRequest(page_size=200), timeout=20
        )
    finally:
        await channel.close()
    return [n.name for n in reply.event_names]


def suggestions(html: str) -> list[str]:
    found = re.search(r'<datalist id="event-names">(.*?)</datalist>', html, re.S)
    assert found is not None, "no datalist of event names"
    return re.findall(r'<option value="([^"]*)">', found.group(1))


async def handled_by_query(console_suite: ConsoleSuite) -> None:
    """ListEventNames reads counts query keeps from the events stream (they lag by the bus
    lag): wait until its consumer group has handled every message the demo caused."""
    settings = console_suite.settings
    waiter = Suite(
        query=None,  # type: ignore[arg-type]
        ingest=None,  # type: ignore[arg-type]
        identity=None,  # type: ignore[arg-type]
        project=console_suite.project,
        database_url=settings.database_url,
        clock=None,  # type: ignore[arg-type]
        redis_url=settings.redis_url,
        redis_prefix=settings.redis_prefix,
    )
    await waiter.settle(within=60)


async def test_segment_and_funnel_forms_suggest_the_projects_event_names(
    console_suite: ConsoleSuite,
) -> None:
    await handled_by_query(console_suite)
    names = await project_event_names(console_suite)
    assert len(names) >= 2  # the demo sends several custom events
    base = console_suite.url
    admin = await asyncio.to_thread(http_sign_in, base, console_suite.project.keys["admin"])
    for path, box in (("/segments/new", "c0-event_name"), ("/funnels/new", "s0-event_name")):
        form = await asyncio.to_thread(admin.get, base + path, timeout=10)
        assert form.status_code == 200, path
        assert suggestions(form.text) == names, path
        box_tag = re.search(rf'<input id="{box}"[^>]*>', form.text)
        assert box_tag is not None, path
        assert 'list="event-names"' in box_tag.group(0), path
    # A row added to the funnel (the form posted back) keeps the suggestions on every box.
    form = await asyncio.to_thread(admin.get, base + "/funnels/new", timeout=10)
    fields = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form.text))
    posted = await asyncio.to_thread(
        admin.post, base + "/funnels/new", data={**fields, "action": "add"}, timeout=10
    )
    assert posted.status_code == 200
    assert suggestions(posted.text) == names
    boxes = re.findall(r'<input id="s\d+-event_name"[^>]*>', posted.text)
    assert len(boxes) >= 3
    assert all('list="event-names"' in tag for tag in boxes)

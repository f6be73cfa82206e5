"""Segment's HTTP tracking API (what analytics.js, analytics-python, analytics-node... send) to
the contract. Pure: a parsed message in, steps out. The rule table is in docs/edge.md.

- `anonymousId` is an installation, `userId` a custom ID. A message with only `userId` is a
  server-side event of that identified profile; one with both is an event of the installation,
  after the login (Identify) it implies.
- `identify` logs in (when it has both IDs) and sets its traits: native attributes where the
  trait is native (email, phone, firstName...), custom otherwise.
- `alias(previousId, userId)` logs the installation `previousId` in with `userId` when
  `previousId` is an installation: the message's own `anonymousId`, or a UUID (what every
  Segment SDK generates as anonymous ID). Anything else is taken for a custom ID, and an alias
  between two custom IDs is refused (ALIAS_REFUSED): only an operator may merge two identified
  profiles.
- `track` is a custom event; `page` and `screen` are the custom events `page` and `screen` with
  the page's name as label; `group` sets the custom attribute `group_id` (group traits are
  dropped: the contract has no accounts).
- Each custom event carries where it happened and the campaign that brought the user:
  `context.page` as `page_url`, `page_path`, `page_referrer`, `page_title`, `page_search`
  (a `page` call's own `url`, `path`... properties are its page's, taken first), and
  `context.campaign` as `utm_source`, `utm_medium`, `utm_campaign`, `utm_term`,
  `utm_content`; a property of the same name wins, and they fill only the room the
  properties leave in the event's 20 attributes.
- `messageId` is the event ID; `timestamp` with `sentAt` gives skew correction; `context.app`,
  `context.os`, `context.device`, `context.locale` and `context.timezone` go to installation
  details; `context.ip` (or the connection's address) gives the session's country, never stored.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from profiles.common.v1 import types_pb2
from services.edge.backstop import backstop
from services.edge.build import (
    Details,
    Origin,
    StepBuilder,
    attribute_events,
    custom_event,
    derived_id,
    derived_session,
    event,
    identifier,
    ip_of,
    language_of,
    message_id,
    parse_time,
    rejection,
    summary,
    text,
    trait_operations,
)
from services.edge.names import normalize_name
from services.edge.platforms import platform_of
from services.edge.properties import add_page_context, custom_attributes
from services.edge.steps import RequestInvalid, Translation

DIALECT = "segment"
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
TYPES = frozenset({"track", "identify", "alias", "page", "screen", "group"})
_UUID = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)
_SUMMARY_KEYS = ("type", "messageId", "event", "name", "anonymousId", "userId", "timestamp")
# Segment's page fields (`context.page`; a page call's reserved properties) and campaign fields
# (`context.campaign`, which analytics.js fills from the page's utm_ query parameters, utm_campaign
# as `name`) as the shared page and campaign attributes (properties.add_page_context):
# (object, field, attribute).
CONTEXT_ATTRIBUTES = (
    ("page", "url", "page_url"),
    ("page", "path", "page_path"),
    ("page", "referrer", "page_referrer"),
    ("page", "title", "page_title"),
    ("page", "search", "page_search"),
    ("campaign", "source", "utm_source"),
    ("campaign", "medium", "utm_medium"),
    ("campaign", "name", "utm_campaign"),
    ("campaign", "term", "utm_term"),
    ("campaign", "content", "utm_content"),
)
PAGE_FIELDS = frozenset(field for kind, field, _ in CONTEXT_ATTRIBUTES if kind == "page")


def batch_of(body: Mapping[str, Any]) -> Sequence[Any]:
    """The messages of a /v1/batch body. Raises RequestInvalid when `batch` is missing or not
    a list: answered 400 rather than stored as nothing."""
    batch = body.get("batch")
    if not isinstance(batch, list):
        raise RequestInvalid("The body has no batch list")
    return batch


def translate_batch(
    body: Mapping[str, Any],
    now: datetime,
    client_ip: str = "",
    single_type: str = "",
    body_size: int | None = None,
) -> Translation:
    """The steps for a parsed request body: `/v1/batch` (`single_type` empty: the body's
    `batch` list) or a single-message endpoint such as `/v1/track` (`single_type` "track": the
    body is the message). `now` stands in for a missing timestamp. `body_size`, the size of the
    body as received: when it is within 32 KB no message can be over, and sizing each message
    is skipped."""
    check_size = body_size is None or body_size > MAX_MESSAGE_BYTES
    if single_type:
        messages: Sequence[Any] = [{**body, "type": single_type}]
        batch_sent = None
        batch_context: Mapping[str, Any] = {}
    else:
        messages = batch_of(body)
        batch_sent = parse_time(body.get("sentAt"))
        context = body.get("context")
        batch_context = context if isinstance(context, dict) else {}
    builder = StepBuilder(DIALECT)
    for message in messages:
        with backstop(builder, message, id_key="messageId", installation_key="anonymousId"):
            _translate(builder, message, now, batch_sent, batch_context, client_ip, check_size)
    return Translation(
        steps=builder.finish(), message_count=len(messages), failures=tuple(builder.failures)
    )


def _translate(
    builder: StepBuilder,
    message: Any,
    now: datetime,
    batch_sent: datetime | None,
    batch_context: Mapping[str, Any],
    connection_ip: str,
    check_size: bool = True,
) -> None:
    if not isinstance(message, dict):
        builder.reject(rejection("MESSAGE_INVALID", "a message is not a JSON object", {}))
        return
    kind = message.get("type")
    event_id = message_id(message.get("messageId"), "segment", message)
    installation_id = identifier(message.get("anonymousId"))
    custom_id = identifier(message.get("userId"))

    def refuse(reason: str, explanation: str, kept: Mapping[str, Any] | None = None) -> None:
        builder.reject(
            rejection(
                reason,
                explanation,
                message if kept is None else kept,
                event_id,
                installation_id,
                custom_id if not installation_id else "",
            )
        )

    # In UTF-8 bytes, as analytics-node measures it (an "é" is 2 bytes, not the 6 of "\u00e9").
    size = _utf8_size(message) if check_size else 0
    if size > MAX_MESSAGE_BYTES:
        refuse("MESSAGE_TOO_LARGE", f"{size} bytes, over 32 KB", summary(message, _SUMMARY_KEYS))
        return
    if not isinstance(kind, str) or kind not in TYPES:
        refuse("MESSAGE_TYPE_UNKNOWN", f"unknown message type {str(kind)[:40]!r}")
        return
    context = message.get("context")
    context = {**batch_context, **context} if isinstance(context, dict) else batch_context
    event_time = parse_time(message.get("timestamp") or message.get("originalTimestamp"))
    # The message's own time goes with the device's send time, for ingest's skew correction;
    # the edge's clock, when the message has no time, with none: it would shift it by the
    # device's skew.
    send_time = parse_time(message.get("sentAt")) or batch_sent
    if event_time is None:
        if message.get("timestamp") is not None:
            refuse("TIMESTAMP_INVALID", "timestamp is not an ISO 8601 time")
            return
        event_time, send_time = now, None
    platform = platform_of(
        _get(context, "os", "name"),
        _get(context, "library", "name"),
        types_pb2.PLATFORM_API,
    )

    if kind == "alias":
        _alias(builder, message, event_id, installation_id, custom_id, refuse)
        return
    if not installation_id and not custom_id:
        refuse("ORIGIN_MISSING", "neither anonymousId nor userId")
        return
    if installation_id and custom_id:
        builder.identify(installation_id, custom_id, derived_id("identify", event_id))
    origin = Origin(installation_id, custom_id, platform, event_time, send_time)
    builder.details(origin, _details(context))
    ip = ip_of(context.get("ip")) or connection_ip
    # Ingest derives the session (30 minutes without events): see build.py.
    session = derived_session(origin, ip)

    if kind == "identify":
        traits = message.get("traits")
        if not isinstance(traits, dict):
            traits = _get(context, "traits") or {}
        operations, unusable = trait_operations(traits)
        if unusable:
            refuse("TRAIT_NAME_UNUSABLE", f"no usable name in trait(s) {unusable[:5]}")
            return
        if operations:
            builder.add(*attribute_events(event_id, origin, operations))
        return
    if kind == "group":
        group_id = identifier(message.get("groupId"))
        if not group_id:
            refuse("GROUP_ID_MISSING", "group without groupId")
            return
        one = event(event_id, origin)
        operation = one.attribute_operations.operations.add(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET, custom_attribute="group_id"
        )
        operation.value.string_value = group_id
        builder.add(one)
        return

    properties = message.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    page = _get(context, "page")
    page = page if isinstance(page, dict) else {}
    if kind == "page":
        # A page call's reserved properties (url, path, referrer, title, search: Segment's
        # spec) describe its page, as context.page does (analytics.js sends both, alike): they
        # are taken as its page fields, first, not also kept as `url`, `path`...; a page event
        # then says `page_url` like any other event. A non-text one stays a property.
        own = {k: v for k, v in properties.items() if k in PAGE_FIELDS and isinstance(v, str)}
        page = {**page, **own}
        properties = {k: v for k, v in properties.items() if k not in own}
    label = ""
    if kind == "track":
        raw_name = message.get("event")
        name = normalize_name(raw_name) if isinstance(raw_name, str) else None
        if name is None:
            refuse("NAME_UNUSABLE", "the event name has no usable character")
            return
    else:
        name = str(kind)  # page, screen
        label = text(message.get("name")) or text(properties.get("name"))
    attributes = custom_attributes(properties)
    if attributes.unusable:
        refuse("PROPERTY_NAME_UNUSABLE", f"no usable name in {attributes.unusable[:5]}")
        return
    campaign = _get(context, "campaign")
    add_context_attributes(attributes.values, page, campaign if isinstance(campaign, dict) else {})
    builder.add(custom_event(event_id, origin, session, name, attributes.values, label))


def add_context_attributes(
    values: dict[str, types_pb2.AttributeValue],
    page: Mapping[str, Any],
    campaign: Mapping[str, Any],
) -> None:
    """Adds the page and campaign fields to an event's attributes (`values`, its properties'),
    by the rule every dialect shares (properties.add_page_context: a property of the same name
    wins, and they fill only the room the properties leave)."""
    fields = {
        attribute: (page if kind == "page" else campaign).get(field)
        for kind, field, attribute in CONTEXT_ATTRIBUTES
    }
    add_page_context(values, fields)


def _alias(
    builder: StepBuilder,
    message: Mapping[str, Any],
    event_id: str,
    installation_id: str,
    custom_id: str,
    refuse: Any,
) -> None:
    # analytics-swift's alias() sends the user's previous userId as previousId, none when the
    # user was anonymous: the previous ID is then the message's own anonymousId, as
    # analytics.js and analytics-kotlin send it.
    previous = identifier(message.get("previousId")) or identifier(message.get("anonymousId"))
    if not previous or not custom_id:
        refuse("ALIAS_INVALID", "alias needs previousId and userId")
        return
    if previous == installation_id or _UUID.fullmatch(previous):
        builder.identify(previous, custom_id, derived_id("identify", event_id))
        return
    refuse(
        "ALIAS_REFUSED",
        "alias between two custom IDs: only an operator may merge identified profiles",
    )


def _details(context: Mapping[str, Any]) -> Details:
    return Details(
        app_version=text(_get(context, "app", "version")),
        os_version=text(_get(context, "os", "version")),
        device_model=text(_get(context, "device", "model")),
        push_token=text(_get(context, "device", "token")),
        language=language_of(context.get("locale")),
        timezone=text(context.get("timezone")),
    )


def _get(mapping: Mapping[str, Any], *path: str) -> Any:
    value: Any = mapping
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _utf8_size(message: Any) -> int:
    text = json.dumps(message, separators=(",", ":"), ensure_ascii=False, default=str)
    return len(text.encode("utf-8", "surrogatepass"))


def browser_settings(write_key: str, api_host: str, protocol: str) -> dict[str, Any]:
    """What analytics.js 2.0 (analytics-next) loads before anything else, from
    `{cdnURL}/v1/projects/<writeKey>/settings` (Segment's CDN by default, where a Profiles key
    is unknown and the library then never loads): its Segment.io destination pointed at this
    edge (`api_host`: host, port and `/v1`), and nothing else to load (no other destination,
    middleware or plugin; no metrics sent back)."""
    return {
        "integrations": {
            "Segment.io": {"apiKey": write_key, "apiHost": api_host, "protocol": protocol}
        },
        "plan": {},
        "edgeFunction": {},
        "analyticsNextEnabled": True,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0},
        "legacyVideoPluginsEnabled": False,
        "remotePlugins": [],
    }

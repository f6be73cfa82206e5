"""PostHog's capture API (what posthog-python, posthog-js, posthog-node... send) to the
contract. Pure: a parsed body in, steps out. The rule table is in docs/edge.md.

- The installation is `$device_id` when the SDK sends one (posthog-js; the mobile SDKs send it
  to /flags only, never on events), else `distinct_id`; but `distinct_id` when the event says
  it is anonymous and differs from `$device_id` (posthog-js after reset()). Identified or
  anonymous: `$user_state`, else `$is_identified` (what posthog-js sends; see
  identified_state). The custom ID is `distinct_id` when the event says it is identified
  (then the event implies a login of the installation), and on the logins below.
- A personless event (`$process_person_profile` false) of a server library is rejected
  (PERSONLESS_EVENT) and listed: its distinct_id names no device, and would make a profile per
  event. A device's personless events are its installation's, like any other.
- Logins: `$identify` logs the installation `$anon_distinct_id` (else `$device_id`, else
  `distinct_id` itself) in with `distinct_id`; `$create_alias` (posthog-python's `alias()`) logs
  the installation `distinct_id` in with `properties.alias`. A login also logs the custom ID in
  as an installation of its own, so that later events a server SDK sends under that distinct_id
  land on the identified profile without the edge keeping any state.
- `$set` and `$set_once`, at top level or in `properties`, set attributes (native where native,
  custom otherwise); `$unset` (a list of names) unsets them.
- SDK-internal events (SDK_INTERNAL_EVENTS: flag calls, web vitals, heatmap data, opt-in
  bookkeeping...) record no action of the user: dropped (counted in Translation.ignored), but
  for the `$set` / `$set_once` / `$unset` they carry (posthog-js puts its initial person
  properties on the first event it sends, whichever it is). `$groupidentify` describes a group,
  not a person: dropped whole, making no profile (posthog-python's `group_identify()` sends it
  under a new random distinct_id per call).
- `$groups` (`{"company": "acme"}`, on every event after posthog-js's `group()`, or
  posthog-python's `capture(groups=...)`) sets the person's custom attributes `group_<type>` =
  key, as Segment's `group` sets `group_id`: once a day while unchanged (group_operations).
- Every other event is a custom event, its name normalized (`$pageview` -> `pageview`,
  `$screen` -> `screen`, with `$screen_name` as label), with the page and campaign attributes
  every dialect shares (page_fields: `$current_url` as `page_url`, `$pathname` as `page_path`,
  `$referrer` as `page_referrer`, `utm_source`...; properties.add_page_context);
  the autocapture events (`$autocapture`, `$rageclick`, `$dead_click`...) get what was clicked
  as attributes (element_attributes) and its text as label;
  `$`-prefixed properties are PostHog's own: `$os` (the mobile SDKs' `$os_name`), `$lib` give
  the platform, `$app_version`, `$os_version`, `$device_model`, `$locale`, `$timezone`
  installation details, `$ip` the session's country (never stored); the rest are dropped.
- `uuid` is the event ID; `timestamp` with `sent_at` gives skew correction; `$session_id` is the
  session (else a derived one, see services/edge/build.py).
- Push tokens: PostHog's mobile SDKs (posthog-ios, posthog-android, posthog-react-native,
  posthog-flutter) register the device token with `POST /api/push_subscriptions/`, a JSON body
  of `api_key`, `distinct_id`, `device_token`, `platform` ("ios" or "android") and `app_id`,
  and unregister it with `DELETE` and the same body: the token (or its removal) goes to the
  installation `distinct_id`, with the platform given (`translate_push_subscription`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

from profiles.common.v1 import types_pb2
from profiles.ingest.v1 import ingest_service_pb2 as ingest_pb
from services.edge.backstop import backstop
from services.edge.build import (
    NO_SESSION,
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
    text,
    trait_operations,
)
from services.edge.names import normalize_name
from services.edge.platforms import platform_of
from services.edge.properties import add_page_context, custom_attributes
from services.edge.steps import RequestInvalid, Translation
from shared.contract_limits import (
    MAX_ATTRIBUTES_PER_EVENT,
    MAX_LIST_ITEMS,
    MAX_STRING_LENGTH,
    MAX_URL_LENGTH,
)

DIALECT = "posthog"
MAX_REQUEST_BYTES = 5 * 1024 * 1024
LOGIN_EVENTS = frozenset({"$identify", "$create_alias"})
ATTRIBUTE_ONLY_EVENTS = frozenset({"$set", "$set_once"})
# Properties PostHog's SDKs put beside the user's without a `$`: dropped like the `$` ones.
SDK_OWN_PROPERTIES = frozenset({"token", "distinct_id", "alias"})
# What posthog-js sends as distinct_id and $session_id in cookieless mode.
COOKIELESS_SENTINEL = "$posthog_cookieless"
# Events PostHog's SDKs send about themselves, which record no action of the user (posthog-js
# 1.449's source): stored as custom events they only inflated the Events counter. Dropped, but
# for the attribute operations they may carry.
SDK_INTERNAL_EVENTS = frozenset(
    {
        "$feature_flag_called",  # a flag was evaluated (posthog-js, posthog-python, posthog-node)
        "$web_vitals",  # page performance metrics
        "$$heatmap",  # heatmap data: pointer positions for PostHog's heatmaps
        "$opt_in",  # opt_in_capturing()'s bookkeeping
        "$snapshot",  # session recording data
        "$$client_ingestion_warning",  # the SDK's own rate limiter dropped events
        "$web_experiment_applied",  # the SDK applied a web experiment's variant
        "$bot_pageview",  # a bot's page view (posthog-js's bot detection), not a person's
        "$conversations_loaded",  # the conversations API or widget finished loading
        "$conversations_widget_loaded",
    }
)
# A group's own event (its properties in `$group_set`): no person's, and the contract has no
# groups (as Segment's group traits, dropped).
GROUP_IDENTIFY = "$groupidentify"
# posthog-js's autocapture events: what was clicked (or changed, submitted, copied) is in
# `$elements` / `$elements_chain`, `$el_text` and `$event_type`, all `$` properties.
ELEMENT_EVENTS = frozenset(
    {"$autocapture", "$rageclick", "$dead_click", "$dead_swipe", "$copy_autocapture"}
)
# PostHog's page properties, as the shared page attributes (properties.add_page_context).
# posthog-js puts `$current_url`, `$pathname` (and `$host`, dropped: no other SDK says it) on
# every event, and `$referrer`, the session's document.referrer, `$direct` for none.
PAGE_PROPERTIES = {
    "$current_url": "page_url",
    "$pathname": "page_path",
    "$referrer": "page_referrer",
    "$title": "page_title",
}
DIRECT_REFERRER = "$direct"
# The UTM parameters posthog-js registers for the session (getCampaignParams; it also sends
# gclid, fbclid... which stay ordinary properties): the shared campaign attributes' own names.
CAMPAIGN_PROPERTIES = ("utm_source", "utm_medium", "utm_campaign", "utm_term", "utm_content")
# PostHog's own limit of group types per project; more in one event are ignored.
MAX_GROUPS = 5


def api_key_of(body: Any) -> str:
    """The project key: top-level `api_key` or `token`, else the first event's own `api_key`
    or `token`, else its `properties.token` (posthog-js). Raises RequestInvalid as
    messages_of does."""
    key = top_level_key(body)
    if key:
        return key
    for message in messages_of(body)[:1]:
        if not isinstance(message, dict):
            continue
        properties = message.get("properties")
        properties = properties if isinstance(properties, dict) else {}
        for value in (message.get("api_key"), message.get("token"), properties.get("token")):
            if isinstance(value, str) and value:
                return value
    return ""


def top_level_key(body: Any) -> str:
    """The key a body carries beside its events (`api_key` or `token`), or ""."""
    if isinstance(body, dict):
        for name in ("api_key", "token"):
            if isinstance(body.get(name), str) and body[name]:
                return str(body[name])
    return ""


def messages_of(body: Any) -> Sequence[Any]:
    """The events of a body: `{"batch": [...]}`, a list, or one event object. Raises
    RequestInvalid for an object that holds neither (a `batch` that is not a list, no
    `event`): answered 400 rather than stored as nothing."""
    if isinstance(body, list):
        return body
    if isinstance(body, dict):
        if "batch" in body:
            batch = body["batch"]
            if not isinstance(batch, list):
                raise RequestInvalid("batch is not a list of events")
            return batch
        if "event" in body:
            return [body]
    raise RequestInvalid("The body holds no events: expected a batch list or an event")


def query_send_time(value: str) -> datetime | None:
    """The send time posthog-js puts in the query string, `_` (epoch milliseconds; PostHog
    reads 11 digits or fewer as seconds): its only send time, as it sends no `sent_at`."""
    digits = value.strip()
    if not digits.isascii() or not digits.isdigit() or len(digits) > 16:
        return None
    number = int(digits)
    return parse_time(number if len(digits) > 11 else number * 1000)


def identified_state(properties: Mapping[str, Any]) -> bool | None:
    """Whether the SDK says its `distinct_id` is identified: `$user_state` ("identified" or
    "anonymous"), else `$is_identified` (a boolean, which posthog-js sends on every event and
    `$user_state` never); None when the message says neither (posthog-python, posthog-node)."""
    state = properties.get("$user_state")
    if state in ("identified", "anonymous"):
        return state == "identified"
    flag = properties.get("$is_identified")
    return flag if isinstance(flag, bool) else None


def translate(
    body: Any, now: datetime, client_ip: str = "", query_sent: datetime | None = None
) -> Translation:
    """The steps for a parsed request body of /batch/, /capture/, /e/ or /i/v0/e/;
    `query_sent` is the query string's send time (query_send_time), which wins over the body's
    `sent_at` as in PostHog's capture."""
    messages = messages_of(body)
    sent = query_sent or (parse_time(body.get("sent_at")) if isinstance(body, dict) else None)
    builder = StepBuilder(DIALECT)
    ignored = 0
    for message in messages:
        with backstop(builder, message, id_key="uuid", installation_key="distinct_id"):
            if _translate(builder, message, now, sent, client_ip) is IGNORED:
                ignored += 1
    return Translation(
        steps=builder.finish(),
        message_count=len(messages),
        failures=tuple(builder.failures),
        ignored=ignored,
    )


# What _translate returns for a message it dropped as the SDK's own (SDK_INTERNAL_EVENTS,
# GROUP_IDENTIFY), for the count of Translation.ignored.
IGNORED = "ignored"


def _translate(
    builder: StepBuilder, message: Any, now: datetime, sent: datetime | None, connection_ip: str
) -> str | None:
    if not isinstance(message, dict):
        builder.reject(rejection("MESSAGE_INVALID", "an event is not a JSON object", {}))
        return None
    properties = message.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    name_text = message.get("event")
    event_id = message_id(message.get("uuid"), "posthog", message)
    distinct_id = identifier(message.get("distinct_id") or properties.get("distinct_id"))
    device_id = identifier(properties.get("$device_id"))
    installation_id = device_id or distinct_id
    identified = identified_state(properties)
    if identified is False and device_id and distinct_id != device_id:
        # posthog-js after reset() (a logout): a new anonymous distinct_id on the same
        # $device_id. Kept on the device's installation, the logged-out visitor's events would
        # land on the profile that just logged out; as a new installation they start a new
        # anonymous profile, which the next $identify (its $anon_distinct_id) merges.
        installation_id = distinct_id
    custom_id = ""
    if identified and distinct_id != installation_id:
        custom_id = distinct_id

    def refuse(reason: str, explanation: str) -> None:
        builder.reject(rejection(reason, explanation, message, event_id, installation_id or "", ""))

    if not isinstance(name_text, str) or not name_text:
        refuse("NAME_UNUSABLE", "the event has no name")
        return None
    internal = name_text in SDK_INTERNAL_EVENTS
    if name_text == GROUP_IDENTIFY or (internal and not _carries_operations(message, properties)):
        # Nothing of the user's: no step at all, so no profile is made for it either.
        return IGNORED
    if not distinct_id:
        refuse("ORIGIN_MISSING", "no distinct_id")
        return None
    if name_text == "$merge_dangerously":
        # Two people's profiles joined on a client's say: only an operator merges identified
        # profiles (MergeProfiles), as for an alias between two custom IDs.
        refuse("ALIAS_REFUSED", "$merge_dangerously: only an operator merges profiles")
        return None
    if COOKIELESS_SENTINEL in (distinct_id, text(properties.get("$session_id"))):
        # posthog-js's cookieless mode asks the server to make the visitor's IDs up; taken as
        # an ID, it would make every visitor of the site one installation and one session.
        refuse("COOKIELESS_UNSUPPORTED", "cookieless mode: the event carries no visitor ID")
        return None
    event_time = parse_time(message.get("timestamp"))
    # The message's own time goes with the device's send time, for ingest's skew correction;
    # the edge's clock, when the message has no time, with none: it would shift it by the
    # device's skew.
    send_time = parse_time(message.get("sent_at")) or sent
    if event_time is None:
        if message.get("timestamp") is not None:
            refuse("TIMESTAMP_INVALID", "timestamp is not an ISO 8601 time")
            return None
        event_time, send_time = now, None
    # posthog-js names the OS `$os`; the mobile SDKs (posthog-ios, posthog-android,
    # posthog-react-native, posthog-flutter) `$os_name`. A cross-platform library's name tells
    # no platform, so without `$os_name` a React Native or Flutter app read as a server library.
    os_name = properties.get("$os") or properties.get("$os_name")
    platform = platform_of(os_name, properties.get("$lib"), types_pb2.PLATFORM_API)
    request_id = derived_id("identify", event_id)
    if (
        properties.get("$process_person_profile") is False
        and platform == types_pb2.PLATFORM_API
        and name_text not in LOGIN_EVENTS
    ):
        # A personless event of a server library (posthog-python's capture() without a
        # distinct_id makes one up, a new one per call): PostHog creates no person for it, and
        # its distinct_id names no device. Stored on an installation of that ID it would make a
        # new anonymous profile per event; it is kept, listed, on no profile. A device's
        # personless events (posthog-js's default before identify) are its installation's.
        refuse("PERSONLESS_EVENT", "$process_person_profile false: a server event of no one")
        return None

    if name_text == "$identify":
        anonymous = identifier(properties.get("$anon_distinct_id")) or device_id or distinct_id
        installation_id, custom_id = anonymous, distinct_id
        builder.identify(anonymous, distinct_id, request_id)
        if anonymous != distinct_id:
            _identify_self(builder, distinct_id, event_id, event_time, send_time)
    elif name_text == "$create_alias":
        alias = identifier(properties.get("alias"))
        if not alias:
            refuse("ALIAS_INVALID", "$create_alias without alias")
            return None
        if identified:
            # posthog-js's alias() of a user already identified: a second custom ID for one
            # person, which a profile cannot hold (Identify would move the browser to a new
            # profile). Only an operator merges identified profiles, as for Segment's alias.
            refuse("ALIAS_REFUSED", "the distinct_id is already identified: alias refused")
            return None
        installation_id, custom_id = distinct_id, alias
        builder.identify(distinct_id, alias, request_id)
        _identify_self(builder, alias, event_id, event_time, send_time)
    elif custom_id:
        builder.identify(installation_id, custom_id, request_id)

    origin = Origin(installation_id, "", platform, event_time, send_time)
    activity = (
        name_text not in LOGIN_EVENTS and name_text not in ATTRIBUTE_ONLY_EVENTS and not internal
    )
    session = NO_SESSION
    if activity:
        # Logins and $set calls often come from a server SDK on the user's behalf: they are not
        # the device's activity, so neither its details nor a session come from them.
        if platform != types_pb2.PLATFORM_API:
            # A server library's $os and $os_version describe the server (posthog-python sets
            # them to its host's), not the user's device.
            builder.details(origin, _details(properties))
        ip = ip_of(message.get("ip")) or ip_of(properties.get("$ip")) or connection_ip
        sdk_session = text(properties.get("$session_id"))[:64]
        if sdk_session:
            session = builder.session(origin, sdk_session, ip)
        else:  # ingest derives it (30 minutes without events): see build.py
            session = derived_session(origin, ip)

    operations = []
    for key, kind in (
        ("$set", types_pb2.ATTRIBUTE_OPERATION_KIND_SET),
        ("$set_once", types_pb2.ATTRIBUTE_OPERATION_KIND_SET_ONCE),
    ):
        for source in (message.get(key), properties.get(key)):
            if isinstance(source, dict):
                found, unusable = trait_operations(source, kind)
                if unusable:
                    refuse("PROPERTY_NAME_UNUSABLE", f"no usable name in {unusable[:5]}")
                    return None
                operations.extend(found)
    unset = properties.get("$unset") or message.get("$unset")
    if isinstance(unset, list):
        found, _ = trait_operations(dict.fromkeys(str(u) for u in unset))
        operations.extend(found)
    if operations:
        builder.add(*attribute_events(derived_id("attrs", event_id), origin, operations))
    groups = group_operations(properties.get("$groups"))
    if groups:
        # Every event after posthog-js's group() repeats them: stored once a day while
        # unchanged, as installation details are (docs/edge.md).
        day = event_time.date().isoformat()
        content = [op.SerializeToString(deterministic=True).hex() for op in groups]
        groups_id = derived_id("groups", installation_id, *content, day)
        builder.add(*attribute_events(groups_id, origin, groups))
    if not activity:
        return IGNORED if internal else None

    if name_text == "$exception":
        # posthog-js's exception autocapture (and captureException): a crash of the app.
        crash = event(event_id, origin, session)
        crash.crash.CopyFrom(exception_crash(properties))
        builder.add(crash)
        return None
    name = normalize_name(name_text)
    if name is None:
        refuse("NAME_UNUSABLE", "the event name has no usable character")
        return None
    page, taken = page_fields(name_text, properties)
    attributes = custom_attributes(
        {k: v for k, v in properties.items() if k not in SDK_OWN_PROPERTIES and k not in taken}
    )
    if attributes.unusable:
        refuse("PROPERTY_NAME_UNUSABLE", f"no usable name in {attributes.unusable[:5]}")
        return None
    label = text(properties.get("$screen_name")) if name_text == "$screen" else ""
    if name_text in ELEMENT_EVENTS:
        clicked = element_attributes(properties)
        # The edge's own attributes never push an event over the contract's 20 (the user's
        # own properties, data-ph-capture-attribute-*, win a name they share).
        for key, value in clicked.items():
            if key not in attributes.values and len(attributes.values) < MAX_ATTRIBUTES_PER_EVENT:
                attributes.values[key] = value
        if "text" in clicked:
            label = clicked["text"].string_value
    add_page_context(attributes.values, page)
    builder.add(custom_event(event_id, origin, session, name, attributes.values, label))
    return None


def page_fields(event_name: str, properties: Mapping[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """An event's page and campaign fields under the names every dialect gives them
    (properties.add_page_context: `page_url`...), and the properties they were taken from, which
    are not also kept as attributes of their own. `$current_url`, `$pathname`, `$referrer`
    (posthog-js's `$direct`, no referrer, is none) and `$title` (PAGE_PROPERTIES); the text
    `utm_` properties (CAMPAIGN_PROPERTIES: posthog-js puts the landing page's UTM parameters on
    every event of the session, as analytics.js puts them in `context.campaign`); and a
    `$pageview`'s `title` (posthog-js's document.title), its page's title as a Segment page
    call's own `title` is. A non-text one stays an ordinary property."""
    fields: dict[str, Any] = {
        attribute: properties.get(key) for key, attribute in PAGE_PROPERTIES.items()
    }
    if fields["page_referrer"] == DIRECT_REFERRER:
        fields["page_referrer"] = None
    taken: set[str] = set()
    own = [*CAMPAIGN_PROPERTIES, *(("title",) if event_name == "$pageview" else ())]
    for key in own:
        value = properties.get(key)
        if isinstance(value, str):
            attribute = "page_title" if key == "title" else key
            fields[attribute] = fields.get(attribute) or value
            taken.add(key)
    return fields, taken


def _carries_operations(message: Mapping[str, Any], properties: Mapping[str, Any]) -> bool:
    """Whether a message sets or unsets person attributes (`$set`, `$set_once`, `$unset`, at
    top level or in `properties`)."""
    for source in (message, properties):
        for key in ("$set", "$set_once", "$unset"):
            value = source.get(key)
            if isinstance(value, dict | list) and value:
                return True
    return False


def group_operations(groups: Any) -> list[types_pb2.AttributeOperation]:
    """The custom attributes `$groups` sets: `group_<type>` = the group's key for each of its
    first MAX_GROUPS types (sorted), the name normalized as any property's (a type with no
    usable character, or a key that is no text or number, is skipped: a hint, never a reason
    to refuse the event)."""
    if not isinstance(groups, dict):
        return []
    operations = []
    for group_type in sorted(k for k in groups if isinstance(k, str))[:MAX_GROUPS]:
        key = groups[group_type]
        if isinstance(key, bool) or not isinstance(key, str | int | float):
            continue
        key_text = (key if isinstance(key, str) else json.dumps(key)).strip()[:MAX_STRING_LENGTH]
        name = normalize_name(f"group_{group_type}") if normalize_name(group_type) else None
        if name is None or not key_text:
            continue
        operation = types_pb2.AttributeOperation(
            kind=types_pb2.ATTRIBUTE_OPERATION_KIND_SET, custom_attribute=name
        )
        operation.value.string_value = key_text
        operations.append(operation)
    return operations


def element_attributes(properties: Mapping[str, Any]) -> dict[str, types_pb2.AttributeValue]:
    """What an autocapture event says was clicked (changed, submitted...), as attributes within
    the contract's limits, most telling first: `event_type` (`$event_type`: click, submit,
    change...), `text` (`$el_text`), `tag`, `href` (a URL when absolute), `element_id`,
    `classes` (a list) of the element (`$elements[0]`, else the first of `$elements_chain`,
    which posthog-js sends alone when its config says `elementsChainAsString`). The page is
    `page_url`, as on every event (page_fields)."""
    element = _first_element(properties)
    classes = element.get("classes")
    if not isinstance(classes, list):
        classes = text(element.get("attr__class")).split()
    values: dict[str, types_pb2.AttributeValue] = {}

    def put(name: str, value: Any) -> None:
        found = text(value) if isinstance(value, str) else ""
        if found:
            values[name] = types_pb2.AttributeValue(string_value=found[:MAX_STRING_LENGTH])

    put("event_type", properties.get("$event_type"))
    put("text", properties.get("$el_text") or element.get("$el_text") or element.get("text"))
    put("tag", element.get("tag_name"))
    href = text(element.get("attr__href") or element.get("href"))
    if href.startswith(("http://", "https://")) and len(href) <= MAX_URL_LENGTH and " " not in href:
        values["href"] = _url_value(href)
    else:
        put("href", href)
    put("element_id", element.get("attr__id"))
    names = [c.strip()[:MAX_STRING_LENGTH] for c in classes if isinstance(c, str) and c.strip()]
    if names:
        values["classes"] = types_pb2.AttributeValue(
            string_list_value=types_pb2.StringList(values=names[:MAX_LIST_ITEMS])
        )
    return values


def _first_element(properties: Mapping[str, Any]) -> Mapping[str, Any]:
    """The element an autocapture event names first (the one acted on): `$elements[0]`, else
    the first of `$elements_chain` read as posthog-js writes it; {} when it says neither."""
    elements = properties.get("$elements")
    if isinstance(elements, list) and elements and isinstance(elements[0], dict):
        return elements[0]
    chain = properties.get("$elements_chain")
    return chain_element(chain) if isinstance(chain, str) else {}


# posthog-js's elements chain (getElementsChainString): elements separated by `;`, each
# `tag.class1.class2:` then its attributes sorted by name, `name="value"` with `"` escaped as
# `\"`, e.g. `button.buy.primary:attr__class="buy primary"nth-child="2"nth-of-type="1"text="Buy"`.
_CHAIN_ATTRIBUTE = re.compile(r'([\w-]+)="((?:\\.|[^"\\])*)"')
_CHAIN_ATTRIBUTE_START = re.compile(r'[\w-]+="')
# What of a chain is read: its first element fits (text 400, href 2,048 characters).
MAX_CHAIN_READ = 8192


def chain_element(chain: str) -> dict[str, Any]:
    """The first element of an elements chain as `$elements` holds one (`tag_name`, `classes`,
    `attr__href`, `attr__id`, `text`...). Class names may hold `:` (Tailwind's `hover:...`),
    so the tag and classes end at the first `:` that attributes follow. Linear in the chain's
    length, which is cut to MAX_CHAIN_READ."""
    chain = chain[:MAX_CHAIN_READ]
    # The first element's tag and classes hold no `;` (nor quotes): a `:` past the first `;`
    # is another element's.
    head_end = chain.find(";")
    start = -1
    position = chain.find(":")
    while position != -1 and (head_end == -1 or position < head_end):
        if _CHAIN_ATTRIBUTE_START.match(chain, position + 1):
            start = position
            break
        position = chain.find(":", position + 1)
    if start == -1:
        return {}
    head = chain[:start].split(".")
    element: dict[str, Any] = {"tag_name": head[0], "classes": [c for c in head[1:] if c]}
    position = start + 1
    while match := _CHAIN_ATTRIBUTE.match(chain, position):
        name, value = match.group(1), match.group(2).replace('\\"', '"')
        element.setdefault(name, value)
        position = match.end()
    if "attr__class" in element:
        element["classes"] = text(element["attr__class"]).split()
    return element


def _identify_self(
    builder: StepBuilder,
    custom_id: str,
    event_id: str,
    event_time: datetime,
    send_time: datetime | None,
) -> None:
    """Logs the custom ID in as an installation of its own (see the module's docstring), with
    platform API: identity's Identify knows no platform, so an event of that installation says
    it (an installation update that changes nothing, its ID derived from the custom ID alone:
    stored once, the first time), sent only if identity accepted the login: a custom ID it
    refuses ("null") must not become an installation of an anonymous profile."""
    origin = Origin(custom_id, "", types_pb2.PLATFORM_API, event_time, send_time)
    platform = event(derived_id("details", custom_id, "identify-self"), origin)
    platform.installation_update.SetInParent()
    builder.identify(custom_id, custom_id, derived_id("identify-self", event_id), (platform,))


# A crash's stack trace is kept to this many characters (the event must stay under ingest's
# 32 KiB).
MAX_STACK_CHARACTERS = 16_000


def exception_crash(properties: Mapping[str, Any]) -> ingest_pb.Crash:
    """A `$exception` as a crash: the first exception's `type` the name (else the older
    `$exception_type`), its `value` the reason (else `$exception_message`), every exception of
    `$exception_list` with its frames, newest first, the stack trace; fatal when the first was
    not handled (`mechanism.handled` false), as an uncaught error is."""
    exceptions = properties.get("$exception_list")
    listed = [e for e in exceptions if isinstance(e, dict)] if isinstance(exceptions, list) else []
    first = listed[0] if listed else {}
    name = text(first.get("type")) or text(properties.get("$exception_type")) or "Error"
    reason = text(first.get("value")) or text(properties.get("$exception_message"))
    mechanism = first.get("mechanism")
    handled = mechanism.get("handled") if isinstance(mechanism, dict) else None
    lines: list[str] = []
    for exception in listed:
        lines.append(f"{text(exception.get('type')) or 'Error'}: {text(exception.get('value'))}")
        stack = exception.get("stacktrace")
        frames = stack.get("frames") if isinstance(stack, dict) else None
        for frame in reversed(frames if isinstance(frames, list) else []):
            if isinstance(frame, dict):
                where = ":".join(
                    str(frame[k])
                    for k in ("filename", "lineno", "colno")
                    if isinstance(frame.get(k), str | int) and not isinstance(frame[k], bool)
                )
                lines.append(f"    at {text(frame.get('function')) or '?'} ({where})")
    return ingest_pb.Crash(
        name=name[:300],
        reason=reason[:300],
        stack_trace="\n".join(lines)[:MAX_STACK_CHARACTERS],
        fatal=handled is False,
    )


def _url_value(url: str) -> types_pb2.AttributeValue:
    return types_pb2.AttributeValue(url_value=url)


def _details(properties: Mapping[str, Any]) -> Details:
    return Details(
        app_version=text(properties.get("$app_version")),
        os_version=text(properties.get("$os_version")),
        device_model=text(properties.get("$device_model")),
        language=language_of(properties.get("$locale") or properties.get("$browser_language")),
        timezone=text(properties.get("$timezone")),
    )


# PostHog's push subscription platforms (its API refuses any other with 400).
PUSH_PLATFORMS = {"ios": types_pb2.PLATFORM_IOS, "android": types_pb2.PLATFORM_ANDROID}


@dataclass(frozen=True, slots=True)
class PushSubscription:
    """A push subscription request's fields (`device_token` is a secret: never logged)."""

    distinct_id: str
    device_token: str = field(repr=False)
    platform: int
    app_id: str


def push_subscription_of(body: Any) -> PushSubscription:
    """The fields of a push subscription body. Raises RequestInvalid (400, as PostHog answers)
    without `distinct_id`, `device_token`, `platform` or `app_id`, or with another platform
    than "ios" or "android"."""
    if not isinstance(body, dict):
        raise RequestInvalid("The body is not a JSON object")
    fields = {name: text(body.get(name)) for name in ("distinct_id", "device_token", "app_id")}
    platform = text(body.get("platform"))
    missing = [name for name, value in {**fields, "platform": platform}.items() if not value]
    if missing:
        raise RequestInvalid(f"Missing required fields: {', '.join(missing)}")
    if platform not in PUSH_PLATFORMS:
        raise RequestInvalid(f"Invalid platform {platform[:20]!r}: expected ios or android")
    return PushSubscription(
        identifier(body.get("distinct_id")),
        fields["device_token"],
        PUSH_PLATFORMS[platform],
        fields["app_id"],
    )


def translate_push_subscription(
    subscription: PushSubscription, now: datetime, *, register: bool
) -> Translation:
    """The InstallationUpdate of a push subscription: `register` (POST) sets the token with
    opt-in on the installation `distinct_id`, else (DELETE) clears it. The event ID is derived
    from the request's content and the UTC day, so a retried request is stored once, and the
    same registration sent at every launch once a day."""
    origin = Origin(subscription.distinct_id, "", subscription.platform, now, None)
    event_id = derived_id(
        "push" if register else "unpush",
        subscription.distinct_id,
        subscription.device_token,
        subscription.app_id,
        now.date().isoformat(),
    )
    update = event(event_id, origin)
    update.installation_update.push_token = subscription.device_token if register else ""
    update.installation_update.push_opt_in = register
    builder = StepBuilder(DIALECT)
    builder.add(update)
    return Translation(steps=builder.finish(), message_count=1)


def remote_config(token: str) -> dict[str, Any]:
    """posthog-js's remote config (`/array/<token>/config`, and as a script `config.js`), which
    it asks for on every page load: what this edge offers. Autocapture on (the SDK's default);
    no feature flags (so posthog-js does not ask `/flags/` too), no session recording,
    heatmaps, surveys or site apps; both gzip encodings read."""
    return {
        "token": token,
        "supportedCompression": ["gzip", "gzip-js"],
        "hasFeatureFlags": False,
        "sessionRecording": False,
        "heatmaps": False,
        "surveys": False,
        "autocaptureExceptions": False,
        "captureDeadClicks": False,
        # posthog-js autocaptures clicks only once the server says `autocapture_opt_out`
        # false (Autocapture.isEnabled: no answer, or no key, keeps it off).
        "autocapture_opt_out": False,
        "siteApps": [],
    }


def remote_config_script(token: str) -> str:
    """The script form: it files the config under its token where posthog-js looks for it."""
    config = json.dumps({"config": remote_config(token), "siteApps": []})
    key = json.dumps(token)
    return (
        "(function(){var w=window;w._POSTHOG_REMOTE_CONFIG=w._POSTHOG_REMOTE_CONFIG||{};"
        f"w._POSTHOG_REMOTE_CONFIG[{key}]={config};}})();"
    )


# The longest `/static/` path and query sent on (posthog-js's are a few dozen characters).
MAX_ASSET_PATH = 512


def asset_location(asset_url: str, path: str, query: str) -> str:
    """Where `GET /static/<path>?<query>` is redirected: the same path and query on the asset
    host (posthog-js adds `?v=<version>`), the path percent-encoded again, both cut to
    MAX_ASSET_PATH."""
    location = f"{asset_url}/static/{quote(path[:MAX_ASSET_PATH], safe='/')}"
    return f"{location}?{query[:MAX_ASSET_PATH]}" if query else location


# What `/flags/` (and the older `/decide/`) answer: no flag is defined here.
NO_FLAGS: dict[str, Any] = {
    "flags": {},
    "featureFlags": {},
    "featureFlagPayloads": {},
    "errorsWhileComputingFlags": False,
}

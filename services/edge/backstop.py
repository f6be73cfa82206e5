"""The backstop of every translator: a message it fails on costs that message alone.

Translators are pure code over free-form SDK input, and an input nobody foresaw may still reach
a bug (a Python limit, a type no rule expected). Raised out of the translator, it would be a 500
for the whole request: the good messages around it lost, and the SDK resending the same request
forever (Countly's SDKs hold back their whole queue behind it). So each message (a Segment or
PostHog message; a Countly request, and each event in it) is translated under `backstop`: an
unexpected exception is kept for the handler, which logs it with its traceback and counts it
(`profiles_edge_translation_failures_total`), and the message is rejected and listed as
TRANSLATION_FAILED, as a message the translator refuses is; the request is answered as one
holding a refused message is (200). What the message produced before the failure stays, as when
a translator refuses a message part-way (a login before an unusable trait): a retry of the same
request fails the same way, so it is stored the same way.

RequestInvalid (the whole request refused, by design) passes, as do the BaseExceptions that are
no error of the message (CancelledError, KeyboardInterrupt).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol

from services.edge.build import MAX_ID_LENGTH, derived_id, identifier
from services.edge.steps import SECRET_KEYS, Reject, RequestInvalid

TRANSLATION_FAILED = "TRANSLATION_FAILED"
# A text field of a failed message is kept to this many characters (a Countly request's
# `events` is JSON text of up to 1 MB).
KEPT_TEXT_CHARS = 1_000


class Output(Protocol):
    """What a translator builds a request's steps in (build.StepBuilder, Countly's _Output)."""

    failures: list[Exception]

    def reject(self, reject: Reject) -> None: ...


class backstop:  # lower-case, as contextlib.suppress: read as a verb in `with backstop(...)`
    """Runs the translation of `message` (the body of the `with`); an unexpected exception is
    added to `output.failures` and the message rejected in `output` (TRANSLATION_FAILED).
    `where` names the message in its request (`events[3]`); `id_key` is its field holding the
    SDK's message ID, `installation_key` its field naming the installation (else
    `installation_id`); `secrets` the field names never kept (lower-case). A class, not a
    contextlib generator: it runs once per message, and costs a third as much."""

    __slots__ = (
        "_id_key",
        "_installation",
        "_installation_key",
        "_message",
        "_output",
        "_secrets",
        "_where",
    )

    def __init__(
        self,
        output: Output,
        message: Any,
        *,
        where: str = "",
        id_key: str = "",
        installation_key: str = "",
        installation_id: str = "",
        secrets: frozenset[str] = SECRET_KEYS,
    ) -> None:
        self._output = output
        self._message = message
        self._where = where
        self._id_key = id_key
        self._installation_key = installation_key
        self._installation = installation_id
        self._secrets = secrets

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if exc is None or not isinstance(exc, Exception) or isinstance(exc, RequestInvalid):
            return False
        self._output.failures.append(exc)
        self._output.reject(self._rejection(exc))
        return True  # the exception is handled: the next message is translated

    def _rejection(self, exc: Exception) -> Reject:
        kept = _top_level_scalars(self._message, self._secrets)
        event_id = identifier(kept.get(self._id_key)) if self._id_key else ""
        installation = (
            identifier(kept.get(self._installation_key)) if self._installation_key else ""
        )
        installation = installation or self._installation
        if not event_id or len(event_id) > MAX_ID_LENGTH:
            event_id = derived_id("untranslated", installation, self._where, sorted(kept.items()))
        prefix = f"{self._where}: " if self._where else ""
        return Reject(
            reason=TRANSLATION_FAILED,
            explanation=(
                f"{prefix}the edge failed on this message ({type(exc).__name__}): "
                "a bug of the edge, logged with its traceback"
            ),
            message=kept,
            event_id=event_id,
            installation_id=installation,
        )


def _top_level_scalars(message: Any, secrets: frozenset[str]) -> dict[str, Any]:
    """The message's top-level scalar fields, texts cut, secrets left out: what failed may be
    the message's nesting (Python's recursion limit), which keeping it whole would meet again."""
    kept: dict[str, Any] = {}
    if not isinstance(message, Mapping):
        return kept
    for key, value in message.items():
        name = str(key)
        if name.lower() in secrets:
            continue
        if isinstance(value, str):
            kept[name] = value[:KEPT_TEXT_CHARS]
        elif value is None or isinstance(value, bool | int | float):
            kept[name] = value
    return kept

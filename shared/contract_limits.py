"""The contract's limits on what a client sends (ingest_service.proto and types.proto state
them; docs/ingest.md's table): written once, for ingest, which enforces them, and for its
clients in this suite (the edge), which shape what they send to fit them (an attribute ingest
would refuse travels alone, a page attribute is cut to a string's length...)."""

from __future__ import annotations

MAX_EVENTS_PER_REQUEST = 1000
MAX_REQUEST_BYTES = 4 * 1024 * 1024
MAX_EVENT_BYTES = 32 * 1024
MAX_EVENT_ID_LENGTH = 64
MAX_INSTALLATION_ID_LENGTH = 128
MAX_CUSTOM_ID_LENGTH = 512
MAX_SESSION_ID_LENGTH = 64
MAX_ATTRIBUTES_PER_EVENT = 20
MAX_OPERATIONS_PER_EVENT = 20
MAX_CUSTOM_ATTRIBUTES_PER_PROFILE = 50
MAX_STRING_LENGTH = 300
MAX_LABEL_LENGTH = 200
MAX_URL_LENGTH = 2048
MAX_LIST_ITEMS = 25
MAX_EMAIL_LENGTH = 254
MAX_VERSION_LENGTH = 64
MAX_DEVICE_MODEL_LENGTH = 128
MAX_PUSH_TOKEN_LENGTH = 4096
MAX_TOKENS_PER_REQUEST = 1000

-- Sessions ingest derives itself (Event.session_rule = SESSION_RULE_INACTIVITY,
-- services/ingest/derived_sessions.py) are told apart from the client's: that rule joins and
-- widens derived sessions only. Read contract for query: `derived`.
ALTER TABLE sessions ADD COLUMN derived boolean NOT NULL DEFAULT false;
-- What the session rules read under the installation's lock: its sessions active near a time.
CREATE INDEX sessions_by_installation_activity
    ON sessions (project_id, installation_id, last_activity_time);

-- Whether segments has seen the session's end: the SDK's end event, or the end ingest publishes
-- when its sweeper closes a session idle for 30 minutes. The engagement score's average
-- duration (score1: model.engagement, the custom segment filter's engagement condition, and
-- query's profile view) is taken over ended sessions only, as GetProfile's average session
-- duration is over ingest's closed sessions: an open session's length is not known yet (it
-- still counts in score2 and score3 from its start). Read contract for query: `ended`.
-- Rows stored before this column count as ended, which is how their durations were averaged
-- until then; one still open is updated by its end like any other.
ALTER TABLE segment_sessions ADD COLUMN ended boolean NOT NULL DEFAULT true;
ALTER TABLE segment_sessions ALTER COLUMN ended SET DEFAULT false;

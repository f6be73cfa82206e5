"""The edge: an HTTP gateway that translates Segment, PostHog and Countly SDK traffic into calls
of the gRPC contract (ingest's TrackEvents, identity's Identify and Logout)."""

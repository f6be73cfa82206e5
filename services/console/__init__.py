"""The web console: read-only pages over the suite's gRPC contract, for people in a browser."""

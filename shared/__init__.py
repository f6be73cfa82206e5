"""Common runtime of the Profiles suite: settings, logs, auth, database, bus, server bootstrap."""

"""The four services; each talks to the others only through gRPC stubs or the bus."""

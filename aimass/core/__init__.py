"""The foundation: configuration, the data contract (topics, record and table schemas), process
and server control, and store access. Everything here imports only the standard library,
third-party packages and other ``aimass.core`` modules."""

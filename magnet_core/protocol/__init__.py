"""The protocol: every message that crosses a site boundary, typed, with its record keys and version."""

"""Local stand-ins for external services we cannot reach in tests or local runs.

Production code reaches them only through a base-URL setting (e.g. ``ELEVENLABS_API_URL``); nothing
outside this package knows it is talking to an emulator.
"""

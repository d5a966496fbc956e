"""Small helpers to derive Postgres connection strings without string surgery at call sites."""

from __future__ import annotations

from urllib.parse import quote, urlsplit, urlunsplit


def with_user_and_database(
    dsn: str, *, user: str | None = None, database: str | None = None, password: str | None = None
) -> str:
    parts = urlsplit(dsn)
    netloc = parts.netloc
    userinfo, at, hostport = netloc.rpartition("@")
    if not at:
        hostport = netloc
        userinfo = ""
    old_user, _, old_password = userinfo.partition(":")
    new_user = quote(user) if user is not None else old_user
    new_password = (
        quote(password) if password is not None else (old_password if user is None else "")
    )
    auth = new_user + (f":{new_password}" if new_password else "")
    netloc = f"{auth}@{hostport}" if auth else hostport
    path = "/" + quote(database) if database is not None else parts.path
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


def redact(dsn: str) -> str:
    parts = urlsplit(dsn)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    netloc = f"{userinfo}@{hostport}" if at else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))

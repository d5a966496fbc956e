"""Locust users for voicerelay: browser callers, phone callers and control-API users.

    make loadtest                                   # a local stack, headless, bounded
    .venv/bin/locust -f loadtests/locustfile.py     # any target, see loadtests/README.md

What they load comes from ``LOADTEST_TARGET_FILE`` (written by ``loadtests.provision``) or the
``LOADTEST_*`` variables (loadtests/load_target.py). Calls report their own measurements as
locust requests: request type ``SIO`` (browser callers) or ``PHONE`` (phone callers), names
``connect`` / ``stream_open``, ``first_agent_audio``, ``round_trip``, ``turn_echo``,
``stale_frames`` and ``call`` (what each means: browser_caller.py and phone_caller.py). HTTP
requests keep locust's own names (``POST /v1/calls``, ``POST /v1/twilio/voice``, ...).

Per-call options: ``LOADTEST_TURNS`` (talk turns per call, default 3) and ``LOADTEST_TALK_MS``
(length of a turn, default 1000).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any, NoReturn

from locust import HttpUser, between, events, task
from locust.env import Environment
from locust.exception import StopUser

from loadtests.browser_caller import BrowserCall
from loadtests.call_report import CallOptions, Report
from loadtests.load_target import LoadTarget, TargetError, target_from_env
from loadtests.phone_caller import PhoneCall
from loadtests.twilio_webhook import CallRefused, parse_connect_stream, signed_inbound_call

log = logging.getLogger("loadtests")

VOICE_WEBHOOK = "/v1/twilio/voice"
# Refresh the control-API user's access token this long before it expires.
REFRESH_MARGIN_SECONDS = 60.0


class CallFailed(Exception):
    """A call's measurement failed; the message says how (shown in locust's failures)."""


class _State:
    target: LoadTarget | None = None
    # Why phone callers do not run (no phone target, or the stack has no phone endpoint yet).
    phone_skipped: str | None = None
    phone_skip_logged = False


def _target() -> LoadTarget:
    assert _State.target is not None, "the init listener loads the target"
    return _State.target


def call_options() -> CallOptions:
    return CallOptions(
        turns=int(os.environ.get("LOADTEST_TURNS", "3")),
        talk_ms=int(os.environ.get("LOADTEST_TALK_MS", "1000")),
    )


def reporter(environment: Environment, request_type: str) -> Report:
    def report(name: str, seconds: float, *, length: int = 0, error: str | None = None) -> None:
        environment.events.request.fire(  # type: ignore[no-untyped-call]
            request_type=request_type,
            name=name,
            response_time=seconds * 1000,
            response_length=length,
            exception=CallFailed(error) if error else None,
            context={},
        )

    return report


@events.init.add_listener  # type: ignore[untyped-decorator]
def _load_target(environment: Environment, **_: Any) -> None:
    try:
        _State.target = target_from_env(os.environ)
    except TargetError as exc:
        sys.exit(f"loadtests: {exc}")
    if _State.target.phone is None:
        _State.phone_skipped = "no phone target (LOADTEST_PHONE_NUMBER and the Twilio credential)"
    for user_class in environment.user_classes:
        if user_class.host is None:
            user_class.host = _State.target.api_url


@events.test_start.add_listener  # type: ignore[untyped-decorator]
def _probe_phone_endpoint(environment: Environment, **_: Any) -> None:
    """Phone callers need the control API's voice webhook: skip them cleanly without it."""
    if _State.phone_skipped is not None:
        return
    import httpx

    host = environment.host or _target().api_url
    try:
        paths = httpx.get(f"{host}/openapi.json", timeout=10).json().get("paths", {})
    except (httpx.HTTPError, ValueError):
        return  # the webhook itself will tell
    if VOICE_WEBHOOK not in paths:
        _State.phone_skipped = f"the control API at {host} has no {VOICE_WEBHOOK} yet"


def _skip_phone(reason: str) -> None:
    if _State.phone_skipped is None:
        _State.phone_skipped = reason


class BrowserCaller(HttpUser):
    """Creates a call (``POST /v1/calls``) and joins it like a browser (Socket.IO)."""

    weight = 3
    wait_time = between(1, 3)

    def on_start(self) -> None:
        self.client.headers["authorization"] = f"Bearer {_target().api_key}"

    @task
    def call(self) -> None:
        with self.client.post(
            "/v1/calls", json={"agent_id": _target().agent_id}, catch_response=True
        ) as answer:
            if answer.status_code != 201:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
                return
            token = answer.json()
        BrowserCall(reporter(self.environment, "SIO"), call_options()).run(
            token["relay_url"], token["token"]
        )


class PhoneCaller(HttpUser):
    """Gets its call as Twilio does (signed voice webhook, TwiML) and streams it."""

    weight = 2
    wait_time = between(1, 3)

    @task
    def call(self) -> None:
        phone = _target().phone
        if phone is None or _State.phone_skipped is not None:
            self._stop_skipped()
        call = signed_inbound_call(
            account_sid=phone.account_sid,
            auth_token=phone.auth_token,
            voice_url=phone.voice_url,
            to_number=phone.number,
        )
        with self.client.post(
            VOICE_WEBHOOK, data=call.form, headers=call.headers, catch_response=True
        ) as answer:
            if answer.status_code == 404:
                answer.success()  # not a failure of the stack under test: it has no phones
                _skip_phone(f"{VOICE_WEBHOOK} answered 404")
                self._stop_skipped()
            try:
                if answer.status_code != 200:
                    raise CallRefused(f"{answer.status_code}: {answer.text[:200]}")
                stream = parse_connect_stream(answer.text)
            except CallRefused as exc:
                answer.failure(str(exc))
                return
        stream_call = PhoneCall(
            reporter(self.environment, "PHONE"),
            call_options(),
            call_sid=call.call_sid,
            account_sid=phone.account_sid,
        )
        if not stream_call.run(stream):
            _skip_phone(f"the relay has no Media Streams endpoint at {stream.url}")
            self._stop_skipped()

    def _stop_skipped(self) -> NoReturn:
        # Raised from a task (not on_start, where locust logs it as an error): a quiet stop.
        if not _State.phone_skip_logged:
            _State.phone_skip_logged = True
            log.warning("phone callers skipped: %s", _State.phone_skipped)
        raise StopUser


class ControlApiUser(HttpUser):
    """A person at the dashboard: signs in, lists calls, creates call tokens."""

    weight = 1
    wait_time = between(1, 2)

    def on_start(self) -> None:
        self._expires_at = 0.0
        self._refresh_token: str | None = None

    def _sign_in(self) -> None:
        target = _target()
        with self.client.post(
            "/v1/auth/login",
            json={"email": target.user_email, "password": target.user_password},
            catch_response=True,
        ) as answer:
            if answer.status_code != 200:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
                raise StopUser
            self._signed_in(answer.json())

    def _signed_in(self, session: dict[str, Any]) -> None:
        self._refresh_token = session["refresh_token"]
        self._expires_at = time.monotonic() + float(session["expires_in"])
        self.client.headers["authorization"] = f"Bearer {session['access_token']}"

    def _fresh(self) -> None:
        """Signed in, with an access token that does not expire in the next minute. Failures
        stop the user from a task (quietly: locust logs a StopUser from on_start as an error)."""
        if self._refresh_token is None:
            self._sign_in()
            return
        if time.monotonic() < self._expires_at - REFRESH_MARGIN_SECONDS:
            return
        with self.client.post(
            "/v1/auth/refresh", json={"refresh_token": self._refresh_token}, catch_response=True
        ) as answer:
            if answer.status_code != 200:
                answer.failure(f"{answer.status_code}: {answer.text[:200]}")
                raise StopUser
            self._signed_in(answer.json())

    @task(5)
    def list_calls(self) -> None:
        self._fresh()
        self.client.get("/v1/calls?limit=20", name="/v1/calls")

    @task(2)
    def active_calls(self) -> None:
        self._fresh()
        self.client.get("/v1/calls/active")

    @task(2)
    def create_call_token(self) -> None:
        self._fresh()
        self.client.post("/v1/calls", json={"agent_id": _target().agent_id})

"""The control API's phone-call actions, as the relay asks for them (service token, call token).

``POST /internal/v1/calls/hangup`` {token}: end the phone call through Twilio (the control API
holds the tenant's Twilio credential; the relay never does). ``POST /internal/v1/calls/transfer``
{token, to}: redirect the live call to a number on the agent's allow-list. Contracts:
/work/notes/phone_design.md. Neither ever raises: a hang-up that fails is logged (closing the
stream already ends a ``<Connect><Stream>`` call with nothing after it), and a transfer that
fails is an answer for the agent. The call token is never logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import httpx

from relay import metrics
from relay.sessions import InternalClient, problem_code

log = logging.getLogger(__name__)

HANGUP_PATH = "/internal/v1/calls/hangup"
TRANSFER_PATH = "/internal/v1/calls/transfer"

# What the agent hears back when the control API refuses a transfer, by its problem code.
_TRANSFER_REFUSALS = {
    "transfer_not_allowed": "This number is not one the call may be transferred to.",
    "not_a_phone_call": "This call is not a phone call; it cannot be transferred.",
    "credential_unusable": "Transfers are not set up for this account.",
    "invalid_phone_number": "That is not a valid phone number.",
}


@dataclass(frozen=True, slots=True)
class TransferResult:
    ok: bool
    # Said to the agent (client_tool_result): what happened, never a secret.
    message: str
    code: str = ""


class PhoneControl(InternalClient):
    async def _ask(self, action: str, path: str, body: dict[str, str]) -> httpx.Response | None:
        try:
            response = await self._post(path, body)
        except httpx.HTTPError as exc:
            metrics.PHONE_CONTROL_REQUESTS.labels(action, "unreachable").inc()
            log.warning(
                "the control API could not be asked to %s the phone call",
                action,
                extra={"error": type(exc).__name__},
            )
            return None
        return response

    async def hangup(self, token: str, *, call_id: str) -> str:
        """Ask the control API to hang the call up; returns its status or an error code."""
        response = await self._ask("hangup", HANGUP_PATH, {"token": token})
        if response is None:
            return "unreachable"
        if response.status_code == 200:
            status = _status(response)
            metrics.PHONE_CONTROL_REQUESTS.labels("hangup", status).inc()
            return status
        code = problem_code(response) or f"http_{response.status_code}"
        metrics.PHONE_CONTROL_REQUESTS.labels("hangup", "refused").inc()
        log.warning(
            "the control API did not hang the phone call up",
            extra={"call_id": call_id, "status": response.status_code, "problem": code},
        )
        return code

    async def transfer(self, token: str, to: str, *, call_id: str) -> TransferResult:
        response = await self._ask("transfer", TRANSFER_PATH, {"token": token, "to": to})
        if response is None:
            return TransferResult(False, "The transfer could not be started; try again later.")
        if response.status_code == 200:
            metrics.PHONE_CONTROL_REQUESTS.labels("transfer", "transferred").inc()
            return TransferResult(True, "The call is being transferred.", "transferred")
        code = problem_code(response) or f"http_{response.status_code}"
        if response.status_code == 422:
            code = "invalid_phone_number"
        metrics.PHONE_CONTROL_REQUESTS.labels("transfer", "refused").inc()
        log.info(
            "the control API refused a transfer: %s",
            code,
            extra={"call_id": call_id, "status": response.status_code},
        )
        message = _TRANSFER_REFUSALS.get(code, "The transfer failed; the call goes on.")
        return TransferResult(False, message, code)


def _status(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return "ok"
    status = body.get("status") if isinstance(body, dict) else None
    if status in ("completed", "already_ended", "skipped"):
        return str(status)
    return "ok"

"""Validation of an agent's settings: phone numbers, browser origins, dynamic variables and
conversation overrides. Pure functions and pydantic types, reused wherever a caller supplies them
(agents, call tokens).

The override structure follows what ElevenLabs accepts in ``conversation_config_override`` of
``conversation_initiation_client_data``; anything else is rejected here rather than by ElevenLabs
in the middle of a call.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

import orjson
import phonenumbers
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

from control_api.pg_text import PgText, reject_nul

MAX_PHONE_NUMBERS = 20
MAX_ALLOWED_ORIGINS = 20
MAX_DYNAMIC_VARIABLES = 50
MAX_DYNAMIC_VARIABLES_BYTES = 16 * 1024
MAX_TRANSFER_NUMBERS = 20
MAX_PHONE_DYNAMIC_VARIABLES = 20

# ---------------------------------------------------------------------------------------------
# Phone numbers
# ---------------------------------------------------------------------------------------------


def normalize_e164(value: str) -> str:
    """``+1 (415) 555-2671`` → ``+14155552671``; only numbers libphonenumber considers valid."""
    if len(value) > 32 or not value.strip().startswith("+"):
        raise ValueError("must be an international number in E.164 form, starting with +")
    try:
        parsed = phonenumbers.parse(value, None)
    except phonenumbers.NumberParseException:
        raise ValueError("is not a phone number") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError("is not a valid phone number")
    formatted: str = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return formatted


def _unique(values: list[str]) -> list[str]:
    return list(dict.fromkeys(values))


E164Number = Annotated[str, AfterValidator(normalize_e164)]
PhoneNumbers = Annotated[
    list[E164Number], Field(max_length=MAX_PHONE_NUMBERS), AfterValidator(_unique)
]
# The only numbers a phone call may be transferred to: an LLM asks for the transfer, so dialling
# anything it names would let a caller talk it into premium-rate or international numbers.
TransferNumbers = Annotated[
    list[E164Number], Field(max_length=MAX_TRANSFER_NUMBERS), AfterValidator(_unique)
]

# ---------------------------------------------------------------------------------------------
# Browser origins
# ---------------------------------------------------------------------------------------------

_ORIGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<host>\[[0-9A-Fa-f:.]+\]|[^/?#@\s:\[\]]+)(?::(?P<port>[0-9]{1,5}))?"
)
_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> str:
    """A browser Origin, ``scheme://host[:port]``, lower-cased and without a default port."""
    match = _ORIGIN.fullmatch(value)
    if match is None:
        raise ValueError("must be an origin like https://app.example.com[:port] with no path")
    scheme = match["scheme"].lower()
    if scheme not in _DEFAULT_PORTS:
        raise ValueError("scheme must be http or https")
    host = match["host"].lower()
    if host.startswith("["):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("has an invalid IPv6 address") from None
    elif len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.split(".")):
        raise ValueError("has an invalid host name")
    port = match["port"]
    if port is not None:
        number = int(port)
        if not 1 <= number <= 65535:
            raise ValueError("has a port out of range")
        if number != _DEFAULT_PORTS[scheme]:
            return f"{scheme}://{host}:{number}"
    return f"{scheme}://{host}"


Origin = Annotated[str, Field(max_length=300), AfterValidator(normalize_origin)]
AllowedOrigins = Annotated[
    list[Origin], Field(max_length=MAX_ALLOWED_ORIGINS), AfterValidator(_unique)
]

# ---------------------------------------------------------------------------------------------
# Dynamic variables
# ---------------------------------------------------------------------------------------------

_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
RESERVED_VARIABLE_PREFIX = "system__"


def check_variable_name(name: str) -> str:
    if not _VARIABLE_NAME.fullmatch(name):
        raise ValueError(
            "variable names are 1-64 characters of letters, digits and _, not starting with a digit"
        )
    if name.lower().startswith(RESERVED_VARIABLE_PREFIX):
        raise ValueError("the system__ prefix is reserved by ElevenLabs")
    return name


def _check_variables_size(variables: dict[str, Any]) -> dict[str, Any]:
    if len(orjson.dumps(variables)) > MAX_DYNAMIC_VARIABLES_BYTES:
        raise ValueError(
            f"dynamic variables must total at most {MAX_DYNAMIC_VARIABLES_BYTES} bytes"
        )
    return variables


VariableName = Annotated[str, AfterValidator(check_variable_name)]
# Booleans first so that JSON true is never read as 1; floats must be finite (JSON has no NaN).
VariableValue = (
    StrictBool
    | Annotated[StrictInt, Field(ge=-(2**53), le=2**53)]
    | Annotated[float, Field(strict=True, allow_inf_nan=False)]
    | Annotated[StrictStr, Field(max_length=4000), AfterValidator(reject_nul)]
)
DynamicVariables = Annotated[
    dict[VariableName, VariableValue],
    Field(max_length=MAX_DYNAMIC_VARIABLES),
    AfterValidator(_check_variables_size),
]

# Twilio voice-webhook parameters a phone call can hand the agent as dynamic variables.
TwilioCallField = Literal[
    "From",
    "To",
    "CallSid",
    "CallerName",
    "FromCity",
    "FromState",
    "FromCountry",
    "FromZip",
    "ToCity",
    "ToState",
    "ToCountry",
    "ToZip",
    "ForwardedFrom",
]
PhoneDynamicVariables = Annotated[
    dict[VariableName, TwilioCallField], Field(max_length=MAX_PHONE_DYNAMIC_VARIABLES)
]

# ---------------------------------------------------------------------------------------------
# Conversation overrides
# ---------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptOverride(_Strict):
    prompt: PgText | None = Field(default=None, min_length=1, max_length=20_000)
    llm: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:/-]{1,100}$")


class AgentOverride(_Strict):
    prompt: PromptOverride | None = None
    first_message: PgText | None = Field(default=None, max_length=2_000)
    language: str | None = Field(default=None, pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})?$")


class TtsOverride(_Strict):
    voice_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,100}$")
    stability: float | None = Field(default=None, ge=0.0, le=1.0)
    # ElevenLabs' agent TTS accepts 0.7 (slower) to 1.2 (faster).
    speed: float | None = Field(default=None, ge=0.7, le=1.2)
    similarity_boost: float | None = Field(default=None, ge=0.0, le=1.0)


class AsrOverride(_Strict):
    keywords: list[Annotated[PgText, Field(min_length=1, max_length=100)]] | None = Field(
        default=None, max_length=100
    )


class ConversationOverride(_Strict):
    text_only: StrictBool | None = None


class ConversationOverrides(_Strict):
    """``conversation_config_override`` as ElevenLabs takes it; each field must also be enabled
    for overrides in the agent's ElevenLabs security settings."""

    agent: AgentOverride | None = None
    tts: TtsOverride | None = None
    asr: AsrOverride | None = None
    conversation: ConversationOverride | None = None

    def to_wire(self) -> dict[str, Any]:
        """The JSON object to send (and store): absent and null fields are left out."""
        return self.model_dump(mode="json", exclude_none=True)

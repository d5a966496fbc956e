"""A user holding a one-time password may do nothing but choose a new one.

Enforced for every authenticated endpoint in control_api/endpoints.py, so a new endpoint is
covered without having to remember it; only endpoints declared ``before_password_change`` (changing
one's own password) accept such a user. API keys never carry the restriction.
"""

from __future__ import annotations

from control_api.principal import Principal
from control_api.problems import Problem

CHANGE_PASSWORD_PATH = "/v1/users/me/password"


def require_chosen_password(principal: Principal) -> None:
    if principal.must_change_password:
        raise Problem(
            403,
            "password_change_required",
            "This account still has its one-time password: choose a new one with"
            f" POST {CHANGE_PASSWORD_PATH} (current_password, new_password), then use the"
            " tokens it returns.",
        )

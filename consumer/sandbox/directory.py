"""The users and companies the sandbox knows, and whether each Track had a user.

Userpilot answers a Track for a user it has never seen with 202 and attributes the event
to no one; this is how a worker that never identifies looks healthy while losing data.
The sandbox keeps what identify, company identify and delete-users did, so a test can ask
"how many Track calls were attributed?" instead of trusting a 202. Pure; no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consumer.sandbox.validation import COMPANY_ID_KEYS, company_id_of

__all__ = ["Directory"]


@dataclass
class Directory:
    """Users (metadata merged over identify calls, last company) and companies."""

    users: dict[str, dict[str, Any]] = field(default_factory=dict)
    companies: dict[str, dict[str, Any]] = field(default_factory=dict)
    attributed: int = 0
    unattributed: int = 0
    deleted_users: int = 0

    def identify(self, body: Mapping[str, Any]) -> None:
        """A valid ``/v1/identify`` body: create or update the user (and its company)."""
        user = self.users.setdefault(body["user_id"], {"metadata": {}, "company": None})
        user["metadata"].update(body.get("metadata") or {})
        company = body.get("company")
        if isinstance(company, dict):
            company_id = company_id_of(company)
            properties = {k: v for k, v in company.items() if k not in COMPANY_ID_KEYS}
            self._company(company_id or "")["metadata"].update(properties)
            user["company"] = company_id

    def identify_company(self, body: Mapping[str, Any]) -> None:
        """A valid ``/v1/companies/identify`` body: create or update the company."""
        self._company(body["company_id"])["metadata"].update(body.get("metadata") or {})

    def _company(self, company_id: str) -> dict[str, Any]:
        return self.companies.setdefault(company_id, {"metadata": {}})

    def track(self, user_id: str) -> bool:
        """Count a Track; True when its user exists (the event is attributed)."""
        known = user_id in self.users
        if known:
            self.attributed += 1
        else:
            self.unattributed += 1
        return known

    def delete_users(self, user_ids: list[str]) -> int:
        """Delete the listed users that exist (Userpilot schedules; the sandbox does it now)."""
        deleted = 0
        for user_id in user_ids:
            if self.users.pop(user_id, None) is not None:
                deleted += 1
        self.deleted_users += deleted
        return deleted

    def users_view(self) -> dict[str, Any]:
        return {user_id: dict(user) for user_id, user in sorted(self.users.items())}

    def companies_view(self) -> dict[str, Any]:
        """Each company with its metadata and the users that belong to it now."""
        members: dict[str, list[str]] = {}
        for user_id, user in sorted(self.users.items()):
            if user["company"] is not None:
                members.setdefault(user["company"], []).append(user_id)
        return {
            company_id: {**company, "users": members.get(company_id, [])}
            for company_id, company in sorted(self.companies.items())
        }

    def stats(self) -> dict[str, int]:
        return {
            "users": len(self.users),
            "companies": len(self.companies),
            "attributed": self.attributed,
            "unattributed": self.unattributed,
            "deleted_users": self.deleted_users,
        }

    def reset(self) -> None:
        self.users.clear()
        self.companies.clear()
        self.attributed = self.unattributed = self.deleted_users = 0

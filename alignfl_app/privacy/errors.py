"""Why a silo will not train: each refusal is one line naming the reason and who can change it."""

from __future__ import annotations


class PrivacyRefusal(RuntimeError):
    """The silo will not train this round; the message is one line naming why and who can change it."""


class PrivacyBudgetExceeded(PrivacyRefusal):
    """The round would take the silo past its lifetime budget, or its ledger cannot be trusted."""


class PolicyRefusal(PrivacyRefusal):
    """The run asks for less privacy than the silo's policy allows."""

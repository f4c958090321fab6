"""What a silo grants a run: the run's privacy request held against the silo's policy and its private past."""

from __future__ import annotations

from pathlib import Path

from alignfl_app.config import LocalTrainingSection, PrivacySection
from alignfl_app.privacy.dpsgd import DifferentialPrivacy, NoPrivacy, calibrate
from alignfl_app.privacy.errors import PolicyRefusal
from alignfl_app.privacy.ledger import PrivacyLedger
from alignfl_app.privacy.policy import POLICY_FILE, SiloPrivacyPolicy


def requires_dp(policy: SiloPrivacyPolicy, silo_dir: Path, silo: str) -> bool:
    """A silo whose policy says so, or one that has trained privately (once private, always private: a later
    non-private round would release what the earlier ones protected). ``PrivacyBudgetExceeded`` when its ledger
    is missing, edited or rolled back: a lost ledger must not lift the rule."""
    return policy.require_dp or PrivacyLedger(silo_dir, silo).read() is not None


def admit(
    request: PrivacySection,
    policy: SiloPrivacyPolicy,
    rounds: int,
    silo: str,
    silo_dir: Path,
    local: LocalTrainingSection,
) -> NoPrivacy | DifferentialPrivacy:
    """The silo's privacy for this run: what the run asks, if the silo's policy allows it (PolicyRefusal)."""
    where = f"<silo-dir>/{POLICY_FILE}"
    if not request.enabled:
        if requires_dp(policy, silo_dir, silo):
            raise PolicyRefusal(
                f"silo '{silo}' requires DP ({where}, or it has trained privately before) but the "
                "run asks to train without it: set dp-epsilon in the run config"
            )
        return NoPrivacy(local)
    plan = calibrate(request, rounds)
    if plan.delta > policy.max_delta:
        raise PolicyRefusal(
            f"silo '{silo}' accepts dp-delta <= {policy.max_delta:g} ({where}); the run asks "
            f"{plan.delta:g}: lower dp-delta"
        )
    if plan.planned_epsilon > policy.max_epsilon * (1 + 1e-9):
        raise PolicyRefusal(
            f"silo '{silo}' accepts at most epsilon {policy.max_epsilon:g} per run ({where}); "
            f"the run plans {plan.planned_epsilon:.3f}: lower dp-epsilon"
        )
    return DifferentialPrivacy(plan, policy, silo, silo_dir)

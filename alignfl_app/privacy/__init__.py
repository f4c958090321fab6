"""Differential privacy of a silo: accounting, DP-SGD with adaptive clipping, the silo's policy and its ledger."""

import logging as _logging

from alignfl_app.exports import lazy_exports

# opacus.utils.module_utils calls logging.basicConfig() on import: drop the root handler it adds, else every Flower
# log line is printed twice in the ServerApp / ClientApp processes. Every opacus import of alignfl is in this
# package, so this runs first.
_handlers = list(_logging.getLogger().handlers)
import opacus  # noqa: E402, F401

for _handler in _logging.getLogger().handlers[len(_handlers) :]:
    _logging.getLogger().removeHandler(_handler)

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "accounting": ["epsilon_of"],
        "admission": ["admit", "requires_dp"],
        "dpsgd": ["DPCarry", "DPPlan", "DifferentialPrivacy", "NoPrivacy", "calibrate"],
        "errors": ["PolicyRefusal", "PrivacyBudgetExceeded", "PrivacyRefusal"],
        "ledger": ["LedgerAnchor", "PrivacyLedger"],
        "policy": ["POLICY_FILE", "SiloPrivacyPolicy", "load_silo_policy"],
    },
)

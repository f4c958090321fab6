"""Differential privacy of a silo: accounting, DP-SGD with adaptive clipping, the silo's policy and its ledger."""

import logging as _logging

from alignfl_app.exports import lazy_exports

# opacus.utils.module_utils calls logging.basicConfig() on import, which would give the root logger a handler and
# print every Flower log line twice in the ServerApp / ClientApp processes. basicConfig does nothing while the root
# has a handler, so a NullHandler stands there during the import (other threads' lines are never doubled, not even
# while opacus loads). Every opacus import of alignfl is in this package, so this runs first.
_placeholder = _logging.NullHandler()
_handlers = list(_logging.getLogger().handlers)
_logging.getLogger().addHandler(_placeholder)
try:
    import opacus  # noqa: E402, F401
finally:
    for _handler in list(_logging.getLogger().handlers):
        if _handler is _placeholder or _handler not in _handlers:
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

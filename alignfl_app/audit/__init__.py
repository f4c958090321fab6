"""What a released decoder reveals: the outlier audit and the canary audit (an epsilon lower bound)."""

from alignfl_app.exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "canary": ["run_canary_audit", "run_gradient_canary_audit"],
        "outliers": ["OutlierAudit", "audit_outliers", "audit_run"],
    },
)

"""A silo's side: its identity and folder, its round of local training, its state between rounds."""

from alignfl_app.exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "core": ["Silo", "TrainOutcome"],
        "setup": ["provision_simulated_silos", "silo_node_config"],
        "state": ["SiloStateError"],
    },
)

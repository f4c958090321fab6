"""The server's side: reply checks, the generator store, synthesis, the global model, results and checkpoints."""

from alignfl_app.exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "core": ["AlignFLServer", "SilosRefused"],
        "store": ["GeneratorStore", "GeneratorTerms"],
    },
)

"""Generators (the silos' VAEs and their released decoders) and the global model the server trains."""

from alignfl_app.exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "global_model": ["GlobalModel", "load_saved_model"],
        "vae": ["VAE", "GeneratorSet", "build_decoder"],
    },
)

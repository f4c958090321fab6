"""Datasets and silo partitions: the built-in datasets, ImageFolders, exports."""

from alignfl_app.exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "datasets": ["SiloData", "build_silo_data", "federation_silo_data", "global_test_set"],
        "folders": ["DataFolderError", "load_image_folder"],
    },
)

"""The wire contract both sides import: record names, reply schemas, the generator descriptor, the sampling style."""

from alignfl_app.exports import lazy_exports

__all__, __getattr__ = lazy_exports(
    __name__,
    {
        "descriptor": ["DESCRIPTOR_FORMAT", "GeneratorDescriptor", "parse_descriptor"],
        "replies": [
            "AveragedTrainMetrics",
            "EvaluateMetrics",
            "GeneratorTrainMetrics",
            "PrivateTrainMetrics",
            "ReplyRejected",
            "train_metrics_schema",
        ],
        "sampling": ["GeneratorFailed", "SamplingStyle", "sample_generator"],
    },
)

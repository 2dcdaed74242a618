"""exitflow core: configuration, messages, Kafka/Redis plumbing, the multi-exit model, datasets, costs, CLI."""

from stream.errors import ExitflowError

__all__ = ["ExitflowError"]
__version__ = "0.1.0"

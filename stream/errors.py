"""One root exception type; every error says where (file/row, topic/partition/offset, sample id, parameter)."""


class ExitflowError(Exception):
    """Root of every error exitflow raises on purpose."""


class ConfigError(ExitflowError):
    """A setting or parameter has a bad value."""


class DataError(ExitflowError):
    """A dataset file or row is not what was expected."""


class ModelError(ExitflowError):
    """A model directory or backbone cannot be loaded."""


class MessageError(ExitflowError):
    """A message on a topic cannot be decoded or fails its schema."""


class InfraError(ExitflowError):
    """The broker or Redis cannot be started or reached."""

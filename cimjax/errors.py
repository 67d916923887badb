"""The exceptions of cimjax: one base class, one subclass per kind of user error.

Every error that cimjax raises for bad input derives from :class:`CimjaxError`, so a caller
(and every console entry point) can catch that one class and print one line. Each subclass
also derives from the built-in class it used to be (``ValueError`` or ``RuntimeError``), so code
written against those keeps working. Anything else that escapes is a bug.
"""

from __future__ import annotations


class CimjaxError(Exception):
  """Base class of every cimjax error: bad input, a missing prerequisite, a corrupt file."""


class UsageError(CimjaxError):
  """Bad command-line input: one line on stderr, exit status 2."""


class ConfigError(CimjaxError, ValueError):
  """A config field has a bad value (the message names the field)."""


class UnknownModelError(ConfigError):
  """A model name (config field or flag) that does not resolve to a model.

  Attributes:
    name: the name given.
    allowed: what is allowed, in words (for messages worded by the caller).
  """

  def __init__(self, message: str, *, name: str = "", allowed: str = ""):
    super().__init__(message)
    self.name = name
    self.allowed = allowed


class StageError(CimjaxError, RuntimeError):
  """A stage cannot run: missing prerequisite stage, bad policy, incompatible workdir."""


class PipelineError(CimjaxError, RuntimeError):
  """A stage of the run cannot run (missing prerequisite, bad policy, config changed)."""


class PolicyError(CimjaxError, ValueError):
  """A policy does not fit the model, the bit range or the constraint, or cannot be read."""


class PolicyLengthError(CimjaxError, ValueError):
  """The policy's number of rows does not match the model's quantizable layers."""


class HwError(CimjaxError, ValueError):
  """A hardware target could not be found, parsed or validated."""


class DataError(CimjaxError, RuntimeError):
  """A dataset file is missing, truncated or malformed, or a split request is impossible."""


class CheckpointError(CimjaxError, RuntimeError):
  """A checkpoint cannot be found or does not match the expected state."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files cannot be read back intact (flipped bytes, a truncated copy)."""


class ModelError(CimjaxError, ValueError):
  """A model cannot be resolved, built or quantized (the message says what was tried)."""


class ModelNotFoundError(UnknownModelError, ModelError):
  """A model reference that resolves to nothing: no such name, module, file or factory."""


class ProgramError(CimjaxError, ValueError):
  """A program cannot be compiled, saved, loaded or executed (the message says why)."""


class WorkdirBusyError(CimjaxError, RuntimeError):
  """Another live run holds the workdir's lock (the message names its process and host)."""


class WeightsError(CimjaxError, ValueError):
  """Pretrained weights cannot be read or do not fit the model (names the file and the key)."""


class OnnxError(CimjaxError, ValueError):
  """An ONNX file cannot be imported or a model cannot be exported (names the node or layer)."""


__all__ = [
  "CheckpointError",
  "CimjaxError",
  "ConfigError",
  "CorruptCheckpointError",
  "DataError",
  "HwError",
  "ModelError",
  "ModelNotFoundError",
  "OnnxError",
  "PipelineError",
  "PolicyError",
  "PolicyLengthError",
  "ProgramError",
  "StageError",
  "UnknownModelError",
  "UsageError",
  "WeightsError",
  "WorkdirBusyError",
]

"""Errors raised by skipit. Every message says what failed, why, and what to do about it."""

from __future__ import annotations

import enum


class SkipitError(Exception):
    """Base class of every error skipit raises on purpose. ``exit_code`` is used by the CLI."""

    exit_code = 2


class ModelLoadError(SkipitError):
    """The model directory or file cannot be loaded (missing, not a model, corrupt, unsafe)."""


class UnsupportedArchitectureError(SkipitError):
    """No architecture spec matches the model and the probe could not find its decoder layers."""


class CalibrationDataError(SkipitError):
    """The calibration / evaluation data file is malformed or points at missing files."""


class OutputExistsError(SkipitError):
    """The output directory exists and ``--overwrite`` was not given."""


class InvalidOptionError(SkipitError):
    """A command-line option or policy value is out of range."""


class NothingToRemoveError(SkipitError):
    """No layer could be removed within the stated bound. Not a crash: a distinct outcome."""

    exit_code = 3


class RewriteError(SkipitError):
    """The slim checkpoint failed its reload check (e.g. stale per-layer config)."""


class ExportError(SkipitError):
    """An export (ONNX / TensorRT) failed or its output does not match the model."""


class ExportMismatchError(ExportError):
    """An exported graph runs but disagrees with the torch model, does not fit it (e.g. another vocabulary
    size), or cannot serve an input the model (and its processor) accepts. Exit code 6, as the validation
    gate's "export mismatch"."""

    exit_code = 6


class TokenizerMismatchError(SkipitError):
    """The slim model's tokenizer/processor does not encode the data as the original's does (``skipit validate``)."""

    exit_code = 6


class BackendUnavailableError(SkipitError):
    """An optional backend (TensorRT, CUDA) is not installed or has no device to run on."""


class EngineIncompatibleError(ExportError):
    """A TensorRT engine was built for another GPU architecture or TensorRT version: rebuild it here."""


class MissingAnswersError(CalibrationDataError):
    """Task accuracy was asked for, but the evaluation samples carry no ``"answer"`` field."""


class ExitCode(enum.IntEnum):
    """Every exit status of skipit's commands, in one place (README "Exit codes")."""

    OK = 0
    INTERNAL = 1  #: a bug: one line, ``--debug`` for the traceback
    BAD_INPUT = 2  #: bad input or option (:class:`SkipitError`)
    NOTHING_TO_REMOVE = 3  #: no layer can be removed within the bound (:class:`NothingToRemoveError`)
    PARITY = 4  #: the gate's parity check failed
    SPEED = 5  #: the gate's speed check failed
    EXPORT_MISMATCH = 6  #: an exported graph (or the slim tokenizer) does not match the model
    INTERRUPTED = 130  #: Ctrl-C (128 + SIGINT)
    TERMINATED = 143  #: SIGTERM (128 + SIGTERM)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty), for one-line errors."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

"""The exceptions users can catch. Every error we raise on bad input derives from `GraloraError`."""


class GraloraError(Exception):
    """Base class of every error gralora-diffusion raises on bad input or bad files."""


class GraloraConfigError(GraloraError, ValueError):
    """Bad adapter settings: rank, k, widths, target modules, adapter names."""


class AdapterFileError(GraloraError, ValueError):
    """An adapter file (or state dict) that cannot be read or does not fit the model."""

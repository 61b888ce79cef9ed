"""The exceptions users can catch. Every error we raise on bad input derives from `GraloraError`."""


class GraloraError(Exception):
    """Base class of every error gralora-diffusion raises on bad input or bad files."""


class GraloraConfigError(GraloraError, ValueError):
    """Bad adapter settings: rank, k, widths, target modules, adapter names."""


class AdapterFileError(GraloraError, ValueError):
    """An adapter file (or state dict) that cannot be read or does not fit the model."""


class ExportError(GraloraError, ValueError):
    """An export that cannot be done as asked (format, rank, size, key layout)."""


class HubError(GraloraError, RuntimeError):
    """A push that the Hub (or the network) refused; the local folder is untouched."""


class TrainConfigError(GraloraError, ValueError):
    """A training setting or input that cannot work; raised before any model loads."""


class TrainingError(GraloraError, RuntimeError):
    """Training went wrong while running (a NaN/Inf loss, non-finite weights)."""


class OutputError(GraloraError, OSError):
    """A file could not be written (disk full, read-only or missing permission); nothing was
    half-written and a file already at that path is unchanged."""


class UnreadableImageError(TrainingError):
    """A training image whose pixels cannot be decoded, met while training (its header read fine)."""


class ImageFileError(GraloraError, ValueError):
    """An image file that cannot be read, or is refused before decoding (too many pixels, too narrow)."""

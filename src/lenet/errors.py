"""The exceptions lenet raises for problems a user can fix.

Every message names what is wrong and what to do about it; the CLI prints the message
without a traceback and exits with status 2.
"""


class LenetError(Exception):
    """A problem with the user's input, files or environment, explained in the message."""


class DataError(LenetError):
    """A dataset file is missing, corrupt, or no source could provide it."""


class IdxFormatError(DataError):
    """A file is not a valid IDX file (wrong magic, type, dimensions or length)."""


class ConfigError(LenetError):
    """A model, dataset, recipe or option value that does not exist or cannot work."""


class RunDirError(LenetError):
    """A run folder that would be overwritten, or that holds nothing to resume from."""


class WeightsError(LenetError):
    """A weights file or model card that cannot be read or does not fit its model."""


class ExportError(LenetError):
    """An export that cannot be made, or whose result does not match the PyTorch model."""


class TrainingInterrupted(LenetError):
    """Ctrl-C during training: a checkpoint was saved; the message says how to resume."""


class ImageError(LenetError):
    """An input image that cannot be used.

    ``status`` is the matching HTTP status code and ``reason`` the label the service counts
    rejected inputs by.
    """

    status = 422
    reason = "undecodable"


class UnsupportedImageFormat(ImageError):
    """A real image, in a format lenet does not accept."""

    status = 415
    reason = "unsupported_format"


class ImageTooLarge(ImageError):
    """An image whose pixel count exceeds the limit (checked before decoding)."""

    status = 413
    reason = "too_many_pixels"


class UploadTooLarge(ImageError):
    """An upload whose body exceeds the service's size limit (checked while reading it)."""

    status = 413
    reason = "too_large"


class BadUpload(ImageError):
    """A request that carries no picture: empty body, no `image` field, wrong content type."""

    reason = "bad_request"


class NoDigit(ImageError):
    """A picture that decodes but holds no digit, where an answer needs one (explain)."""

    reason = "no_digit"


class ClientDisconnected(ImageError):
    """The client closed the connection before its upload arrived whole.

    499 is the status proxies log for this (no response reaches the client); it keeps such
    requests out of the service's 5xx counts, which mean the service failed.
    """

    status = 499
    reason = "client_disconnected"


class UploadStalled(ImageError):
    """The client stopped sending its upload part-way (a slow or stuck client)."""

    status = 408
    reason = "upload_stalled"

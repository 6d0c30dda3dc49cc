"""One error family for everything lorasynth raises on purpose.

Library code raises these; the CLI turns them into a single line on stderr and a
non-zero exit code. Anything else escaping is a bug and keeps its traceback.
"""


class LorasynthError(Exception):
    """Base class: a user-facing problem with a message that says what to do."""


class FormatError(LorasynthError):
    """A LoRA file is unreadable, unsafe, of an unsupported kind, or inconsistent."""


class LayoutError(LorasynthError):
    """A LoRA does not fit a Layout or a base model (module names, shapes, ranks)."""


class ImageError(LorasynthError):
    """An input image is not readable, not an image, or too large to decode safely."""


class FaceError(LorasynthError):
    """No face, an invalid face index, or missing face-model files."""


class ModelError(LorasynthError):
    """A base model or trained lorasynth model is missing, broken or incompatible."""


class LibraryError(LorasynthError):
    """A LoRA library operation failed (missing entry, duplicate, corrupt blob...)."""


class InputError(LorasynthError, ValueError):
    """A number or option given by the caller is not a number, not finite, or out of range.

    Also a ValueError, so code that guards conversions with ``except ValueError`` still works.
    """


class OutputError(LorasynthError, OSError):
    """An output path cannot be written (a directory, below a regular file, read-only, disk full).

    Also an OSError, so code that guards file writes with ``except OSError`` still works.
    """

"""What every layer shares and nothing else owns: the input error, device and precision
resolution, and the option schema that each layer's config is declared with.

Nothing here imports torch at module level (``lresnet.core.device`` imports it inside its
functions), so importing ``lresnet.core`` is cheap in any process.
"""

from lresnet.core.errors import InputError, PathLike

__all__ = ["InputError", "PathLike"]

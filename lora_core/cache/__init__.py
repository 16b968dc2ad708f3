"""On-disk cache of encoded samples."""
from .latent_cache import *  # noqa: F401,F403

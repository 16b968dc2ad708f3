"""On-disk cache of encoded features: media (VAE latents) and text (encoder embeddings) apart."""
from .build import CacheStats, build_media_cache, build_text_cache, media_keys
from .feature_cache import CACHE_FORMAT, CorruptEntry, FeatureCache
from .identity import ContentIndex, path_identity

__all__ = [
    "CACHE_FORMAT", "CacheStats", "ContentIndex", "CorruptEntry", "FeatureCache",
    "build_media_cache", "build_text_cache", "media_keys", "path_identity",
]  # fmt: skip

"""CogVideoX 1.0 (2B / 5B text-to-video, 5B image-to-video)."""

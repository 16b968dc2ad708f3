"""Training objectives and their samplers: flow matching (Wan); DDPM and EDM next."""

"""Training objectives and their samplers: flow matching (Wan), DDPM (SD1.5, AnimateDiff, CogVideoX); EDM next."""

"""Stable Diffusion lineage: the SD1.5 UNet (diffusers module paths), its LDM single-file names, and later
the AnimateDiff motion modules, the SVD spatio-temporal UNet, ControlNet and the VAEs."""

"""Stable Video Diffusion (img2vid, -xt) and Framer: the spatio-temporal UNet, under diffusers' names."""

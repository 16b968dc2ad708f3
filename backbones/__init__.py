"""Vendored backbones and their registry."""

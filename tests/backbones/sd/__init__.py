"""Tests of backbones.sd."""

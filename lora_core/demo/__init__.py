"""The embedded demo: procedural scenes to pretrain tiny bases on and to teach them a held-out concept, the
measures that tell whether a LoRA learned it, and the before/after contact sheet.

- `scenes`: coloured shapes moving on plain backgrounds, rendered and captioned from named parts;
- `measure`: the concept in generated frames (the moving object's colour, its direction of motion);
- `sheet`: a PNG of frames, one row per video (base vs LoRA).
"""
from .measure import colour_progress, motion_direction, object_colour
from .scenes import BACKGROUNDS, COLOURS, MOTIONS, SHAPES, Scene, render
from .sheet import contact_sheet

__all__ = ["BACKGROUNDS", "COLOURS", "MOTIONS", "SHAPES", "Scene", "colour_progress", "contact_sheet",
           "motion_direction", "object_colour", "render"]

"""The LoRA engine: layers, injection, merge/unmerge, file formats, and the training runtime."""
from .formats import FORMATS, KeyMap, LoRANaming, load_lora, read_lora, save_lora
from .inject import (disable_lora, inject_lora, lora_layers, lora_parameters, lora_state_dict, lora_targetable,
                     merge_lora, remove_lora, set_trainable, unmerge_lora)
from .layers import LoRAConv, LoRALayer, LoRALinear, is_lora_layer

__all__ = [
    "LoRALinear", "LoRAConv", "LoRALayer", "is_lora_layer",
    "inject_lora", "merge_lora", "unmerge_lora", "disable_lora", "remove_lora",
    "lora_layers", "lora_parameters", "lora_state_dict", "lora_targetable", "set_trainable",
    "save_lora", "load_lora", "read_lora", "KeyMap", "LoRANaming", "FORMATS",
]

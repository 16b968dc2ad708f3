"""Optional hand-written kernels. Nothing here is used by the engine unless a GPU measurement says it beats the
default path (`lora_core.fused`, cuBLAS + epilogues); every module has an `available()` that is False on CPU."""

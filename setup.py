from setuptools import find_packages, setup

setup(
    name="video-lora-engine",
    version="0.1.0",
    description="A hand-written LoRA engine for fine-tuning open video diffusion models (Wan2.2 TI2V-5B first).",
    packages=find_packages(include=["lora_core", "lora_core.*", "backbones", "backbones.*"]),
    py_modules=["train", "infer"],
    # the tiny pretrained Wan base of the embedded demo (a few MB, official layout)
    package_data={"backbones.wan": ["tiny_base/*", "tiny_base/google/umt5-xxl/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "safetensors>=0.4",
        "einops>=0.7",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tqdm>=4.60",
        "decord>=0.6",
        "av>=12.0",          # H.264 mp4 writer (PyAV); decord only reads
        "tokenizers>=0.15",  # umT5 tokenizer.json, without transformers
        "pillow>=9.0",       # still images and --image
    ],
    extras_require={
        "cuda": ["bitsandbytes>=0.45", "xformers", "triton; platform_system == 'Linux'"],
        "test": [
            "pytest>=7",
            "bitsandbytes>=0.50",  # 8-bit AdamW runs on CPU from 0.50
            "peft",
            "diffusers>=0.35",
            "transformers>=4.50",
            "accelerate",
            "sentencepiece",      # transformers' T5Tokenizer reads spiece.model through it (the T5 v1.1 oracle)
            "protobuf",
            "triton; platform_system == 'Linux'",   # the LoRA kernel's test runs under TRITON_INTERPRET=1 on CPU
        ],
    },
)

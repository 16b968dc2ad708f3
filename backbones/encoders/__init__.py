"""Text and image encoders shared by families: the T5 family (umT5; T5 v1.1 next), CLIP ViT-L text + its BPE tokenizer."""

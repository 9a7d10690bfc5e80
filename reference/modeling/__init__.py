"""Models and what is attached to them: loading from local directories (bf16, 8-bit, NF4), tokenizers and prompt
formats, LoRA adapters and their records, bitsandbytes' CPU kernels, and the arithmetic of shapes, memory and FLOPs.
"""

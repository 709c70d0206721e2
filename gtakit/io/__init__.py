"""Shared I/O under convert, evaluate and finetune: sources, text, output folders."""

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

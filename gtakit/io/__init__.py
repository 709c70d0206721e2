"""Shared input/output below convert, evaluate and finetune: text files, output folders."""

"""Data pipeline: record formats, tokenizer, chat templates, media, collate and packing."""

"""Tokenizer, corpus preparation (python -m data.prepare) and loading of prepared token files."""

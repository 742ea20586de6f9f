"""Generated creatives: LLM variants (prompts, parsing, filters, llm, cli) and the CTR model.

Kept import-free: ``adloop`` registers the commands of this package, and torch and
transformers load only when a command or the worker needs a model.
"""

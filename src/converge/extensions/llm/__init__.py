"""LLM extension: provider abstraction and LLM-driven agent."""

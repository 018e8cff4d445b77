"""Tailor Studio: the seven steps in a browser (tailor studio)."""

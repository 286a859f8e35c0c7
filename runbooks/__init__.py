"""Operator runbooks, shipped as package data (one Markdown file per alert)."""

"""Command-line tools: ``visattn bench | info | show | train``."""

"""The demo's dataset recipe, shipped as package data (``visaudit.data``)."""

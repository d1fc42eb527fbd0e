"""The report's default Jinja2 template and stylesheet, shipped as package data (``visaudit.templates``)."""

"""Prefect flows and the command line of visaudit."""

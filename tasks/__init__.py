"""The work of an audit: plain functions on tensors and DataFrames, free of Prefect."""

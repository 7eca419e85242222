"""The run report: the Report (JSON, schema in schema.json) and its HTML page."""
from .report import Report, count_quantized

__all__ = ["Report", "count_quantized"]

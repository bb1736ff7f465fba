"""Load generation and its statistics."""

from shipyard.bench.stats import percentile, summarize
from shipyard.bench.stream_load import LoadResult, RequestRecord, Slo, run_closed_loop, run_open_loop

__all__ = ["LoadResult", "RequestRecord", "Slo", "percentile", "run_closed_loop", "run_open_loop", "summarize"]

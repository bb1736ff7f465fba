"""Load generation and its statistics."""

from shipyard.bench.stats import percentile, summarize
from shipyard.bench.stream_load import LoadResult, RequestRecord, run_closed_loop

__all__ = ["LoadResult", "RequestRecord", "percentile", "run_closed_loop", "summarize"]

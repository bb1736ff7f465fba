"""Load generation, its scenarios and its statistics."""

from shipyard.bench.load import LoadResult, RequestRecord, Slo, find_max, run_closed_loop, run_open_loop
from shipyard.bench.scenarios import ChatWorkload, DatasetWorkload, RandomWorkload, Workload
from shipyard.stats import percentile, summarize

__all__ = [
    "ChatWorkload",
    "DatasetWorkload",
    "LoadResult",
    "RandomWorkload",
    "RequestRecord",
    "Slo",
    "Workload",
    "find_max",
    "percentile",
    "run_closed_loop",
    "run_open_loop",
    "summarize",
]

"""Engines beyond one host: the Ray cluster backend (``shipyard.cluster.ray_backend``, imported only when the
settings name ``cluster:``)."""

"""Episode data: the crash-safe zarr episode store, its statistics, and LeRobot v3 export/import."""

from vla_stack.data.episode_store import EpisodeMeta, EpisodeStore, EpisodeWriter, Feature, Schema
from vla_stack.data.stats import PartialStats

__all__ = ["EpisodeMeta", "EpisodeStore", "EpisodeWriter", "Feature", "PartialStats", "Schema"]

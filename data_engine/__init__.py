"""Datasets to identity-grouped WebDataset shards, and shards to training batches."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from data_engine.loading.loader import build_loader

__all__ = ["build_loader"]


def __getattr__(name: str) -> Any:
    """Import the loader on first use: ``import data_engine`` stays free of torch and DALI."""
    if name == "build_loader":
        from data_engine.loading.loader import build_loader

        return build_loader
    raise AttributeError(f"module 'data_engine' has no attribute {name!r}")

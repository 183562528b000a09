"""The Matrix adapter (matrix-nio): one pinned notice per job or batch, edited in place."""

from .adapter import MatrixAdapter, MatrixAuthError, MatrixStats
from .config import MatrixConfig

__all__ = ["MatrixAdapter", "MatrixAuthError", "MatrixConfig", "MatrixStats"]

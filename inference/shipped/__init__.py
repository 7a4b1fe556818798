"""Model bundles shipped inside the package.

``SHAPES_BUNDLE`` is the project's own shapes-world model (docs/model-card.md), trained by
``dallebot train shapes``: the default model when the configuration names none.
"""

from pathlib import Path

SHAPES_BUNDLE = Path(__file__).parent / "shapes"

__all__ = ["SHAPES_BUNDLE"]

"""Lorentz-model geometry as pure functions (curvature is always an argument, so it can be learned)."""

from helmlm.geometry.lorentz import (
    as_curvature,
    centroid,
    distance,
    expmap0,
    lift,
    logmap0,
    lorentz_normalize,
    manifold_violation,
    max_radius,
    minkowski_inner,
    origin,
    project,
    rescale_curvature,
    sq_distance,
    time_from_space,
)

__all__ = [
    "as_curvature",
    "centroid",
    "distance",
    "expmap0",
    "lift",
    "logmap0",
    "lorentz_normalize",
    "manifold_violation",
    "max_radius",
    "minkowski_inner",
    "origin",
    "project",
    "rescale_curvature",
    "sq_distance",
    "time_from_space",
]

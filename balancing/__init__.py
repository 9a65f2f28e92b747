"""Gradient balancing at the shared representation. Depends on torch and NumPy only: lift it into
any model.

>>> from concord.balancing import RepresentationBoundary, build_balancer
"""

from concord.balancing.base import Balancer, available_balancers, balancer_class, build_balancer, register
from concord.balancing.boundary import NonFiniteLossError, RepresentationBoundary
from concord.balancing.stats import StepStats

# Importing the method modules registers them.
from concord.balancing import (  # noqa: F401,E402
    cograd,
    dbmtl,
    emtl,
    equal,
    graddrop,
    gradvac,
    imtlg,
    mgda,
    multibalance,
    pcgrad,
    uncertainty,
)

__all__ = [
    "Balancer",
    "NonFiniteLossError",
    "RepresentationBoundary",
    "StepStats",
    "available_balancers",
    "balancer_class",
    "build_balancer",
    "register",
]

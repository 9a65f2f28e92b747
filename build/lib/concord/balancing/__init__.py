"""Gradient balancing at the shared representation. Depends on torch and NumPy only: lift it into
any model.

>>> from concord.balancing import RepresentationBoundary, build_balancer  # installed; copied: your own name
"""

from .base import Balancer, available_balancers, balancer_class, build_balancer, register
from .boundary import NonFiniteLossError, RepresentationBoundary
from .statistics import StepStats

# Importing the method modules registers them.
from . import (  # noqa: F401,E402
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

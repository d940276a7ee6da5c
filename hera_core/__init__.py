"""HERA: route each AI-agent step between a local SLM and a cloud LLM.

Importing hera_core loads nothing heavy: the native module, llama.cpp and XGBoost are imported
where they are used.
"""

from ._version import __version__
from .config import HeraSettings, load_settings
from .errors import HeraError
from .features import logit_features, logit_features_numpy
from .forest import Forest, ForestPy
from .ledger import Ledger
from .policy import Override, Route
from .predictor import Kappa, Predictor
from .radix import PyRadixIndex, RadixIndex
from .runtime import Runtime, SubtaskResult

__all__ = ["Forest", "ForestPy", "HeraError", "HeraSettings", "Kappa", "Ledger", "Override", "Predictor",
           "PyRadixIndex", "RadixIndex", "Route", "Runtime", "SubtaskResult", "__version__", "load_settings",
           "logit_features", "logit_features_numpy"]

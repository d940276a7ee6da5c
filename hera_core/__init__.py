"""HERA: route each AI-agent step between a local SLM and a cloud LLM.

Importing hera_core loads nothing heavy: the native module, llama.cpp and XGBoost are imported
where they are used.
"""

from hera_core._version import __version__
from hera_core.config import HeraSettings, load_settings
from hera_core.errors import HeraError
from hera_core.native.features import logit_features, logit_features_numpy
from hera_core.native.forest import Forest, ForestPy
from hera_core.routing.ledger import Ledger
from hera_core.routing.policy import Override, Route
from hera_core.routing.predictor import Kappa, Predictor
from hera_core.native.radix import PyRadixIndex, RadixIndex
from hera_core.routing.runtime import Runtime, SubtaskResult

__all__ = ["Forest", "ForestPy", "HeraError", "HeraSettings", "Kappa", "Ledger", "Override", "Predictor",
           "PyRadixIndex", "RadixIndex", "Route", "Runtime", "SubtaskResult", "__version__", "load_settings",
           "logit_features", "logit_features_numpy"]

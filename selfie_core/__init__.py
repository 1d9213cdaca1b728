"""selfie_core: the SelfIE interpretation engine as a plain library (torch + transformers only).

Importing this package loads no model and reads no environment variables.
"""

from .engine import SelfieEngine
from .errors import SelfieInputError, UnsupportedArchitectureError
from .frame import to_dataframe
from .loading import LoadedModel, load_model
from .records import GenerationConfig, InjectionConfig, Interpretation, InterpretRequest, VectorRequest
from .templates import PRESETS, InterpretationTemplate

__all__ = [
    "load_model",
    "LoadedModel",
    "InterpretationTemplate",
    "PRESETS",
    "InjectionConfig",
    "GenerationConfig",
    "InterpretRequest",
    "VectorRequest",
    "Interpretation",
    "SelfieEngine",
    "SelfieInputError",
    "UnsupportedArchitectureError",
    "to_dataframe",
]

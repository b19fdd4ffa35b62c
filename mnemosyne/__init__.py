"""Mnemosyne: exact long-context LLM inference."""

from mnemosyne.engine.args import EngineArgs
from mnemosyne.engine.llm_engine import LLMEngine
from mnemosyne.errors import ConfigError, InvalidRequestError, MnemosyneError, ModelLoadError
from mnemosyne.llm import LLM
from mnemosyne.outputs import RequestOutput
from mnemosyne.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "ConfigError",
    "EngineArgs",
    "InvalidRequestError",
    "LLMEngine",
    "MnemosyneError",
    "ModelLoadError",
    "RequestOutput",
    "SamplingParams",
]
__version__ = "0.1.0"

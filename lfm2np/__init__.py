"""lfm2np: a NumPy reference interpreter for Liquid AI's LFM models (LFM2 dense and MoE, LFM3).

    >>> import lfm2np
    >>> model = lfm2np.load("path/to/LFM2-350M")          # config.json + safetensors, a cached repo id, a .gguf
    >>> logits = model.forward([1, 422, 1119])             # (T,) -> (T, V)
"""

from .config import Config
from .errors import Lfm2npError
from .loading import load, load_config
from .model import Model
from .state import State
from .schema import TraceName, expected_tensors, trace_names
from .version import __version__

__all__ = ["Config", "Lfm2npError", "Model", "State", "TraceName", "expected_tensors", "load", "load_config",
           "trace_names", "__version__"]

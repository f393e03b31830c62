"""lfm2np: a NumPy reference interpreter for Liquid AI's LFM2 family (dense and MoE).

    >>> import lfm2np
    >>> model = lfm2np.load("path/to/LFM2-350M")          # config.json + safetensors
    >>> logits = model.forward([1, 422, 1119])             # (T,) -> (T, V)
"""

from .config import Config, load_config
from .errors import Lfm2npError
from .model import Model, load
from .weights import expected_tensors

__version__ = "0.1.0"
__all__ = ["Config", "Lfm2npError", "Model", "expected_tensors", "load", "load_config", "__version__"]

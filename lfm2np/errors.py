"""The one exception type lfm2np raises for bad input (files, configs, token ids)."""


class Lfm2npError(Exception):
    """Raised when a checkpoint, config or input is not what an LFM2 model needs.

    Messages name the file, tensor, config field or token id at fault and what was expected.
    """

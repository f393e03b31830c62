"""Import torchvision 0.28.0 (a CUDA build, the only wheel for torch 2.13) on CPU torch, for fixture generation.

Its import registers fake (meta) kernels for its C++ operators (nms, roi_align, ...), which this build cannot load on
CPU torch, so the registration raises "operator torchvision::nms does not exist". Only those registrations are made
tolerant here (a registration that fails is skipped); the transforms the LFM2-VL image processor uses are pure
torch and unaffected. Import this module before transformers' image processors."""
import torch.library

_register_fake = torch.library.register_fake


def _tolerant(op, *args, **kwargs):
    try:
        decorate = _register_fake(op, *args, **kwargs)
    except RuntimeError:
        return lambda fn: fn

    def apply(fn):
        try:
            return decorate(fn)
        except RuntimeError:  # the operator does not exist in this build
            return fn
    return apply


torch.library.register_fake = _tolerant
import torchvision  # noqa: E402,F401
torch.library.register_fake = _register_fake

"""ONNX export of a student: one graph for every input size (used by ``scripts/export_onnx.py`` and the
onnxruntime / OpenVINO engines of ``dtkd-infer``).

The graph takes ``lq``: (1, C, H, W) float32 RGB in [0, 1] (any H, W >= the window size) and returns
``sr``: (1, C, scale*H, scale*W), with the reflect padding to the window size and the crop back inside
the graph. For SwinIR students (``SwinIRStudent``, or BasicSR's ``SwinIR``: same checkpoint) what is
traced is BasicSR's ``SwinIR``, with its shifted-window attention mask computed in the graph from the
padded input size rather than stored for one size, so one file serves every size. The network is traced
once at a fixed example size with ``torch.onnx.export(dynamo=False)``, height and width marked dynamic
(10-22 s for the paper's student on a shared 2-vCPU machine; the torch.export-based exporter takes
minutes for the same graph). The batch is fixed at one image. The file carries its scale and window
size as metadata (``scale``, ``min_size``), which :func:`graph_info` reads back.
"""
import io
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from dtkd_compat import OptionError

SWINIR_TYPES = ('SwinIR', 'SwinIRStudent')


class PaddedSR(nn.Module):
    """Reflect-pad (B, C, H, W) to multiples of ``multiple``, run ``net``, crop to scale × (H, W)."""

    def __init__(self, net, multiple, scale):
        super().__init__()
        self.net, self.multiple, self.scale = net, multiple, scale

    def forward(self, x):
        h, w = x.shape[-2:]
        pad_h = (self.multiple - h % self.multiple) % self.multiple
        pad_w = (self.multiple - w % self.multiple) % self.multiple
        x = F.pad(x, (0, pad_w, 0, pad_h), mode='reflect')
        return self.net(x)[..., :h * self.scale, :w * self.scale]


def exportable(network_g, state_dict):
    """The network to trace: BasicSR's SwinIR with ``state_dict`` for SwinIR/SwinIRStudent options (the
    attention mask then follows the input size in the graph), else the registered architecture.

    Returns (PaddedSR module in eval mode, window multiple, scale)."""
    from basicsr.utils.registry import ARCH_REGISTRY

    import dtkd_arch  # noqa: F401  (registers the architectures)

    params = dict(network_g)
    arch = params.pop('type')
    params.pop('precision', None)
    if arch in SWINIR_TYPES:
        from basicsr.archs.swinir_arch import SwinIR

        net = SwinIR(**params)
        net.load_state_dict(state_dict, strict=True)
        for module in net.modules():
            if hasattr(module, 'calculate_mask'):
                # BasicSR uses its stored mask when the input has the training size and computes one
                # otherwise; with no stored size every input takes the computed (traced) path.
                module.input_resolution = None
    else:
        net = ARCH_REGISTRY.get(arch)(**params)
        net.load_state_dict(state_dict, strict=True)
    multiple = int(params.get('window_size') or 1)
    scale = int(params.get('upscale', 1)) if params.get('upsampler', 'x') else 1
    return PaddedSR(net.eval(), multiple, scale).eval(), multiple, scale


def export(module, path, multiple, opset=18, meta=None):
    """Write ``module`` to ``path`` (atomically) for one image of dynamic height and width (>= ``multiple``)."""
    import onnx

    channels = module.net.conv_first.in_channels if hasattr(module.net, 'conv_first') else 3
    # an example size that needs padding on both sides, so that the padding is traced
    example = torch.rand(1, channels, 3 * multiple + 5, 4 * multiple + 3)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter warns that it is deprecated, and the tracer about values that are constant
        # for a batch of one (SwinIR's batch size in window_reverse)
        warnings.simplefilter('ignore')
        torch.onnx.export(module, (example,), buffer, input_names=['lq'], output_names=['sr'], opset_version=opset,
                          dynamic_axes={'lq': {2: 'height', 3: 'width'}, 'sr': {2: 'sr_height', 3: 'sr_width'}},
                          dynamo=False)
    model = onnx.load_from_string(buffer.getvalue())
    for key, value in (meta or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    try:
        onnx.save(model, tmp)
        onnx.checker.check_model(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def export_student(network_g, state_dict, path, opset=18, checkpoint=None):
    """Export the student of ``network_g`` with ``state_dict`` to ``path``, with the metadata that
    :func:`graph_info` reads. Returns (window multiple, scale)."""
    module, multiple, scale = exportable(network_g, state_dict)
    meta = {'scale': scale, 'min_size': multiple, 'input': 'lq: (1, C, H, W) float32 RGB in [0, 1]',
            'output': f'sr: (1, C, {scale}H, {scale}W)'}
    if checkpoint:
        meta['checkpoint'] = os.path.basename(checkpoint)
    export(module, path, multiple, opset, meta=meta)
    return multiple, scale


def graph_info(path, option='--onnx'):
    """(scale, window multiple, input channels) of a graph written by :func:`export_student`; errors name
    ``option`` and the file."""
    import onnx

    if not os.path.isfile(path):
        raise OptionError(f"{option}: file '{path}' does not exist")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as err:  # onnx raises DecodeError, ValueError or OSError for files that are not ONNX
        raise OptionError(f"{option} {path}: not a readable ONNX file ({type(err).__name__}: {err})") from None
    meta = {p.key: p.value for p in model.metadata_props}
    try:
        scale, multiple = int(meta['scale']), int(meta['min_size'])
        channels = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    except (KeyError, ValueError, IndexError):
        raise OptionError(f'{option} {path}: no scale/min_size metadata or input (1, C, H, W); export the student '
                          'with scripts/export_onnx.py') from None
    return scale, multiple, channels or 3

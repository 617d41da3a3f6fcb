"""Export a trained student to ONNX with dynamic height and width, and check it with onnxruntime.

    python scripts/export_onnx.py --model net_g_latest.pth -o student_x4.onnx           # SwinIR-small x4
    python scripts/export_onnx.py -opt options/train_dtkd.yml --model net_g.pth -o student.onnx

The graph takes ``lq``: (1, C, H, W) float32 RGB in [0, 1] (any H, W >= the window size) and returns
``sr``: (1, C, scale*H, scale*W), with the reflect padding to the window size and the crop back inside
the graph. For SwinIR students (``SwinIRStudent``, or BasicSR's ``SwinIR``: same checkpoint) what is
traced is BasicSR's ``SwinIR``, with its shifted-window attention mask computed in the graph from the
padded input size rather than stored for one size, so one file serves every size. The export traces
the network once at a fixed example size with ``torch.onnx.export(dynamo=False)`` and marks height and
width as dynamic axes (a few seconds; the torch.export-based exporter takes minutes for the same graph).
The batch is fixed at one image.

The check runs the exported file with onnxruntime on inputs of several sizes (odd sizes included,
a real photograph among them) and prints the largest absolute difference from the PyTorch
network as ``dtkd-infer`` runs it (fp32); the script fails if it exceeds ``--atol``.
"""
import argparse
import io
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_compat  # noqa: E402, F401  (before basicsr)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from dtkd.infer import build_student, student_options  # noqa: E402
from dtkd_compat import OptionError  # noqa: E402

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

    import dtkd_arch  # noqa: F401

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


def check(path, reference, inputs, threads=None):
    """Largest absolute difference between onnxruntime on ``path`` and ``reference`` for each input.

    Returns a list of (shape, max abs difference)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    rows = []
    for x in inputs:
        with torch.no_grad():
            ref = reference(x).numpy()
        out = session.run(['sr'], {'lq': x.numpy()})[0]
        if out.shape != ref.shape:
            raise AssertionError(f'ONNX output shape {out.shape} != PyTorch {ref.shape} for input {tuple(x.shape)}')
        rows.append((tuple(x.shape), float(np.abs(out - ref).max())))
    return rows


def check_inputs(channels, multiple, seed=0):
    """A real photograph (skimage.data.astronaut, cropped to an odd size) and random inputs of other
    sizes (the smallest allowed, odd, non-square)."""
    import skimage.data

    photo = torch.from_numpy(skimage.data.astronaut()[180:233, 200:271].copy()).permute(2, 0, 1)[None] / 255.0
    photo = photo.float() if channels == 3 else photo.float().mean(1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    sizes = [(1, multiple, multiple), (1, 2 * multiple + 3, 5 * multiple - 1), (1, 4 * multiple, 3 * multiple)]
    return [photo] + [torch.rand(b, channels, h, w, generator=g) for b, h, w in sizes]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', help="student checkpoint; alone it is taken to be the paper's SwinIR-small x4")
    p.add_argument('-opt', '--opt', dest='opt', help='trained option file (network_g, path.pretrain_network_g)')
    p.add_argument('-o', '--output', required=True, help='ONNX file to write')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset (default 18)')
    p.add_argument('--atol', type=float, default=1e-4, help='largest accepted |ONNX - PyTorch| (default 1e-4)')
    p.add_argument('--no-check', action='store_true', help='skip the onnxruntime comparison')
    args = p.parse_args(argv)
    try:
        network_g, ckpt, key = student_options(args.model, args.opt)
        student = build_student(network_g, ckpt, key=key, source=args.opt)
    except OptionError as err:
        print(f'error: {err}', file=sys.stderr)
        raise SystemExit(2) from None
    module, multiple, scale = exportable(network_g, student.state_dict())
    start = time.time()
    export(module, args.output, multiple, args.opset,
           meta={'scale': scale, 'min_size': multiple, 'input': 'lq: (1, C, H, W) float32 RGB in [0, 1]',
                 'output': f'sr: (1, C, {scale}H, {scale}W)', 'checkpoint': os.path.basename(ckpt)})
    print(f'wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, dynamic height/width, '
          f'H, W >= {multiple}) in {time.time() - start:.1f} s')
    if args.no_check:
        return
    channels = module.net.conv_first.in_channels if hasattr(module.net, 'conv_first') else 3
    rows = check(args.output, student, check_inputs(channels, multiple))
    for shape, diff in rows:
        print(f'  input {shape}: max |onnxruntime - PyTorch| = {diff:.3g}')
    worst = max(d for _, d in rows)
    print(f'max abs difference {worst:.3g} (tolerance {args.atol:g})')
    if not worst <= args.atol:
        raise SystemExit(1)


if __name__ == '__main__':
    main()

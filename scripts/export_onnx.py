"""Export a trained student to ONNX with dynamic height and width, and check it with onnxruntime.

    python scripts/export_onnx.py --model net_g_latest.pth -o student_x4.onnx           # SwinIR-small x4
    python scripts/export_onnx.py -opt options/train_dtkd.yml --model net_g.pth -o student.onnx

The graph takes ``lq``: (1, C, H, W) float32 RGB in [0, 1] (any H, W >= the window size) and returns
``sr``: (1, C, scale*H, scale*W), with the padding to the window size inside; see ``dtkd.onnx_export``
(the same export ``dtkd-infer --engine onnxruntime|openvino`` runs on the fly). Tracing with
``torch.onnx.export(dynamo=False)`` took 10-22 s for the paper's student on a shared 2-vCPU machine;
the torch.export-based exporter takes minutes for the same graph. The file also runs in
``dtkd-infer --engine onnxruntime|openvino --onnx FILE``.

The check runs the exported file with onnxruntime on inputs of several sizes (odd sizes included,
a real photograph among them) and prints the largest absolute difference from the PyTorch
network as ``dtkd-infer`` runs it (fp32); the script fails if it exceeds ``--atol``.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dtkd_compat  # noqa: E402, F401  (before basicsr)

# isort: split
import numpy as np  # noqa: E402
import torch  # noqa: E402

from dtkd.infer import build_student, student_options  # noqa: E402
from dtkd.onnx_export import export_student  # noqa: E402
from dtkd_compat import OptionError  # noqa: E402


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
    start = time.time()
    multiple, _ = export_student(network_g, student.state_dict(), args.output, args.opset, checkpoint=ckpt)
    print(f'wrote {args.output} ({os.path.getsize(args.output) / 2**20:.1f} MiB, dynamic height/width, '
          f'H, W >= {multiple}) in {time.time() - start:.1f} s')
    if args.no_check:
        return
    channels = getattr(getattr(student, 'conv_first', None), 'in_channels', 3)
    rows = check(args.output, student, check_inputs(channels, multiple))
    for shape, diff in rows:
        print(f'  input {shape}: max |onnxruntime - PyTorch| = {diff:.3g}')
    worst = max(d for _, d in rows)
    print(f'max abs difference {worst:.3g} (tolerance {args.atol:g})')
    if not worst <= args.atol:
        raise SystemExit(1)


if __name__ == '__main__':
    main()

"""CPU engines for an exported student graph (``dtkd.onnx_export``): onnxruntime and OpenVINO.

An engine replaces only the network's forward pass in ``dtkd-infer``: reading, padding, tiling, alpha
and writing are the same for every engine. :class:`GraphEngine` is a callable that takes what the
PyTorch network takes, (B, C, h, w) float32 RGB in [0, 1], and returns (B, C, scale*h, scale*w) float32
on the CPU.

Precisions: onnxruntime runs fp32; OpenVINO runs bf16 (``INFERENCE_PRECISION_HINT: bf16``) on CPUs with
bf16 matrix instructions (x86 AMX or AVX512-BF16, read from /proc/cpuinfo) and fp32 elsewhere, unless
asked for a precision.
"""
import importlib

import numpy as np
import torch

from dtkd.onnx_export import graph_info
from dtkd_compat import OptionError
from dtkd_utils.device import check_precision, cpu_flags

ENGINES = ('torch', 'onnxruntime', 'openvino')
# Python packages each engine imports (export to ONNX needs onnx); all of them: pip install 'dtkd[deploy]'
PACKAGES = {'torch': (), 'onnxruntime': ('onnxruntime', 'onnx'), 'openvino': ('openvino', 'onnx')}
PRECISIONS = {'torch': ('fp32', 'bf16', 'fp16'), 'onnxruntime': ('fp32',), 'openvino': ('fp32', 'bf16')}
# Substrings of the engines' messages for a failed allocation (onnxruntime: "Failed to allocate memory",
# OpenVINO: std::bad_alloc); such errors are re-raised as out-of-memory RuntimeErrors so that
# dtkd-infer retries with smaller tiles as it does for PyTorch.
_ALLOC_FAILURES = ('failed to allocate', 'bad_alloc', 'out of memory', 'cannot allocate')


def require(engine, option='--engine'):
    """Import the packages ``engine`` needs; raise an OptionError naming the pip packages that are missing."""
    if engine not in ENGINES:
        raise OptionError(f'{option}: expected one of {", ".join(ENGINES)}, got {engine!r}')
    missing = []
    for name in PACKAGES[engine]:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise OptionError(f"{option} {engine}: the Python package{'s' * (len(missing) > 1)} {' and '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: pip install {' '.join(missing)} "
                          "(or pip install 'dtkd[deploy]' for every engine)")


def openvino_has_bf16():
    """True on x86 CPUs with AMX-BF16 or AVX512-BF16, where OpenVINO's CPU plugin computes in bf16."""
    return bool({'amx_bf16', 'avx512_bf16'} & (cpu_flags() or set()))


def engine_precision(engine, precision=None, option='--precision'):
    """The precision ``engine`` runs in: ``precision`` when given (checked), else the engine's default
    (fp32; bf16 for OpenVINO where :func:`openvino_has_bf16`)."""
    if precision is None:
        return 'bf16' if engine == 'openvino' and openvino_has_bf16() else 'fp32'
    if precision not in PRECISIONS[engine]:
        raise OptionError(f'{option} {precision}: the {engine} engine runs {" or ".join(PRECISIONS[engine])}')
    if engine == 'openvino' and precision == 'bf16' and not openvino_has_bf16():
        raise OptionError(f'{option} bf16: OpenVINO computes bf16 on CPUs with AMX or AVX512-BF16, and this one '
                          'has neither; use fp32')
    return check_precision(precision, 'cpu', option)


class GraphEngine:
    """The forward pass of an exported student graph in onnxruntime or OpenVINO, on the CPU.

    Args:
        path (str): ONNX file (``dtkd.onnx_export.export_student``), batch 1, dynamic height and width.
        engine (str): 'onnxruntime' or 'openvino'.
        precision (str): 'fp32', or 'bf16' for OpenVINO (``engine_precision``).
        threads (int | None): intra-op threads; None keeps the engine's default (one per core).

    Attributes ``scale``, ``multiple`` (window size) and ``in_chans`` come from the file's metadata.
    """

    def __init__(self, path, engine, precision='fp32', threads=None):
        require(engine)
        self.engine, self.precision = engine, engine_precision(engine, precision)
        self.scale, self.multiple, self.in_chans = graph_info(path)
        if engine == 'onnxruntime':
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
            name = session.get_inputs()[0].name
            self._run = lambda x: session.run(None, {name: x})[0]
        elif engine == 'openvino':
            import openvino as ov

            config = {'INFERENCE_PRECISION_HINT': 'bf16' if self.precision == 'bf16' else 'f32',
                      'PERFORMANCE_HINT': 'LATENCY'}
            if threads:
                config['INFERENCE_NUM_THREADS'] = threads
            request = ov.Core().compile_model(path, 'CPU', config).create_infer_request()
            # the request's output tensor is reused by the next call: copy it
            self._run = lambda x: np.array(request.infer([x])[0], copy=True)
        else:
            raise OptionError(f'--engine: {engine!r} does not run an exported graph (onnxruntime or openvino)')

    def __call__(self, x):
        """x: (B, C, h, w) float tensor on the CPU -> (B, C, scale*h, scale*w) float32 tensor."""
        outs = []
        for image in x.detach().to('cpu', torch.float32):  # the graph takes one image at a time
            try:
                outs.append(torch.from_numpy(self._run(np.ascontiguousarray(image[None].numpy()))))
            except Exception as err:  # the engines' own exception types; only allocation failures are translated
                msg = str(err)
                if any(s in msg.lower() for s in _ALLOC_FAILURES):
                    raise RuntimeError(f'out of memory in {self.engine}: {msg.strip().splitlines()[0]}') from err
                raise
        return torch.cat(outs)

"""scripts/export_onnx.py: one ONNX file for every input size, equal to the PyTorch student.

The tiny student (TINY_STUDENT, random weights saved as a BasicSR checkpoint) is exported once,
traced at one size; onnxruntime then runs the file on inputs of sizes the export never saw, odd and
non-square ones and a real photograph among them, and is compared with SwinIRStudent, the network
``dtkd-infer`` runs.
"""
import contextlib
import importlib.util
import io
import os

import numpy as np
import onnx
import pytest
import torch

from conftest import REPO, TINY_STUDENT, photo, write_yaml
from dtkd_arch.swinir_student_arch import SwinIRStudent


def _script():
    spec = importlib.util.spec_from_file_location('export_onnx', os.path.join(REPO, 'scripts', 'export_onnx.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('onnx')
    torch.manual_seed(0)
    net = SwinIRStudent(**{k: v for k, v in TINY_STUDENT.items() if k != 'type'}).eval()
    # non-trivial relative position biases, so that a wrong mask or bias in the graph shows
    for name, p in net.named_parameters():
        if 'relative_position_bias_table' in name:
            p.data.normal_(0, 1)
    torch.save({'params_ema': net.state_dict()}, root / 'tiny.pth')
    opt = write_yaml(root / 'tiny.yml', {'network_g': dict(TINY_STUDENT, type='SwinIRStudent')})
    script = _script()
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            script.main(['-opt', opt, '--model', str(root / 'tiny.pth'), '-o', str(root / 'tiny.onnx'),
                         '--atol', '1e-5'])
    finally:
        torch.set_num_threads(n)
    return script, net, str(root / 'tiny.onnx'), printed.getvalue()


def test_export_checks_itself_and_is_dynamic(exported):
    _, _, path, out = exported
    assert 'max abs difference' in out and 'tolerance 1e-05' in out
    model = onnx.load(path)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_value == 1 and dims[1].dim_value == 3
    assert dims[2].dim_param and dims[3].dim_param  # symbolic height and width
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta['scale'] == '4' and meta['min_size'] == '8'
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.startswith('.')]


def test_onnxruntime_matches_pytorch_on_unseen_sizes(exported):
    script, net, path, _ = exported
    img = torch.from_numpy(photo('coffee')[100:161, 300:337].copy()).permute(2, 0, 1)[None].float() / 255
    g = torch.Generator().manual_seed(1)
    inputs = [img] + [torch.rand(1, 3, h, w, generator=g) for h, w in ((8, 13), (40, 40), (17, 64), (9, 8))]
    rows = script.check(path, net, inputs, threads=1)
    assert [shape for shape, _ in rows] == [tuple(x.shape) for x in inputs]
    worst = max(d for _, d in rows)
    assert worst < 1e-5, rows
    # the comparison can fail: another network's output is far away
    other = SwinIRStudent(**{k: v for k, v in TINY_STUDENT.items() if k != 'type'}).eval()
    assert max(d for _, d in script.check(path, other, inputs[:1], threads=1)) > 1e-2
    assert np.isfinite(worst)

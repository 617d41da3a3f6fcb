"""Metrics through BasicSR's METRIC_REGISTRY, checked against independent implementations.

PSNR / SSIM: scikit-image. LPIPS / MUSIQ: pyiqa's own ``create_metric`` path, fed the same weight
files; the networks are randomly initialised (the real weights are not available offline), which
tests the wiring (input conversion, weight lookup and loading, caching) without them.
"""
import dtkd_compat  # noqa: F401  (must precede basicsr)

# isort: split
import os

import cv2
import numpy as np
import pytest
import skimage.data
import torch
import torchvision
import yaml
from basicsr.metrics import calculate_metric
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

import dtkd_metric  # noqa: F401  (registers the metrics)
from dtkd_metric import perceptual_metric as pm
from dtkd_metric.weights import (
    ALEXNET,
    LPIPS_ALEX,
    MUSIQ_KONIQ,
    MissingFileError,
    OptionError,
    check_metric_weights,
    default_weight_path,
    resolve_metrics,
)

OPTIONS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'options', 'test_metrics.yml')


def _photo_pair(name='astronaut', size=96, seed=0):
    """A real photo crop (RGB uint8) and a blurred, noisy copy."""
    rgb = getattr(skimage.data, name)()
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    top, left = (rgb.shape[0] - size) // 3, (rgb.shape[1] - size) // 2
    gt = np.ascontiguousarray(rgb[top:top + size, left:left + size, :3])
    noise = np.random.default_rng(seed).normal(0, 6, gt.shape)
    sr = np.clip(cv2.GaussianBlur(gt, (0, 0), 1.2).astype(np.float64) + noise, 0, 255).round().astype(np.uint8)
    return sr, gt


def _bgr(rgb):
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _tensor(rgb):
    return torch.from_numpy(rgb.astype(np.float32) / 255.0).permute(2, 0, 1).unsqueeze(0)


def _load_metric_options():
    with open(OPTIONS_FILE, encoding='utf-8') as f:
        return yaml.safe_load(f)['val']['metrics']


@pytest.fixture(autouse=True)
def isolated_network_cache(monkeypatch):
    """Each test starts with an empty metric-network cache (``perceptual_metric._NETWORKS``) of its own,
    and the session's cache is put back afterwards: counts of cached networks do not depend on which
    tests (here or in other files) ran before."""
    monkeypatch.setattr(pm, '_NETWORKS', {})


# ---------------------------------------------------------------- PSNR / SSIM vs scikit-image

@pytest.mark.parametrize('photo', ['astronaut', 'coffee', 'chelsea'])
def test_psnr_ssim_rgb_match_skimage(photo):
    sr, gt = _photo_pair(photo, size=160)
    opts = _load_metric_options()
    c = 4
    psnr = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), opts['psnr'])
    ssim = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), opts['ssim'])
    sr_c, gt_c = sr[c:-c, c:-c], gt[c:-c, c:-c]
    ref_psnr = peak_signal_noise_ratio(gt_c, sr_c, data_range=255)
    # BasicSR's SSIM: 11x11 Gaussian window (sigma 1.5), population covariance, 'valid' region,
    # mean over the three channels: skimage with these settings (its window is 11 for sigma 1.5).
    ref_ssim = structural_similarity(gt_c.astype(np.float64), sr_c.astype(np.float64), data_range=255,
                                     channel_axis=2, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert psnr == pytest.approx(ref_psnr, abs=1e-9)
    assert ssim == pytest.approx(ref_ssim, abs=1e-6)
    assert 15 < psnr < 45 and 0.3 < ssim < 0.999


def test_psnr_ssim_y_channel_match_skimage():
    sr, gt = _photo_pair('astronaut', size=160, seed=3)
    opts = _load_metric_options()
    psnr_y = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), opts['psnr_y'])
    ssim_y = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), opts['ssim_y'])
    # ITU-R BT.601 luma in [16, 235], as MATLAB's rgb2ycbcr (both implementations).
    y_sr, y_gt = rgb2ycbcr(sr)[:, :, 0], rgb2ycbcr(gt)[:, :, 0]
    ref_psnr = peak_signal_noise_ratio(y_gt, y_sr, data_range=255)
    ref_ssim = structural_similarity(y_gt, y_sr, data_range=255, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    # BasicSR converts through float32: agreement to float32 precision.
    assert psnr_y == pytest.approx(ref_psnr, abs=1e-3)
    assert ssim_y == pytest.approx(ref_ssim, abs=1e-5)
    rgb_psnr = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), dict(opts['psnr'], crop_border=0))
    assert abs(psnr_y - rgb_psnr) > 0.01  # the protocol choice is visible in the numbers


def test_niqe_still_registered_and_orders_blur():
    opts = _load_metric_options()
    gt = _bgr(_photo_pair('astronaut', size=192)[1])
    blurred = cv2.GaussianBlur(gt, (0, 0), 2.0)
    clean = calculate_metric(dict(img=gt, img2=gt), opts['niqe'])
    blur = calculate_metric(dict(img=blurred, img2=gt), opts['niqe'])
    assert np.isfinite(clean) and blur > clean + 1.0  # NIQE: lower is better, blur is worse


# ---------------------------------------------------------------- LPIPS / MUSIQ with random networks

def _no_download(*args, **kwargs):
    raise AssertionError(f'a download was attempted: {args}')


@pytest.fixture(scope='module')
def random_weights(tmp_path_factory):
    """A torch hub dir holding randomly initialised networks under the real file names."""
    from pyiqa.archs.lpips_arch import LPIPS
    from pyiqa.archs.musiq_arch import MUSIQ

    root = tmp_path_factory.mktemp('torch_home')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('TORCH_HOME', str(root))
        mp.setattr(torch.hub, '_hub_dir', None)
        mp.setattr(torch.hub, 'download_url_to_file', _no_download)
        pm.clear_metric_networks()
        gen = torch.Generator().manual_seed(0)
        for weight in (ALEXNET, LPIPS_ALEX, MUSIQ_KONIQ):
            os.makedirs(os.path.dirname(default_weight_path(weight)), exist_ok=True)
        torch.manual_seed(0)
        torch.save(torchvision.models.alexnet(weights=None).state_dict(), default_weight_path(ALEXNET))
        lpips = LPIPS(pretrained=False)
        # Positive weights, as trained LPIPS has, so distances are positive; only the lin layers are stored.
        lin = {k: torch.rand(v.shape, generator=gen) + 0.05 for k, v in lpips.state_dict().items()
               if k.startswith('lin') and not k.startswith('lins')}
        torch.save(lin, default_weight_path(LPIPS_ALEX))
        musiq = MUSIQ(pretrained=False)
        torch.save(musiq.state_dict(), default_weight_path(MUSIQ_KONIQ))
        yield {'root': root, 'mp': mp}
        pm.clear_metric_networks()


def _pyiqa_reference(metric, pretrained_model_path, *images):
    import pyiqa

    ref = pyiqa.create_metric(metric, device='cpu', pretrained_model_path=pretrained_model_path)
    return float(ref(*images).reshape(-1)[0])


def test_lpips_matches_pyiqa_and_builds_one_network_per_run(random_weights):
    sr, gt = _photo_pair('coffee', size=64)
    opts = _load_metric_options()['lpips']
    value = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), opts)
    ref = _pyiqa_reference('lpips', default_weight_path(LPIPS_ALEX), _tensor(sr), _tensor(gt))
    assert value == pytest.approx(ref, rel=1e-5, abs=1e-7)
    assert value > 1e-4
    same = calculate_metric(dict(img=_bgr(gt), img2=_bgr(gt)), opts)
    assert same == pytest.approx(0.0, abs=1e-7)
    # One network for every image of the run.
    assert pm.get_lpips_metric('cpu') is pm.get_lpips_metric('cpu')
    assert sum(1 for key in pm._NETWORKS if key[0] == 'lpips') == 1


def test_lpips_batched_api_matches_per_image(random_weights):
    pairs = [_photo_pair(name, size=48, seed=i) for i, name in enumerate(['astronaut', 'chelsea'])]
    metric = pm.get_lpips_metric('cpu')
    batch = metric(torch.cat([_tensor(s) for s, _ in pairs]), torch.cat([_tensor(g) for _, g in pairs]))
    assert batch.shape == (2,)
    singles = [calculate_metric(dict(img=_bgr(s), img2=_bgr(g)), {'type': 'calculate_lpips'}) for s, g in pairs]
    np.testing.assert_allclose(batch.numpy(), singles, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match='B x 3 x H x W'):
        metric(_tensor(pairs[0][0])[0], _tensor(pairs[0][1])[0])


def test_lpips_weight_paths_from_options(random_weights, tmp_path):
    """weights_path / backbone_path override the caches, and the hub dir is left as it was."""
    from pyiqa.archs.lpips_arch import LPIPS

    torch.manual_seed(1)
    lin = tmp_path / 'my_lpips.pth'
    # The other spelling of the same layers (``lins.<i>``), which some LPIPS files use.
    torch.save({k: v.abs() + 0.05 for k, v in LPIPS(pretrained=False).state_dict().items() if k.startswith('lins')},
               lin)
    sr, gt = _photo_pair('astronaut', size=48)
    default = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), {'type': 'calculate_lpips'})
    backbone = default_weight_path(ALEXNET)
    # An empty cache: only the files named in the options can be used.
    random_weights['mp'].setattr(torch.hub, '_hub_dir', str(tmp_path / 'empty_hub'))
    try:
        opts = {'type': 'calculate_lpips', 'weights_path': str(lin), 'backbone_path': backbone}
        assert len(check_metric_weights({'lpips': {'type': 'calculate_lpips'}}, raise_error=False)) == 2
        assert check_metric_weights({'lpips': opts}) == []
        value = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), opts)
        assert torch.hub.get_dir() == str(tmp_path / 'empty_hub')
    finally:
        random_weights['mp'].setattr(torch.hub, '_hub_dir', None)
    assert abs(value - default) > 1e-6
    ref = _pyiqa_reference('lpips', str(lin), _tensor(sr), _tensor(gt))
    assert value == pytest.approx(ref, rel=1e-5, abs=1e-7)


def test_wrong_or_corrupt_weight_files_are_named(random_weights, tmp_path):
    sr, gt = _photo_pair('astronaut', size=32)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(b'not a checkpoint')
    wrong = tmp_path / 'wrong.pth'
    torch.save({'head.weight': torch.zeros(1, 384)}, wrong)
    with pytest.raises(pm.OptionError) as info:  # no fallback to full unpickling, no warning
        calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), {'type': 'calculate_lpips', 'weights_path': str(corrupt)})
    assert f'Could not read LPIPS v0.1 linear layers for AlexNet (pyiqa) from {corrupt}' in str(info.value)
    with pytest.raises(pm.OptionError, match='is not an LPIPS v0.1 AlexNet linear-layer file') as info:
        calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), {'type': 'calculate_lpips', 'weights_path': str(wrong)})
    assert str(wrong) in str(info.value)
    with pytest.raises(pm.OptionError, match='is not a MUSIQ KonIQ checkpoint'):
        pm.calculate_musiq(_bgr(sr), weights_path=str(wrong))


def test_musiq_matches_pyiqa_and_builds_one_network(random_weights):
    sr, gt = _photo_pair('chelsea', size=64)
    opts = _load_metric_options()['musiq']
    value = calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), opts)
    ref = _pyiqa_reference('musiq', default_weight_path(MUSIQ_KONIQ), _tensor(sr))
    assert value == pytest.approx(ref, rel=1e-4, abs=1e-5)
    assert sum(1 for key in pm._NETWORKS if key[0] == 'musiq') == 1


def test_option_file_metrics_resolve_with_defaults_and_their_weights_present(random_weights):
    opts = _load_metric_options()
    del opts['niqe']['better']
    metrics, warnings = resolve_metrics(opts)
    assert list(metrics) == list(opts) and warnings == []
    assert metrics['niqe']['better'] == 'lower' and 'better' not in opts['niqe']  # default added to a copy
    assert metrics['musiq'].get('better', 'higher') == 'higher'
    assert check_metric_weights(opts) == []


def test_image_to_tensor_converts_bgr_to_rgb_crops_the_border_and_checks_the_shape():
    img = np.zeros((6, 5, 3), np.uint8)
    img[..., 0] = 255  # blue in BGR
    x = pm.image_to_tensor(img, crop_border=1)
    assert x.shape == (1, 3, 4, 3)
    assert torch.all(x[0, 2] == 1) and torch.all(x[0, :2] == 0)
    with pytest.raises(ValueError, match='H x W x 3'):
        pm.image_to_tensor(np.zeros((4, 4, 2), np.uint8))


# ---------------------------------------------------------------- missing weights

@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty_home'))
    monkeypatch.setattr(torch.hub, '_hub_dir', None)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', _no_download)
    pm.clear_metric_networks()
    return tmp_path / 'empty_home' / 'hub'


def test_missing_weights_message_names_file_dir_and_fix(empty_hub):
    opts = _load_metric_options()
    with pytest.raises(MissingFileError) as info:
        check_metric_weights(opts)
    message = str(info.value)
    for weight in (ALEXNET, LPIPS_ALEX, MUSIQ_KONIQ):
        assert weight.name in message
    assert str(empty_hub / 'checkpoints') in message and str(empty_hub / 'pyiqa') in message
    assert 'scripts/fetch_metric_weights.py' in message and 'optional: true' in message
    assert 'Traceback' not in message
    assert len(info.value.problems) == 3
    assert check_metric_weights(opts, raise_error=False) == info.value.problems
    with pytest.raises(MissingFileError):
        resolve_metrics(opts)


def test_missing_weights_stop_before_any_network_is_built(empty_hub):
    sr, gt = _photo_pair('astronaut', size=32)
    with pytest.raises(MissingFileError, match=LPIPS_ALEX.name):
        calculate_metric(dict(img=_bgr(sr), img2=_bgr(gt)), {'type': 'calculate_lpips'})
    with pytest.raises(MissingFileError, match='given by val.metrics.musiq.weights_path'):
        check_metric_weights({'musiq': {'type': 'calculate_musiq', 'weights_path': str(empty_hub / 'nope.pth')}})
    assert pm._NETWORKS == {}


def test_optional_metrics_are_skipped_with_a_warning(empty_hub):
    opts = _load_metric_options()
    opts['lpips']['optional'] = True
    opts['musiq']['optional'] = True
    metrics, warnings = resolve_metrics(opts)
    assert set(metrics) == {'psnr', 'psnr_y', 'ssim', 'ssim_y', 'niqe'}
    assert len(warnings) == 2 and 'lpips' in warnings[0] and MUSIQ_KONIQ.name in warnings[1]
    assert check_metric_weights(opts) == []


@pytest.mark.parametrize('entry, match', [
    ({'crop_border': 0}, 'needs a "type"'),
    ({'type': 'calculate_nothing'}, 'unknown metric'),
    ({'type': 'calculate_psnr', 'optional': 'yes'}, 'optional must be true or false'),
    ({'type': 'calculate_psnr', 'better': 'up'}, 'better must be'),
])
def test_bad_metric_options_are_named(entry, match):
    with pytest.raises(OptionError, match=match) as info:
        resolve_metrics({'m': entry})
    assert 'val.metrics.m' in str(info.value)


def test_fetch_script_lists_destinations_without_downloading(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setattr(torch.hub, 'download_url_to_file', _no_download)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts',
                        'fetch_metric_weights.py')
    spec = importlib.util.spec_from_file_location('fetch_metric_weights', path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    hub = tmp_path / 'hub'
    assert script.main(['--list', '--hub-dir', str(hub)]) == 0
    out = capsys.readouterr().out
    for weight in (ALEXNET, LPIPS_ALEX, MUSIQ_KONIQ):
        assert f'missing {hub / weight.cache / weight.name}' in out
    # Files already in place are kept, not downloaded again.
    (hub / 'pyiqa').mkdir(parents=True)
    (hub / 'pyiqa' / MUSIQ_KONIQ.name).write_bytes(b'x')
    assert script.main(['--metric', 'musiq', '--hub-dir', str(hub)]) == 0
    assert f'present: {hub / "pyiqa" / MUSIQ_KONIQ.name}' in capsys.readouterr().out

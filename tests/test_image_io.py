"""The project's one image reader (``dtkd_data.image_io``): decoded pixels checked against independent
decoders (PIL, and PNGs assembled byte by byte here), for 8-bit, 16-bit, gray, alpha, palette,
float and EXIF-oriented images; header sizes agree with the pixels; errors name the file and say what
is wrong, without OpenCV's own log lines; the training and LMDB policies on top."""
import io
import struct
import zlib

import cv2
import numpy as np
import pytest
from PIL import Image, ImageOps

import dtkd_data  # noqa: F401  (makes basicsr importable)
from conftest import photo
from dtkd_compat import OptionError
from dtkd_data import image_checks, image_io
from dtkd_data.image_io import (
    BadImageError,
    as_lmdb,
    as_training,
    image_size,
    png_info,
    probe_bytes,
    read_image,
    read_lmdb_image,
    read_training_image,
)


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def pil_decode(data, mode=None):
    """Independent reference: PIL's decoder with ``ImageOps.exif_transpose``; RGB(A) order."""
    with Image.open(io.BytesIO(data)) as img:
        img = ImageOps.exif_transpose(img)
        return np.asarray(img.convert(mode) if mode else img)


def to_bgr(rgb):
    return rgb[..., [2, 1, 0, 3]] if rgb.shape[2] == 4 else rgb[..., ::-1]


def handmade_png(samples, ctype, depth, chunks=()):
    """A PNG assembled here (no encoder library): ``samples`` (H, W[, C]) in RGB(A) order, filter 0."""
    h, w = samples.shape[:2]
    rows = samples.astype('>u2' if depth == 16 else np.uint8).reshape(h, -1)
    raw = b''.join(b'\x00' + row.tobytes() for row in rows)

    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))

    return (image_io.PNG_SIGNATURE + chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, depth, ctype, 0, 0, 0))
            + b''.join(chunk(k, b) for k, b in chunks) + chunk(b'IDAT', zlib.compress(raw)) + chunk(b'IEND', b''))


RNG = np.random.default_rng(0)
RGB = photo('coffee')[100:140, 200:256]  # 40 x 56


# ---------------------------------------------------------------------------------------------- pixels
def test_8bit_colour_and_gray_match_pil(tmp_path):
    for fmt, kw in (('PNG', {}), ('BMP', {}), ('WEBP', {'lossless': True}), ('TIFF', {}), ('PPM', {})):
        data = encode(Image.fromarray(RGB), fmt, **kw)
        img = read_image(data)
        assert img.dtype == np.uint8 and img.shape == (40, 56, 3), fmt
        np.testing.assert_array_equal(img, to_bgr(pil_decode(data)), err_msg=fmt)
    gray = encode(Image.fromarray(RGB).convert('L'), 'PNG')
    (tmp_path / 'g.png').write_bytes(gray)
    img = read_image(tmp_path / 'g.png')  # a path works as well as bytes
    assert img.shape == (40, 56)
    np.testing.assert_array_equal(img, pil_decode(gray))


def test_16bit_images_keep_every_sample():
    rgb16 = RNG.integers(0, 65536, (9, 7, 3), dtype=np.uint16)
    rgba16 = np.dstack([rgb16, np.full((9, 7), 65535, np.uint16)])
    gray16 = RNG.integers(0, 65536, (9, 7), dtype=np.uint16)
    for samples, ctype in ((rgb16, 2), (rgba16, 6), (gray16, 0)):
        img = read_image(handmade_png(samples, ctype, 16))
        assert img.dtype == np.uint16
        np.testing.assert_array_equal(img, to_bgr(samples) if samples.ndim == 3 else samples)
    # and PIL, a second independent decoder, agrees on the gray one
    np.testing.assert_array_equal(read_image(handmade_png(gray16, 0, 16)), pil_decode(handmade_png(gray16, 0, 16)))


def test_alpha_and_palette_match_pil():
    rgba = np.dstack([RGB, RNG.integers(0, 256, RGB.shape[:2], dtype=np.uint8)])
    data = encode(Image.fromarray(rgba), 'PNG')
    np.testing.assert_array_equal(read_image(data), to_bgr(pil_decode(data)))
    # gray + alpha: BGRA with three equal channels
    la = encode(Image.fromarray(rgba).convert('LA'), 'PNG')
    np.testing.assert_array_equal(read_image(la), to_bgr(pil_decode(la, 'RGBA')))
    # palette: BGR, or BGRA with its transparency
    pal = Image.fromarray(RGB).convert('P', palette=Image.Palette.ADAPTIVE, colors=16)
    for kw, mode, channels in (({}, 'RGB', 3), ({'transparency': 3}, 'RGBA', 4)):
        data = encode(pal, 'PNG', **kw)
        img = read_image(data)
        assert img.shape == (40, 56, channels)
        np.testing.assert_array_equal(img, to_bgr(pil_decode(data, mode)))
    # gray with a tRNS colour key (OpenCV alone ignores it): BGRA, transparent where the key is
    gray = np.asarray(Image.fromarray(RGB).convert('L'))
    key = int(gray[5, 5])
    data = encode(Image.fromarray(gray), 'PNG', transparency=key)
    img = read_image(data)
    np.testing.assert_array_equal(img, to_bgr(pil_decode(data, 'RGBA')))
    assert img[5, 5, 3] == 0 and (img[..., 3] == 0).sum() == (gray == key).sum()


def test_float_tiff_stays_float(tmp_path):
    values = RNG.random((6, 5), dtype=np.float32) * 3 - 1
    assert cv2.imwrite(str(tmp_path / 'f.tif'), values)
    img = read_image(tmp_path / 'f.tif')
    assert img.dtype == np.float32
    np.testing.assert_array_equal(img, pil_decode((tmp_path / 'f.tif').read_bytes()))
    with pytest.raises(BadImageError, match=r'f\.tif has float32 pixels \(8- or 16-bit images expected\)'):
        read_training_image(tmp_path / 'f.tif')


# ---------------------------------------------------------------------------------------------- orientation
def _exif(orientation):
    exif = Image.Exif()
    exif[image_io.EXIF_ORIENTATION] = orientation
    return exif.tobytes()


@pytest.mark.parametrize('orientation', range(1, 9))
@pytest.mark.parametrize('kind', ['jpeg', 'gray_jpeg', 'png', 'rgba_png', 'webp', 'tiff'])
def test_exif_orientation_is_applied_like_pil(kind, orientation, tmp_path):
    src = Image.fromarray(RGB)
    if kind == 'jpeg':
        data = encode(src, 'JPEG', quality=90, exif=_exif(orientation))
    elif kind == 'gray_jpeg':
        data = encode(src.convert('L'), 'JPEG', quality=90, exif=_exif(orientation))
    elif kind == 'png':
        data = encode(src, 'PNG', exif=_exif(orientation))
    elif kind == 'rgba_png':  # OpenCV's own orientation needs the alpha dropped; the reader's does not
        data = encode(src.convert('RGBA'), 'PNG', exif=_exif(orientation))
    elif kind == 'webp':
        data = encode(src, 'WEBP', lossless=True, exif=_exif(orientation))
    else:  # TIFF decoders orient while decoding
        data = encode(src, 'TIFF', exif=_exif(orientation))
    ref = pil_decode(data)
    img = read_image(data)
    assert img.shape[:2] == ((56, 40) if orientation >= 5 else (40, 56))
    np.testing.assert_array_equal(img, to_bgr(ref) if ref.ndim == 3 else ref)
    # the header functions report the oriented size
    (tmp_path / 'x').write_bytes(data)
    assert (probe_bytes(data).h, probe_bytes(data).w) == image_size(tmp_path / 'x') == img.shape[:2]
    if kind in ('jpeg', 'png', 'webp'):  # the same as OpenCV's orientation where OpenCV applies it
        np.testing.assert_array_equal(img, cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR))


def test_training_and_lmdb_policies_see_the_oriented_image():
    data = encode(Image.fromarray(RGB), 'PNG', exif=_exif(6))
    oriented = to_bgr(pil_decode(data))
    np.testing.assert_array_equal(read_lmdb_image(data), oriented)
    np.testing.assert_array_equal(read_training_image(data), oriented.astype(np.float32) / 255)


# ---------------------------------------------------------------------------------------------- errors
def _cut(data, fraction=0.6):
    return data[:int(len(data) * fraction)]


def _bad_files(tmp_path):
    png = encode(Image.fromarray(RGB), 'PNG')
    damaged = bytearray(png)
    damaged[200:240] = bytes(40)
    files = {
        'empty.png': (b'', r'is empty \(0 bytes\)'),
        'cut.png': (_cut(png), 'is truncated'),
        'cut.jpg': (_cut(encode(Image.fromarray(RGB), 'JPEG')), 'is truncated'),
        'crc.png': (bytes(damaged), r'is corrupt \(CRC error in its IDAT chunk'),
        'notes.png': (b'plain text, not an image ' * 4, 'is not an image format OpenCV or PIL can read'),
        'broken.jpg': (b'\xff\xd8 not really a jpeg', r'has a damaged JPEG header'),
        'cmyk.jpg': (encode(Image.fromarray(RGB).convert('CMYK'), 'JPEG'), 'is a CMYK JPEG; convert it to RGB'),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    return files


def test_errors_name_the_file_and_say_what_is_wrong(tmp_path):
    for name, (data, reason) in _bad_files(tmp_path).items():
        path = str(tmp_path / name)
        with pytest.raises(BadImageError, match=reason) as info:
            read_image(path)
        err = info.value
        assert str(err).startswith(f'{path} ') and err.name == path and str(err) == f'{path} {err.reason}', name
        assert isinstance(err, image_checks.BadImageError) and isinstance(err, OptionError)
        with pytest.raises(BadImageError, match=f'^LQ image k1 of x.lmdb {reason}'):  # bytes: the name given
            read_image(data, 'LQ image k1 of x.lmdb')
    with pytest.raises(FileNotFoundError, match=r'missing\.png does not exist'):  # also a BadImageError
        read_image(tmp_path / 'missing.png')
    with pytest.raises(BadImageError, match='is not a file'):
        read_image(tmp_path)
    with pytest.raises(BadImageError, match=r'cut\.png is truncated'):
        image_size(tmp_path / 'cut.png')


def test_opencv_log_lines_are_silenced(tmp_path, capfd):
    """A TIFF or BMP cut short makes OpenCV print '[ERROR:0@...]' lines of its own; through the reader
    only the project's error remains, and OpenCV's log level is as it was."""
    logging = cv2.utils.logging
    old = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_WARNING)
    try:
        rgb = np.ascontiguousarray(RGB[..., ::-1])
        cut = {ext: _cut(cv2.imencode(ext, rgb)[1].tobytes(), 0.5) for ext in ('.tif', '.bmp')}
        for data in cut.values():
            assert cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) is None
        assert '[ERROR' in capfd.readouterr().err  # what the reader has to keep quiet
        for ext, data in cut.items():
            with pytest.raises(BadImageError, match=f'cut{ext} is'):
                read_image(data, f'cut{ext}')
        err = capfd.readouterr().err
        assert '[ERROR' not in err and '[ WARN' not in err and 'libpng' not in err, err
        assert logging.getLogLevel() == logging.LOG_LEVEL_WARNING
        with image_io.quiet_opencv(), image_io.quiet_opencv():  # nested: one silencing, restored once
            assert logging.getLogLevel() == logging.LOG_LEVEL_SILENT
        assert logging.getLogLevel() == logging.LOG_LEVEL_WARNING
    finally:
        logging.setLogLevel(old)


# ---------------------------------------------------------------------------------------------- policies
def test_training_policy():
    bgr8 = np.ascontiguousarray(RGB[..., ::-1])
    np.testing.assert_array_equal(as_training(bgr8), bgr8.astype(np.float32) / 255)
    bgr16 = bgr8.astype(np.uint16) * 257 + 1
    out = as_training(bgr16)
    assert out.dtype == np.float32 and np.array_equal(out, bgr16.astype(np.float32) / 65535)
    gray = as_training(bgr8[..., 0])
    assert gray.shape == (40, 56, 3) and (gray[..., 0] == gray[..., 2]).all()
    opaque = np.dstack([bgr8, np.full((40, 56), 255, np.uint8)])
    np.testing.assert_array_equal(as_training(opaque), bgr8.astype(np.float32) / 255)
    opaque[0, :3, 3] = 7
    with pytest.raises(BadImageError, match=r'^a\.png has transparent pixels \(3 of 2240\)'):
        as_training(opaque, 'a.png')


def test_lmdb_policy_stores_what_the_file_holds():
    gray16 = RNG.integers(0, 65536, (5, 6), dtype=np.uint16)
    out = read_lmdb_image(handmade_png(gray16, 0, 16))
    assert out.dtype == np.uint16 and np.array_equal(out, gray16)  # gray stays gray, 16 bits stay 16 bits
    rgba = np.dstack([RGB, np.full((40, 56), 255, np.uint8)])
    np.testing.assert_array_equal(as_lmdb(to_bgr(rgba)), RGB[..., ::-1])  # opaque alpha dropped
    rgba[3, 3, 3] = 0
    with pytest.raises(BadImageError, match='x.png has transparent pixels'):
        read_lmdb_image(encode(Image.fromarray(rgba), 'PNG'), 'x.png')


def test_png_info_is_the_header_parser():
    data = handmade_png(RNG.integers(0, 256, (5, 6, 3), dtype=np.uint8), 2, 8)
    info = png_info(data)
    assert (info.h, info.w, info.channels, info.depth, info.alpha) == (5, 6, 3, 8, False)
    with pytest.raises(BadImageError, match='is not a PNG'):
        png_info(b'GIF89a' + bytes(40))

"""The project's one image reader, and the policies its consumers apply on top.

:func:`read_image` decodes a file or encoded bytes into the image **as stored**; everything that reads
an image (training and test data sets, the data-set scan, LMDB preparation, the teacher cache,
``dtkd-infer``, the figures) goes through it, so every consumer sees the same pixels:

- layout: ``(H, W)`` gray, ``(H, W, 3)`` BGR or ``(H, W, 4)`` BGRA. Gray with alpha (PNG gray+alpha, or
  gray with a tRNS colour key that some pixel uses) comes back as BGRA with equal colour channels, as
  OpenCV returns gray+alpha images; palette images come back as BGR, or BGRA when they have transparency.
- pixel type as stored: ``uint8``, ``uint16`` or ``float32`` (float TIFF/EXR/HDR/PFM; ``float64`` is
  converted to ``float32``). Other types (32-bit integer TIFFs, ...) are refused.
- EXIF orientation applied, for every format and layout the same way (as ``PIL.ImageOps.exif_transpose``):
  OpenCV applies it only when asked to drop alpha and 16 bits, so the reader decodes with
  ``IMREAD_UNCHANGED`` and turns the image itself (TIFF decoders already apply it while decoding).
  The sizes the header functions (:func:`probe_bytes`, :func:`probe_file`, :func:`image_size`) report
  are the oriented sizes, so header and pixels always agree.
- refused with :class:`BadImageError` (an ``OptionError``) whose message names the file (or the ``name``
  given) and says what is wrong: a missing (then also a ``FileNotFoundError``), empty, truncated or
  corrupt file, an unknown format, a CMYK/YCCK JPEG (converting it needs its colour profile), a layout
  or pixel type outside the above. A PNG or JPEG that does not end with its end marker is decoded in
  full by PIL to tell truncation from trailing data. OpenCV's own log lines ("[ERROR:0@...]") are
  silenced while the reader decodes, so the project's message is the only one.

Policies, small and explicit, for consumers that need something else than the stored image:

- :func:`as_training`: ``float32`` BGR ``(H, W, 3)`` in [0, 1] (``value / 255`` or ``value / 65535``:
  16-bit images keep their precision); gray expanded to three channels; opaque alpha dropped,
  transparent pixels refused (they have no defined colour); float images refused (8 or 16 bits).
  Used for training/validation/test images, the teacher cache's LQ inputs and the figures.
- :func:`as_lmdb`: what LMDB preparation stores (PNG-encoded): ``uint8`` or ``uint16``, gray or BGR as
  stored; opaque alpha dropped, transparency refused, float refused.
- inference (``dtkd-infer``) uses :func:`read_image` as it is: alpha, 16 bits and float are kept.
"""
import io
import os
import struct
import threading
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass

import cv2
import numpy as np

from dtkd_compat import MissingFileError, OptionError

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'
PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'
HEAD_BYTES = 1 << 16
EXIF_ORIENTATION = 0x0112


class BadImageError(OptionError):
    """An image cannot be used; the message names it and says why.

    ``reason`` is what is wrong (without the name), ``name`` the file or image it is about (None when
    the message carries no separate name).
    """

    def __init__(self, reason, name=None):
        self.reason, self.name = reason, name
        super().__init__(f'{name} {reason}' if name else reason)


class MissingImageError(BadImageError, MissingFileError):
    """The image file does not exist (also a ``FileNotFoundError``)."""


class _NeedMore(Exception):
    """The header lies beyond the bytes read so far."""


@dataclass
class ImageInfo:
    """What an image's header says.

    ``h``, ``w``: the size after EXIF orientation (what :func:`read_image` returns). ``channels`` as
    stored (1 gray, 2 gray+alpha, 3, 4 RGBA/CMYK). ``orientation``: the EXIF orientation (1-8) that
    :func:`read_image` still applies after decoding (1 when there is none or the decoder applies it).
    ``gray_key``: a gray PNG's tRNS colour key (the stored sample value that is transparent).
    """
    fmt: str
    h: int
    w: int
    channels: int
    depth: int
    alpha: bool = False
    cmyk: str = None  # 'CMYK' or 'YCCK' (Adobe's YCbCr-coded CMYK) for four-colour images
    orientation: int = 1
    gray_key: int = None

    @property
    def gray(self):
        return self.channels in (1, 2) and not self.cmyk

    def describe(self):
        kind = self.cmyk or {1: 'gray', 2: 'gray+alpha', 3: 'RGB', 4: 'RGBA'}[self.channels]
        return f'{self.fmt} {self.h}x{self.w} {kind} {self.depth}-bit'


# ---------------------------------------------------------------------------------------------- EXIF
def exif_orientation(tiff):
    """The Orientation tag (1-8) of a TIFF-structured EXIF block (``Exif\\0\\0`` prefix allowed); 1 when
    absent or invalid."""
    if tiff[:6] == b'Exif\x00\x00':
        tiff = tiff[6:]
    order = {b'II': '<', b'MM': '>'}.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8 or struct.unpack(order + 'H', tiff[2:4])[0] != 42:
        return 1
    offset = struct.unpack(order + 'I', tiff[4:8])[0]
    if offset + 2 > len(tiff):
        return 1
    for i in range(struct.unpack(order + 'H', tiff[offset:offset + 2])[0]):
        pos = offset + 2 + 12 * i
        if pos + 12 > len(tiff):
            break
        tag, kind = struct.unpack(order + 'HH', tiff[pos:pos + 4])
        if tag == EXIF_ORIENTATION:
            if kind == 3:  # SHORT
                value = struct.unpack(order + 'H', tiff[pos + 8:pos + 10])[0]
            elif kind == 4:  # LONG
                value = struct.unpack(order + 'I', tiff[pos + 8:pos + 12])[0]
            else:
                return 1
            return value if 1 <= value <= 8 else 1
    return 1


def apply_orientation(img, orientation):
    """``img`` (H, W[, C]) turned as EXIF ``orientation`` asks (the transposes of ``PIL.ImageOps.exif_transpose``)."""
    if orientation == 2:
        img = img[:, ::-1]
    elif orientation == 3:
        img = img[::-1, ::-1]
    elif orientation == 4:
        img = img[::-1]
    elif orientation == 5:
        img = img.swapaxes(0, 1)
    elif orientation == 6:
        img = img.swapaxes(0, 1)[:, ::-1]
    elif orientation == 7:
        img = img.swapaxes(0, 1)[::-1, ::-1]
    elif orientation == 8:
        img = img.swapaxes(0, 1)[::-1]
    else:
        return img
    return np.ascontiguousarray(img)


def _oriented(info):
    if info.orientation in (5, 6, 7, 8):
        info.h, info.w = info.w, info.h
    return info


# ---------------------------------------------------------------------------------------------- headers
def _png_info(data):
    if len(data) < 33:
        raise _NeedMore
    if data[12:16] != b'IHDR':
        raise BadImageError('has a damaged PNG header (no IHDR chunk)')
    w, h, depth, ctype = struct.unpack('>IIBB', data[16:26])
    if ctype not in (0, 2, 3, 4, 6) or depth not in (1, 2, 4, 8, 16) or w == 0 or h == 0:
        raise BadImageError(f'has an invalid PNG header (size {w}x{h}, bit depth {depth}, colour type {ctype})')
    info = ImageInfo('PNG', h, w, {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}[ctype], 8 if ctype == 3 else depth,
                     alpha=ctype in (4, 6))
    pos = 8  # ancillary chunks before the image data: tRNS (transparency), eXIf (orientation)
    while True:
        if pos + 8 > len(data):
            raise _NeedMore
        length, kind = struct.unpack('>I4s', data[pos:pos + 8])
        if kind in (b'IDAT', b'IEND'):
            break
        if kind in (b'tRNS', b'eXIf'):
            if pos + 8 + length > len(data):
                raise _NeedMore
            body = data[pos + 8:pos + 8 + length]
            if kind == b'eXIf':
                info.orientation = exif_orientation(body)
            elif not info.alpha:
                info.alpha = True
                if ctype == 0 and len(body) >= 2:
                    key = int.from_bytes(body[:2], 'big')
                    info.gray_key = key if depth >= 8 else key * 255 // (2 ** depth - 1)  # OpenCV expands to 8 bits
        pos += 12 + length
    return _oriented(info)


def png_info(data):
    """:class:`ImageInfo` from an encoded PNG's header chunks (no decoding); raises BadImageError."""
    data = bytes(data)
    if not data.startswith(PNG_SIGNATURE):
        raise BadImageError('is not a PNG (no PNG signature)')
    try:
        return _png_info(data)
    except _NeedMore:
        raise BadImageError('is truncated (it ends inside its PNG header)') from None


_JPEG_SOF = set(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def _jpeg_info(data):
    pos, adobe, orientation = 2, None, 1
    while True:
        if pos + 4 > len(data):
            raise _NeedMore
        if data[pos] != 0xFF:
            raise BadImageError(f'has a damaged JPEG header (no marker at byte {pos})')
        marker = data[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        if marker in (0xD9, 0xDA):
            raise BadImageError('has no JPEG frame header before its image data')
        length = int.from_bytes(data[pos + 2:pos + 4], 'big')
        if pos + 2 + length > len(data):
            raise _NeedMore
        seg = data[pos + 4:pos + 2 + length]
        if marker == 0xEE and seg[:5] == b'Adobe' and len(seg) >= 12:
            adobe = seg[11]
        if marker == 0xE1 and seg[:6] == b'Exif\x00\x00' and orientation == 1:
            orientation = exif_orientation(seg[6:])
        if marker in _JPEG_SOF:
            if len(seg) < 6:
                raise BadImageError('has a damaged JPEG frame header')
            depth, h, w, ncomp = struct.unpack('>BHHB', seg[:6])
            if ncomp not in (1, 3, 4) or w == 0:
                raise BadImageError(f'has an unsupported JPEG layout ({ncomp} components, width {w})')
            cmyk = ('YCCK' if adobe == 2 else 'CMYK') if ncomp == 4 else None
            return _oriented(ImageInfo('JPEG', h, w, ncomp, depth, cmyk=cmyk, orientation=orientation))
        pos += 2 + length


# PIL mode -> (channels, bits per channel)
_PIL_MODES = {'1': (1, 8), 'L': (1, 8), 'P': (3, 8), 'LA': (2, 8), 'PA': (4, 8), 'RGB': (3, 8), 'RGBA': (4, 8),
              'RGBX': (3, 8), 'CMYK': (4, 8), 'YCbCr': (3, 8), 'I;16': (1, 16), 'I;16B': (1, 16), 'I;16L': (1, 16),
              'I;16N': (1, 16), 'I': (1, 32), 'F': (1, 32)}


def _pil_info(data):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(io.BytesIO(data)) as img:
                w, h, mode, fmt = img.size[0], img.size[1], img.mode, img.format or 'image'
                transparency = 'transparency' in img.info
                # PIL's TIFF reader (like OpenCV's) reports and decodes TIFFs already oriented
                orientation = 1 if fmt == 'TIFF' else img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception as err:  # PIL raises many kinds for unknown or damaged files
        raise BadImageError(f'is not a readable image ({_first_line(err)})') from None
    if mode not in _PIL_MODES:
        raise BadImageError(f'has an unsupported pixel format ({fmt} mode {mode}; gray, RGB or RGBA expected)')
    channels, depth = _PIL_MODES[mode]
    orientation = orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1
    return _oriented(ImageInfo(fmt, h, w, channels, depth, alpha=mode in ('LA', 'PA', 'RGBA') or transparency,
                               cmyk='CMYK' if mode == 'CMYK' else None, orientation=orientation))


def _first_line(err):
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _header(data):
    if data.startswith(PNG_SIGNATURE):
        return _png_info(data)
    if data.startswith(b'\xff\xd8'):
        return _jpeg_info(data)
    return _pil_info(data)


def _ends_cleanly(fmt, tail):
    """Whether the last bytes end the format's stream (False: possibly truncated, decode to decide)."""
    if fmt == 'PNG':
        return tail.endswith(PNG_END)
    if fmt == 'JPEG':
        return tail.rstrip(b'\x00\r\n ').endswith(b'\xff\xd9')
    return True


def verify_decodes(data):
    """Decode ``data`` in full with PIL (strict about truncation); raises BadImageError with the reason."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(io.BytesIO(data)) as img:
                img.load()
    except (OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error, Image.DecompressionBombError) as err:
        message = _first_line(err)
        if 'truncated' in message.lower() or isinstance(err, EOFError):
            raise BadImageError(f'is truncated ({message})') from None
        raise BadImageError(f'is corrupt ({message})') from None


# ---------------------------------------------------------------------------------------------- probing
class _Bytes:
    def __init__(self, data):
        self.data = data
        self.size = len(data)

    def head(self, n):
        return self.data[:n]

    def tail(self, n):
        return self.data[-n:]

    def all(self):
        return self.data


class _File:
    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)

    def head(self, n):
        with open(self.path, 'rb') as f:
            return f.read(n)

    def tail(self, n):
        with open(self.path, 'rb') as f:
            f.seek(max(self.size - n, 0))
            return f.read()

    def all(self):
        with open(self.path, 'rb') as f:
            return f.read()


def _probe(src, full):
    if src.size == 0:
        raise BadImageError('is empty (0 bytes)')
    data = src.head(HEAD_BYTES)
    try:
        info = _header(data)
    except _NeedMore:
        data = src.all()
        try:
            info = _header(data)
        except _NeedMore:
            raise BadImageError('is truncated (it ends inside its header)') from None
    if full or not _ends_cleanly(info.fmt, src.tail(64)):
        verify_decodes(src.all())
    return info


def probe_bytes(data, full=False):
    """:class:`ImageInfo` of an encoded image (header and stream end; ``full``: decoded by PIL as well).
    Raises BadImageError whose message says what is wrong, without a name."""
    return _probe(_Bytes(bytes(data)), full)


def probe_file(path, full=False):
    """:class:`ImageInfo` of an image file, as :func:`probe_bytes` (message without the name)."""
    if not os.path.isfile(path):
        raise MissingImageError('does not exist') if not os.path.exists(path) else BadImageError('is not a file')
    try:
        return _probe(_File(path), full)
    except OSError as err:
        raise BadImageError(f'cannot be read ({err.strerror or _first_line(err)})') from None


def image_size(path):
    """(h, w) of an image file from its header, oriented as :func:`read_image` returns it; raises
    BadImageError naming ``path``."""
    try:
        info = probe_file(os.fspath(path))
    except BadImageError as err:
        raise type(err)(err.reason, os.fspath(path)) from None
    return info.h, info.w


# ---------------------------------------------------------------------------------------------- OpenCV logging
_LOG_LOCK = threading.Lock()
_log_state = {'depth': 0, 'saved': None}


def _log_api():
    logging = getattr(getattr(cv2, 'utils', None), 'logging', None)
    if logging is not None and hasattr(logging, 'setLogLevel'):
        return logging.getLogLevel, logging.setLogLevel, logging.LOG_LEVEL_SILENT
    if hasattr(cv2, 'setLogLevel') and hasattr(cv2, 'getLogLevel'):
        return cv2.getLogLevel, cv2.setLogLevel, 0
    return None


@contextmanager
def quiet_opencv():
    """Silence OpenCV's log ("[ERROR:0@...]", "[ WARN:0@...]") while decoding; the previous level comes
    back when the last decoding thread leaves (nested and concurrent use share one silencing)."""
    api = _log_api()
    if api is None:
        yield
        return
    get_level, set_level, silent = api
    with _LOG_LOCK:
        if _log_state['depth'] == 0:
            _log_state['saved'] = get_level()
            set_level(silent)
        _log_state['depth'] += 1
    try:
        yield
    finally:
        with _LOG_LOCK:
            _log_state['depth'] -= 1
            if _log_state['depth'] == 0:
                set_level(_log_state['saved'])


# ---------------------------------------------------------------------------------------------- reading
def cmyk_reason(info):
    return (f'is a {info.cmyk} {info.fmt}; convert it to RGB with its colour profile (an image editor, or '
            'ImageMagick: convert in.jpg -colorspace sRGB out.png)')


def check_png_chunks(data):
    """Walk a whole PNG's chunks and check their CRCs (libpng would print its own error line for a bad
    one); raises BadImageError (without a name) naming the damaged chunk."""
    pos, view = 8, memoryview(data)
    while True:
        if pos + 12 > len(data):
            raise BadImageError(f'is truncated (its PNG chunks end at byte {pos} without an IEND chunk)')
        length, kind = struct.unpack('>I4s', data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            raise BadImageError(f'is corrupt (its {kind.decode("latin-1")} chunk at byte {pos} runs past the end '
                                'of the file)')
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(data[end - 4:end], 'big'):
            raise BadImageError(f'is corrupt (CRC error in its {kind.decode("latin-1")} chunk at byte {pos})')
        if kind == b'IEND':
            return
        pos = end


def _inspect(data):
    """Header checks before decoding: :class:`ImageInfo`, or None for a format PIL does not know (EXR,
    HDR, ...: OpenCV alone decides). Raises BadImageError (without a name)."""
    if len(data) == 0:
        raise BadImageError('is empty (0 bytes)')
    if data.startswith(PNG_SIGNATURE) or data.startswith(b'\xff\xd8'):
        return probe_bytes(data)  # the project's own parsers: their errors stand
    try:
        return probe_bytes(data)
    except BadImageError:  # PIL does not know it (or not this pixel format): OpenCV decides below
        return None


def decode_probed(data, info):
    """Pixels of encoded ``data`` whose header gave ``info`` (None: unknown to PIL), as :func:`read_image`
    returns them. Raises BadImageError (without a name)."""
    if info is not None and info.cmyk:
        raise BadImageError(cmyk_reason(info))
    if info is not None and info.fmt == 'PNG':
        check_png_chunks(data)
    with quiet_opencv():
        try:
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error as err:
            raise BadImageError(f'cannot be decoded ({_first_line(err)})') from None
    if img is None:
        if info is None:
            raise BadImageError('is not an image format OpenCV or PIL can read (unknown format or corrupt file)')
        verify_decodes(data)  # raises with PIL's reason for damaged data
        raise BadImageError(f'cannot be decoded by OpenCV ({info.describe()})')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    elif img.ndim == 3 and img.shape[2] == 2:  # gray + alpha: BGRA, as OpenCV returns gray+alpha PNGs
        img = np.ascontiguousarray(img[..., [0, 0, 0, 1]])
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (3, 4)):
        raise BadImageError(f'has an unsupported layout {img.shape} (gray, BGR or BGRA expected)')
    if img.dtype == np.float64:
        img = img.astype(np.float32)
    if img.dtype not in (np.uint8, np.uint16, np.float32):
        raise BadImageError(f'has unsupported {img.dtype} pixels (8-bit, 16-bit or float expected)')
    if info is not None and img.dtype != np.float32 and info.depth not in (1, 2, 4, 8, 16):
        # e.g. a 12-bit JPEG in uint16: its values would be read as if they spanned 16 bits
        raise BadImageError(f'has {info.depth} bits per channel (8- or 16-bit images expected)')
    if info is not None and info.gray_key is not None and img.ndim == 2:
        transparent = img == info.gray_key  # a gray PNG's tRNS key, which OpenCV ignores
        if transparent.any():
            alpha = np.where(transparent, 0, np.iinfo(img.dtype).max).astype(img.dtype)
            img = np.dstack([img, img, img, alpha])
    if info is not None:
        img = apply_orientation(img, info.orientation)
        if img.shape[:2] != (info.h, info.w):
            raise BadImageError(f'decodes to {img.shape[0]}x{img.shape[1]} pixels but its header says '
                                f'{info.h}x{info.w}')
    return img


def _load(source, name):
    """(bytes, name) of a path or of encoded bytes."""
    if source is None:
        raise BadImageError('is missing', name or 'image')
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        name = name or path
        if not os.path.exists(path):
            raise MissingImageError('does not exist', name)
        if not os.path.isfile(path):
            raise BadImageError('is not a file', name)
        try:
            with open(path, 'rb') as f:
                return f.read(), name
        except OSError as err:
            raise BadImageError(f'cannot be read ({err.strerror or _first_line(err)})', name) from None
    if isinstance(source, np.ndarray):
        return source.astype(np.uint8, copy=False).tobytes(), name or 'image'
    return bytes(source), name or 'image'


def read_image(source, name=None):
    """Decode an image file or encoded bytes into the image as stored (see the module docstring).

    Args:
        source (str | os.PathLike | bytes | memoryview | numpy.ndarray): a path, or the encoded bytes
            (an LMDB value, a file's contents).
        name (str | None): how errors name the image (default: the path; ``'image'`` for bytes).

    Returns:
        numpy.ndarray: (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA; uint8, uint16 or float32; EXIF
        orientation applied.

    Raises:
        BadImageError: '<name> <what is wrong>' (MissingImageError, also a FileNotFoundError, for a
            path that does not exist).
    """
    data, name = _load(source, name)
    try:
        return decode_probed(data, _inspect(data))
    except BadImageError as err:
        if err.name is not None:
            raise
        raise type(err)(err.reason, name) from None


# ---------------------------------------------------------------------------------------------- policies
def usage_problem(info):
    """Why an image with this header cannot be used for training or LMDB preparation (None when it can;
    transparency needs the pixels)."""
    if info.cmyk:
        return cmyk_reason(info)
    if info.depth not in (1, 2, 4, 8, 16):
        return f'has {info.depth} bits per channel (8- or 16-bit images expected)'
    return None


def _opaque_integer(img, name):
    """``img`` without its alpha channel, refusing transparent pixels and non-integer pixels."""
    if img.dtype not in (np.uint8, np.uint16):
        raise BadImageError(f'has {img.dtype} pixels (8- or 16-bit images expected)', name)
    if img.ndim == 3 and img.shape[2] == 4:
        alpha, peak = img[..., 3], np.iinfo(img.dtype).max
        if alpha.min() < peak:
            raise BadImageError(f'has transparent pixels ({int((alpha < peak).sum())} of {alpha.size}); flatten it '
                                'onto a background first, transparent pixels have no defined colour', name)
        img = img[..., :3]
    return img


def as_training(img, name=None):
    """Training policy: a :func:`read_image` result as float32 BGR (H, W, 3) in [0, 1] (BasicSR's
    ``imfrombytes(float32=True)`` for 8-bit images; 16-bit images keep their precision). Gray becomes
    three equal channels, opaque alpha is dropped; transparency and float images are refused."""
    img = _opaque_integer(img, name)
    scale = 65535.0 if img.dtype == np.uint16 else 255.0
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return img.astype(np.float32) / scale


def as_lmdb(img, name=None):
    """LMDB-preparation policy: a :func:`read_image` result as it is stored (PNG) in an LMDB: uint8 or
    uint16, (H, W) gray or (H, W, 3) BGR as in the file; opaque alpha is dropped, transparency and float
    images are refused."""
    return np.ascontiguousarray(_opaque_integer(img, name))


def read_training_image(source, name=None):
    """:func:`as_training` of :func:`read_image`."""
    data, name = _load(source, name)
    return as_training(read_image(data, name), name)


def read_lmdb_image(source, name=None):
    """:func:`as_lmdb` of :func:`read_image`."""
    data, name = _load(source, name)
    return as_lmdb(read_image(data, name), name)

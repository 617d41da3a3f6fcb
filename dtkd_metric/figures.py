"""Figures of the paper from result folders: band-group discrepancy (Figs. 3-4), zoomed comparisons (Figs. 5-6).

Images in result folders are matched by file stem (optionally after removing run suffixes such as
BasicSR's ``_<experiment name>``). Arrays inside this module are RGB, H x W x 3, float32 in [0, 1].
"""
import os

import cv2
import numpy as np
import torch

from dtkd_compat import atomic_write

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


def _matplotlib():
    import matplotlib

    matplotlib.use('Agg')  # files only; no display needed
    import matplotlib.pyplot as plt

    return plt


def read_rgb(path):
    """Read an image file as RGB float32 H x W x 3 in [0, 1] with the project's reader and its training
    policy (:func:`dtkd_data.image_io.read_training_image`: 8- or 16-bit, gray repeated, EXIF orientation
    applied, opaque alpha dropped; transparent or float images refused). Raises BadImageError naming the
    file (a ``ValueError``; a missing file is also a ``FileNotFoundError``)."""
    from dtkd_data.image_io import read_training_image

    return np.ascontiguousarray(read_training_image(os.fspath(path))[:, :, ::-1])


def _image_key(file_name, strip_suffixes):
    stem = os.path.splitext(file_name)[0]
    for suffix in sorted(strip_suffixes, key=len, reverse=True):
        if suffix and stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[:-len(suffix)]
    return stem


def run_suffix(folder):
    """The name ending dtkd-test gives a run's images (``<image>_<run name>.png`` under
    ``results/<run name>/visualization/<dataset>/``), or None for a folder not laid out so."""
    dataset_dir = os.path.abspath(folder)
    visualization = os.path.dirname(dataset_dir)
    if os.path.basename(visualization) != 'visualization':
        return None
    return '_' + os.path.basename(os.path.dirname(visualization))


def list_images(folder, strip_suffixes=()):
    """``{key: path}`` for the images in ``folder``; key = stem without any of ``strip_suffixes`` or, for a
    dtkd-test result folder, without its run's name ending (:func:`run_suffix`)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'result folder not found: {folder}')
    own = run_suffix(folder)
    strip_suffixes = tuple(strip_suffixes) + ((own,) if own else ())
    found = {}
    for name in sorted(os.listdir(folder)):
        if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
            continue
        key = _image_key(name, strip_suffixes)
        if key in found:
            raise ValueError(f'{folder}: {os.path.basename(found[key])} and {name} both match image "{key}"')
        found[key] = os.path.join(folder, name)
    if not found:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in {folder}')
    return found


def match_images(folders, strip_suffixes=()):
    """Pair images across folders by key.

    Args:
        folders: ``{label: folder}``.

    Returns:
        ``(keys, {label: {key: path}})`` with the sorted keys present in every folder.

    Raises:
        ValueError: some image is not in every folder (all unmatched names are listed per folder).
    """
    listed = {label: list_images(folder, strip_suffixes) for label, folder in folders.items()}
    common = set.intersection(*(set(v) for v in listed.values()))
    problems = []
    for label, images in listed.items():
        extra = sorted(set(images) - common)
        if extra:
            problems.append(f'{label} ({folders[label]}): {", ".join(extra)}')
    if problems:
        raise ValueError('images not found in every result folder (matched by file stem, without the run name '
                         'that dtkd-test appends; give other name endings with --strip-suffix):\n  '
                         + '\n  '.join(problems))
    return sorted(common), listed


def compute_band_discrepancy(teacher_dir, student_dirs, level=2, wavelet='haar', strip_suffixes=(), device='cpu'):
    """Mean |W_g(teacher) - W_g(student)| per frequency group for every image and checkpoint.

    Uses ``dtkd_loss.dwt_kd_loss.band_group_discrepancy`` (student as ``pred``, teacher as
    ``target``): groups LF = LL_J, MF = details of levels 2..J, HF = level-1 details.

    Args:
        teacher_dir: folder of teacher outputs.
        student_dirs: ``{checkpoint label: folder of student outputs}`` (one or more).

    Returns:
        ``{'images': [keys], 'groups': [...], 'level': J, 'wavelet': name,
        'per_image': {label: {image: {group: value}}}, 'mean': {label: {group: mean over images}}}``.
    """
    from dtkd_loss.dwt_kd_loss import band_group_discrepancy

    if not student_dirs:
        raise ValueError('give at least one student result folder')
    if 'teacher' in student_dirs:
        raise ValueError('"teacher" is reserved for the teacher folder; choose another checkpoint label')
    keys, listed = match_images({'teacher': teacher_dir, **student_dirs}, strip_suffixes)
    per_image = {label: {} for label in student_dirs}
    groups = None
    for key in keys:
        teacher = read_rgb(listed['teacher'][key])
        target = torch.from_numpy(teacher).permute(2, 0, 1).unsqueeze(0).to(device)
        for label in student_dirs:
            student = read_rgb(listed[label][key])
            if student.shape != teacher.shape:
                raise ValueError(f'image "{key}": {label} is {student.shape[1]}x{student.shape[0]} but the teacher '
                                 f'is {teacher.shape[1]}x{teacher.shape[0]} ({listed[label][key]})')
            pred = torch.from_numpy(student).permute(2, 0, 1).unsqueeze(0).to(device)
            with torch.no_grad():
                out = band_group_discrepancy(pred, target, level=level, wavelet=wavelet)
            groups = list(out)
            per_image[label][key] = {g: float(v[0]) for g, v in out.items()}
    mean = {label: {g: float(np.mean([per_image[label][k][g] for k in keys])) for g in groups}
            for label in student_dirs}
    return {'images': keys, 'groups': groups, 'level': level, 'wavelet': wavelet, 'per_image': per_image,
            'mean': mean}


def _save_figure(fig, out_path, dpi):
    """Save as PNG through a temporary file, so an existing figure is replaced only when complete."""
    plt = _matplotlib()
    try:
        atomic_write(out_path, lambda f: fig.savefig(f, dpi=dpi, format='png', bbox_inches='tight'), fsync=False)
    finally:
        plt.close(fig)
    return out_path


def _bars(ax, values, labels, groups, title):
    width = 0.8 / len(labels)
    x = np.arange(len(groups))
    for i, label in enumerate(labels):
        ax.bar(x + (i - (len(labels) - 1) / 2) * width, [values[label][g] for g in groups], width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(groups)
    ax.set_title(title, fontsize=10)
    ax.grid(axis='y', alpha=0.3)


def plot_band_discrepancy(result, out_path, max_images=4, title=None, dpi=150):
    """Grouped bars of the band-group discrepancy: one panel per image (up to ``max_images``) and the mean.

    Args:
        result: output of :func:`compute_band_discrepancy`.
        out_path: PNG file to write.

    Returns:
        ``out_path``.
    """
    plt = _matplotlib()
    labels = list(result['mean'])
    groups = result['groups']
    shown = result['images'][:max(0, int(max_images))]
    panels = [(f'{key}', {lb: result['per_image'][lb][key] for lb in labels}) for key in shown]
    panels.append((f'mean over {len(result["images"])} images', result['mean']))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 0.5, 3.2), squeeze=False)
    for ax, (name, values) in zip(axes[0], panels):
        _bars(ax, values, labels, groups, name)
    axes[0][0].set_ylabel('mean |W_g(T) - W_g(S)|')
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title or f'Teacher-student discrepancy per band group ({result["wavelet"]}, level {result["level"]})',
                 fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, out_path, dpi)


def parse_box(text):
    """``'x,y,w,h'`` (pixels of the full-size image) -> tuple of ints."""
    try:
        box = tuple(int(v) for v in str(text).split(','))
    except ValueError:
        box = ()
    if len(box) != 4 or box[2] <= 0 or box[3] <= 0 or box[0] < 0 or box[1] < 0:
        raise ValueError(f'zoom box must be "x,y,width,height" with x, y >= 0 and positive size, got {text!r}')
    return box


def upsample_bicubic(img, size):
    """Bicubic resize of an RGB [0, 1] array to ``size = (height, width)`` (OpenCV's bicubic)."""
    out = cv2.resize(img, (int(size[1]), int(size[0])), interpolation=cv2.INTER_CUBIC)
    return np.clip(out, 0.0, 1.0)


def plot_qualitative_grid(panels, box, out_path, title=None, box_color='red', dpi=150, panel_width=2.6):
    """Zoomed comparison: top row the full images with a red box, bottom row the boxed region enlarged.

    Args:
        panels: list of ``(label, image)``, images RGB H x W x 3 float in [0, 1], all the same size
            (upsample the LR input first, e.g. :func:`upsample_bicubic`).
        box: ``(x, y, width, height)`` of the zoomed region in pixels.
        out_path: PNG file to write.

    Returns:
        ``out_path``.
    """
    plt = _matplotlib()
    from matplotlib.patches import Rectangle

    if not panels:
        raise ValueError('no panels to plot')
    h, w = panels[0][1].shape[:2]
    for label, img in panels:
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f'panel "{label}": expected an H x W x 3 RGB image, got shape {img.shape}')
        if img.shape[:2] != (h, w):
            raise ValueError(f'panel "{label}" is {img.shape[1]}x{img.shape[0]} but "{panels[0][0]}" is {w}x{h}; '
                             'all panels must have the same size')
    x, y, bw, bh = box
    if x + bw > w or y + bh > h:
        raise ValueError(f'zoom box {box} (x, y, width, height) does not fit in the {w}x{h} images')
    aspect = h / w
    fig, axes = plt.subplots(2, len(panels), squeeze=False,
                             figsize=(panel_width * len(panels), panel_width * (aspect + bh / bw)),
                             gridspec_kw={'height_ratios': [aspect, bh / bw]})
    for col, (label, img) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        top.imshow(img, interpolation='lanczos')
        top.add_patch(Rectangle((x - 0.5, y - 0.5), bw, bh, fill=False, edgecolor=box_color, linewidth=1.5))
        bottom.imshow(img[y:y + bh, x:x + bw], interpolation='nearest')
        for spine in bottom.spines.values():
            spine.set_edgecolor(box_color)
            spine.set_linewidth(1.5)
        top.set_title(label, fontsize=9)
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
    top_spines = [ax.spines.values() for ax in axes[0]]
    for spines in top_spines:
        for spine in spines:
            spine.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save_figure(fig, out_path, dpi)

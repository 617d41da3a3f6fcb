"""AugKDModel: the AugKD distillation baseline (DTKD paper, Table 1) on top of DTKDModel.

AugKD (Zhang et al., "AugKD: Ingenious Augmentations Empower Knowledge Distillation for Image
Super-Resolution", ICLR 2025; first circulated as DUKD, "Data Upcycling Knowledge Distillation for
Image Super-Resolution", arXiv:2309.14162; official code github.com/yun224/DUKD, ``models/dukd_model.py``)
adds two uses of unpaired augmentation to response distillation:

1. auxiliary distillation samples labelled by the teacher T:
   - zoom-in: sub-patches of the HR (GT) patch, of the LR patch's size, used as LR inputs: the
     ``scale x scale`` grid of LR-sized tiles of the GT patch, ``n_zoom_in`` of them drawn at random
     (the same tiles for every image of the batch, as the official ``n_gt_sub``); the label is T(tile);
   - zoom-out: the LR patch down-sampled by ``1/scale`` with MATLAB bicubic (``imresize``); its
     labels are the LR patch itself (pixel loss) and T(down(LR)) (distillation loss);
2. label-consistency regularisation with invertible augmentations g: colour inversion (1 - x),
   left-right flip, up-down flip and transposition, each applied to a sample with probability
   ``prob`` (official 0.3); the student's answer is mapped back, g^-1(S(g(x))), and compared with
   the teacher's label T(x) of the un-augmented sample. (The official code maps back by applying
   the same ops in the same order again; that is g^-1 except where the transposition meets exactly
   one flip, a quarter turn, which applied twice leaves a half turn. The exact inverse is used here.)

As in the official code, the main step (task loss + lambda(t) KD loss, DTKDModel) and the
auxiliary step (zoom-in, zoom-out, consistency) are two optimizer steps per iteration, and the EMA
is updated once after both. The distillation terms use ``train.kd_opt``'s loss at unit weight; the
auxiliary weights are constant (AugKD has no schedule). In fp16 training both steps go through the
gradient scaler (each is scaled, unscaled, skipped by the scaler on overflow, and updates it).

Teacher labels (``train.augkd_opt.label_source``):

- ``online``: the online teacher (``teacher`` block, a ResShiftTeacher) labels every auxiliary
  sample. This is AugKD as published. With a diffusion teacher it costs one teacher sampling per
  auxiliary batch.
- ``cached``: only the cached teacher output T(x) of the training patch exists. Labels can be
  derived from it only for transforms that commute with super-resolution:
    * scale-aligned crops: T(crop_r(x)) = crop_{scale r}(T(x)) for a translation-equivariant teacher
      away from the crop borders (the ResShift sampler itself relies on this when it chops large
      images into patches);
    * flips / transposition: T(g x) = g T(x) for an equivariant teacher (ResShift is trained with
      horizontal flips only, so this is approximate);
  and NOT for colour inversion (the teacher is not equivariant to it), zoom-in (HR tiles are new
  inputs at another scale) or zoom-out (new content at a smaller scale): those need the online
  teacher. In cached mode the zoom-in term therefore uses a substitute: a random scale-aligned LR
  crop of ``crop_size`` pixels, labelled by the same region of the cached teacher output; the
  consistency term is unchanged (its label is T(x) of the un-augmented crop). ``zoom_out_weight``
  (teacher label) must be 0; ``zoom_out_pix_weight`` (LR label) needs no teacher and works in both.
- ``auto``: ``online`` when a ``teacher`` block is given, else ``cached``.
"""
from collections import OrderedDict

import torch
from basicsr.utils.matlab_functions import imresize
from basicsr.utils.registry import MODEL_REGISTRY

from dtkd_arch.tiling import forward_padded
from dtkd_compat import OptionError
from dtkd_model.dtkd_model import DTKDModel
from dtkd_utils.options import unknown_key_error

INVERTIBLE_OPS = ('invert', 'flip_lr', 'flip_ud', 'transpose')
LABEL_SOURCES = ('auto', 'online', 'cached')
AUGKD_DEFAULTS = {
    'label_source': 'auto',
    'zoom_in_weight': 1.0,
    'n_zoom_in': 1,
    'zoom_out_weight': 0.0,
    'zoom_out_pix_weight': 0.0,
    'consistency': {'prob': 0.3, 'ops': list(INVERTIBLE_OPS)},
    'crop_size': None,
}


# ---------------------------------------------------------------------- augmentations
def apply_invertible(x, flags, img_range=1.0):
    """g(x): per-sample invertible augmentations, applied in the order of ``INVERTIBLE_OPS``.

    Args:
        x (Tensor): (B, C, H, W); H == W when any 'transpose' flag is set.
        flags (dict[str, Tensor]): op name -> (B,) bool, which samples get the op.
        img_range (float): colour inversion is ``img_range - x``.

    Returns:
        Tensor: new tensor, same shape (H and W swapped for transposed samples, hence square input).
    """
    out = x.clone()
    for op in INVERTIBLE_OPS:
        out = _apply_op(out, op, flags.get(op), img_range)
    return out


def invert_invertible(y, flags, img_range=1.0):
    """g^-1(y): the ops of :func:`apply_invertible` undone in reverse order (each op is an involution)."""
    out = y.clone()
    for op in reversed(INVERTIBLE_OPS):
        out = _apply_op(out, op, flags.get(op), img_range)
    return out


def _apply_op(x, op, mask, img_range):
    if mask is None or not bool(mask.any()):
        return x
    idx = mask.nonzero(as_tuple=True)[0]
    sel = x[idx]
    if op == 'invert':
        sel = img_range - sel
    elif op == 'flip_lr':
        sel = sel.flip(-1)
    elif op == 'flip_ud':
        sel = sel.flip(-2)
    elif op == 'transpose':
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f'transpose augmentation needs square samples, got {tuple(x.shape[-2:])}')
        sel = sel.transpose(-2, -1)
    else:
        raise ValueError(f'unknown invertible op {op!r}')
    x = x.clone()
    x[idx] = sel
    return x


def draw_flags(batch, ops, prob, device=None, generator=None):
    """Independent Bernoulli(prob) draws per sample for each op in ``ops`` (official ``noisy`` block)."""
    flags = {}
    for op in ops:
        flags[op] = (torch.rand(batch, generator=generator) < prob).to(device)
    return flags


def zoom_in_tiles(gt, lq_hw, scale, tiles):
    """AugKD zoom-in inputs: LR-sized tiles of the HR patch.

    Args:
        gt (Tensor): (B, C, scale*h, scale*w) HR patch in [0, 1].
        lq_hw (tuple): (h, w) of the LR patch = tile size.
        scale (int): SR factor (the tile grid is scale x scale).
        tiles (list[tuple[int, int]]): grid positions (i, j), 0 <= i, j < scale.

    Returns:
        Tensor: (len(tiles) * B, C, h, w), tile-major (all images' tile 0, then tile 1, ...) as the
        official ``torch.cat([...], 0)``.
    """
    h, w = lq_hw
    if gt.shape[-2:] != (h * scale, w * scale):
        raise ValueError(f'zoom-in: GT {tuple(gt.shape[-2:])} is not {scale} x LQ {(h, w)}')
    return torch.cat([gt[..., i * h:(i + 1) * h, j * w:(j + 1) * w] for i, j in tiles], 0)


def zoom_out_inputs(lq, scale):
    """AugKD zoom-out inputs: the LR patch down-sampled by 1/scale with MATLAB bicubic (BasicSR ``imresize``)."""
    return torch.stack([imresize(img, 1 / scale) for img in lq.detach().cpu()]).to(lq.device, lq.dtype)


def aligned_crop(lq, teacher, scale, top, left, size):
    """A square LR crop and the teacher output's matching region (cached-label zoom-in substitute).

    Returns:
        tuple(Tensor, Tensor): lq[..., top:top+size, left:left+size] and
        teacher[..., scale*top:scale*(top+size), scale*left:scale*(left+size)].
    """
    crop = lq[..., top:top + size, left:left + size]
    label = teacher[..., scale * top:scale * (top + size), scale * left:scale * (left + size)]
    return crop, label


@MODEL_REGISTRY.register()
class AugKDModel(DTKDModel):
    """DTKDModel plus AugKD's auxiliary samples and label-consistency regularisation (``train.augkd_opt``)."""

    def init_training_settings(self):
        super().init_training_settings()
        if self.cri_kd is None:
            raise OptionError('train.kd_opt: AugKDModel distils from a teacher; set a KD loss (AugKD: L1Loss)')
        self.augkd = self._parse_augkd(self.opt['train'].get('augkd_opt'))
        source = self.augkd['label_source']
        if source == 'auto':
            source = 'online' if self.online_teacher is not None else 'cached'
        if source == 'online' and self.online_teacher is None:
            raise OptionError("train.augkd_opt.label_source: 'online' needs a teacher block "
                                   '(teacher.opt: the teacher option file)')
        if source == 'cached' and self.augkd['zoom_out_weight'] > 0:
            raise OptionError('train.augkd_opt.zoom_out_weight: the zoom-out label T(down(LR)) cannot be derived '
                                   "from cached teacher outputs; use label_source: online (teacher block) or set it 0")
        self.label_source = source

    @staticmethod
    def _parse_augkd(opt):
        opt = {} if opt is None else opt
        if not isinstance(opt, dict):
            raise OptionError('train.augkd_opt: expected a mapping')
        unknown = sorted(set(opt) - set(AUGKD_DEFAULTS))
        if unknown:
            raise OptionError(str(unknown_key_error(unknown[0], AUGKD_DEFAULTS, 'train.augkd_opt')))
        out = {**AUGKD_DEFAULTS, **opt}
        if out['label_source'] not in LABEL_SOURCES:
            raise OptionError(f"train.augkd_opt.label_source: expected one of {LABEL_SOURCES}, "
                                   f"got {out['label_source']!r}")
        for key in ('zoom_in_weight', 'zoom_out_weight', 'zoom_out_pix_weight'):
            v = out[key]
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0:
                raise OptionError(f'train.augkd_opt.{key}: expected a number >= 0, got {v!r}')
        n = out['n_zoom_in']
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise OptionError(f'train.augkd_opt.n_zoom_in: expected an integer >= 1, got {n!r}')
        cons = out['consistency']
        if cons is not None:
            if not isinstance(cons, dict):
                raise OptionError('train.augkd_opt.consistency: expected {prob: <0..1>, ops: [...]} or ~')
            for key in cons:
                if key not in ('prob', 'ops'):
                    raise OptionError(str(unknown_key_error(key, ('prob', 'ops'), 'train.augkd_opt.consistency')))
            prob = cons.get('prob', 0.3)
            ops = list(cons.get('ops', INVERTIBLE_OPS))
            if not isinstance(prob, (int, float)) or not 0 <= prob <= 1:
                raise OptionError(f'train.augkd_opt.consistency.prob: expected a number in [0, 1], got {prob!r}')
            bad = [op for op in ops if op not in INVERTIBLE_OPS]
            if bad:
                raise OptionError(f'train.augkd_opt.consistency.ops: unknown {bad} (known: {INVERTIBLE_OPS})')
            out['consistency'] = {'prob': float(prob), 'ops': ops}
        crop = out['crop_size']
        if crop is not None and (not isinstance(crop, int) or crop < 1):
            raise OptionError(f'train.augkd_opt.crop_size: expected a positive integer (LR pixels), got {crop!r}')
        return out

    # ------------------------------------------------------------------ pieces
    def _student(self, x):
        """Student SR of ``x`` (any size: padded to the window multiple, cropped back), with gradients."""
        return forward_padded(self.net_g, x, self._window_multiple(), int(self.opt['scale']))

    def teacher_label(self, x):
        """Online teacher SR of ``x`` (B, 3, h, w) in [0, 1], without gradients."""
        with torch.no_grad():
            return self.online_teacher.sample(x).to(device=x.device, dtype=x.dtype)

    def consistent_student(self, x, flags=None):
        """g^-1(S(g(x))) with per-sample random g (label consistency), or S(x) when disabled.

        Transposition needs square samples; for non-square ones it is left out.
        """
        cons = self.augkd['consistency']
        if cons is None or cons['prob'] == 0:
            return self._student(x)
        if flags is None:
            ops = [op for op in cons['ops'] if op != 'transpose' or x.shape[-1] == x.shape[-2]]
            flags = draw_flags(x.shape[0], ops, cons['prob'], device=x.device)
        return invert_invertible(self._student(apply_invertible(x, flags)), flags)

    def auxiliary_samples(self):
        """(inputs, teacher labels) of the zoom-in term for the current batch.

        Online: HR tiles and T(tile). Cached: an aligned LR crop and the cached teacher's region.
        """
        scale = int(self.opt['scale'])
        h, w = self.lq.shape[-2:]
        if self.label_source == 'online':
            perm = torch.randperm(scale * scale)[:self.augkd['n_zoom_in']].tolist()
            tiles = [(k // scale, k % scale) for k in perm]
            x = zoom_in_tiles(self.gt, (h, w), scale, tiles)
            return x, self.teacher_label(x)
        teacher = self.get_teacher_output()
        size = self.augkd['crop_size'] or max(min(h, w) // 2, 1)
        if size > min(h, w):
            raise OptionError(f"train.augkd_opt.crop_size: {size} exceeds the LR patch {(h, w)}")
        top = int(torch.randint(0, h - size + 1, (1,)))
        left = int(torch.randint(0, w - size + 1, (1,)))
        return aligned_crop(self.lq, teacher, scale, top, left, size)

    # ------------------------------------------------------------------ training
    def optimize_parameters(self, current_iter):
        # main step (task + scheduled KD) without its EMA update: the EMA follows the auxiliary step
        ema_decay, self.ema_decay = self.ema_decay, 0
        try:
            super().optimize_parameters(current_iter)
        finally:
            self.ema_decay = ema_decay
        log = OrderedDict(self.log_dict)

        self.optimizer_g.zero_grad(set_to_none=True)
        terms = OrderedDict()
        a = self.augkd
        if a['zoom_in_weight'] > 0:
            x, label = self.auxiliary_samples()
            terms['l_zoom_in'] = a['zoom_in_weight'] * self.cri_kd(self.consistent_student(x), label)
        if a['zoom_out_weight'] > 0 or a['zoom_out_pix_weight'] > 0:
            x = zoom_out_inputs(self.lq, int(self.opt['scale']))
            pred = self._student(x)
            if a['zoom_out_pix_weight'] > 0:
                terms['l_zoom_out_pix'] = a['zoom_out_pix_weight'] * self.cri_pix(pred, self.lq)
            if a['zoom_out_weight'] > 0:
                terms['l_zoom_out_kd'] = a['zoom_out_weight'] * self.cri_kd(pred, self.teacher_label(x))
        stepped = self.step_taken
        if terms:
            total = sum(terms.values())
            self.scaled_backward(total)  # total.backward(), scaled in fp16 training
            if self.step_if_finite(total, terms, current_iter, self.optimizer_g):
                stepped = True
            log.update(self.reduce_loss_dict(OrderedDict((k, v.detach()) for k, v in terms.items())))
        self.log_dict = log
        if stepped and self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)


__all__ = ['AugKDModel', 'OptionError', 'apply_invertible', 'invert_invertible', 'draw_flags', 'zoom_in_tiles',
           'zoom_out_inputs', 'aligned_crop', 'INVERTIBLE_OPS', 'AUGKD_DEFAULTS']

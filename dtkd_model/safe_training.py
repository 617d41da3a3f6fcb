"""Crash-safe and fault-tolerant training shared by the project's models (a mixin for BasicSR models).

:class:`SafeTrainingMixin`, placed before BasicSR's ``SRModel`` in a model's bases, changes three things:

- ``save_network`` / ``save_training_state`` write to a hidden temporary file in the same folder,
  flush it to disk and rename it over the target (``os.replace``, atomic on POSIX), so a crash or
  SIGKILL during a save leaves the previous file intact and loadable, never a truncated one. Weights
  and optimizer states holding NaN or Inf are never written: the save stops with
  :class:`NonFiniteError` instead.
- validation and test images are written the same way (:func:`atomic_imwrite`).
- ``load_network`` reads checkpoints with ``torch.load(weights_only=True)``
  (:func:`dtkd_arch.checkpoint.safe_torch_load`): a file carrying pickled code is refused with a
  message naming it, and nothing from it runs.
- :meth:`SafeTrainingMixin.finite_step` is called by ``optimize_parameters`` after ``backward`` and
  before ``optimizer.step``: when the loss or a gradient is NaN or Inf the step is skipped (no
  optimizer step, no EMA update) with a warning naming the iteration, the non-finite terms and the
  batch's image keys. After ``train.max_nonfinite_steps`` consecutive iterations with a skipped step
  (default 5) training stops with :class:`NonFiniteError`; the last checkpoint is the last good one.
  In distributed training the decision is shared by all processes, so their weights stay equal.
- fp16 loss scaling: a model that sets ``self.grad_scaler`` (a ``torch.amp.GradScaler``, see
  :func:`make_grad_scaler`) calls :meth:`SafeTrainingMixin.scaled_backward` and
  :meth:`SafeTrainingMixin.step_if_finite` instead of ``backward`` / ``finite_step`` /
  ``optimizer.step``: the loss is scaled for ``backward``; a non-finite (unscaled) loss is a skipped,
  counted step as above and leaves the scaler untouched; otherwise the gradients are unscaled, the
  scaler skips the optimizer step when they overflowed and lowers its scale, which is fp16's normal
  course and not counted, and the scaler is updated. Only an overflow at a scale already below
  :data:`MIN_GRAD_SCALE` (gradients that overflow even unscaled: NaN/Inf, not a range problem) is
  counted as a non-finite step, so a NaN gradient cannot silently skip every step forever. The
  scaler's state is saved in the training state (``grad_scaler``) and restored on resume.
  Without a scaler (fp32, bf16) these methods are exactly ``loss.backward()``, ``finite_step`` and
  ``optimizer.step()``.
"""
import contextlib
import os
import os.path as osp
import time

import torch
import torch.distributed as dist
from basicsr.utils import get_root_logger
from basicsr.utils.dist_util import master_only

from dtkd_compat import OptionError, atomic_write, fault_point

DEFAULT_MAX_NONFINITE_STEPS = 5
# An overflow of the scaled gradients at a loss scale below this is counted as a non-finite step (fp16
# overflows without any scaling at scale 1; the scaler starts at 2**16 and reaches 1 after 16 overflows).
MIN_GRAD_SCALE = 1.0


class NonFiniteError(RuntimeError):
    """Training produced NaN/Inf too often in a row, or a network/optimizer state to be saved is not finite."""


def _fsync_dir(directory):
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_torch_save(obj, path):
    """``torch.save(obj, path)`` so that ``path`` is at every moment either the old file or the new one.

    The data goes to ``.<name>.tmp`` beside ``path``, is flushed and fsynced, and is then renamed over
    ``path``. A process killed during the write leaves ``path`` untouched (and at most the temporary
    file, which the next save of the same name replaces).
    """
    atomic_write(path, lambda f: torch.save(obj, f), tmp_suffix='.tmp')
    _fsync_dir(osp.dirname(osp.abspath(path)))


def atomic_imwrite(img, path):
    """``basicsr.utils.imwrite`` (folders created, format from the extension), via a temporary file and
    a rename, so a killed run never leaves a truncated image under the final name."""
    import cv2

    path = os.fspath(path)
    ok, buf = cv2.imencode(osp.splitext(path)[1] or '.png', img)
    if not ok:
        raise OSError(f'Failed in writing images: {path}')
    atomic_write(path, buf.tobytes(), fsync=False, tmp_suffix='.tmp')


def nonfinite_entries(tree, prefix=''):
    """Names of the tensors in a (nested) dict/list that hold NaN or Inf."""
    bad = []
    if torch.is_tensor(tree):
        if tree.is_floating_point() or tree.is_complex():
            if not bool(torch.isfinite(tree).all()):
                bad.append(prefix or '<tensor>')
    elif isinstance(tree, dict):
        for key, value in tree.items():
            bad += nonfinite_entries(value, f'{prefix}.{key}' if prefix else str(key))
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            bad += nonfinite_entries(value, f'{prefix}[{i}]')
    return bad


def _save_with_retry(obj, path, what):
    """``atomic_torch_save`` with BasicSR's three attempts for transient file-system errors."""
    for attempt in range(3):
        try:
            atomic_torch_save(obj, path)
            return
        except OSError as err:
            get_root_logger().warning(f'Save {what} error: {err}, remaining retry times: {2 - attempt}')
            time.sleep(1)
    raise OSError(f'Cannot save {what} to {path}')


def max_nonfinite_steps(train_opt):
    """``train.max_nonfinite_steps`` checked: a positive integer (default 5)."""
    value = (train_opt or {}).get('max_nonfinite_steps', DEFAULT_MAX_NONFINITE_STEPS)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise OptionError(f'train.max_nonfinite_steps: expected an integer >= 1 (consecutive iterations with a '
                          f'NaN/Inf loss before training stops), got {value!r}')
    return value


def make_grad_scaler(device):
    """A ``torch.amp.GradScaler`` for ``device`` (a torch.device or its name; 'cuda' for fp16 training,
    'cpu' in the tests), with torch's defaults (initial scale 2**16, halved on overflow, doubled after
    2000 good steps)."""
    return torch.amp.GradScaler(torch.device(device).type)


class SafeTrainingMixin:
    """Atomic, finite-only checkpoints, weights-only loading and NaN/Inf step skipping for BasicSR models."""

    # ------------------------------------------------------------------ non-finite steps
    def _nonfinite_state(self):
        if not hasattr(self, '_nonfinite'):
            self._nonfinite = {'limit': max_nonfinite_steps(self.opt.get('train')), 'run': 0, 'last_bad': None,
                               'skipped': 0, 'scaler_skipped': 0}
        return self._nonfinite

    def batch_keys(self):
        """Image names of the current batch (from the data loader's paths), for messages."""
        paths = getattr(self, '_batch_paths', None) or []
        return [osp.splitext(osp.basename(str(p)))[0] for p in paths]

    def feed_data(self, data):
        """The base model's ``feed_data``; the batch's image names are kept for messages."""
        super().feed_data(data)
        self._batch_paths = data.get('gt_path', data.get('lq_path')) if isinstance(data, dict) else None

    def finite_step(self, loss, terms, current_iter, nets=None, extra=None):
        """Whether the step may be taken: ``loss`` and all gradients of ``nets`` are finite.

        Call after ``loss.backward()`` and before ``optimizer.step()``. On a bad step the gradients are
        cleared, a warning names the iteration, the non-finite ``terms`` (dict name -> tensor) and
        ``extra`` tensors (e.g. ``{'teacher output': t}``) and the batch keys; after
        ``train.max_nonfinite_steps`` consecutive bad iterations :class:`NonFiniteError` is raised.
        """
        nets = nets if nets is not None else [self.net_g]
        if self._all_finite(loss, nets):
            self._good_step(current_iter)
            return True
        self._bad_step(current_iter, self._nonfinite_names(terms, extra), nets)
        return False

    def _all_finite(self, loss, nets=()):
        """``loss`` and the gradients of ``nets`` finite, on every process (one bad process makes it bad)."""
        grads = [p.grad for net in nets for p in net.parameters() if p.grad is not None]
        ok = torch.isfinite(loss.detach()).all()
        if grads:
            ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads))  # NaN/Inf in any gradient
        if self.opt.get('dist') and dist.is_available() and dist.is_initialized():
            flag = ok.to(torch.int32).reshape(1)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # one bad process makes the step bad everywhere
            ok = flag[0] > 0
        return bool(ok)

    def _good_step(self, current_iter):
        state = self._nonfinite_state()
        if state['last_bad'] != current_iter:
            state['run'] = 0

    @staticmethod
    def _nonfinite_names(terms, extra):
        what = [name for name, value in terms.items()
                if torch.is_tensor(value) and not bool(torch.isfinite(value.detach()).all())]
        what += [name for name, value in (extra or {}).items()
                 if torch.is_tensor(value) and not bool(torch.isfinite(value).all())]
        return what or ['gradients']

    def _bad_step(self, current_iter, what, nets):
        """A skipped, counted step: gradients cleared, a warning, and the stop after too many in a row."""
        state = self._nonfinite_state()
        for net in nets:
            net.zero_grad(set_to_none=True)
        state['skipped'] += 1
        if state['last_bad'] != current_iter:
            state['run'] += 1
            state['last_bad'] = current_iter
        keys = ', '.join(self.batch_keys()) or 'unknown'
        message = (f'iter {current_iter}: non-finite {", ".join(what)}; step skipped (batch: {keys}); '
                   f'{state["run"]} consecutive, limit train.max_nonfinite_steps={state["limit"]}')
        get_root_logger().warning(message)
        if state['run'] >= state['limit']:
            raise NonFiniteError(f'training stopped at iter {current_iter}: {state["run"]} consecutive iterations had '
                                 f'a NaN/Inf loss or gradient (last: {", ".join(what)}; batch: {keys}). No NaN was '
                                 'saved: the newest checkpoint is the last good one. Lower the learning rate, check '
                                 'the data and teacher outputs, or raise train.max_nonfinite_steps')

    # ------------------------------------------------------------------ fp16 loss scaling
    def scaled_backward(self, loss):
        """``loss.backward()``, of the loss times the gradient scaler's scale when the model has a scaler."""
        scaler = getattr(self, 'grad_scaler', None)
        (loss if scaler is None else scaler.scale(loss)).backward()

    def step_if_finite(self, loss, terms, current_iter, optimizer, nets=None, extra=None):
        """After :meth:`scaled_backward`: check, then ``optimizer.step()``; returns whether the step was taken.

        Without a gradient scaler: :meth:`finite_step`, then ``optimizer.step()`` when it allows. With one:

        1. a non-finite loss is a skipped, counted step (:meth:`finite_step`'s warning and limit); the
           scaler is not touched (no unscale, no update): its scale is no cause of a NaN loss;
        2. the gradients are unscaled; the scaler skips ``optimizer.step()`` when they hold Inf/NaN (an
           fp16 overflow of the scaled gradients) and halves its scale; that skip is not counted as a
           non-finite step (the consecutive count is left as it is) unless the scale was already below
           :data:`MIN_GRAD_SCALE`;
        3. the scaler is updated.
        """
        scaler = getattr(self, 'grad_scaler', None)
        nets = nets if nets is not None else [self.net_g]
        if scaler is None:
            taken = self.finite_step(loss, terms, current_iter, nets=nets, extra=extra)
            if taken:
                optimizer.step()
            return taken
        if not self._all_finite(loss):
            self._bad_step(current_iter, self._nonfinite_names(terms, extra), nets)
            return False
        scale = scaler.get_scale()
        scaler.unscale_(optimizer)  # the gradients are unscaled before the scaler checks them and steps
        scaler.step(optimizer)  # skipped by the scaler when an unscaled gradient holds Inf/NaN
        scaler.update()  # halves the scale after an overflow (backoff), grows it after growth_interval good steps
        new_scale = scaler.get_scale()
        if 0 < scale <= new_scale:  # only an overflow lowers the scale (at scale 0 every step overflows)
            self._good_step(current_iter)
            return True
        state = self._nonfinite_state()
        state['scaler_skipped'] += 1
        if scale < MIN_GRAD_SCALE:
            self._bad_step(current_iter, [f'gradients (overflow at gradient scale {scale:g})'], nets)
            return False
        for net in nets:
            net.zero_grad(set_to_none=True)
        get_root_logger().info(f'iter {current_iter}: fp16 gradient overflow at loss scale {scale:g}; the gradient '
                               f'scaler skipped the step and lowered the scale to {new_scale:g} (normal in fp16 '
                               'training; not counted as a non-finite step)')
        return False

    # ------------------------------------------------------------------ saving
    @master_only
    def save_network(self, net, net_label, current_iter, param_key='params'):
        """BasicSR's ``save_network`` (same file name and layout), written atomically and only when finite."""
        if current_iter == -1:
            current_iter = 'latest'
        save_path = osp.join(self.opt['path']['models'], f'{net_label}_{current_iter}.pth')
        nets = net if isinstance(net, list) else [net]
        param_keys = param_key if isinstance(param_key, list) else [param_key]
        if len(nets) != len(param_keys):
            raise ValueError('save_network: the lengths of net and param_key should be the same.')
        save_dict = {}
        for net_, key_ in zip(nets, param_keys):
            state_dict = self.get_bare_model(net_).state_dict()
            # contiguous: a channels_last student (train.channels_last) is saved in the default layout
            save_dict[key_] = {(k[7:] if k.startswith('module.') else k): v.cpu().contiguous()
                               for k, v in state_dict.items()}
        bad = nonfinite_entries(save_dict)
        if bad:
            raise NonFiniteError(f'{save_path} not saved: {len(bad)} tensor(s) hold NaN/Inf ({", ".join(bad[:5])}); '
                                 'the previous checkpoints are unchanged')
        _save_with_retry(save_dict, save_path, 'model')

    @master_only
    def save_training_state(self, epoch, current_iter):
        """BasicSR's ``save_training_state`` (rank 0 only, same layout), written atomically and only when finite."""
        if current_iter == -1:
            return
        state = {'epoch': epoch, 'iter': current_iter, 'optimizers': [o.state_dict() for o in self.optimizers],
                 'schedulers': [s.state_dict() for s in self.schedulers]}
        scaler = getattr(self, 'grad_scaler', None)
        if scaler is not None:
            state['grad_scaler'] = scaler.state_dict()  # fp16 loss scale and growth tracker (plain numbers)
        state.update(self.extra_training_state())
        save_path = osp.join(self.opt['path']['training_states'], f'{current_iter}.state')
        bad = nonfinite_entries(state['optimizers'], 'optimizers')
        if bad:
            raise NonFiniteError(f'{save_path} not saved: optimizer state holds NaN/Inf ({", ".join(bad[:5])})')
        _save_with_retry(state, save_path, 'training state')
        fault_point(f'save_training_state.saved:{current_iter}')  # crash tests only (dtkd_compat.fault_point)

    # ------------------------------------------------------------------ loading
    def resume_training(self, resume_state):
        """BasicSR's ``resume_training`` (optimizers, schedulers) plus the fp16 gradient scaler's state."""
        super().resume_training(resume_state)
        scaler = getattr(self, 'grad_scaler', None)
        saved = resume_state.get('grad_scaler')
        logger = get_root_logger()
        if scaler is not None and saved:
            scaler.load_state_dict(saved)
            logger.info(f'Resumed the fp16 gradient scaler at loss scale {scaler.get_scale():g}')
        elif scaler is not None:
            logger.info('The training state has no gradient scaler (saved by an fp32/bf16 run); the fp16 gradient '
                        f'scaler starts at loss scale {scaler.get_scale():g}')
        elif saved:
            logger.info('The training state holds an fp16 gradient scaler; it is not used (no fp16 training now)')
        self.load_extra_training_state(resume_state)

    def extra_training_state(self):
        """Entries a model adds to its training state (tensors and plain numbers only); none by default."""
        return {}

    def load_extra_training_state(self, resume_state):
        """Restore what :meth:`extra_training_state` saved; nothing by default."""

    def load_network(self, net, load_path, strict=True, param_key='params'):
        """BasicSR's ``load_network`` with weights-only reading and errors naming the file."""
        from dtkd_arch.checkpoint import CheckpointFormatError, safe_torch_load

        logger = get_root_logger()
        net = self.get_bare_model(net)
        load_net = safe_torch_load(load_path, what='network checkpoint', option_key='path.pretrain_network_g')
        if param_key is not None:
            if not isinstance(load_net, dict):
                raise CheckpointFormatError(f"path.pretrain_network_g: '{load_path}' is not a BasicSR checkpoint "
                                            f'(expected a dict with {param_key!r})')
            if param_key not in load_net and 'params' in load_net:
                param_key = 'params'
                logger.info('Loading: params_ema does not exist, use params.')
            if param_key not in load_net:
                raise CheckpointFormatError(f"path.pretrain_network_g: '{load_path}' has no {param_key!r} entry "
                                            f'(keys: {", ".join(map(str, load_net))})')
            load_net = load_net[param_key]
        logger.info(f'Loading {net.__class__.__name__} model from {load_path}, with param key: [{param_key}].')
        load_net = {(k[7:] if k.startswith('module.') else k): v for k, v in load_net.items()}
        self._print_different_keys_loading(net, load_net, strict)
        net.load_state_dict(load_net, strict=strict)

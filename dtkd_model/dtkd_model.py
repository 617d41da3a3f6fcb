"""DTKDModel: a student SR network trained with a task loss plus a scheduled distillation loss.

L_total(t) = L_task(S, GT) + lambda(t) · L_KD(S, T)        (DTKD, Electronics 2026, Eqs. 5-9)

- ``train.pixel_opt``: the task loss (the paper: L1 to the ground truth).
- ``train.kd_opt``: the distillation loss, any registered loss (``DWTKDLoss`` in the paper;
  ``L1Loss``, ``FourierKDLoss``, ``DTCWTKDLoss`` for the comparisons). Its ``loss_weight`` is the
  final weight lambda_KD; the loss itself is built with weight 1 and scaled by the schedule.
- ``train.kd_schedule``: how lambda grows (``linear`` from 0, the paper's; ``constant``; ``cosine``).
- The teacher's output comes from the batch (``teacher``, a cached teacher result read by
  ``PairedTeacherDataset``) or, when the batch has none, from an online teacher (``teacher`` block).

Validation and testing reflect-pad the input to a multiple of the student's window and crop back,
so any image size works; ``val.tile: {tile_size, tile_pad}`` switches to blended tiles.

Checkpoints and training states are written atomically and only when finite; a step whose loss or
gradients hold NaN/Inf is skipped, and ``train.max_nonfinite_steps`` consecutive ones stop training
(:mod:`dtkd_model.safe_training`).

A KD loss whose ``forward`` takes a ``gt`` keyword (or ``**kwargs``) is also given the ground truth:
``cri_kd(output, teacher, gt=gt)`` (confidence-aware losses weigh the teacher by its error to the GT).
Likewise a ``teacher_samples`` keyword receives the batch's K cached teacher samples, (B, K, C, H, W),
when the dataset reads them (``datasets.train.teacher_samples``).

GPU training (docs/gpu_training.md):

- ``network_g.precision: fp16`` (CUDA): the student's forward runs under fp16 autocast and the loss is
  scaled by a ``torch.amp.GradScaler`` (:meth:`SafeTrainingMixin.step_if_finite`: overflow skips are
  the scaler's, not non-finite steps); the scaler's state is part of the training state. ``bf16`` and
  ``fp32`` use no scaler (fp32 is unchanged).
- ``train.channels_last: true``: on CUDA the student and its LQ inputs use the channels_last memory
  format (the EMA copy keeps the default layout; checkpoints are saved contiguous). SwinIR is mostly
  token-wise (attention and MLPs on (B, N, C) tokens), so only its convolutions (first, body,
  upsampler) can gain; not measured on a GPU yet. Ignored on the CPU.
- ``train.compile: true``: the training forward runs through ``torch.compile(self.net_g)``, a wrapper
  kept beside ``self.net_g``: checkpoints, the EMA and validation use the uncompiled module, so the
  state-dict keys are unchanged. The first iteration's time (compilation included) is logged.
"""
import inspect
import logging
import time
from collections import OrderedDict
from copy import deepcopy
from os import path as osp

import torch
from basicsr.losses import build_loss
from basicsr.metrics import calculate_metric
from basicsr.models.sr_model import SRModel
from basicsr.utils import get_root_logger, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from dtkd_arch.tiling import forward_padded, tiled_forward
from dtkd_compat import OptionError
from dtkd_loss.dwt_kd_loss import band_group_discrepancy
from dtkd_model.kd_schedule import KDWeightSchedule
from dtkd_model.options import check_model_options
from dtkd_model.safe_training import SafeTrainingMixin, atomic_imwrite, make_grad_scaler


@MODEL_REGISTRY.register()
class DTKDModel(SafeTrainingMixin, SRModel):
    """Student training with response distillation from a (diffusion) teacher."""

    def __init__(self, opt):
        self._check_options(opt)
        self.online_teacher = None
        self._validated = set()  # (dataset, iteration) pairs validated in training
        self._validation_counts = {}  # dataset -> validations logged
        super().__init__(opt)

    # ------------------------------------------------------------------ set-up
    @staticmethod
    def _check_options(opt):
        check_model_options(opt, bool(opt.get('is_train')))

    def print_network(self, net):
        """BasicSR's network summary, but the module tree (hundreds of lines) goes to the log file only;
        the console gets the class and parameter count."""
        logger = get_root_logger()
        consoles = [h for h in logger.handlers if type(h) is logging.StreamHandler]
        levels = [h.level for h in consoles]
        for handler in consoles:
            handler.setLevel(logging.WARNING)
        try:
            super().print_network(net)
        finally:
            for handler, level in zip(consoles, levels):
                handler.setLevel(level)
        bare = self.get_bare_model(net)
        count = sum(p.numel() for p in bare.parameters())
        summary = f'Network: {type(bare).__name__}, {count:,d} parameters (structure in the log file)'
        for handler in consoles:
            handler.handle(logging.LogRecord(logger.name, logging.INFO, __file__, 0, summary, None, None))

    def model_to_device(self, net):
        if self._channels_last():  # before any DDP wrapping: DDP's gradient buckets follow the parameters' layout
            net = net.to(self.device, memory_format=torch.channels_last)
        # BasicSR passes device_ids=[current CUDA device] to DDP, which fails on a CPU process group.
        if self.opt['dist'] and self.device.type == 'cpu':
            net = net.to(self.device)
            return DistributedDataParallel(net, find_unused_parameters=self.opt.get('find_unused_parameters', False))
        return super().model_to_device(net)

    def init_training_settings(self):
        super().init_training_settings()
        train_opt = self.opt['train']
        kd_opt = deepcopy(train_opt.get('kd_opt'))
        self.cri_kd = None
        self.kd_schedule = None
        if kd_opt is not None:
            final_weight = float(kd_opt.pop('loss_weight', 1.0))
            kd_opt['loss_weight'] = 1.0
            self.cri_kd = build_loss(kd_opt).to(self.device)
            self.kd_schedule = KDWeightSchedule.from_options(train_opt.get('kd_schedule'), final_weight,
                                                             int(train_opt['total_iter']))
        teacher_opt = self.opt.get('teacher')
        if teacher_opt is not None and self.cri_kd is not None:
            self.online_teacher = self._build_online_teacher(teacher_opt)
        self.log_freq = int(self.opt.get('logger', {}).get('print_freq', 100))
        self.kd_takes_gt = self.cri_kd is not None and self._accepts_keyword(self.cri_kd, 'gt')
        self.kd_takes_samples = self.cri_kd is not None and self._accepts_keyword(self.cri_kd, 'teacher_samples')
        self.grad_scaler = self._build_grad_scaler()
        self._setup_gpu_options(train_opt)

    # ------------------------------------------------------------------ GPU training options
    def _wants_grad_scaler(self):
        """fp16 autocast needs loss scaling (fp16's range is small); bf16 has fp32's range, fp32 needs none."""
        return self.opt['network_g'].get('precision', 'fp32') == 'fp16'

    def _build_grad_scaler(self):
        if not self._wants_grad_scaler():
            return None
        scaler = make_grad_scaler(self.device)
        get_root_logger().info(f'network_g.precision fp16: the loss is scaled by a gradient scaler '
                               f'(initial scale {scaler.get_scale():g})')
        return scaler

    def _channels_last(self):
        """``train.channels_last`` on a CUDA device, in training (the CPU ignores it)."""
        if not self.opt.get('is_train'):
            return False
        return bool((self.opt.get('train') or {}).get('channels_last', False)) and self.device.type == 'cuda'

    def _setup_gpu_options(self, train_opt):
        logger = get_root_logger()
        if train_opt.get('channels_last'):
            if self._channels_last():
                logger.info('train.channels_last: the student and its LQ inputs use the channels_last memory format')
            else:
                logger.info(f'train.channels_last: ignored on {self.device.type} (a CUDA option)')
        self.net_g_compiled = None
        self._compile_started = None
        if train_opt.get('compile'):
            # A wrapper beside self.net_g (which keeps its state-dict keys, used by checkpoints, the EMA and
            # validation); torch.compile is lazy: the first training forward and backward compile.
            self.net_g_compiled = torch.compile(self.net_g)
            logger.info('train.compile: the student is compiled with torch.compile at the first iteration')

    @staticmethod
    def _accepts_keyword(loss, name):
        """Whether ``loss.forward`` takes a ``name`` keyword (or any keyword, ``**kwargs``)."""
        params = inspect.signature(loss.forward).parameters.values()
        return any(p.name == name and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.kind == p.VAR_KEYWORD
                   for p in params)

    def _build_online_teacher(self, teacher_opt):
        from dtkd_teacher.teacher import ResShiftTeacher

        teacher = ResShiftTeacher.from_options(teacher_opt['opt'], device=self.device,
                                               precision=teacher_opt.get('precision', 'fp32'))
        get_root_logger().info(f"Online teacher from {teacher_opt['opt']} "
                               f"(precision {teacher_opt.get('precision', 'fp32')})")
        return teacher

    # ------------------------------------------------------------------ data
    def feed_data(self, data):
        super().feed_data(data)
        self.teacher = data['teacher'].to(self.device) if 'teacher' in data else None
        samples = data.get('teacher_samples')
        self.teacher_samples = samples.to(self.device) if samples is not None else None
        if self._channels_last():
            self.lq = self.lq.contiguous(memory_format=torch.channels_last)

    def get_teacher_output(self):
        """The teacher's SR for the current batch, (B, C, sH, sW) in [0, 1].

        Cached outputs arrive with the batch; otherwise the online teacher runs on the LQ.
        """
        if self.teacher is not None:
            return self.teacher
        if self.online_teacher is None:
            raise OptionError('the training batch has no teacher output: set datasets.train.dataroot_teacher '
                              '(cached teacher results) or a teacher block (online teacher)')
        with torch.no_grad():
            self.teacher = self.online_teacher.sample(self.lq).to(self.output.dtype)
        return self.teacher

    # ------------------------------------------------------------------ training
    def kd_loss(self, output, teacher):
        """The KD loss at unit weight; the batch's GT is passed too when the loss takes a ``gt`` keyword."""
        kwargs = {'gt': self.gt} if self.kd_takes_gt else {}
        if self.kd_takes_samples and getattr(self, 'teacher_samples', None) is not None:
            kwargs['teacher_samples'] = self.teacher_samples
        return self.cri_kd(output, teacher, **kwargs)

    def optimize_parameters(self, current_iter):
        compiled = getattr(self, 'net_g_compiled', None)
        first_compiled = compiled is not None and self._compile_started is None
        if first_compiled:
            self._compile_started = time.perf_counter()
        self.optimizer_g.zero_grad(set_to_none=True)
        self.output = (self.net_g if compiled is None else compiled)(self.lq)

        loss_dict = OrderedDict()
        l_task = self.cri_pix(self.output, self.gt)
        l_total = l_task
        loss_dict['l_task'] = l_task
        if self.cri_kd is not None:
            lam = self.kd_schedule(current_iter)
            log_now = current_iter % self.log_freq == 0
            # With lambda = 0 the teacher term does not change the gradient; skip it (and an online
            # teacher's sampling) except when it is logged.
            if lam > 0 or log_now:
                teacher = self.get_teacher_output()
                l_kd = self.kd_loss(self.output, teacher)
                if lam > 0:
                    l_total = l_total + lam * l_kd
                loss_dict['l_kd'] = l_kd.detach()
                for name, value in (getattr(self.cri_kd, 'last_confidence', None) or {}).items():
                    loss_dict[f'kd_conf_{name}'] = value.detach().float()  # ConfidenceDWTKDLoss
                adaptive = getattr(self.cri_kd, 'adaptive', None)
                if adaptive is not None:  # adaptive band-group weights
                    for name, value in adaptive.weights().items():
                        loss_dict[f'kd_w_{name}'] = torch.tensor(value, device=self.device)
                if log_now:
                    with torch.no_grad():
                        groups = band_group_discrepancy(self.output.detach(), teacher)
                    for name, value in groups.items():
                        loss_dict[f'kd_{name}'] = value.mean()
            loss_dict['lambda_kd'] = torch.tensor(lam, device=self.device)
        if self.grad_scaler is not None:
            loss_dict['grad_scale'] = torch.tensor(self.grad_scaler.get_scale(), device=self.device)
        self.scaled_backward(l_total)  # l_total.backward(), scaled in fp16 training
        extra = {'teacher output': self.teacher} if self.teacher is not None else None
        self.step_taken = self.step_if_finite(l_total, loss_dict, current_iter, self.optimizer_g, extra=extra)

        self.log_dict = self.reduce_loss_dict(loss_dict)
        if self.step_taken and self.ema_decay > 0:
            self.model_ema(decay=self.ema_decay)
        if first_compiled:
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - self._compile_started
            get_root_logger().info(f'train.compile: compiled the student in {seconds:.1f} s '
                                   '(the first iteration, forward and backward, compilation included)')

    def extra_training_state(self):
        """The adaptive band-group weights' state (running means, starting point, current weights)."""
        adaptive = getattr(getattr(self, 'cri_kd', None), 'adaptive', None)
        return {'kd_adaptive_weights': adaptive.state_dict()} if adaptive is not None else {}

    def load_extra_training_state(self, resume_state):
        adaptive = getattr(getattr(self, 'cri_kd', None), 'adaptive', None)
        saved = resume_state.get('kd_adaptive_weights')
        if adaptive is not None and saved is not None:
            adaptive.load_state_dict(saved)
            get_root_logger().info(f'Resumed the adaptive band-group weights at {adaptive.weights()}')
        elif adaptive is not None:
            get_root_logger().info('The training state has no adaptive band-group weights; they start again')

    # ------------------------------------------------------------------ inference
    def _window_multiple(self):
        val_opt = self.opt.get('val') or {}
        if val_opt.get('pad_multiple') is not None:
            return int(val_opt['pad_multiple'])
        return int(self.opt['network_g'].get('window_size', 1))

    def _infer(self, net, lq):
        scale = int(self.opt.get('scale', 1))
        tile = (self.opt.get('val') or {}).get('tile')
        if tile:
            return tiled_forward(net, lq, scale, tile['tile_size'], tile.get('tile_pad', 0), self._window_multiple())
        return forward_padded(net, lq, self._window_multiple(), scale)

    def test(self):
        net = self.net_g_ema if hasattr(self, 'net_g_ema') else self.net_g
        was_training = net.training
        net.eval()
        with torch.no_grad():
            self.output = self._infer(net, self.lq)
        if was_training:
            net.train()

    # ------------------------------------------------------------------ validation
    def validation(self, dataloader, current_iter, tb_logger, save_img=False):
        """BasicSR's validation, labelled with the iteration of the weights it evaluates.

        BasicSR's runner validates once more after its loop with a counter that has run past
        ``train.total_iter`` (by one per epoch boundary); those are the final weights, so they are
        labelled ``total_iter``, and skipped when that iteration was validated already.
        """
        if self.opt['is_train']:
            total = int(self.opt['train']['total_iter'])
            current_iter = min(current_iter, total)
            key = (dataloader.dataset.opt['name'], current_iter)
            if key in self._validated:
                get_root_logger().info(f'Validation {key[0]}: iteration {current_iter} was validated already')
                return
            self._validated.add(key)
        super().validation(dataloader, current_iter, tb_logger, save_img)

    def _log_validation_metric_values(self, current_iter, dataset_name, tb_logger):
        """The metric values; the best value so far only once there is more than one validation to compare."""
        counts = self._validation_counts
        counts[dataset_name] = counts.get(dataset_name, 0) + 1
        lines = [f'Validation {dataset_name} @ iter {current_iter}']
        for metric, value in self.metric_results.items():
            line = f'\t # {metric}: {value:.4f}'
            best = getattr(self, 'best_metric_results', {}).get(dataset_name, {}).get(metric)
            if best is not None and counts[dataset_name] > 1:
                line += f'\tBest: {best["val"]:.4f} @ {best["iter"]} iter'
            lines.append(line)
        get_root_logger().info('\n'.join(lines) + '\n')
        if tb_logger:
            for metric, value in self.metric_results.items():
                tb_logger.add_scalar(f'metrics/{dataset_name}/{metric}', value, current_iter)

    def nondist_validation(self, dataloader, current_iter, tb_logger, save_img):
        """SRModel's validation plus per-image metric records and, in test runs, result files."""
        dataset_name = dataloader.dataset.opt['name']
        val_opt = self.opt['val']
        metrics_opt = val_opt.get('metrics') or {}
        with_metrics = bool(metrics_opt)
        if with_metrics:
            self._initialize_best_metric_results(dataset_name)
            self.metric_results = {metric: 0.0 for metric in metrics_opt}
        recorder = self._results_recorder() if with_metrics and not self.opt['is_train'] else None

        pbar = tqdm(total=len(dataloader), unit='image') if val_opt.get('pbar', False) else None
        count = 0
        for val_data in dataloader:
            img_name = osp.splitext(osp.basename(val_data['lq_path'][0]))[0]
            self.feed_data(val_data)
            self.test()
            sr_img = tensor2img([self.output.detach().cpu()])
            metric_data = {'img': sr_img}
            if hasattr(self, 'gt'):
                metric_data['img2'] = tensor2img([self.gt.detach().cpu()])
                del self.gt
            del self.lq
            del self.output

            if save_img:
                if self.opt['is_train']:
                    save_path = osp.join(self.opt['path']['visualization'], img_name, f'{img_name}_{current_iter}.png')
                else:
                    suffix = val_opt.get('suffix') or self.opt['name']
                    save_path = osp.join(self.opt['path']['visualization'], dataset_name, f'{img_name}_{suffix}.png')
                atomic_imwrite(sr_img, save_path)

            if with_metrics:
                values = {}
                for name, mopt in metrics_opt.items():
                    mopt = {k: v for k, v in mopt.items() if k not in ('better', 'optional')}
                    values[name] = float(calculate_metric(metric_data, mopt))
                    self.metric_results[name] += values[name]
                if recorder is not None:
                    recorder.add(dataset_name, img_name, values)
            count += 1
            if pbar is not None:
                pbar.update(1)
                pbar.set_description(f'Test {img_name}')
        if pbar is not None:
            pbar.close()

        if with_metrics and count:
            for metric in self.metric_results:
                self.metric_results[metric] /= count
                self._update_best_metric_result(dataset_name, metric, self.metric_results[metric], current_iter)
            self._log_validation_metric_values(current_iter, dataset_name, tb_logger)
            if recorder is not None:
                paths = recorder.write()
                get_root_logger().info(f"Results: {paths['json']} and {paths['markdown']} (means), "
                                       f"{', '.join(paths['csv'].values())} (per image)")

    def _results_recorder(self):
        """One recorder per test run, shared by all its datasets (summary files list every dataset)."""
        if getattr(self, '_recorder', None) is None:
            from dtkd_metric.report import ResultsRecorder, metric_protocol

            val_opt = self.opt['val']
            metrics = val_opt.get('metrics') or {}
            better = {name: mopt.get('better') for name, mopt in metrics.items()}
            self._recorder = ResultsRecorder(self.opt['path']['results_root'],
                                             model_label=val_opt.get('model_label', self.opt['name']),
                                             kd_label=val_opt.get('kd_label', self._kd_label()), better=better,
                                             protocol=metric_protocol(metrics))
        return self._recorder

    def _kd_label(self):
        kd_opt = (self.opt.get('train') or {}).get('kd_opt')
        return kd_opt['type'] if kd_opt else '-'

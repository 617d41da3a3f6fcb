"""Building blocks of the VQ-f4 autoencoder that ResShift diffuses in.

The autoencoder is the VQ-regularised first stage of latent diffusion (Rombach et al., CVPR 2022;
``ldm/modules/diffusionmodules/model.py`` and ``ldm/modules/vqvae/quantize.py`` as vendored in
github.com/zsyOAOA/ResShift). Parameter names match those files so the released
``autoencoder_vq_f4.pth`` loads unchanged. Single-head spatial self-attention runs through
``torch.nn.functional.scaled_dot_product_attention`` (same result, no N x N matrix in memory).
"""
import torch
import torch.nn.functional as F
from torch import nn


def _norm(channels):
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Pre-activation residual block without timestep input (keys norm1, conv1, norm2, conv2, nin_shortcut)."""

    def __init__(self, in_channels, out_channels=None, dropout=0.0):
        super().__init__()
        out_channels = out_channels or in_channels
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)
        else:
            self.nin_shortcut = None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions (keys norm, q, k, v, proj_out: 1x1 convs)."""

    def __init__(self, channels):
        super().__init__()
        self.norm = _norm(channels)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # B x HW x C
        # One matrix product for q, k and v instead of three 1x1 convolutions.
        weight = torch.cat([self.q.weight, self.k.weight, self.v.weight]).flatten(1)
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias])
        q, k, v = F.linear(tokens, weight, bias).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as the reference
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve the resolution: pad right/bottom by one then stride-2 3x3 conv (or 2x2 average pooling)."""

    def __init__(self, channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class Upsample(nn.Module):
    """Double the resolution: nearest neighbour then (optionally) a 3x3 conv."""

    def __init__(self, channels, with_conv):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = F.interpolate(x, scale_factor=2.0, mode='nearest')
        return self.conv(x) if self.with_conv else x


def _per_level(num_res_blocks, ch_mult):
    if isinstance(num_res_blocks, int):
        return [num_res_blocks] * len(ch_mult)
    if len(num_res_blocks) != len(ch_mult):
        raise ValueError(f'ddconfig.num_res_blocks {num_res_blocks} needs one entry per ch_mult level {ch_mult}')
    return list(num_res_blocks)


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> features (B, z_channels (x2 if double_z), H / 2^(L-1), W / 2^(L-1))."""

    def __init__(self, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=True, dropout=0.0, resamp_with_conv=True):
        super().__init__()
        self.num_res_blocks = _per_level(num_res_blocks, ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        res = resolution
        block_in = ch
        for level, mult in enumerate(ch_mult):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_out = ch * mult
            for _ in range(self.num_res_blocks[level]):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                res //= 2
            self.down.append(stage)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for stage in self.down:
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, 'downsample'):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Features (B, z_channels, h, w) -> image (B, out_ch, h * 2^(L-1), w * 2^(L-1))."""

    def __init__(self, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, dropout=0.0,
                 resamp_with_conv=True, give_pre_end=False, tanh_out=False):
        super().__init__()
        self.num_res_blocks = _per_level(num_res_blocks, ch_mult)
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        block_in = ch * ch_mult[-1]
        res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)
        stages = []
        for level in reversed(range(len(ch_mult))):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            block_out = ch * ch_mult[level]
            for _ in range(self.num_res_blocks[level] + 1):
                stage.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if res in attn_resolutions:
                    stage.attn.append(AttnBlock(block_in))
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                res *= 2
            stages.insert(0, stage)
        # Indexed by level (0 = full resolution), as in the reference checkpoints.
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for stage in reversed(self.up):
            for i, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[i](h)
            if hasattr(stage, 'upsample'):
                h = stage.upsample(h)
        if self.give_pre_end:
            return h
        h = self.conv_out(F.silu(self.norm_out(h)))
        return torch.tanh(h) if self.tanh_out else h


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantiser (``VectorQuantizer2`` of latent diffusion; key ``embedding.weight``).

    Args:
        n_embed (int): codebook size.
        embed_dim (int): code width (latent channels).
    """

    def __init__(self, n_embed, embed_dim):
        super().__init__()
        self.n_embed = n_embed
        self.embed_dim = embed_dim
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)

    def codes(self, z):
        """Index of the nearest code for every position: z (B, C, H, W) -> (B, H, W) int64."""
        b, c, h, w = z.shape
        if c != self.embed_dim:
            raise ValueError(f'VQ latent has {c} channels, the codebook expects {self.embed_dim}')
        flat = z.permute(0, 2, 3, 1).reshape(-1, c)
        codebook = self.embedding.weight
        # Same expansion |z|^2 + |e|^2 - 2 z.e as the reference, so ties and rounding pick the same codes.
        dist = flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1) - 2 * flat @ codebook.t()
        return dist.argmin(dim=1).view(b, h, w)

    def forward(self, z):
        """Quantise z (B, C, H, W); gradients pass straight through to z. Returns (z_q, codes (B, H, W))."""
        idx = self.codes(z)
        z_q = self.embedding(idx).permute(0, 3, 1, 2)
        # Written as z + (z_q - z) like the reference: equal to z_q up to float rounding, and the
        # straight-through gradient of VQ-VAE training.
        return z + (z_q - z).detach(), idx

"""The factorised spatial/temporal 3D UNet that TF-T2V trains with both branches.

Implements the network of TF-T2V §3 (Wang et al., CVPR 2024), which is the ModelScope T2V /
VideoComposer UNet: a 2D diffusion UNet (DDPM §4, LDM §3.3) whose every level interleaves
spatial layers with temporal layers, so that one set of weights is an image model when the
temporal layers are skipped (the content branch, `use_temporal=False`, F = 1) and a video model
when they run (the motion branch). Read top to bottom: timestep embedding -> attention ->
ResBlock -> temporal convolution -> spatial transformer -> temporal transformer -> `UNet3D`.

Layouts (the video tensor at the module boundary is (B, C, F, H, W)):
- spatial layers see frames folded into the batch, (B*F, C, H, W), so every frame is processed
  exactly as an image; GroupNorm there normalises each frame separately (as the official UNet);
- temporal convolutions see the video (B, C, F, H, W); temporal attention sees one sequence over
  frames per pixel, (B*H*W, F, C).
- Patches (`patch_size` p > 1): each frame enters as non-overlapping p x p patches, one pixel of
  C p^2 channels each (pixel_unshuffle), and leaves through the inverse (pixel_shuffle).
  Deviation: the paper's UNet runs in the SD VAE's 8x-downsampled latent; in pixel space, 2x2
  patches are this project's cheap stand-in for that downsampling (4x fewer positions per level).
- Activations stay in PyTorch's default contiguous layout. Measured on a 2-core AVX-512 CPU,
  channels-last made convolutions faster but GroupNorm's backward 3x (float32) to 15x (bfloat16)
  slower, and the net step slower; the layout changes at the temporal blocks and the
  attention token sequences are one copy each, a few percent of a step. Sampling has no
  backward: there `channels_last_convs` pays (one `quick` video 7-14% faster in fp32).

Zero initialisation (improved-diffusion's `zero_module`): the last layer of every temporal block
is zero, so an untrained temporal stack is the identity and the video model starts as the image
model applied to each frame; the output head, each ResBlock's second convolution and each spatial
transformer's output projection are zero too, as in the official (Stable Diffusion) UNet.
`spatial_proj_zero=False` starts the spatial transformers' output projections at torch's default
initialisation instead (not in the paper; docs/experiments.md, section 4, has why and what it did).

Spatial conditions (TF-T2V's compositional synthesis, VideoComposer's STC-encoder in miniature):
with `condition_channels` K > 0, per-frame condition maps (B, K, F, H, W) pass a small condition
encoder (convolutions per frame, then a temporal mixing convolution over frames) whose features are
concatenated to x's channels before the input convolution. Deviation: VideoComposer's encoder
mixes frames with a temporal transformer; here one zero-initialised convolution over frames does.

Context maps (`context_maps` K > 0; an option, not in the paper): the first context token, through
one linear layer, enters as K input channels, constant over each frame and over the frames. TF-T2V
(tft2v.py) puts the caption's pooled CLIP text embedding there when the UNet has these maps. Why
(docs/experiments.md, section 4): the direction a caption names ("moving left") is learnt late or
never through the cross-attention; it makes up 28.5% of the variance of the pooled embedding of
`toy`'s CLIP, against 3.7% of its mean text token's. In a scratch test (big red squares, t = T)
the `quick` UNet learnt direction-dependent mean clips from the pooled embedding through these
maps by step 700, and from the same captions' tokens through its cross-attention only at step
5,600 (and that with the spatial transformers' zero-initialised `proj_out` at torch's default
initialisation instead, `spatial_proj_zero=False`).

Tensor legend: B batch, C channels, F frames, H W height width, L context tokens,
D context width, E timestep-embedding width, N a batch of sequences, S sequence length,
K condition maps (or context maps).
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    in_channels: int = 3  # channels of x_t (3 in pixel space, 4 for the SD VAE latent)
    out_channels: int = 3  # channels of the prediction (eps or v)
    patch_size: int = 1  # >1: frames enter as non-overlapping p x p patches (pixel_unshuffle)
    model_channels: int = 32  # width of level 0; level i has model_channels * channel_mult[i]
    channel_mult: tuple = (1, 2, 2)  # width multiplier per level; each level halves H and W
    num_res_blocks: int = 1  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple = (0, 1)  # levels with spatial + temporal transformers (0 = full res)
    head_dim: int = 32  # width of one attention head; heads = channels // head_dim
    context_dim: int = 64  # D, width of the context tokens the cross-attention reads
    temporal_conv_layers: int = 4  # convolutions over frames per temporal conv block (official 4)
    num_groups: int = 32  # GroupNorm groups
    condition_channels: int = 0  # K per-frame condition maps (compositional synthesis); 0 = none
    condition_dim: int = 16  # width of the condition encoder's features, concatenated to x
    context_maps: int = 0  # >0: this many constant input channels from the first context token
    spatial_proj_zero: bool = True  # spatial transformers' proj_out starts at zero (official);
    # False: torch's default initialisation (not in the paper; see the module docstring)
    dropout: float = 0.0  # in ResBlocks and temporal conv blocks
    use_checkpoint: bool = False  # gradient checkpointing per block: less memory, ~30% more time

    def size_multiple(self):
        """Frame height and width must be multiples of this: the patch side times one halving
        per level below the first."""
        return self.patch_size * 2 ** (len(self.channel_mult) - 1)


PRESETS = {
    # CPU toy/bench model: widths (32, 64, 64) at 32x32, 16x16, 8x8.
    # Deviation: 2 convolutions per temporal conv block (official 4): ~10% of a CPU step.
    "tiny": UNetConfig(temporal_conv_layers=2),
    # TF-T2V / ModelScope T2V in the SD 2.1 latent space (4 x 32 x 56 for 448 x 256 video).
    "paper": UNetConfig(in_channels=4, out_channels=4, model_channels=320,
                        channel_mult=(1, 2, 4, 4), num_res_blocks=2, attention_levels=(0, 1, 2),
                        head_dim=64, context_dim=1024, dropout=0.1),
}


def zero_module(module):
    """Zero a layer's parameters so that the block it closes starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


@contextlib.contextmanager
def channels_last_convs(module, enabled=True):
    """Within the block, every Conv2d weight of `module` is stored channels-last, so those
    convolutions run in the channels-last (NHWC) path and their outputs, the activations after
    them, come out channels-last too; on leaving, the contiguous layout is back. The values never
    change, only their layout. For inference: one `quick` video (DDIM 50 steps with guidance,
    float32) ran 7-14% faster in six alternating rounds on a 2-core Emerald Rapids Xeon (1.44-1.58
    s against 1.58-1.73 s), while in training the backward's GroupNorms lose what the
    convolutions gain."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)] if enabled else []
    for conv in convs:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    try:
        yield module
    finally:
        for conv in convs:
            conv.weight.data = conv.weight.data.contiguous()


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps t (B,) -> (B, dim)
    (Transformer §3.5, as in DDPM)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]  # (B, dim/2)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def frames_to_video(h, B):
    """(B*F, C, H, W) -> (B, C, F, H, W), a (strided) view."""
    return h.unflatten(0, (B, -1)).transpose(1, 2)  # (B, C, F, H, W)


def video_to_frames(x):
    """(B, C, F, H, W) -> (B*F, C, H, W); a copy unless F = 1."""
    return x.transpose(1, 2).flatten(0, 1)  # (B*F, C, H, W)


# ----------------------------------------------------------------------------------------------
# Attention


# Scores per chunk of the plain CPU attention below: 2^21 bfloat16 scores = 4 MB, cache-sized.
SCORE_CHUNK = 2**21
# float32 on the CPU: the plain form for at most this many keys (`attention`), on AVX2 CPUs only
PLAIN_KEYS = 64 if torch.backends.cpu.get_cpu_capability() == "AVX2" else 0


def attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v for q (N, heads, S, d), k and v (N, heads, L, d).

    torch's scaled_dot_product_attention (fused kernels on CUDA, a flash kernel on the CPU), except
    on the CPU for bfloat16, and for float32 with at most PLAIN_KEYS keys: there a plain
    matmul-softmax was faster. bfloat16, measured on a 2-core AVX-512 CPU (forward + backward,
    each attention of the `tiny` UNet's step): torch's flash kernel took 1.2x to 2.9x as long
    (1,024-token self-attention: 96 vs 76 ms; 8-frame temporal attention: 17 vs 6 ms), and the
    whole step 20-35% longer. float32 on a 2-core Zen 3 EPYC (AVX2, no AVX-512): the flash kernel
    took 1.3x to 4x as long for the `quick` UNet's attentions (8 frames, 36 text tokens or 64
    positions as keys), about as long for 256 keys, and 0.64x as long for 1,024. On an AVX-512
    Cascade Lake Xeon, though, the flash kernel was the faster in float32 (8-frame temporal
    attention: 31 vs 86 ms), so PLAIN_KEYS is 0 on every CPU but an AVX2 one. The plain form
    materialises the (S, L) scores, so it runs on chunks of the batch of about SCORE_CHUNK scores
    each: one chunk for short sequences, two 1,024-token sequences at a time at full resolution.
    As under autocast on CUDA, bfloat16 scores are rounded to bfloat16 before the softmax."""
    if q.device.type != "cpu" or (q.dtype != torch.bfloat16 and k.shape[2] > PLAIN_KEYS):
        return F.scaled_dot_product_attention(q, k, v)
    rows = max(1, SCORE_CHUNK // (q.shape[1] * q.shape[2] * k.shape[2]))  # batch rows per chunk
    if rows >= q.shape[0]:
        return plain_attention(q, k, v)
    return torch.cat([plain_attention(*qkv) for qkv in zip(q.split(rows), k.split(rows),
                                                           v.split(rows))])


def plain_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v by two batched matmuls, the softmax in the inputs' dtype."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (N, heads, S, L)
    return torch.softmax(scores, dim=-1, dtype=scores.dtype) @ v  # (N, heads, S, d)


class Attention(nn.Module):
    """Multi-head attention softmax(Q K^T / sqrt(d)) V (Transformer Eq. 1) via `attention`.
    Self-attention when `context` is None, else cross-attention."""

    def __init__(self, dim, head_dim, context_dim=None):
        super().__init__()
        self.heads = max(1, dim // head_dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):  # x (N, S, C), context (N, L, D)
        context = x if context is None else context
        q, k, v = (proj(a).unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (N, heads, S, C/h)
                   for proj, a in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
        out = attention(q, k, v)  # (N, heads, S, C/heads)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (N, S, C)


class FeedForward(nn.Sequential):
    """Transformer MLP: C -> 4C -> C with GELU.
    Deviation: GELU MLP instead of the official GEGLU (a gated GELU with twice the first width)."""

    def __init__(self, dim, dropout=0.0):
        super().__init__(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(4 * dim, dim))


# ----------------------------------------------------------------------------------------------
# Spatial blocks: frames folded into the batch, (B*F, C, H, W)


class ResBlock(nn.Module):
    """DDPM/improved-diffusion residual block: GroupNorm, SiLU, conv, + timestep embedding,
    GroupNorm, SiLU, dropout, conv (zero-initialised); 1x1 conv on the skip when widths differ."""

    def __init__(self, cin, cout, emb_dim, config):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(config.num_groups, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, cout))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(config.num_groups, cout), nn.SiLU(), nn.Dropout(config.dropout),
            zero_module(nn.Conv2d(cout, cout, 3, padding=1)))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, h, emb):  # h (B*F, C, H, W), emb (B*F, E)
        x = self.in_layers(h) + self.emb_layers(emb)[:, :, None, None]
        return self.skip(h) + self.out_layers(x)


class SpatialTransformer(nn.Module):
    """LDM §3.3 transformer on the H*W tokens of each frame: self-attention, cross-attention to
    the context tokens, feed-forward, each pre-LayerNorm and residual; GroupNorm + linear
    projections around it and a zero-initialised output projection, as in Stable Diffusion."""

    def __init__(self, dim, config):
        super().__init__()
        self.norm = nn.GroupNorm(config.num_groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1, self.self_attn = nn.LayerNorm(dim), Attention(dim, config.head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.cross_attn = Attention(dim, config.head_dim, config.context_dim)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim)
        self.proj_out = nn.Linear(dim, dim)
        if config.spatial_proj_zero:
            zero_module(self.proj_out)

    def forward(self, h, context):  # h (B*F, C, H, W), context (B, L, D)
        BF, C, H, W = h.shape
        B = context.shape[0]
        x = self.proj_in(self.norm(h).permute(0, 2, 3, 1).reshape(BF, H * W, C))  # (B*F, H*W, C)
        x = x + self.self_attn(self.norm1(x))
        # Cross-attention treats each query token on its own, so all F frames of a video can
        # share one copy of that video's context: queries (B, F*H*W, C), keys (B, L, D).
        x = x + self.cross_attn(self.norm2(x).reshape(B, -1, C), context).reshape(BF, H * W, C)
        x = x + self.ff(self.norm3(x))
        out = self.proj_out(x).reshape(BF, H, W, C).permute(0, 3, 1, 2)  # (B*F, C, H, W)
        return h + out


# ----------------------------------------------------------------------------------------------
# Temporal blocks: mix information across frames only


class TemporalConvBlock(nn.Module):
    """VideoComposer's temporal convolution block: `temporal_conv_layers` x (GroupNorm, SiLU,
    [dropout], convolution of kernel 3 over frames), residual, last convolution zero-initialised.
    Implemented as Conv3d with kernel (3, 1, 1) on (B, C, F, H, W): measured 1.3-3x faster than
    Conv1d on (B*H*W, C, F), which also needs two permuting copies. GroupNorm here normalises over
    all frames of a video together (as the official block)."""

    def __init__(self, dim, config):
        super().__init__()
        if config.temporal_conv_layers < 1:
            raise ValueError(f"temporal_conv_layers must be at least 1, got "
                             f"{config.temporal_conv_layers}")
        layers = []
        for i in range(config.temporal_conv_layers):
            layers += [nn.GroupNorm(config.num_groups, dim), nn.SiLU()]
            layers += [nn.Dropout(config.dropout)] if i > 0 else []
            layers += [nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0))]
        zero_module(layers[-1])
        self.layers = nn.Sequential(*layers)

    def forward(self, x):  # x (B, C, F, H, W)
        return x + self.layers(x)


class TemporalTransformer(nn.Module):
    """Transformer over the F frames at each pixel: GroupNorm, linear in, [LayerNorm,
    self-attention, LayerNorm, feed-forward], zero-initialised linear out, residual.

    Frame positions: none are added, as in the official UNet. Attention alone is blind to frame
    order (it is permutation-equivariant over frames), but every level also has a temporal
    convolution block, whose kernel over neighbouring frames and zero padding at the clip ends
    give the features order and position. Leaving positions out keeps the layer free of a
    maximum clip length, so a model trained on F frames runs on any F."""

    def __init__(self, dim, config):
        super().__init__()
        self.norm = nn.GroupNorm(config.num_groups, dim)
        self.proj_in = nn.Linear(dim, dim)
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, config.head_dim)
        self.norm2, self.ff = nn.LayerNorm(dim), FeedForward(dim)
        self.proj_out = zero_module(nn.Linear(dim, dim))

    def forward(self, x):  # x (B, C, F, H, W)
        B, C, Fr, H, W = x.shape
        seq = self.norm(x).permute(0, 3, 4, 2, 1).reshape(B * H * W, Fr, C)  # (B*H*W, F, C)
        seq = self.proj_in(seq)
        seq = seq + self.attn(self.norm1(seq))
        seq = seq + self.ff(self.norm2(seq))
        out = self.proj_out(seq).reshape(B, H, W, Fr, C).permute(0, 4, 3, 1, 2)  # (B, C, F, H, W)
        return x + out


class TemporalMix(nn.Module):
    """The condition encoder's step over frames: x + conv_F(x), a kernel-3 convolution over frames
    at each pixel, zero-initialised (so it starts as the identity, like every temporal block)."""

    def __init__(self, dim):
        super().__init__()
        self.conv = zero_module(nn.Conv3d(dim, dim, (3, 1, 1), padding=(1, 0, 0)))

    def forward(self, x):  # x (B, C, F, H, W)
        return x + self.conv(x)


class ConditionEncoder(nn.Module):
    """Per-frame condition maps (B*F, K, H, W) -> features (B*F, condition_dim, H, W): three 3x3
    convolutions on each frame (spatial, so images train them), then `TemporalMix` over the
    frames of each video when temporal layers run."""

    def __init__(self, config):
        super().__init__()
        c = config.condition_dim
        self.spatial = nn.Sequential(
            nn.Conv2d(config.condition_channels, c, 3, padding=1), nn.SiLU(),
            nn.Conv2d(c, c, 3, padding=1), nn.SiLU(), nn.Conv2d(c, c, 3, padding=1))
        self.temporal = TemporalMix(c)

    def forward(self, maps, B, use_temporal):  # maps (B*F, K, H, W)
        h = self.spatial(maps)
        if use_temporal:
            h = video_to_frames(self.temporal(frames_to_video(h, B)))
        return h  # (B*F, condition_dim, H, W)


# ----------------------------------------------------------------------------------------------
# The UNet


class Stage(nn.Module):
    """One step of a level (TF-T2V §3, Fig. 2 backbone): ResBlock -> temporal conv block ->
    [spatial transformer -> temporal transformer]; the temporal modules run only when asked."""

    def __init__(self, cin, cout, emb_dim, config, attention):
        super().__init__()
        self.res = ResBlock(cin, cout, emb_dim, config)
        self.temporal_conv = TemporalConvBlock(cout, config)
        self.spatial_attn = SpatialTransformer(cout, config) if attention else None
        self.temporal_attn = TemporalTransformer(cout, config) if attention else None
        self.use_checkpoint = config.use_checkpoint

    def forward(self, h, emb, context, use_temporal):  # h (B*F, C, H, W), emb (B*F, E)
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, h, emb, context, use_temporal, use_reentrant=False)
        return self._forward(h, emb, context, use_temporal)

    def _forward(self, h, emb, context, use_temporal):
        B = context.shape[0]
        h = self.res(h, emb)
        if use_temporal:
            h = video_to_frames(self.temporal_conv(frames_to_video(h, B)))
        if self.spatial_attn is not None:
            h = self.spatial_attn(h, context)
            if use_temporal:
                h = video_to_frames(self.temporal_attn(frames_to_video(h, B)))
        return h


class UNet3D(nn.Module):
    """Factorised 3D UNet: conv in -> down levels (Stages, spatial 2x downsampling) -> middle
    (Stage with attention, then a ResBlock) -> up levels (Stages on [h ; skip], spatial 2x
    upsampling) -> GroupNorm, SiLU, zero-initialised conv out.

    Deviation: the official UNet also has one temporal transformer right after the input
    convolution and its middle block ends with a ResBlock that is followed by a temporal conv;
    here every temporal layer belongs to a Stage, so the middle ends with a plain ResBlock."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        emb_dim = 4 * c.model_channels
        self.time_embed = nn.Sequential(  # sinusoid -> MLP, as DDPM / the official UNet
            nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        p2 = c.patch_size**2  # a p x p patch of C channels is one pixel of C * p^2 channels
        self.condition_encoder = ConditionEncoder(c) if c.condition_channels else None
        cin = c.in_channels + (c.condition_dim if c.condition_channels else 0)
        if c.context_maps < 0:
            raise ValueError(f"context_maps must be 0 or more, got {c.context_maps}")
        self.context_maps = nn.Linear(c.context_dim, c.context_maps) if c.context_maps else None
        self.conv_in = nn.Conv2d(cin * p2 + c.context_maps, c.model_channels, 3, padding=1)

        widths = [c.model_channels * m for m in c.channel_mult]
        skips = [c.model_channels]  # width of every tensor the down path hands to the up path
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        ch = c.model_channels
        for level, width in enumerate(widths):
            stages = nn.ModuleList()
            for _ in range(c.num_res_blocks):
                stages.append(Stage(ch, width, emb_dim, c, level in c.attention_levels))
                ch = width
                skips.append(ch)
            self.down.append(stages)
            last = level == len(widths) - 1
            self.downsample.append(None if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
            if not last:
                skips.append(ch)

        self.middle = Stage(ch, ch, emb_dim, c, attention=True)
        self.middle_res = ResBlock(ch, ch, emb_dim, c)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            stages = nn.ModuleList()
            for _ in range(c.num_res_blocks + 1):
                stages.append(Stage(ch + skips.pop(), width, emb_dim, c,
                                    level in c.attention_levels))
                ch = width
            self.up.append(stages)
            self.upsample.append(None if level == 0 else nn.Conv2d(ch, ch, 3, padding=1))

        self.out = nn.Sequential(nn.GroupNorm(c.num_groups, ch), nn.SiLU(),
                                 zero_module(nn.Conv2d(ch, c.out_channels * p2, 3, padding=1)))

    def forward(self, x, t, context, use_temporal=True, condition=None):
        """x (B, C, F, H, W) noisy video (F = 1 for images), t (B,) timesteps (long or float),
        context (B, L, D), condition (B, K, F, H, W) maps or None (absent: zeros). With
        use_temporal=False no temporal module runs, so every frame is denoised independently as
        an image. H and W must be divisible by patch_size * 2^(levels - 1).
        Returns (B, out_channels, F, H, W)."""
        B, _, Fr, H, W = x.shape
        m = self.config.size_multiple()
        if H % m or W % m:
            raise ValueError(f"frame size {H}x{W} is not a multiple of {m} (patch_size "
                             f"{self.config.patch_size}, {len(self.config.channel_mult)} levels)")
        context = context.to(x.dtype)
        emb = self.time_embed(timestep_embedding(t, self.config.model_channels).to(x.dtype))
        emb = emb.repeat_interleave(Fr, dim=0)  # (B*F, E): each frame carries its video's t
        h = video_to_frames(x)  # (B*F, C, H, W)
        if self.condition_encoder is not None:
            if condition is None:
                condition = x.new_zeros(B, self.config.condition_channels, *x.shape[2:])
            maps = video_to_frames(condition.to(x.dtype))  # (B*F, K, H, W)
            h = torch.cat([h, self.condition_encoder(maps, B, use_temporal)], dim=1)
        elif condition is not None:
            raise ValueError("this UNet takes no condition maps (condition_channels = 0)")
        h = F.pixel_unshuffle(h, self.config.patch_size)  # (B*F, C p^2, H/p, W/p)
        if self.context_maps is not None:  # the first context token as K constant channels
            k = self.context_maps(context[:, 0]).repeat_interleave(Fr, dim=0)  # (B*F, K)
            h = torch.cat([h, k[:, :, None, None].expand(-1, -1, *h.shape[2:])], dim=1)

        h = self.conv_in(h)
        skips = [h]
        for stages, downsample in zip(self.down, self.downsample):
            for stage in stages:
                h = stage(h, emb, context, use_temporal)
                skips.append(h)
            if downsample is not None:
                h = downsample(h)
                skips.append(h)

        h = self.middle_res(self.middle(h, emb, context, use_temporal), emb)

        for stages, upsample in zip(self.up, self.upsample):
            for stage in stages:
                h = stage(torch.cat([h, skips.pop()], dim=1), emb, context, use_temporal)
            if upsample is not None:
                h = upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))

        out = F.pixel_shuffle(self.out(h), self.config.patch_size)  # (B*F, C_out, H, W)
        return frames_to_video(out, B).contiguous()  # (B, C_out, F, H, W)

    def temporal_parameters(self):
        """Parameters of the temporal conv blocks, temporal transformers and the condition
        encoder's temporal mixing (motion)."""
        temporal = (TemporalConvBlock, TemporalTransformer, TemporalMix)
        return [p for m in self.modules() if isinstance(m, temporal) for p in m.parameters()]

    def spatial_parameters(self):
        """Every other parameter (appearance): trained by both branches."""
        temporal = {id(p) for p in self.temporal_parameters()}
        return [p for p in self.parameters() if id(p) not in temporal]

"""TF-T2V: text-to-video diffusion trained from image-text pairs and text-free videos.

Implements TF-T2V §3 (Wang et al., "A Recipe for Scaling up Text-to-Video Generation with
Text-free Videos", CVPR 2024) on top of two pure networks:
- `clip_tiny.CLIP`, frozen: captions -> text tokens, frames -> image embeddings;
- `unet3d.UNet3D`: the factorised spatial/temporal denoiser.

Read top to bottom:
1. `Diffusion`: schedules (DDPM §2, "linear_sd", zero terminal SNR of Lin et al. 2024 Alg. 1),
   `q_sample` (DDPM Eq. 4), eps- and v-prediction (Salimans & Ho 2022 §4), offset noise,
   the DDPM ancestral sampler (DDPM Alg. 2) and DDIM (DDIM Eq. 12), classifier-free guidance
   (Ho & Salimans 2022 Eq. 6).
2. `coherence_loss`: the temporal coherence loss of TF-T2V §3.3.
3. `TFT2V`: conditioning (context = [text tokens ; image tokens], TF-T2V §3.2), condition dropout,
   the content branch (`content_loss`, TF-T2V §3.1 spatial appearance) and the motion branch
   (`motion_loss`, TF-T2V §3.1 motion dynamics, §3.4 semi-supervised), and `generate`.

Deviation: diffusion runs in pixel space (3 channels, 32x32 by default) instead of the SD 2.1 VAE
latent; `UNetConfig.in_channels = 4` and a VAE in front would restore the paper's setting.
Deviation: samplers clamp x0_pred to [-1, 1] (`clip_x0`), right for pixels, not for latents.
Deviation: guidance is against the null context (all conditions zero, or a negative prompt's
text tokens when one is given) rather than the official fixed negative-prompt embedding.

Tensor legend: B batch, C channels, F frames, H W height width, T diffusion steps,
L text tokens, D context width, E CLIP embedding width. Videos are (B, C, F, H, W) in [-1, 1];
images are videos with F = 1.
"""

import ctypes
import glob
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import clip_tiny
import unet3d
from data import conditions as spatial_conditions

# ----------------------------------------------------------------------------------------------
# 0. Where and in which precision to run (the one place devices are chosen)


def pick_device(name):
    """"auto" (CUDA when there is one, else the CPU), or a torch device name ("cpu", "cuda",
    "cuda:N"); ValueError for a name torch does not know or a GPU this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU here")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {name!r} asked for, but there are only "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def pick_precision(name, device):
    """bf16 autocast where it is faster: CUDA with bf16, or a CPU with bf16 matrix instructions
    (avx512_bf16 / amx_bf16; measured ~3x faster than fp32 on such a CPU, see bench.py)."""
    if name in ("fp32", "bf16"):
        return name
    if name != "auto":
        raise ValueError(f"unknown precision {name!r}: auto, fp32 or bf16")
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def sampling_channels_last(device, precision):
    """Whether sampling runs the UNet's Conv2d weights channels-last
    (`unet3d.channels_last_convs`): on a CPU in float32, where it was measured 7-14% faster (an
    Emerald Rapids Xeon; on a Cascade Lake one a forward pass gained nothing clear); not on CUDA
    or in bf16, where it was not measured for sampling (on a bf16 CPU, channels-last training
    steps were slower)."""
    return device.type == "cpu" and precision == "fp32"


def compile_errors(compiling):
    """For an `except` clause around work that may run under torch.compile (--compile of
    train.py and sample.py): the exception torch raises when it cannot build a graph, or none
    when not compiling (torch._dynamo, ~1.6 s to import, is then never imported)."""
    if not compiling:
        return ()
    from torch._dynamo.exc import BackendCompilerFailed
    return BackendCompilerFailed


def compile_failure(error):
    """One line naming why torch.compile could not build a graph: its BackendCompilerFailed
    wraps the cause, e.g. no C++ compiler for inductor on a CPU."""
    cause = getattr(error, "inner_exception", None) or error
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[0]}" if lines else type(cause).__name__


def keep_freed_memory():
    """Have glibc's malloc keep freed memory for reuse rather than hand it back to the system.

    By default glibc serves blocks over a moving threshold (128 KB at first) with fresh mmap'd
    pages and returns freed heap above 128 KB, so the same large activations of every training
    step come back as new pages the kernel must fault in and zero. Measured on a 2-core VM: the
    `tiny` bf16 training step that bench.py times faulted in ~42,000 pages each time, none with
    this, and ran 2-7% faster. Blocks up to 32 MB (glibc's largest threshold) then come from the
    heap, and the heap is not trimmed. A no-op where the C library is not glibc. Returns whether
    it applied."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
                    and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------------------------
# 1. Diffusion


@dataclass
class DiffusionConfig:
    timesteps: int = 1000  # T
    schedule: str = "linear_sd"  # "linear_sd" (official), "linear" (DDPM) or "cosine" (iDDPM)
    zero_terminal_snr: bool = True  # rescale betas so alpha_bar_T = 0 (official)
    prediction: str = "v"  # what the network predicts: "v" (official) or "eps"
    offset_noise: float = 0.1  # per-(sample, channel, frame) offset noise strength (official 0.1)


def make_betas(schedule, timesteps):
    """beta_1..beta_T in float64."""
    if schedule == "linear_sd":  # linear in sqrt(beta), as Stable Diffusion and VGen
        return torch.linspace(0.00085**0.5, 0.012**0.5, timesteps, dtype=torch.float64) ** 2
    if schedule == "linear":  # DDPM §4, scaled so any T spans the same noise range
        scale = 1000 / timesteps
        return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)
    if schedule == "cosine":  # iDDPM Eq. (17)
        s = 0.008
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        alpha_bar = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown schedule {schedule!r}: use linear_sd, linear or cosine")


def rescale_zero_terminal_snr(betas):
    """Lin et al. 2024, Alg. 1: shift and scale sqrt(alpha_bar) so that its last value is 0 (the
    model sees pure noise at t = T, as at sampling) while its first value is unchanged."""
    sqrt_ab = torch.cumprod(1 - betas, 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


def broadcast(coef, t, x):
    """coef[t] for each sample, shaped (B, 1, ..., 1) to broadcast against x of any rank."""
    return coef.to(x.device)[t].to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def classifier_free_guidance(model, context, null_context, scale):
    """Wrap model(x_t, t, context) into model_fn(x_t, t) that returns the guided prediction
    uncond + s * (cond - uncond) (CFG Eq. 6) from one batched forward pass."""

    def model_fn(x_t, t):
        out = model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([context, null_context]))
        cond, uncond = out.chunk(2)
        return uncond + scale * (cond - uncond)

    return model_fn


class Diffusion:
    """The forward process, its targets and two samplers. The network is an argument, never a
    member (as improved-diffusion). All coefficients are computed once in float64.

    Notation: alpha_bar[t] = prod_{s<=t} (1 - beta_s);
    x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps;
    v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0.   Index t runs 0..T-1 (paper's 1..T).
    """

    def __init__(self, config=DiffusionConfig()):
        self.config = config
        betas = make_betas(config.schedule, config.timesteps)
        if config.zero_terminal_snr:
            if config.prediction == "eps":
                raise ValueError("zero terminal SNR needs v-prediction: eps is unidentifiable at "
                                 "alpha_bar_T = 0 (Lin et al. 2024 §3.2)")
            betas = rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alpha_bar = torch.cumprod(1 - betas, 0)
        self.alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alpha_bar[:-1]])
        self.sqrt_alpha_bar = self.alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1 - self.alpha_bar).sqrt()
        # q(x_{t-1} | x_t, x0), DDPM Eq. (6)-(7)
        self.posterior_variance = betas * (1 - self.alpha_bar_prev) / (1 - self.alpha_bar)
        self.posterior_mean_coef_x0 = betas * self.alpha_bar_prev.sqrt() / (1 - self.alpha_bar)
        self.posterior_mean_coef_xt = (1 - self.alpha_bar_prev) * (1 - betas).sqrt() / (
            1 - self.alpha_bar)

    @property
    def num_timesteps(self):
        return self.config.timesteps

    # -- forward process and targets --

    def noise_like(self, x0):
        """eps ~ N(0, I), plus offset noise (Guttenberg 2023): one extra value per
        (sample, channel, frame), so the model can also change a frame's mean colour."""
        eps = torch.randn_like(x0)
        if self.config.offset_noise > 0:
            eps = eps + self.config.offset_noise * torch.randn(
                *x0.shape[:-2], 1, 1, device=x0.device, dtype=x0.dtype)  # (B, C, F, 1, 1)
        return eps

    def scales(self, t, x):
        """(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)), each shaped to broadcast against x."""
        return broadcast(self.sqrt_alpha_bar, t, x), broadcast(self.sqrt_one_minus_alpha_bar, t, x)

    def q_sample(self, x0, t, eps):
        """x_t ~ q(x_t | x0), DDPM Eq. (4)."""
        a, s = self.scales(t, x0)
        return a * x0 + s * eps

    def v_from(self, x0, eps, t):
        a, s = self.scales(t, x0)
        return a * eps - s * x0

    def target(self, x0, eps, t):
        """What the network is trained to output at (x_t, t)."""
        return eps if self.config.prediction == "eps" else self.v_from(x0, eps, t)

    def x0_eps_from(self, x_t, t, model_out):
        """(x0_pred, eps_pred) from the network's output, for either parameterisation."""
        a, s = self.scales(t, x_t)
        if self.config.prediction == "eps":
            eps = model_out
            return (x_t - s * eps) / a, eps
        v = model_out  # v-prediction, Salimans & Ho 2022 §4: x0 = a x_t - s v, eps = s x_t + a v
        return a * x_t - s * v, s * x_t + a * v

    def eps_from_x0(self, x_t, t, x0):
        a, s = self.scales(t, x_t)
        return (x_t - a * x0) / s

    def q_posterior(self, x0, x_t, t):
        """Mean and variance of q(x_{t-1} | x_t, x0), DDPM Eq. (7)."""
        mean = broadcast(self.posterior_mean_coef_x0, t, x_t) * x0 + broadcast(
            self.posterior_mean_coef_xt, t, x_t) * x_t
        return mean, broadcast(self.posterior_variance, t, x_t)

    # -- samplers: model_fn(x_t, t) -> network output; guidance is folded into model_fn --

    def ddpm_sample(self, model_fn, shape, generator=None, device="cpu", clip_x0=True,
                    progress=False):
        """DDPM Alg. 2: ancestral sampling through all T steps,
        x_{t-1} ~ q(x_{t-1} | x_t, x0_pred)."""
        x_t = torch.randn(shape, generator=generator, device=device)
        for i in tqdm(reversed(range(self.num_timesteps)), total=self.num_timesteps,
                      disable=not progress, desc="ddpm"):
            t = torch.full((shape[0],), i, device=device, dtype=torch.long)
            x0, _ = self.x0_eps_from(x_t, t, model_fn(x_t, t).float())
            if clip_x0:
                x0 = x0.clamp(-1, 1)
            mean, var = self.q_posterior(x0, x_t, t)
            noise = torch.randn(shape, generator=generator, device=device) if i > 0 else 0
            x_t = mean + var.sqrt() * noise
        return x_t

    def sampling_timesteps(self, steps, spacing="trailing"):
        """Which of the T timesteps a `steps`-step sampler visits, high to low. "trailing" starts
        at t = T (pure noise under zero terminal SNR); "leading" is DDIM's original choice
        (Lin et al. 2024 §3.4 compare them)."""
        T = self.num_timesteps
        if not 1 <= steps <= T:
            raise ValueError(f"sampling steps must be in 1..{T}, got {steps}")
        if spacing == "trailing":
            ts = torch.arange(T, 0, -T / steps).round().long() - 1
        elif spacing == "leading":
            ts = (torch.arange(steps) * (T // steps)).flip(0)
        else:
            raise ValueError(f"unknown spacing {spacing!r}: use trailing or leading")
        return ts

    def ddim_sample(self, model_fn, shape, steps=50, eta=0.0, spacing="trailing", generator=None,
                    device="cpu", clip_x0=True, progress=False):
        """DDIM (Song et al. 2021). Per step, with a_t = alpha_bar[t], a_prev = alpha_bar[t_prev]:
          1. predict x0 and eps from the network output;
          2. sigma_t = eta sqrt((1 - a_prev) / (1 - a_t)) sqrt(1 - a_t / a_prev)   DDIM Eq. (16)
          3. x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z  DDIM Eq. (12)
        The last step goes to a_prev = 1, i.e. returns x0."""
        ts = self.sampling_timesteps(steps, spacing)
        x_t = torch.randn(shape, generator=generator, device=device)
        for i, step in enumerate(tqdm(ts.tolist(), disable=not progress, desc="ddim")):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            x0, eps = self.x0_eps_from(x_t, t, model_fn(x_t, t).float())  # 1.
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = self.eps_from_x0(x_t, t, x0)
            a_t = self.alpha_bar[step]
            a_prev = self.alpha_bar[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0).double()
            sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()  # 2.
            eps_coef = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
            x_t = a_prev.sqrt().float() * x0 + eps_coef.float() * eps  # 3.
            if eta > 0 and i + 1 < len(ts):
                x_t = x_t + sigma.float() * torch.randn(shape, generator=generator, device=device)
        return x_t


# ----------------------------------------------------------------------------------------------
# 2. The temporal coherence loss


def coherence_loss(pred, target):
    """TF-T2V §3.3: adjacent-frame differences of the prediction must match those of the target,

        L_coh = 1/(F-1) sum_{j=1..F-1} || (o_{j+1} - o_j) - (y_{j+1} - y_j) ||^2,

    here averaged over the F-1 pairs and over every element (B, C, H, W), like the base MSE.
    pred, target: (B, C, F, H, W)."""
    if pred.shape != target.shape:
        raise ValueError(f"coherence_loss: pred {tuple(pred.shape)} "
                         f"vs target {tuple(target.shape)}")
    if pred.shape[2] < 2:
        raise ValueError("coherence_loss needs at least 2 frames (F > 1); images have none")
    d_pred = pred[:, :, 1:] - pred[:, :, :-1]  # (B, C, F-1, H, W)
    d_target = target[:, :, 1:] - target[:, :, :-1]
    return F.mse_loss(d_pred.float(), d_target.float())


# ----------------------------------------------------------------------------------------------
# 3. TF-T2V: conditioning, the two branches, generation


@dataclass
class TFT2VConfig:
    image_tokens: int = 4  # the image embedding becomes this many context tokens (official 4)
    p_text_in_content: float = 0.5  # content branch: P(condition = caption); else the image itself
    p_drop_each: float = 0.1  # each condition zeroed independently with this probability
    p_drop_all: float = 0.1  # all conditions zeroed together (unconditional sample, for CFG)
    cond_frame: str = "middle"  # frame whose CLIP embedding conditions a clip: middle|first|random
    coherence_weight: float = 0.1  # lambda of L = L_base + lambda * L_coh (TF-T2V §3.3)
    null_text: str = "zeros"  # absent text: "zeros" (official UNet) or "empty" (CLIP of "")
    # compositional synthesis (TF-T2V §4): per-frame spatial condition maps, data/conditions.py
    conditions: str = ""  # kinds, e.g. "silhouette,sketch"; "" = none
    p_drop_condition: float = 0.5  # each kind zeroed independently: one kind alone works too
    video_conditions: bool = False  # control only: the motion branch also gets its clips' maps


class TFT2V(nn.Module):
    """One UNet, two branches (TF-T2V Fig. 2).

    The frozen CLIP turns captions into text tokens (B, L, D) and frames into image embeddings
    (B, E); a small MLP maps an image embedding to `image_tokens` tokens of width D. The context
    every spatial cross-attention sees is [text tokens ; image tokens] (B, L + image_tokens, D),
    with an absent condition as zeros (as the official UNet). A UNet with context maps (not in the
    paper; unet3d.py) reads the first token: the text tokens then start with the caption's pooled
    CLIP embedding, L + 1 of them.
    """

    def __init__(self, clip, tokenizer, unet_config, config=TFT2VConfig(),
                 diffusion_config=DiffusionConfig()):
        super().__init__()
        D = clip.config.transformer_width
        if unet_config.context_dim != D:
            raise ValueError(f"UNet context_dim {unet_config.context_dim} != CLIP text width {D}")
        if unet_config.context_maps and clip.config.embed_dim != D:
            raise ValueError(f"context maps read the pooled text embedding as a context "
                             f"token: CLIP embed_dim {clip.config.embed_dim} must equal its text "
                             f"width {D}")
        self.config, self.unet_config = config, unet_config
        self.clip, self.tokenizer = clip.eval().requires_grad_(False), tokenizer
        self.unet = unet3d.UNet3D(unet_config)
        E = clip.config.embed_dim
        self.image_mlp = nn.Sequential(  # official: Linear -> SiLU -> Linear to 4 tokens
            nn.Linear(E, D), nn.SiLU(), nn.Linear(D, config.image_tokens * D))
        self.diffusion = Diffusion(diffusion_config)
        self.condition_kinds = spatial_conditions.parse_kinds(config.conditions)
        if len(self.condition_kinds) != unet_config.condition_channels:
            raise ValueError(f"{len(self.condition_kinds)} condition kind(s) "
                             f"({config.conditions!r}) but UNet condition_channels "
                             f"{unet_config.condition_channels}")

    def forward(self, branch, x, captions=None):
        """Dispatch to a branch loss, so DistributedDataParallel (which hooks `forward`) can wrap
        the whole module: branch is "content", "motion" or "paired"."""
        if branch == "content":
            return self.content_loss(x, captions)
        if branch in ("motion", "paired"):
            return self.motion_loss(x, captions if branch == "paired" else None)
        raise ValueError(f"unknown branch {branch!r}: content, motion or paired")

    def trainable_parameters(self):
        """The UNet and the image-token MLP; CLIP stays frozen."""
        return [p for p in self.parameters() if p.requires_grad]

    def train(self, mode=True):
        super().train(mode)
        self.clip.eval()  # frozen: never in training mode (no dropout etc.)
        return self

    # -- conditions --

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def text_length(self):
        """Text tokens in the context: CLIP's L, plus the pooled embedding for context maps."""
        return self.clip.config.context_length + (1 if self.unet_config.context_maps else 0)

    @torch.no_grad()
    def encode_text(self, captions):
        """Captions -> text tokens (B, L, D) from CLIP's penultimate block. An empty caption is
        the absent-text condition (`null_text`), so an empty prompt means unconditional."""
        tokens = self.tokenizer(list(captions), self.clip.config.context_length).to(self.device)
        text = self.clip.text_tokens(tokens).float()  # (B, L, D)
        if self.unet_config.context_maps:  # the pooled embedding first, for the UNet's maps
            text = torch.cat([self.clip.encode_text(tokens).float()[:, None], text], dim=1)
        if self.config.null_text == "zeros":
            empty = torch.tensor([c.strip() == "" for c in captions], device=self.device)
            text = text.masked_fill(empty[:, None, None], 0.0)
        return text

    def null_text(self, batch):
        """The absent-text condition (B, L, D): zeros, or CLIP's tokens of the empty prompt."""
        if self.config.null_text == "zeros":
            L, D = self.text_length, self.unet_config.context_dim
            return torch.zeros(batch, L, D, device=self.device)
        if self.config.null_text == "empty":
            return self.encode_text([""] * batch)
        raise ValueError(f"unknown null_text {self.config.null_text!r}: zeros or empty")

    @torch.no_grad()
    def embed_image(self, images):
        """Images (B, 3, H, W) in [-1, 1] -> CLIP image embeddings (B, E)."""
        pixels = clip_tiny.preprocess(images.float(), self.clip.config.image_resolution)
        return self.clip.encode_image(pixels).float()

    def image_tokens(self, embedding):
        B, D = embedding.shape[0], self.unet_config.context_dim
        return self.image_mlp(embedding).view(B, self.config.image_tokens, D)  # (B, 4, D)

    def context(self, text, image_embedding, text_on, image_on):
        """[text tokens ; image tokens] (B, L + 4, D); a condition switched off per sample by the
        boolean masks text_on / image_on (B,) is absent: null text, zero image tokens."""
        img = self.image_tokens(image_embedding) * image_on[:, None, None].to(text.dtype)
        text = torch.where(text_on[:, None, None], text, self.null_text(text.shape[0]))
        return torch.cat([text, img], dim=1)

    def condition_dropout(self, text_on, image_on):
        """Per sample: all conditions off with p_drop_all, else each off with p_drop_each
        (the official trainer's scheme), so one model learns both p(x|c) and p(x) for CFG."""
        B, dev = text_on.shape[0], text_on.device
        keep_any = torch.rand(B, device=dev) >= self.config.p_drop_all
        text_on = text_on & keep_any & (torch.rand(B, device=dev) >= self.config.p_drop_each)
        image_on = image_on & keep_any & (torch.rand(B, device=dev) >= self.config.p_drop_each)
        return text_on, image_on

    def condition_maps(self, x, on):
        """Compositional synthesis: the spatial condition maps of clips x (B, C, F, H, W) as
        (B, K, F, H, W), each kind zeroed (absent) with p_drop_condition, and all of them where
        `on` (B,) is False (samples whose text and image were both dropped stay unconditional);
        None when the model takes no maps."""
        if not self.condition_kinds:
            return None
        maps = spatial_conditions.condition_maps(x, self.condition_kinds)
        keep = torch.rand(maps.shape[:2], device=x.device) >= self.config.p_drop_condition
        keep = keep & on[:, None]
        return maps * keep[:, :, None, None, None].to(maps.dtype)

    def pick_frame(self, videos):
        """The frame whose image embedding conditions each clip: (B, C, H, W)."""
        F_ = videos.shape[2]
        if self.config.cond_frame == "middle":
            idx = torch.full((videos.shape[0],), F_ // 2)
        elif self.config.cond_frame == "first":
            idx = torch.zeros(videos.shape[0], dtype=torch.long)
        elif self.config.cond_frame == "random":
            idx = torch.randint(0, F_, (videos.shape[0],))
        else:
            raise ValueError(f"unknown cond_frame {self.config.cond_frame!r}: middle|first|random")
        return videos[torch.arange(videos.shape[0]), :, idx.to(videos.device)]  # (B, C, H, W)

    # -- the denoising loss shared by both branches --

    def denoise(self, x0, context, use_temporal, maps=None):
        """One diffusion training example per sample: t ~ U{0..T-1}, x_t = q_sample(x0, t, eps),
        returns (prediction, target). maps: spatial condition maps or None (absent)."""
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=x0.device)
        eps = self.diffusion.noise_like(x0)
        x_t = self.diffusion.q_sample(x0, t, eps)
        pred = self.unet(x_t, t, context, use_temporal=use_temporal, condition=maps)
        return pred.float(), self.diffusion.target(x0, eps, t)

    # -- the two branches of TF-T2V §3.1 --

    def content_loss(self, images, captions):
        """Content (spatial appearance) branch on image-text pairs. images: (B, C, 1, H, W) or
        (B, C, H, W). Per sample the condition is the caption OR the image's own CLIP embedding,
        never both; the temporal layers are not run, so they get no gradient from images.
        Compositional models also see the image's condition maps (condition-image pairs)."""
        if images.dim() == 4:
            images = images.unsqueeze(2)  # (B, C, 1, H, W)
        if images.shape[2] != 1:
            raise ValueError(f"content_loss takes images (F = 1), got F = {images.shape[2]}")
        B = images.shape[0]
        text_on = torch.rand(B, device=images.device) < self.config.p_text_in_content
        text_on, image_on = self.condition_dropout(text_on, ~text_on)
        # the frozen CLIP runs only on the rows whose condition is on (context() puts the absent
        # condition in the others): on all rows, its two towers took ~10% of a `quick` content step
        text = images.new_zeros(B, self.text_length, self.unet_config.context_dim)
        emb = images.new_zeros(B, self.clip.config.embed_dim)
        if text_on.any():
            text[text_on] = self.encode_text([c for c, o in zip(captions, text_on.tolist()) if o])
        if image_on.any():
            emb[image_on] = self.embed_image(images[image_on, :, 0])
        ctx = self.context(text, emb, text_on, image_on)
        maps = self.condition_maps(images, text_on | image_on)  # off where text and image are
        pred, target = self.denoise(images, ctx, use_temporal=False, maps=maps)
        loss = F.mse_loss(pred, target)
        return loss, {"content": loss.item()}

    def motion_loss(self, videos, captions=None):
        """Motion (dynamics) branch on videos (B, C, F, H, W). The image condition is the CLIP
        embedding of one frame (`cond_frame`); the text slot is zeros for text-free clips and the
        caption for video-text pairs (semi-supervised, TF-T2V §3.4). Spatial and temporal layers
        train; loss = L_base + lambda * L_coh (TF-T2V §3.3). A compositional model gets no
        condition maps here (TF-T2V never pairs videos with conditions), unless
        `video_conditions` asks for the control experiment that does."""
        B = videos.shape[0]
        ones = torch.ones(B, dtype=torch.bool, device=videos.device)
        if captions is None:
            text, text_on = self.null_text(B), ~ones
        else:
            text, text_on = self.encode_text(captions), ones
        text_on, image_on = self.condition_dropout(text_on, ones)
        ctx = self.context(text, self.embed_image(self.pick_frame(videos)), text_on, image_on)
        maps = self.condition_maps(videos, text_on | image_on) if self.config.video_conditions \
            else None
        pred, target = self.denoise(videos, ctx, use_temporal=True, maps=maps)
        base = F.mse_loss(pred, target)
        coh = coherence_loss(pred, target)
        name = "motion" if captions is None else "paired"
        loss = base + self.config.coherence_weight * coh
        return loss, {name: base.item(), f"{name}_coh": coh.item()}

    # -- inference --

    @torch.no_grad()
    def generate(self, prompts=None, images=None, frames=8, size=32, steps=50, guidance=9.0,
                 sampler="ddim", seed=0, eta=0.0, negative_prompt="", spacing="trailing",
                 precision="fp32", progress=False, maps=None, guide_maps=False):
        """Text -> video (prompts), image -> video (images (B, 3, H, W) in [-1, 1]), or
        image + text -> video (both). Classifier-free guidance against the negative prompt
        ("" = text and image conditions zero); precision "bf16" runs the UNet under bf16
        autocast. maps (B, K, F, H, W): a compositional model's condition maps (0 = absent kind),
        by default given to both passes, so guidance acts on text and image only.
        guide_maps=True leaves them out of the null pass (every condition absent at once, the one
        null case training covers), so guidance also pushes towards the maps: measured on the
        Shapes world (README), outlines follow the maps more closely but colours saturate and
        mix inside them.
        Returns (B, C, F, H, W) in [-1, 1]."""
        if prompts is None and images is None:
            raise ValueError("generate needs prompts, images or both")
        if not (math.isfinite(guidance) and 0 <= eta < math.inf):  # NaN, inf: blank videos
            raise ValueError(f"guidance must be finite and eta at least 0 (and finite), got "
                             f"{guidance}, {eta}")
        B = len(prompts) if prompts is not None else images.shape[0]
        if prompts is not None and images is not None and images.shape[0] != B:
            raise ValueError(f"{len(prompts)} prompts but {images.shape[0]} images")
        H, W = (size, size) if isinstance(size, int) else size
        on = torch.ones(B, dtype=torch.bool, device=self.device)
        text = self.encode_text(prompts if prompts is not None else [""] * B)
        if images is not None:
            emb = self.embed_image(images.to(self.device))
        else:
            emb = torch.zeros(B, self.clip.config.embed_dim, device=self.device)
        ctx = self.context(text, emb, on, on if images is not None else ~on)
        null = self.context(self.encode_text([negative_prompt] * B), emb, on, ~on)
        use_temporal = frames > 1
        if maps is not None:
            if not self.condition_kinds:
                raise ValueError("this model was trained without condition maps")
            want = (B, len(self.condition_kinds), frames, H, W)
            if tuple(maps.shape) != want:
                raise ValueError(f"condition maps {tuple(maps.shape)}, expected {want} "
                                 f"({', '.join(self.condition_kinds)})")
            null_maps = torch.zeros_like(maps) if guide_maps else maps
            maps = torch.cat([maps, null_maps]).to(self.device)  # (cond ; null), as the batch

        def model(x_t, t, c):
            with torch.autocast(self.device.type, torch.bfloat16, enabled=precision == "bf16"):
                return self.unet(x_t, t, c, use_temporal=use_temporal, condition=maps).float()

        model_fn = classifier_free_guidance(model, ctx, null, guidance)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        shape = (B, self.unet_config.out_channels, frames, H, W)
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"unknown sampler {sampler!r}: use ddim or ddpm")
        with unet3d.channels_last_convs(self.unet, sampling_channels_last(self.device, precision)):
            if sampler == "ddim":
                x0 = self.diffusion.ddim_sample(model_fn, shape, steps, eta, spacing, gen,
                                                self.device, progress=progress)
            else:
                x0 = self.diffusion.ddpm_sample(model_fn, shape, gen, self.device,
                                                progress=progress)
        return x0.clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# 4. Checkpoints (written by train.py): every config, the tokenizer's merges and all weights

CHECKPOINT_FORMAT = "tft2v-checkpoint-v1"


def model_from_checkpoint(state, use_ema=False):
    """Rebuild a TFT2V from a loaded checkpoint dict; with use_ema, the EMA weights."""
    cfg = state["configs"]
    clip = clip_tiny.CLIP(clip_tiny.CLIPConfig(**cfg["clip"]))
    tokenizer = clip_tiny.Tokenizer(state["merges"])
    model = TFT2V(clip, tokenizer, unet3d.UNetConfig(**cfg["unet"]), TFT2VConfig(**cfg["tft2v"]),
                  DiffusionConfig(**cfg["diffusion"]))
    model.load_state_dict(state["model"])
    if use_ema:
        model.load_state_dict(state["ema"], strict=False)
    return model.eval()


def checkpoints(folder):
    """A run folder's checkpoints (ckpt_<step>.pt), oldest first."""
    return sorted(glob.glob(os.path.join(folder, "ckpt_*.pt")))


def load_checkpoint(path, use_ema=True, device="cpu"):
    """A train.py checkpoint file, or a run folder (its newest checkpoint) -> (model, configs).
    Raises ValueError with a one-line reason for a missing or foreign file."""
    if os.path.isdir(path):
        found = checkpoints(path)
        if not found:
            raise ValueError(f"no checkpoint (ckpt_*.pt) in folder {path}")
        path = found[-1]
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip and torch errors all mean the same to a user
        raise ValueError(f"{path} is not a readable torch checkpoint ({type(e).__name__})")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a tft2v checkpoint written by train.py")
    try:
        model = model_from_checkpoint(state, use_ema)
    except (TypeError, KeyError, RuntimeError) as e:  # unknown config fields, other weights
        reason = str(e).splitlines()[0][:200]
        raise ValueError(f"{path} was written by another version or config of tft2v and does "
                         f"not fit this code ({type(e).__name__}: {reason})")
    return model.to(device), state["configs"]

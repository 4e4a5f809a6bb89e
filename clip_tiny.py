"""clip_tiny.py: CLIP (Radford et al. 2021) from scratch, small enough to train on a CPU.

TF-T2V conditions its UNet on a frozen CLIP (TF-T2V §3): a caption as the per-token features of
the text transformer's penultimate block, then the final LayerNorm (as the official VGen code
does), and an image as its one projected embedding. This file is all of CLIP, in three parts:

1. Tokenizer: CLIP's byte-level BPE (CLIP §2.4, GPT-2 §2.2, Sennrich et al. 2016), readable
   step by step; it learns merges from our captions, and it loads OpenAI's own merges file
   (bpe_simple_vocab_16e6.txt.gz), with which it gives exactly OpenAI's ids.
2. Model: a ViT image tower (`visual`) and a causal text transformer (`transformer`) whose
   `state_dict()` has OpenAI CLIP's key names and shapes, so a real ViT checkpoint loads as is.
3. Training: the symmetric InfoNCE loss (CLIP Fig. 3), a trainer for the Shapes image-text pairs
   and zero-shot classification to check what it learned.

Tensor legend: N batch, L tokens (context length), D transformer width, E embedding (embed_dim),
R image resolution, P patch size, G = R / P patches per side, V vocabulary size.

Deviation: TF-T2V uses a pretrained OpenCLIP ViT-H/14; we train a tiny CLIP on the Shapes
image-text pairs (or load an OpenAI ViT checkpoint with `load_clip`).
Deviation: the tiny preset uses context_length 32 instead of CLIP's 77 (our captions are short);
a real checkpoint keeps its own 77.
"""

import argparse
import dataclasses
import gzip
import html
import importlib.util
import math
import os
import time
import zipfile
from collections import Counter
from dataclasses import dataclass

import ftfy
import regex
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from data import fetch_batch, shapes

# ----------------------------------------------------------------------------------------------
# 1. Tokenizer


def bytes_to_unicode():
    """The byte-to-unicode table: every byte 0..255 gets a visible, non-space character.

    BPE merges strings, and a merges file is text with one space between the two halves of a
    merge, so every byte needs a printable stand-in that is not whitespace. The 188 bytes that
    print already ("!".."~", "¡".."¬", "®".."ÿ") stand for themselves; the other 68 (controls,
    space, ...) get the characters 256, 257, ... in byte order, so the space (byte 32) is "Ġ".
    The table's order is the order of the first 256 vocabulary ids: printable bytes first.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table


def clean(text):
    """CLIP's text normalisation, applied before anything else."""
    text = ftfy.fix_text(text)  # repair mojibake ("cafÃ©" -> "café") and odd unicode
    text = html.unescape(html.unescape(text))  # "&amp;lt;" -> "<": web text is often escaped twice
    text = regex.sub(r"\s+", " ", text).strip()  # any run of whitespace -> one space
    return text.lower()


SOT, EOT = "<|startoftext|>", "<|endoftext|>"

# The pre-tokenising regex splits cleaned text into words; BPE never merges across two of them.
PRE_TOKENIZE = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>"  # the special tokens, kept whole (as OpenAI does)
    r"|'s|'t|'re|'ve|'m|'ll|'d"  # English contractions come off: "it's" -> "it", "'s"
    r"|[\p{L}]+"  # a run of letters, in any script
    r"|[\p{N}]"  # one digit: numbers are spelled digit by digit
    r"|[^\s\p{L}\p{N}]+",  # a run of anything else (punctuation, emoji); whitespace is dropped
    regex.IGNORECASE)

# OpenAI's file holds more merges than its model uses: 49152 - 256 - 2 of them make the
# 49408-entry vocabulary (512 byte tokens + 48894 merges + 2 special tokens).
MAX_MERGES = 49152 - 256 - 2


# texts whose ids a Tokenizer remembers (`Tokenizer.encode`): ~25 MB for 12-word captions
TEXT_CACHE = 100_000


def merge_pair(symbols, pair):
    """Replace every occurrence of `pair` in `symbols` by the merged symbol, left to right."""
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def word_symbols(word):
    """A pre-token (already in byte characters) as BPE's starting symbols; "</w>" ends a word."""
    return [*word[:-1], word[-1] + "</w>"]


class Tokenizer:
    """CLIP's byte-level BPE tokenizer.

    Vocabulary layout (OpenAI's): ids 0..255 the byte characters, 256..511 the same with "</w>"
    (a byte that ends a word), then one token per merge in merge order, then <|startoftext|> and
    <|endoftext|> as the two last ids. A row of `__call__` is [sot, ids..., eot, 0, 0, ...].

    `merges`: the merge rules in priority order, as pairs ("a", "b") or as lines "a b".
    """

    def __init__(self, merges):
        self.merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        bytes_ = list(self.byte_encoder.values())
        vocab = bytes_ + [b + "</w>" for b in bytes_] + ["".join(m) for m in self.merges]
        vocab += [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.ranks = {m: i for i, m in enumerate(self.merges)}  # lower rank = merged earlier
        self.sot_token, self.eot_token = len(vocab) - 2, len(vocab) - 1
        self.cache = {SOT: [SOT], EOT: [EOT]}
        self.text_cache = {}  # text -> ids (`encode`)

    @property
    def vocab_size(self):
        return self.eot_token + 1

    def merge_steps(self, word):
        """BPE on one pre-token: [(None, start), (pair, symbols after merging it), ...].

        Each step merges the adjacent pair with the lowest rank; it stops when no adjacent pair
        is a known merge (or one symbol is left).
        """
        symbols = word_symbols(word)
        steps = [(None, symbols)]
        while len(symbols) > 1:
            best = min(zip(symbols[:-1], symbols[1:]), key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            symbols = merge_pair(symbols, best)
            steps.append((best, symbols))
        return steps

    def bpe(self, word):
        if word not in self.cache:
            self.cache[word] = self.merge_steps(word)[-1][1]
        return self.cache[word]

    def pre_tokens(self, text):
        """Clean, split into words, and write each word's UTF-8 bytes as byte characters."""
        words = PRE_TOKENIZE.findall(clean(text))
        return ["".join(self.byte_encoder[b] for b in w.encode("utf-8")) for w in words]

    def encode(self, text):
        """Text -> token ids, without start/end tokens. Remembered per text, as captions repeat
        (the Shapes world has 960): 32 captions took 1.6 ms, 0.44 ms remembered, on a 2-core Zen 3
        EPYC (ftfy's cleaning the most of it). Up to TEXT_CACHE texts, then it starts over."""
        if text not in self.text_cache:
            if len(self.text_cache) >= TEXT_CACHE:
                self.text_cache.clear()
            ids = [self.encoder[s] for word in self.pre_tokens(text) for s in self.bpe(word)]
            self.text_cache[text] = tuple(ids)
        return list(self.text_cache[text])

    def decode(self, ids):
        """Token ids -> text: the cleaned words joined by single spaces.

        The start token is skipped and decoding stops at the end token, so a padded row of
        `__call__` decodes to its caption. decode(encode(t)) gives back t's pre-tokens.
        """
        data = bytearray()
        for i in ids:
            token = self.decoder[int(i)]
            if token == EOT:
                break
            if token == SOT:
                continue
            word_end = token.endswith("</w>")
            data += bytes(self.byte_decoder[c] for c in token.removesuffix("</w>"))
            data += b" " if word_end else b""
        return data.decode("utf-8", errors="replace").strip()

    def __call__(self, texts, context_length):
        """Texts -> LongTensor (N, context_length): [sot, ids..., eot], padded with 0.

        Too long a text is cut to `context_length` with its last id replaced by eot, so every
        row still ends in eot (which is where the text tower pools).
        """
        texts = [texts] if isinstance(texts, str) else texts
        rows = []
        for text in texts:
            ids = [self.sot_token, *self.encode(text), self.eot_token]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token
            rows.append(ids + [0] * (context_length - len(ids)))
        # one tensor from the lists: a tensor per row took ~4 torch calls each
        return torch.tensor(rows, dtype=torch.long).view(len(texts), context_length)

    @classmethod
    def train(cls, texts, vocab_size):
        """Learn merges from `texts` until the vocabulary has `vocab_size` ids (Sennrich et al.).

        Repeatedly merge the most frequent adjacent pair of symbols over all words (weighted by
        how often each word occurs). Deterministic: ties go to the alphabetically first pair. A
        merge that would rebuild an existing token is not taken, so every id is a distinct
        string. Stops early, with a smaller vocabulary, once every word is a single token.
        """
        tok = cls([])
        word_counts = Counter(w for t in texts for w in tok.pre_tokens(t) if w not in (SOT, EOT))
        words = {w: word_symbols(w) for w in word_counts}
        known = set(tok.encoder)
        merges = []
        while 512 + len(merges) + 2 < vocab_size:
            pair_counts = Counter()
            for w, n in word_counts.items():
                for pair in zip(words[w][:-1], words[w][1:]):
                    pair_counts[pair] += n
            candidates = [p for p in pair_counts if "".join(p) not in known]
            if not candidates:
                break
            best = min(candidates, key=lambda p: (-pair_counts[p], p))
            merges.append(best)
            known.add("".join(best))
            words = {w: merge_pair(s, best) for w, s in words.items()}
        return cls(merges)

    def save(self, path):
        """Write CLIP's merges-file format: a header line, then one "a b" merge per line."""
        text = "#version: 0.2 (tft2v clip_tiny)\n" + "".join(f"{a} {b}\n" for a, b in self.merges)
        opener = gzip.open if str(path).endswith(".gz") else open
        with opener(path, "wt", encoding="utf-8") as f:
            f.write(text)

    @classmethod
    def load(cls, path):
        """Read a merges file (plain or gzip): ours, or OpenAI's bpe_simple_vocab_16e6.txt.gz."""
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":  # the gzip magic number
            data = gzip.decompress(data)
        lines = data.decode("utf-8").split("\n")[1 : MAX_MERGES + 1]  # line 0 is the header
        return cls([line for line in lines if line.strip()])

    def explain(self, text):
        """Every step of tokenizing `text`, for readers. Returns a multi-line string."""
        out = [f"text:       {text!r}", f"cleaned:    {clean(text)!r}",
               f"pre-tokens: {PRE_TOKENIZE.findall(clean(text))}"]
        for word in self.pre_tokens(text):
            if word in (SOT, EOT):
                out.append(f"{word!r}: special token {self.encoder[word]}")
                continue
            steps = self.merge_steps(word)
            out.append(f"{word!r} as byte characters: {' '.join(steps[0][1])}")
            for pair, symbols in steps[1:]:
                out.append(f"    merge {' '.join(pair)!r:16} (rank {self.ranks[pair]:>5}) ->"
                           f" {' '.join(symbols)}")
            out.append(f"    ids: {[self.encoder[s] for s in steps[-1][1]]}")
        ids = [self.sot_token, *self.encode(text), self.eot_token]
        out.append(f"with start/end tokens: {ids}")
        return "\n".join(out)


def merges_of(tokenizer):
    """The tokenizer as plain data for a checkpoint ("a b" lines); Tokenizer(lines) rebuilds it."""
    return [f"{a} {b}" for a, b in tokenizer.merges]


def find_openai_bpe():
    """Path of OpenAI's bpe_simple_vocab_16e6.txt.gz if one is on this machine, else None.

    Looked for in $TFT2V_OPENAI_BPE, then in an installed `clip` or `open_clip` package.
    """
    candidates = [os.environ.get("TFT2V_OPENAI_BPE", "")]
    for package in ("clip", "open_clip"):
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            spec = None
        if spec and spec.origin:
            candidates.append(os.path.join(os.path.dirname(spec.origin),
                                           "bpe_simple_vocab_16e6.txt.gz"))
    return next((p for p in candidates if p and os.path.isfile(p)), None)


# ----------------------------------------------------------------------------------------------
# 2. Model


@dataclass
class CLIPConfig:
    """OpenAI's names (CLIP's build_model). The defaults are ViT-B/32."""
    embed_dim: int = 512  # E: the joint image-text embedding space
    image_resolution: int = 224  # R: the image tower sees R x R pixels
    vision_layers: int = 12  # blocks in the image tower
    vision_width: int = 768  # width of the image tower; its heads are width // 64 (OpenAI's rule)
    vision_patch_size: int = 32  # P: one token per P x P patch
    context_length: int = 77  # L: tokens per caption, start and end tokens included
    vocab_size: int = 49408  # V: rows of the token embedding (>= the tokenizer's vocab_size)
    transformer_width: int = 512  # D: width of the text tower (and of the tokens the UNet sees)
    transformer_heads: int = 8  # heads of the text tower
    transformer_layers: int = 12  # blocks in the text tower
    quick_gelu: bool = True  # OpenAI's x * sigmoid(1.702 x) in the MLPs; False: exact GELU


PRESETS = {
    "ViT-B/32": CLIPConfig(),
    # Trains on the Shapes image-text pairs on a 2-core CPU in about 2 minutes. Its image tower
    # sees the 32 x 32 frames upsampled to 40 x 40: with 5 x 5 patches instead of 4 x 4 a small
    # shape (an 8 x 8 pixel box) is cut less badly, and small triangles and crosses are told
    # apart (zero-shot 99.7% instead of 96.5% for the same training time; patches of 4 cost more).
    "tiny": CLIPConfig(embed_dim=64, image_resolution=40, vision_layers=3, vision_width=128,
                       vision_patch_size=8, context_length=32, vocab_size=1024,
                       transformer_width=64, transformer_heads=4, transformer_layers=3),
}

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # per-channel pixel statistics of CLIP's data
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images, resolution):
    """(N, 3, H, W) in [-1, 1] -> (N, 3, R, R) normalised as CLIP's image tower wants it.

    OpenAI's pipeline, on tensors: resize the short side to R (bicubic, antialiased), centre
    crop, map to [0, 1], subtract OpenAI's mean and divide by its std per channel. The tiny CLIP
    is trained on exactly this, so a real checkpoint plugs into the same path.
    """
    x = (images.float() + 1) / 2  # [-1, 1] -> [0, 1]
    H, W = x.shape[-2:]
    if (H, W) != (resolution, resolution):
        scale = resolution / min(H, W)
        size = (max(resolution, round(H * scale)), max(resolution, round(W * scale)))
        x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        x = x.clamp(0, 1)  # bicubic overshoots; PIL's resize clips to the pixel range too
        top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        x = x[..., top : top + resolution, left : left + resolution]  # (N, 3, R, R)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class QuickGELU(nn.Module):
    """OpenAI's sigmoid approximation of GELU; its checkpoints were trained with it."""

    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameters (in_proj_weight,
    in_proj_bias, out_proj), computed by F.scaled_dot_product_attention (fused where it can)."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))  # q, k, v stacked
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        N, L, D = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.view(N, L, self.heads, D // self.heads).transpose(1, 2)  # (N, heads, L, D/h)
                   for t in (q, k, v))
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return self.out_proj(x.transpose(1, 2).reshape(N, L, D))  # (N, L, D)


class ResidualAttentionBlock(nn.Module):
    """A pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)).

    How it differs from "Attention is all you need": LayerNorm before each sublayer, not after;
    QuickGELU; the text tower's attention is causal (CLIP §2.4), though it is no language model.
    """

    def __init__(self, width, heads, quick_gelu=True):
        super().__init__()
        self.attn = Attention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", QuickGELU() if quick_gelu else nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal=causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu=True):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, quick_gelu) for _ in range(layers))

    def forward(self, x, causal=False, layers=None):
        """Run the first `layers` blocks (all by default): (N, L, D) -> (N, L, D)."""
        for block in self.resblocks[:layers]:
            x = block(x, causal=causal)
        return x


class VisionTransformer(nn.Module):
    """ViT (Dosovitskiy et al. 2021) as in CLIP: patches + class token, extra ln_pre, and the
    class token's output (ln_post) projected to the embedding."""

    def __init__(self, resolution, patch_size, width, layers, heads, output_dim, quick_gelu=True):
        super().__init__()
        scale = width**-0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        grid = resolution // patch_size
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x):
        x = self.conv1(x)  # (N, D, G, G): one token per patch
        x = x.flatten(2).transpose(1, 2)  # (N, G*G, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (N, 1+G*G, D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (N, E): the class token


class CLIP(nn.Module):
    """The two towers, `visual` (images) and `transformer` (text), and the learnable temperature.

    `state_dict()` has OpenAI CLIP's key names, shapes (ViT variant) and order.
    """

    def __init__(self, config):
        super().__init__()
        c = self.config = config
        vision_heads = max(1, c.vision_width // 64)
        problems = [f"{name} {width} is not a multiple of its {heads} heads" for name, width, heads
                    in (("transformer_width", c.transformer_width, c.transformer_heads),
                        ("vision_width", c.vision_width, vision_heads)) if width % heads]
        if c.context_length < 2:
            problems.append(f"context_length {c.context_length} leaves no room for the start "
                            f"and end tokens")
        if c.image_resolution < c.vision_patch_size:
            problems.append(f"image_resolution {c.image_resolution} is below vision_patch_size "
                            f"{c.vision_patch_size}")
        if problems:
            raise ValueError("; ".join(problems))
        self.visual = VisionTransformer(c.image_resolution, c.vision_patch_size, c.vision_width,
                                        c.vision_layers, vision_heads, c.embed_dim,
                                        c.quick_gelu)
        self.transformer = Transformer(c.transformer_width, c.transformer_layers,
                                       c.transformer_heads, c.quick_gelu)
        self.token_embedding = nn.Embedding(c.vocab_size, c.transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(c.context_length,
                                                             c.transformer_width))
        self.ln_final = nn.LayerNorm(c.transformer_width)
        self.text_projection = nn.Parameter(torch.empty(c.transformer_width, c.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP §2.5: tau=0.07
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's initialisation (std shrinking with width and depth), for both towers.

        Deviation: OpenAI leaves its image tower's blocks at PyTorch's default initialisation.
        """
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=self.config.transformer_width**-0.5)
        for tower in (self.transformer, self.visual.transformer):
            width, layers = tower.resblocks[0].ln_1.normalized_shape[0], len(tower.resblocks)
            proj_std = width**-0.5 * (2 * layers) ** -0.5
            for block in tower.resblocks:
                nn.init.normal_(block.attn.in_proj_weight, std=width**-0.5)
                nn.init.zeros_(block.attn.out_proj.bias)
                nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
                nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
                nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def encode_image(self, images):
        """Preprocessed images (N, 3, R, R) -> embeddings (N, E), not normalised."""
        return self.visual(images)

    def text_features(self, tokens, layers=None):
        """Token ids (N, L) -> ln_final(output of the first `layers` blocks): (N, L, D)."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        return self.ln_final(self.transformer(x, causal=True, layers=layers))

    def text_tokens(self, tokens):
        """The per-token features the TF-T2V UNet attends to: (N, L, D).

        The penultimate block's output, then ln_final, as the official VGen code does
        (FrozenOpenCLIPEmbedder, layer="penultimate").
        """
        return self.text_features(tokens, layers=self.config.transformer_layers - 1)

    def encode_text(self, tokens):
        """Token ids (N, L) -> embeddings (N, E), not normalised: the features at the end token.

        The end token has the largest id, so argmax finds it (as OpenAI does); under the causal
        mask it is the one position that has seen the whole caption. For the same reason no
        position after the batch's last end token can reach an end token, so those are not
        computed: the same embeddings, and a `tiny` CLIP training step 18% faster on a 2-core Zen 3
        EPYC (100 against 122 ms; Shapes captions take 9 of its 32 positions).
        """
        ends = tokens.argmax(dim=-1)  # (N,)
        used = int(ends.max()) + 1 if len(tokens) else tokens.shape[1]
        x = self.text_features(tokens[:, :used])  # (N, used, D)
        x = x[torch.arange(x.shape[0], device=x.device), ends]  # (N, D)
        return x @ self.text_projection.to(x.dtype)  # (N, E)

    def forward(self, images, tokens):
        """Cosine similarities times the temperature: (logits_per_image, logits_per_text)."""
        image = F.normalize(self.encode_image(images).float(), dim=-1)
        text = F.normalize(self.encode_text(tokens).float(), dim=-1)
        scale = self.logit_scale.exp().clamp(max=100)  # CLIP §2.5: clipped to at most 100
        logits_per_image = scale * image @ text.t()  # (N_images, N_texts)
        return logits_per_image, logits_per_image.t()

    @classmethod
    def from_state_dict(cls, state_dict, transformer_heads=None):
        """Build a CLIP from an OpenAI-format (ViT) state dict, reading the config off the shapes
        as OpenAI's build_model does. Head counts are not in the shapes: the image tower's are
        width // 64 (always, as OpenAI), the text tower's too unless `transformer_heads` says."""
        sd = {k: v for k, v in state_dict.items()
              if k not in ("input_resolution", "context_length", "vocab_size")}
        if "visual.proj" not in sd:
            raise ValueError("not a ViT CLIP state dict (ResNet CLIPs are not supported)")

        def count(prefix):
            return len({k[len(prefix) :].split(".")[0] for k in sd if k.startswith(prefix)})

        patch = sd["visual.conv1.weight"].shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        width = sd["ln_final.weight"].shape[0]
        config = CLIPConfig(
            embed_dim=sd["text_projection"].shape[1], image_resolution=patch * grid,
            vision_layers=count("visual.transformer.resblocks."),
            vision_width=sd["visual.conv1.weight"].shape[0], vision_patch_size=patch,
            context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0], transformer_width=width,
            transformer_heads=transformer_heads or max(1, width // 64),
            transformer_layers=count("transformer.resblocks."))
        model = cls(config)
        model.load_state_dict({k: v.float() for k, v in sd.items()})
        return model


# ----------------------------------------------------------------------------------------------
# 3. Training


def clip_loss(logits_per_image, logits_per_text, targets=None):
    """CLIP's symmetric InfoNCE (CLIP Fig. 3): cross-entropy over texts for each image and over
    images for each text, averaged. `targets` (N, N), rows summing to 1, replaces the identity
    (the i-th image matches the i-th text) when a batch holds several equal captions."""
    if targets is None:
        targets = torch.eye(len(logits_per_image), device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets)
            + F.cross_entropy(logits_per_text, targets.t())) / 2


def caption_targets(captions, key=None):
    """InfoNCE targets for a batch in which several items may show the same thing: (N, N), row
    i spread evenly over every j with key(caption j) == key(caption i) (the caption itself by
    default). Every row and column sums to 1, so the loss stays symmetric.

    Why: the Shapes world has only 48 colour x shape x size combinations, so a batch of 128
    repeats each one several times; one-hot targets would ask the model to tell apart images
    and captions that are the same, which it cannot, and the loss would fight itself. Soft
    targets instead make all copies equally right (batches of distinct combinations would do
    too, but cap the batch at 48 and do not carry over to a user's own captions).
    Deviation: CLIP uses one-hot targets (its 400M pairs rarely repeat a caption in a batch).
    """
    keys = [key(c) if key else c for c in captions]
    same = torch.tensor([[a == b for b in keys] for a in keys], dtype=torch.float32)
    return same / same.sum(dim=1, keepdim=True)


def shapes_key(text):
    """What a Shapes caption names, whatever its phrasing: "the big red circle" and "a picture
    of a big red circle" describe the same image."""
    return tuple(shapes.parse_caption(text).values())


def shapes_captions():
    """Every caption the Shapes world writes: each colour x shape x size, each phrasing, static
    and moving in each direction. The tokenizer learns its merges from these, so image captions
    and video captions ("... moving left") both tokenise compactly."""
    return [shapes.caption(colour, shape, size, direction, variant)
            for colour, shape, size in shapes.all_combinations()
            for direction in (None, *shapes.DIRECTIONS)
            for variant in range(len(shapes.IMAGE_TEMPLATES))]


def image_text_batch(data, indices):
    """Items `indices` of an image-text dataset: ((B, 3, H, W) in [-1, 1], B captions)."""
    videos, captions = fetch_batch(data, indices)
    return videos[:, :, videos.shape[2] // 2], captions  # (B, 3, H, W): F = 1 for images


def trail_image(videos):
    """Clips (B, 3, F, H, W) in [-1, 1] -> one image each (B, 3, H, W): the maximum over frames,
    frame f dimmed to (f + 1) / F, so the object fades in along its path and the image shows
    where it went. On a black background (the Shapes world's) the last frame is drawn as is."""
    F = videos.shape[2]
    fade = torch.arange(1, F + 1, dtype=videos.dtype, device=videos.device).view(1, 1, F, 1, 1) / F
    return ((videos + 1) / 2 * fade).amax(2) * 2 - 1


def adamw(params, **kwargs):
    """torch's AdamW with its fused kernel where torch has one for the device (CUDA; the CPU since
    torch 2.4), else its default. The same update; on a 2-core Zen 3 EPYC a step over the `tiny`
    CLIP's 86 tensors took 1.1 ms fused against 4.9 ms in the per-tensor loop the CPU gets by
    default (3.4 ms foreach)."""
    try:
        return torch.optim.AdamW(params, fused=True, **kwargs)
    except RuntimeError:  # no fused kernel here
        return torch.optim.AdamW(params, **kwargs)


def train_clip(data, config=PRESETS["tiny"], steps=1200, batch_size=64, lr=1e-3, device="cpu",
               seed=0, tokenizer=None, precision="fp32", progress=True, videos=None):
    """Train a CLIP from scratch on an image-text dataset; returns (model in eval mode, tokenizer).

    `data`: items ((3, F, H, W) in [-1, 1], caption), e.g. ShapesDataset("images", config) or
    ImageTextFolder. `videos` (optional): captioned clips, e.g. ShapesDataset("paired"); they fill
    half of each batch, each shown as its `trail_image`, so that the words only videos use
    ("moving", "left", ...) are trained too. Without them those words' embeddings keep their
    random initialisation, and in one `toy` seed of four "up" alone turned red objects magenta
    (docs/experiments.md, section 3). Deviation: the paper's CLIP is pretrained on web text and
    knows those words; a CLIP trained on the Shapes images alone would not.
    The tokenizer is learnt first (Tokenizer.train; for the Shapes world from every caption it
    writes, otherwise from the dataset's captions and the clips') unless one is given. Each
    step draws a random batch, uses the symmetric InfoNCE loss (CLIP Fig. 3) with soft targets
    over items that show the same thing (`caption_targets`; for Shapes captions, the same
    colour, shape, size and direction in any phrasing), AdamW (CLIP §2.5 and Table 19: betas
    0.9, 0.98, eps 1e-6, weight decay on matrices only, 0.1 here against CLIP's 0.2), warm-up,
    cosine.
    `precision`: "fp32" or "bf16" (autocast; on a 2-core CPU it was slower than fp32).
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    is_shapes = isinstance(data, shapes.ShapesDataset)
    if tokenizer is None:
        texts = shapes_captions() if is_shapes else [
            d[i][1] for d in (data, videos or []) for i in range(len(d))]
        tokenizer = Tokenizer.train(texts, config.vocab_size)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids, the model only "
                         f"{config.vocab_size} (CLIPConfig.vocab_size)")
    device = torch.device(device)
    model = CLIP(config).to(device).train()
    params = list(model.parameters())
    opt = adamw([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                 {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                lr=lr, betas=(0.9, 0.98), eps=1e-6)
    warmup = max(1, steps // 20)
    n_clips = batch_size // 2 if videos is not None else 0
    bar = tqdm(range(steps), desc="clip", disable=not progress)
    for step in bar:
        cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr * min((step + 1) / warmup, cosine)
        indices = torch.randint(len(data), (batch_size - n_clips,), generator=generator).tolist()
        images, captions = image_text_batch(data, indices)
        if n_clips:
            clip_indices = torch.randint(len(videos), (n_clips,), generator=generator).tolist()
            clips, clip_captions = fetch_batch(videos, clip_indices)
            images = torch.cat([images, trail_image(clips)])
            captions = list(captions) + list(clip_captions)
        images = preprocess(images, config.image_resolution).to(device)
        tokens = tokenizer(captions, config.context_length).to(device)
        targets = caption_targets(captions, shapes_key if is_shapes else None).to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            logits_per_image, logits_per_text = model(images, tokens)
        loss = clip_loss(logits_per_image.float(), logits_per_text.float(), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", scale=f"{model.logit_scale.exp().item():.1f}")
    return model.eval(), tokenizer


@torch.no_grad()
def zero_shot_accuracy(model, tokenizer, shapes_config=None, per_class=20, seed=10**9,
                       device="cpu"):
    """Zero-shot classification (CLIP §3.1.2) of freshly rendered Shapes images.

    Renders `per_class` new images (seeds from `seed` on, none of them in the dataset) of every
    colour x shape x size and picks, for each, the most similar of the captions of all
    combinations ("a big red circle", ...). Returns a dict: accuracy (top-1 over all),
    accuracy_holdout (over the colour-shape pairs held out of the videos), and the mean cosine
    similarity of matched and of unmatched image/caption embeddings.
    """
    shapes_config = shapes_config or shapes.ShapesConfig()
    classes = shapes.all_combinations()  # (colour, shape, size) for every class
    tokens = tokenizer([shapes.caption(*c) for c in classes], model.config.context_length)
    text = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)  # (K, E)
    labels = torch.arange(len(classes)).repeat_interleave(per_class)  # (K * per_class,)
    colours, shape_names, sizes = zip(*[classes[k] for k in labels])
    seeds = [seed + i for i in range(len(labels))]
    images = shapes.render_batch(colours, shape_names, sizes, ["static"] * len(labels), seeds,
                                 frames=1, resolution=shapes_config.resolution)[:, :, 0]
    pixels = preprocess(images, model.config.image_resolution).to(device)  # (N, 3, R, R)
    image = torch.cat([F.normalize(model.encode_image(chunk).float(), dim=-1)
                       for chunk in pixels.split(256)])  # (N, E)
    cosine = image @ text.t()  # (N, K)
    right = (cosine.argmax(dim=1).cpu() == labels).float()
    held = torch.tensor([shapes.is_held_out(c, s, shapes_config) for c, s, _ in classes])[labels]
    matched = torch.zeros_like(cosine, dtype=torch.bool)
    matched[torch.arange(len(labels)), labels.to(device)] = True
    return {"accuracy": right.mean().item(), "accuracy_holdout": right[held].mean().item(),
            "matched_cosine": cosine[matched].mean().item(),
            "unmatched_cosine": cosine[~matched].mean().item()}


def save_clip(path, model, tokenizer):
    """One file with the config, the weights and the tokenizer's merges; written to a temporary
    file and renamed, so a crash never leaves half a file."""
    state = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict(),
             "merges": merges_of(tokenizer)}
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_clip(path, merges=None):
    """(model in eval mode, tokenizer) from a save_clip file, or from an OpenAI CLIP (ViT)
    checkpoint: a state dict or OpenAI's released TorchScript file, with the merges file
    `merges` (by default OpenAI's bpe_simple_vocab_16e6.txt.gz, if find_openai_bpe finds it)."""
    names = zipfile.ZipFile(path).namelist() if zipfile.is_zipfile(path) else []
    if any(n.endswith("/constants.pkl") for n in names):  # OpenAI's files are TorchScript
        state = torch.jit.load(path, map_location="cpu").state_dict()
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if "merges" in state and "config" in state:
        model = CLIP(CLIPConfig(**state["config"]))
        model.load_state_dict(state["state_dict"])
        return model.eval(), Tokenizer(state["merges"])
    merges = merges or find_openai_bpe()
    if merges is None:
        raise FileNotFoundError(f"{path} is an OpenAI-format CLIP: give its merges file "
                                "(bpe_simple_vocab_16e6.txt.gz) or set TFT2V_OPENAI_BPE")
    return CLIP.from_state_dict(state).eval(), Tokenizer.load(merges)


def main():
    parser = argparse.ArgumentParser(
        description="Train the tiny CLIP on the Shapes image-text pairs, report zero-shot "
                    "accuracy, save it (or show how a text is tokenized with --explain).")
    parser.add_argument("--out", default="runs/clip.pt", help="where save_clip writes")
    parser.add_argument("--preset", default="tiny", choices=list(PRESETS))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--explain", metavar="TEXT", help="tokenize TEXT step by step and exit "
                        "(with the Shapes tokenizer, or --merges FILE)")
    parser.add_argument("--merges", help="a merges file for --explain")
    args = parser.parse_args()
    if args.explain is not None:
        tok = Tokenizer.load(args.merges) if args.merges else Tokenizer.train(
            shapes_captions(), PRESETS["tiny"].vocab_size)
        print(tok.explain(args.explain))
        return
    start = time.time()
    model, tok = train_clip(shapes.ShapesDataset("images"), PRESETS[args.preset],
                            steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                            device=args.device, seed=args.seed, precision=args.precision)
    print(f"trained in {time.time() - start:.0f} s")
    print({k: round(v, 4) for k, v in zero_shot_accuracy(model, tok, device=args.device).items()})
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    save_clip(args.out, model, tok)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

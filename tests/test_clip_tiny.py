"""Tests of clip_tiny.py: the tokenizer against hand-derived and OpenAI ids, the model against
OpenAI CLIP's layout, and the contrastive training."""

import dataclasses
import math
import os

import pytest
import torch
import torch.nn.functional as F

import clip_tiny
from clip_tiny import CLIP, CLIPConfig, Tokenizer, adamw, clip_loss

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tiny_merges.txt")
SMALL = CLIPConfig(embed_dim=32, image_resolution=16, vision_layers=2, vision_width=64,
                   vision_patch_size=8, context_length=12, vocab_size=530, transformer_width=32,
                   transformer_heads=4, transformer_layers=2)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(FIXTURE)


# ----------------------------------------------------------------------------------------------
# Tokenizer


def test_clean_fixes_mojibake_entities_whitespace_and_case():
    assert clip_tiny.clean("cafÃ©  &amp;lt;B&gt;\n\tX  ") == "café <b> x"
    assert clip_tiny.clean("  A\u00a0Big   RED\ncircle ") == "a big red circle"


def test_byte_table_is_a_bijection_onto_printable_characters():
    table = clip_tiny.bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]  # id order: printable bytes first


def test_hand_made_merges_give_hand_derived_ids(tok):
    # merges: he=512 ll=513 hell=514 hello</w>=515 wo=516 rl=517 worl=518 world</w>=519
    assert (tok.vocab_size, tok.sot_token, tok.eot_token) == (522, 520, 521)
    assert tok.encode("hello world") == [515, 519]
    assert tok.encode("HELLO, World") == [515, 256 + 11, 519]  # "," is byte 44 -> id 11
    assert tok.encode("help") == [512, 75, 256 + 79]  # no merge "he l": he, l, p</w>
    assert tok.encode("hell") == [512, 75, 256 + 75]  # "l l</w>" is not the merge "l l"
    assert tok.encode("llo") == [513, 256 + 78]
    assert tok.encode("42") == [256 + 19, 256 + 17]  # digits are separate words


def test_unicode_and_emoji_go_through_utf8_bytes(tok):
    assert tok.encode("é") == [127, 256 + 102]  # bytes C3 A9, both printable in latin-1
    # F0 9F 99 82: F0 printable (id 172); 9F 99 82 are not, so they map past 255 (ids 253 247 224)
    assert tok.encode("🙂") == [172, 253, 247, 256 + 224]
    assert tok.decode(tok.encode("日本語 🙂 é")) == "日本語 🙂 é"


def test_empty_string_is_start_and_end_only(tok):
    assert tok.encode("") == [] and tok.encode(" \n\t ") == []
    assert tok([""], 6).tolist() == [[520, 521, 0, 0, 0, 0]]


def test_padding_and_over_long_text_keeps_the_end_token(tok):
    rows = tok(["hello world", "hello " * 20], context_length=6)
    assert rows.tolist() == [[520, 515, 519, 521, 0, 0], [520, 515, 515, 515, 515, 521]]
    assert rows.dtype == torch.long


def test_encode_remembers_each_text_and_hands_out_copies(monkeypatch):
    tok = Tokenizer.load(FIXTURE)
    calls = []
    monkeypatch.setattr(clip_tiny, "clean", lambda text: calls.append(text) or text.lower())
    first = tok.encode("Hello world")
    first.append(0)  # a caller's change to its list does not reach the remembered ids
    assert tok.encode("Hello world") == [515, 519] and calls == ["Hello world"]
    monkeypatch.setattr(clip_tiny, "TEXT_CACHE", 2)
    tok.encode("hello")  # the second text: the cache is full now
    tok.encode("world")  # so it starts over, with this one alone
    assert list(tok.text_cache) == ["world"]
    assert tok.encode("Hello world") == [515, 519] and calls.count("Hello world") == 2


def test_decode_inverts_encode_up_to_cleaning(tok):
    for text in ["Hello, World!", "it's  a   café", "a big red circle moving left", "x=1+2"]:
        words = clip_tiny.PRE_TOKENIZE.findall(clip_tiny.clean(text))
        assert tok.decode(tok.encode(text)) == " ".join(words)
    assert tok.decode(tok(["hello world"], 8)[0].tolist()) == "hello world"  # stops at eot


def test_save_load_round_trip_plain_and_gzip(tok, tmp_path):
    for name in ("merges.txt", "merges.txt.gz"):
        tok.save(tmp_path / name)
        again = Tokenizer.load(tmp_path / name)
        assert again.merges == tok.merges and again.encode("hello world") == [515, 519]
    assert (tmp_path / "merges.txt").read_text().splitlines()[1:3] == ["h e", "l l"]


def test_bpe_training_is_deterministic_and_merges_the_most_frequent_pair():
    texts = ["a big red circle", "a small blue square", "a big red square moving left"] * 3
    first, second = Tokenizer.train(texts, 540), Tokenizer.train(list(texts), 540)
    assert first.merges == second.merges and first.vocab_size == 540
    # nine pairs occur 6 times ("b i", "r e", "a r", ...); the tie goes to the first, "a r"
    assert first.merges[0] == ("a", "r")
    every = Tokenizer.train(texts, 10_000)  # runs out of pairs: every word is one token
    assert every.vocab_size < 10_000
    for word in ["a", "big", "circle", "moving", "square"]:
        assert every.encode(word) == [every.encoder[word + "</w>"]]


def test_explain_shows_every_merge(tok):
    text = tok.explain("Hello!")
    assert "merge 'h e'" in text and "hello</w>" in text and "[520, 515, 256, 521]" in text


# Ids from OpenAI's own SimpleTokenizer (openai/CLIP simple_tokenizer.py), run once on these
# strings with bpe_simple_vocab_16e6.txt.gz.
OPENAI_IDS = [
    ("hello world", [3306, 1002]),
    ("a big red circle moving left", [320, 1205, 736, 7117, 3584, 1823]),
    ("A  Big\tRED\ncircle!!!", [320, 1205, 736, 7117, 995]),
    ("It's a dog's life, isn't it? We'll see; they'd've",
     [585, 568, 320, 1929, 568, 970, 267, 2923, 713, 585, 286, 649, 1342, 862, 282, 889, 1896,
      1200]),
    ("Tom &amp; Jerry &amp;lt;3 &quot;quoted&quot;", [2435, 261, 9164, 283, 274, 257, 27706, 257]),
    ("caf\xc3\xa9 cr\xc3\xa8me", [15304, 1075, 12138, 614]),
    ("na\xefve fa\xe7ade \xfcber stra\xdfe",
     [1097, 35689, 563, 778, 10067, 1928, 6522, 1516, 1894, 127, 253, 324]),
    ("\u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8",
     [39121, 44353, 34002, 252, 21575, 2429, 228, 47121, 32421, 486]),
    ("\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440",
     [26302, 16370, 29503, 110, 22176, 141, 480, 267, 38018, 16701, 141, 478]),
    ("emoji \U0001f431\u200d\U0001f464 \U0001f389\U0001f389 \U0001f44d\U0001f3fd \u2764\ufe0f",
     [16327, 35710, 4244, 964, 353, 13450, 43722, 1752]),
    ("numbers 12345 3.14159 1,000,000",
     [6121, 272, 273, 274, 275, 276, 274, 269, 272, 275, 272, 276, 280, 272, 267, 271, 271, 271,
      267, 271, 271, 271]),
    ("x" * 60, [32035] * 14 + [22819]),
    ("supercalifragilisticexpialidocious",
     [1642, 2857, 13093, 2076, 5868, 26850, 835, 639, 38466]),
    ("<|startoftext|>inside<|endoftext|> text", [49406, 2912, 49407, 4160]),
    ("tabs\xa0nbsp\u2003emspace", [29163, 6459, 4393, 908, 2138]),
    ("C++ & Rust -> fast?!", [322, 19056, 261, 14212, 5081, 1953, 2835]),
    ("", []),
    ("\u200bzero\u200bwidth", [9844, 5848, 9844, 23571]),
    ("e\u0301 combining", [4166, 23561]),
    ("\uff26\uff35\uff2c\uff2c\uff37\uff29\uff24\uff34\uff28", [9407, 23571]),
    ("a_b-c/d\\e", [320, 318, 321, 268, 322, 270, 323, 315, 324]),
]


@pytest.fixture(scope="module")
def openai_tok():
    path = clip_tiny.find_openai_bpe()
    if path is None:
        pytest.skip("OpenAI's bpe_simple_vocab_16e6.txt.gz not found (set TFT2V_OPENAI_BPE)")
    return Tokenizer.load(path)


def test_openai_vocabulary_gives_openai_ids(openai_tok):
    assert (openai_tok.vocab_size, openai_tok.sot_token, openai_tok.eot_token) == (49408, 49406,
                                                                                     49407)
    assert openai_tok(["hello world"], 77)[0, :5].tolist() == [49406, 3306, 1002, 49407, 0]
    for text, ids in OPENAI_IDS:
        assert openai_tok.encode(text) == ids, text


# ----------------------------------------------------------------------------------------------
# Model


def openai_vit_clip_shapes(c):
    """Key -> shape of OpenAI's CLIP with a ViT image tower, in state_dict order, written out
    from its published architecture (openai/CLIP model.py: CLIP, VisionTransformer,
    ResidualAttentionBlock with nn.MultiheadAttention)."""

    def block(prefix, d):
        return {f"{prefix}.attn.in_proj_weight": (3 * d, d),
                f"{prefix}.attn.in_proj_bias": (3 * d,),
                f"{prefix}.attn.out_proj.weight": (d, d), f"{prefix}.attn.out_proj.bias": (d,),
                f"{prefix}.ln_1.weight": (d,), f"{prefix}.ln_1.bias": (d,),
                f"{prefix}.mlp.c_fc.weight": (4 * d, d), f"{prefix}.mlp.c_fc.bias": (4 * d,),
                f"{prefix}.mlp.c_proj.weight": (d, 4 * d), f"{prefix}.mlp.c_proj.bias": (d,),
                f"{prefix}.ln_2.weight": (d,), f"{prefix}.ln_2.bias": (d,)}

    V, D, E = c.vision_width, c.transformer_width, c.embed_dim
    grid = c.image_resolution // c.vision_patch_size
    shapes = {"positional_embedding": (c.context_length, D), "text_projection": (D, E),
              "logit_scale": (), "visual.class_embedding": (V,),
              "visual.positional_embedding": (grid * grid + 1, V), "visual.proj": (V, E),
              "visual.conv1.weight": (V, 3, c.vision_patch_size, c.vision_patch_size),
              "visual.ln_pre.weight": (V,), "visual.ln_pre.bias": (V,)}
    for i in range(c.vision_layers):
        shapes |= block(f"visual.transformer.resblocks.{i}", V)
    shapes |= {"visual.ln_post.weight": (V,), "visual.ln_post.bias": (V,)}
    for i in range(c.transformer_layers):
        shapes |= block(f"transformer.resblocks.{i}", D)
    shapes |= {"token_embedding.weight": (c.vocab_size, D), "ln_final.weight": (D,),
               "ln_final.bias": (D,)}
    return list(shapes.items())


@pytest.mark.parametrize("name", ["tiny", "ViT-B/32"])
def test_state_dict_has_openai_vit_keys_and_shapes(name):
    config = clip_tiny.PRESETS[name]
    with torch.device("meta"):
        model = CLIP(config)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == openai_vit_clip_shapes(config)
    if name == "ViT-B/32":  # the parameter count OpenAI's notebook prints for ViT-B/32
        assert sum(math.prod(s) for _, s in ours) == 151_277_313


@pytest.mark.parametrize("field,value,message", [
    ("transformer_width", 30, "transformer_width 30 is not a multiple of its 4 heads"),
    ("context_length", 1, "no room for the start and end tokens"),
    ("image_resolution", 4, "below vision_patch_size"),
])
def test_impossible_config_is_a_one_line_error(field, value, message):
    config = dataclasses.replace(clip_tiny.PRESETS["tiny"], **{field: value})
    with pytest.raises(ValueError, match=message):
        CLIP(config)


def test_from_state_dict_recovers_the_config():
    model = CLIP(SMALL)
    again = CLIP.from_state_dict(model.state_dict(), transformer_heads=SMALL.transformer_heads)
    assert again.config == SMALL
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values()))
    openai_rule = dataclasses.replace(SMALL, transformer_width=128, transformer_heads=2)
    assert CLIP.from_state_dict(CLIP(openai_rule).state_dict()).config == openai_rule


def test_attention_equals_nn_multiheadattention():
    torch.manual_seed(0)
    ours = clip_tiny.Attention(32, 4)
    torch.nn.init.normal_(ours.in_proj_weight, std=0.2)
    ref = torch.nn.MultiheadAttention(32, 4, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(3, 7, 32)
    mask = torch.full((7, 7), float("-inf")).triu(1)  # OpenAI's causal mask
    torch.testing.assert_close(ours(x), ref(x, x, x, need_weights=False)[0])
    torch.testing.assert_close(ours(x, causal=True),
                               ref(x, x, x, attn_mask=mask, need_weights=False)[0])


def test_text_is_causal_a_later_token_leaves_earlier_outputs_unchanged():
    torch.manual_seed(0)
    model = CLIP(SMALL).eval()
    tokens = torch.randint(1, 500, (2, SMALL.context_length))
    changed = tokens.clone()
    changed[:, 6] = 7
    a, b = model.text_tokens(tokens), model.text_tokens(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_text_embedding_pools_at_the_end_token(tok):
    torch.manual_seed(0)
    model = CLIP(dataclasses.replace(SMALL, vocab_size=tok.vocab_size)).eval()
    tokens = tok(["hello world", "help"], SMALL.context_length)  # eot at positions 3 and 4
    features = model.text_features(tokens)  # (2, L, D) after all blocks and ln_final
    expected = torch.stack([features[0, 3], features[1, 4]]) @ model.text_projection
    torch.testing.assert_close(model.encode_text(tokens), expected)
    padded = tokens.clone()
    padded[:, 6:] = 9  # anything after the end token cannot matter
    torch.testing.assert_close(model.encode_text(padded), expected)


def test_text_embedding_runs_the_tower_up_to_the_last_end_token_only_with_the_same_gradients(tok):
    torch.manual_seed(0)
    model = CLIP(dataclasses.replace(SMALL, vocab_size=tok.vocab_size))
    tokens = tok(["hello world", "help"], SMALL.context_length)  # eot at positions 3 and 4
    lengths = []
    hook = model.transformer.resblocks[0].register_forward_pre_hook(
        lambda module, args: lengths.append(args[0].shape[1]))
    model.encode_text(tokens).square().sum().backward()
    hook.remove()
    assert lengths == [5]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    features = model.text_features(tokens)  # every position, as before the shortcut
    full = torch.stack([features[0, 3], features[1, 4]]) @ model.text_projection
    full.square().sum().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:  # the same sums in another order: equal to float32 rounding
            scale = p.grad.abs().max().item()
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-6 * scale)
    assert model.encode_text(tokens[:0]).shape == (0, SMALL.embed_dim)


def test_text_tokens_are_the_penultimate_block_then_ln_final():
    torch.manual_seed(0)
    model = CLIP(SMALL).eval()
    tokens = torch.randint(1, 500, (2, SMALL.context_length))
    x = model.token_embedding(tokens) + model.positional_embedding
    x = model.transformer.resblocks[0](x, causal=True)  # the first of the two blocks
    torch.testing.assert_close(model.text_tokens(tokens), model.ln_final(x))
    assert model.text_tokens(tokens).shape == (2, SMALL.context_length, SMALL.transformer_width)


def test_logit_scale_starts_at_one_over_0_07_and_is_clamped_at_100():
    model = CLIP(SMALL)
    assert model.logit_scale.exp().item() == pytest.approx(1 / 0.07)
    images, tokens = torch.randn(2, 3, 16, 16), torch.randint(1, 500, (2, SMALL.context_length))
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    logits, _ = model(images, tokens)
    assert logits.abs().max() <= 100 + 1e-4


def test_preprocess_resizes_and_normalises_like_openai():
    black = -torch.ones(2, 3, 40, 40)  # pixel value 0
    out = clip_tiny.preprocess(black, 16)
    assert out.shape == (2, 3, 16, 16)
    expected = -torch.tensor(clip_tiny.OPENAI_MEAN) / torch.tensor(clip_tiny.OPENAI_STD)
    torch.testing.assert_close(out[0, :, 5, 5], expected)
    wide = clip_tiny.preprocess(torch.rand(1, 3, 20, 40) * 2 - 1, 16)  # short side, centre crop
    assert wide.shape == (1, 3, 16, 16)


# ----------------------------------------------------------------------------------------------
# Loss and training


def test_loss_is_symmetric_and_log_n_at_random():
    torch.manual_seed(0)
    image = F.normalize(torch.randn(64, 16), dim=-1)
    text = F.normalize(torch.randn(64, 16), dim=-1)
    logits = image @ text.t()
    assert clip_loss(logits, logits.t()) == pytest.approx(clip_loss(logits.t(), logits).item())
    assert clip_loss(logits, logits.t()).item() == pytest.approx(math.log(64), rel=0.05)
    perfect = 100 * torch.eye(8)
    assert clip_loss(perfect, perfect).item() < 1e-6


def test_soft_targets_over_equal_captions_do_not_penalise_duplicates():
    logits = 50 * torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    targets = clip_tiny.caption_targets(["a red circle", "a red circle", "a blue square"])
    assert targets.tolist() == [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    # the minimum possible: the targets' own entropy, (log 2 + log 2 + 0) / 3
    assert clip_loss(logits, logits.t(), targets).item() == pytest.approx(2 / 3 * math.log(2))


def test_caption_targets_group_shapes_captions_by_what_they_name():
    captions = ["a big red circle", "a picture of a big red circle", "the small red circle"]
    targets = clip_tiny.caption_targets(captions, clip_tiny.shapes_key)
    assert targets.tolist() == [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]


def test_a_tiny_batch_overfits():
    torch.manual_seed(0)
    captions = ["a red circle", "a blue square", "one green cross", "the big triangle",
                "small and round", "moving left", "up", "nothing at all"]
    data = [(torch.rand(3, 1, 16, 16) * 2 - 1, c) for c in captions]  # (3, F=1, H, W), caption
    model, tok = clip_tiny.train_clip(data, SMALL, steps=60, batch_size=8, lr=3e-3,
                                      progress=False)
    images = clip_tiny.preprocess(torch.stack([v[:, 0] for v, _ in data]), 16)
    with torch.no_grad():
        logits_per_image, logits_per_text = model(images, tok(captions, SMALL.context_length))
    assert clip_loss(logits_per_image, logits_per_text).item() < 0.1
    assert logits_per_image.argmax(1).tolist() == list(range(8))


def test_train_on_shapes_then_save_and_load_round_trip(tmp_path, monkeypatch):
    from data import shapes

    data = shapes.ShapesDataset("images", shapes.ShapesConfig(n_images=16))
    config = dataclasses.replace(SMALL, vocab_size=1024)
    built = []

    def spy(*args, **kwargs):
        built.append(adamw(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(clip_tiny, "adamw", spy)
    model, tok = clip_tiny.train_clip(data, config, steps=2, batch_size=8, progress=False)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert built[0].defaults["fused"]  # torch's fused AdamW, as the UNet's
    for caption in clip_tiny.shapes_captions():  # every Shapes word is one token
        assert len(tok.encode(caption)) == len(caption.split())
    clip_tiny.save_clip(tmp_path / "clip.pt", model, tok)
    again, tok2 = clip_tiny.load_clip(tmp_path / "clip.pt")
    assert again.config == config and tok2.merges == tok.merges
    images, tokens = torch.rand(2, 3, 16, 16), tok(["a big red circle", "one"], 12)
    torch.testing.assert_close(again(images, tokens), model(images, tokens))
    scores = clip_tiny.zero_shot_accuracy(again, tok2, per_class=1)
    assert set(scores) == {"accuracy", "accuracy_holdout", "matched_cosine", "unmatched_cosine"}


def test_trail_image_fades_the_object_in_along_its_path():
    clip = -torch.ones(1, 3, 4, 5, 5)  # black background
    for f in range(4):
        clip[0, :, f, 2, f] = 1.0  # a white pixel moving right, one column a frame
    trail = clip_tiny.trail_image(clip)
    assert trail.shape == (1, 3, 5, 5)
    torch.testing.assert_close(trail[0, 0, 2, :4], torch.tensor([0.25, 0.5, 0.75, 1.0]) * 2 - 1)
    trail[0, :, 2, :4] = -1.0
    assert (trail == -1).all()  # the background stays black


def test_train_clip_trains_the_video_words_only_with_videos():
    """Without captioned clips a word only videos use ("moving", "up") gets no gradient: AdamW
    only decays its embedding, which stays parallel to its initialisation."""
    from data import shapes

    cfg = shapes.ShapesConfig(n_images=16, n_paired=16)
    config = dataclasses.replace(SMALL, vocab_size=1024)
    images, clips = shapes.ShapesDataset("images", cfg), shapes.ShapesDataset("paired", cfg)
    torch.manual_seed(0)
    init = CLIP(config).token_embedding.weight.detach()  # what train_clip(seed=0) starts from
    for videos, parallel in ((None, True), (clips, False)):
        model, tok = clip_tiny.train_clip(images, config, steps=3, batch_size=8, progress=False,
                                          videos=videos)
        def unmoved(word):
            i = tok.encode(word)[0]
            return F.cosine_similarity(model.token_embedding.weight[i], init[i], 0) > 1 - 1e-6

        assert not unmoved("red")  # names images in either run
        assert unmoved("moving") == parallel
        assert all(map(unmoved, shapes.DIRECTIONS)) == parallel  # the batches drew some of them


def test_a_users_clip_tokenizer_learns_the_words_of_the_clip_captions_too():
    images = [(torch.rand(3, 1, 16, 16) * 2 - 1, "a red circle")] * 4
    clips = [(torch.rand(3, 4, 16, 16) * 2 - 1, "a red circle zigzagging")] * 4
    config = dataclasses.replace(SMALL, vocab_size=1024)
    _, tok = clip_tiny.train_clip(images, config, steps=1, batch_size=4, progress=False)
    _, tok2 = clip_tiny.train_clip(images, config, steps=1, batch_size=4, progress=False,
                                   videos=clips)
    assert len(tok.encode("zigzagging")) > 1 and len(tok2.encode("zigzagging")) == 1


def test_load_clip_reads_an_openai_format_state_dict(tmp_path):
    config = dataclasses.replace(SMALL, transformer_width=64, transformer_heads=1)
    model = CLIP(config)
    torch.save(model.state_dict(), tmp_path / "openai.pt")
    again, tok = clip_tiny.load_clip(tmp_path / "openai.pt", merges=FIXTURE)
    assert again.config == config and tok.encode("hello world") == [515, 519]

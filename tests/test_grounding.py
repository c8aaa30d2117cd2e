"""Tests for grounding.py: the detector's objects named in captions (issue 20), on hand-made decoders, attention
maps and detections; and the --ground option reaching beam search from caption.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _decoders import tiny_cfg

import caption
import grounding
from decoding import DecodeConfig, Decoded
from detector import Detection
from grounding import Grounder, ObjectWords, SlotHook, agree_articles, swap
from models import DecoderWithAttention
from utils import DEFAULT_CHECKPOINT

WORDS = ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "cat", "cup", "table", "on", "cats", "dogs"]
WORD_MAP = {w: i for i, w in enumerate(WORDS)}
SIZE = 64  # the square frame the encoder saw; its 2 x 2 grid's cells are 32 x 32
CAT = Detection("cat", 0.6, (0.0, 0.0, 32.0, 32.0))  # the top-left cell
CUP = Detection("cup", 0.5, (32.0, 32.0, 64.0, 64.0))  # the bottom-right cell
PLAIN = dict(beam_size=1, max_len=3, block_trigrams=False, block_bigrams=False, block_doubled=False)


def hand_made_decoder() -> DecoderWithAttention:
    """A decoder that always wants "dog" (then <end>, then nothing else) and attends, sharply, to the grid
    cell whose annotation vector has the largest first channel (energy 20 * tanh(a_i0))."""
    dec = DecoderWithAttention(tiny_cfg(vocab_size=len(WORDS)), encoder_dim=8).eval()
    with torch.no_grad():
        for p in dec.parameters():
            p.zero_()
        dec.attention.encoder_att.weight[0, 0] = 1.0
        dec.attention.full_att.weight[0, 0] = 20.0
        dec.fc.bias[WORD_MAP["dog"]] = 5.0
        dec.fc.bias[WORD_MAP["<end>"]] = 4.0
    return dec


def looking_at(*cells: int) -> torch.Tensor:
    """One set of 4 annotation vectors per image (2 x 2 grid) whose attention falls on ``cells[i]``."""
    feats = torch.zeros(len(cells), 4, 8)
    feats[:, :, 0] = -10.0
    for i, cell in enumerate(cells):
        feats[i, cell, 0] = 10.0
    return feats


def grounder() -> Grounder:
    return Grounder(WORD_MAP, detector=object(), image_size=SIZE)  # type: ignore[arg-type]  (findings given)


def said(decoded: Decoded) -> list[str]:
    return [WORDS[i] for i in decoded.tokens]


def test_the_word_whose_attention_falls_on_a_box_names_that_boxs_object() -> None:
    """Image 0 looks at the cat's box, image 1 at the cup's: the decoder's "dog" becomes "cat" and "cup"; each
    object fills one slot (the second "dog" takes the other detection, then nothing is left and <end> wins)."""
    dec, cfg = hand_made_decoder(), DecodeConfig(**PLAIN, ground="slot")
    own = grounder().search(dec, looking_at(0, 3), DecodeConfig(**PLAIN, ground="off"), None, None, [[CAT, CUP]] * 2)
    assert [said(d) for d in own] == [["dog", "dog", "dog"]] * 2  # ground off: the decoder's own words
    decoded = grounder().search(dec, looking_at(0, 3), cfg, None, None, [[CAT, CUP], [CAT, CUP]])
    assert [said(d) for d in decoded] == [["cat", "cup"], ["cup", "cat"]]
    assert [d.outside for d in decoded] == [[True, True], [True, True]]
    assert decoded[0].alphas[0].argmax() == 0 and decoded[1].alphas[0].argmax() == 3


def test_with_no_confident_detection_the_decoders_own_word_stands() -> None:
    dec, cfg = hand_made_decoder(), DecodeConfig(**PLAIN, ground="slot")
    weak = [Detection("cat", 0.19, CAT.box)]  # below ground_min_score (0.3) and ground_fallback_score (0.2)
    decoded = grounder().search(dec, looking_at(0, 0), cfg, None, None, [weak, []])
    assert [said(d) for d in decoded] == [["dog", "dog", "dog"]] * 2
    assert [d.outside for d in decoded] == [[False] * 3] * 2


def test_a_photo_with_no_confident_detection_is_named_by_its_best_guess() -> None:
    """Nothing reaches ground_min_score (0.3): the best find of at least ground_fallback_score (0.2) names the
    object, the weaker one does not; with the fallback off the decoder's own word stands."""
    dec = hand_made_decoder()
    guesses = [Detection("cat", 0.29, CAT.box), Detection("cup", 0.25, CUP.box)]
    cfg = DecodeConfig(**PLAIN, ground="slot")
    assert said(grounder().search(dec, looking_at(0), cfg, None, None, [guesses])[0])[0] == "cat"
    off = DecodeConfig(**PLAIN, ground="slot", ground_fallback_score=None)
    assert said(grounder().search(dec, looking_at(0), off, None, None, [guesses])[0]) == ["dog"] * 3


def test_a_weakly_seen_object_keeps_the_decoders_word_above_the_absent_score() -> None:
    """The dog scores 0.15: not confident enough to name (0.3), but with ground_absent_score 0.1 not absent
    either, so the decoder's "dog" stands (once: an object is named once, so the decoder's next "dog" goes to
    the cup); at the default (absent below 0.2) it is refilled by the cup."""
    dec, faint_dog = hand_made_decoder(), Detection("dog", 0.15, (0.0, 0.0, 64.0, 64.0))
    kept = DecodeConfig(**PLAIN, ground="slot", ground_absent_score=0.1)
    assert said(grounder().search(dec, looking_at(3), kept, None, None, [[CUP, faint_dog]])[0]) == ["dog", "cup"]
    refilled = DecodeConfig(**PLAIN, ground="slot")
    assert said(grounder().search(dec, looking_at(3), refilled, None, None, [[CUP, faint_dog]])[0]) == ["cup"]


def test_a_word_the_encoders_classifier_sees_is_not_refilled() -> None:
    """``kept`` (the ImageNet classifier's words, Grounder.kept_by_classifier) protects the decoder's "dog"
    from a detector that sees only a cup; without it the dog is refilled. No classifier without an
    EfficientNet-Lite encoder, or at threshold 0."""
    words, p = ObjectWords(WORD_MAP), torch.zeros(1, len(WORDS))
    p[0, WORD_MAP["dog"]], p[0, WORD_MAP["a"]] = 0.7, 0.3
    kept = torch.zeros(1, len(WORDS), dtype=torch.bool)
    kept[0, WORD_MAP["dog"]] = True
    empty, flags = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0, dtype=torch.bool)
    for protect, expected in ((kept, "dog"), (None, "cup")):
        hook = SlotHook([[CUP]], words, SIZE, (2, 2), 0.3, kept=protect)
        new, _ = hook(p.log(), torch.full((1, 4), 0.25), torch.tensor([0]), empty, flags)
        assert WORDS[int(new.argmax())] == expected
    assert grounder().kept_by_classifier(torch.zeros(1, 4, 8), 0.3) is None  # no backbone named
    lite = Grounder(WORD_MAP, detector=object(), backbone="efficientnet_lite0")  # type: ignore[arg-type]
    assert lite.kept_by_classifier(torch.zeros(1, 4, 1280), 0.0) is None


def test_the_slot_hook_moves_only_the_mass_of_unseen_objects_and_keeps_plurals() -> None:
    """Step by step on a hand-made distribution: "dog" (not detected) gives its probability to the attended
    detection's name, "dogs" to its plural; a seen object's word ("cat" when the cat is detected) and words
    naming no object keep theirs; the moved word is marked as outside knowledge."""
    words = ObjectWords(WORD_MAP)
    hook = SlotHook([[CAT, CUP]], words, SIZE, (2, 2), 0.3)
    p = torch.zeros(2, len(WORDS))
    p[0, WORD_MAP["dog"]], p[0, WORD_MAP["a"]], p[0, WORD_MAP["cat"]] = 0.5, 0.3, 0.2
    p[1, WORD_MAP["dogs"]], p[1, WORD_MAP["on"]] = 0.6, 0.4
    alpha = torch.tensor([[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]])  # row 0 on the cup, row 1 on the cat
    new, marked = hook(p.log(), alpha, torch.tensor([0, 0]), torch.zeros(2, 0, dtype=torch.long),
                       torch.zeros(2, 0, dtype=torch.bool))  # fmt: skip
    q = new.exp()
    assert q[0, WORD_MAP["cup"]] == pytest.approx(0.5) and q[0, WORD_MAP["dog"]] == 0
    assert q[0, WORD_MAP["a"]] == pytest.approx(0.3) and q[0, WORD_MAP["cat"]] == pytest.approx(0.2)
    assert q[1, WORD_MAP["cats"]] == pytest.approx(0.6) and q[1, WORD_MAP["dogs"]] == 0
    assert marked[0].nonzero().flatten().tolist() == [WORD_MAP["cup"]]
    assert marked[1].nonzero().flatten().tolist() == [WORD_MAP["cats"]]


def test_swap_replaces_the_first_unseen_object_by_the_top_non_person_find() -> None:
    words = ObjectWords(WORD_MAP)
    tokens = [WORD_MAP[w] for w in ["a", "dog", "on", "a", "table"]]
    decoded = Decoded(tokens, -1.0, torch.eye(5, 4))
    findings = [Detection("person", 0.9, (0, 0, 9, 9)), CUP, Detection("dining table", 0.2, (0, 0, 64, 64))]
    swapped = swap(decoded, findings, words, 0.3)
    assert said(swapped) == ["a", "cup", "on", "a", "table"]
    assert swapped.outside == [False, True, False, False, False]
    assert torch.equal(swapped.alphas, decoded.alphas)  # the replaced word keeps its attention row
    # the table (0.2) is not seen either, but only the first unseen object is replaced
    assert swap(decoded, findings[:1], words, 0.3) is decoded  # no non-person find: unchanged
    seen = [Detection("dog", 0.8, (0, 0, 9, 9)), Detection("dining table", 0.5, (0, 0, 9, 9)), CUP]
    assert swap(decoded, seen, words, 0.3) is decoded  # every object named is seen: unchanged


def test_object_names_come_from_the_vocabulary_or_its_nearest_synonym() -> None:
    words = ObjectWords({**WORD_MAP, "bike": 12, "teddy": 13, "bear": 14, "bears": 15})
    name = {c: [words.vocabulary[i] for i in words.names[grounding.LABELS.index(c)]] for c in grounding.LABELS}
    assert name["cup"] == ["cup"] and name["dining table"] == ["table"] and name["bicycle"] == ["bike"]
    assert name["teddy bear"] == ["teddy", "bear"] and name["bear"] == ["bear"] and name["giraffe"] == []
    assert [words.vocabulary[i] for i in words.plurals[grounding.LABELS.index("teddy bear")]] == ["teddy", "bears"]
    assert "giraffe" in words.unsayable() and "cup" not in words.unsayable()
    people = ObjectWords({**WORD_MAP, "people": 12, "man": 13})
    assert people.plural[12] and not people.plural[13] and people.plural[WORD_MAP["dogs"]]  # "a group of people"


def test_a_two_word_name_follows_its_first_word_in_the_singular() -> None:
    """A singular slot filled with "teddy" (the detector's teddy bear) goes on with "bear", not "bears"."""
    words = ObjectWords({**WORD_MAP, "teddy": 12, "bear": 13, "bears": 14})
    hook = SlotHook([[Detection("teddy bear", 0.6, CAT.box)]], words, SIZE, (2, 2), 0.3)
    logp = torch.full((1, 15), -5.0)
    seqs, flags = torch.tensor([[WORD_MAP["a"], 12]]), torch.tensor([[False, True]])
    new, marked = hook(logp, torch.full((1, 4), 0.25), torch.tensor([0]), seqs, flags)
    assert int(new.argmax()) == 13 and new[0, 13] == 0 and bool(marked[0, 13])


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.is_file(), reason="the shipped model is not there")
def test_flickr8ks_own_vocabulary_cannot_say_21_coco_categories() -> None:
    """The shipped word map starts with Flickr8k's words (ids kept when train_text.py grew it): those alone
    cannot name 21 COCO categories; the grown map names all but one (tests/test_shipped_model.py)."""
    from checkpoint import load_checkpoint_file

    ckpt = load_checkpoint_file(DEFAULT_CHECKPOINT)
    known = ckpt["text_training"]["vocabulary"]["known_words"]
    words = ObjectWords({w: i for w, i in ckpt["word_map"].items() if i < known})
    assert len(words.unsayable()) == 21 and {"giraffe", "zebra", "sink", "clock", "fork"} <= set(words.unsayable())


def test_the_ground_option_reaches_beam_search_from_the_command_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """caption.py --ground slot: the DecodeConfig that beam search gets says "slot" and a SlotHook comes with
    it; the detector's words are printed with * and a legend (shipped model and detector, skipped without)."""
    from detector import Detector, DetectorUnavailable

    try:
        Detector.load()
    except DetectorUnavailable as exc:
        pytest.skip(str(exc))
    if not DEFAULT_CHECKPOINT.is_file():
        pytest.skip("the shipped model is not there")
    import skimage.data

    seen = []
    original = grounding.beam_search

    def recording(decoder, features, cfg, content_words=None, bonus=None, hook=None):
        seen.append((cfg.ground, type(hook).__name__))
        return original(decoder, features, cfg, content_words, bonus, hook)

    monkeypatch.setattr(grounding, "beam_search", recording)
    photo = Path(skimage.data.__file__).parent / "coffee.png"
    assert caption.main([str(photo), "--ground", "slot", "--no-figures", "--device", "cpu"]) == 0
    # the shipped model carries a text-taught language model: it wraps the slots (language.TextFusion)
    assert seen == [("slot", "TextFusion")]
    out = capsys.readouterr().out
    assert "*" in out.splitlines()[0] and out.splitlines()[-1].startswith("* chosen by outside knowledge")
    assert caption.main([str(photo), "--no-figures", "--device", "cpu"]) == 0  # slot is the default
    assert seen[1] == ("slot", "TextFusion")
    assert caption.main([str(photo), "--ground", "off", "--no-figures", "--device", "cpu"]) == 0
    assert len(seen) == 2 and "*" not in capsys.readouterr().out.split("\n")[-2]  # off: not through here


def test_articles_agree_with_the_detectors_words() -> None:
    words = ObjectWords({**WORD_MAP, "an": 12, "airplane": 13})
    tokens = [words.word_map[w] for w in ["a", "airplane", "on", "an", "cup"]]
    decoded = Decoded(tokens, -1.0, torch.zeros(5, 4), outside=[False, True, False, False, True])
    assert said_in(words, agree_articles(decoded, words)) == ["an", "airplane", "on", "a", "cup"]
    own = Decoded(tokens, -1.0, torch.zeros(5, 4), outside=[False] * 5)
    assert agree_articles(own, words) is own  # the decoder's own articles are its business


def said_in(words: ObjectWords, decoded: Decoded) -> list[str]:
    return [words.vocabulary[i] for i in decoded.tokens]

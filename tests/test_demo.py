"""The offline demo corpora: determinism, an exact likelihood, and exactly invertible seq2seq targets."""

import json
import math
from collections import defaultdict

import numpy as np
import pytest

from elf.data import demo
from elf.errors import ElfError

# Tiny lexicons whose documents can all be enumerated. "fish" is a noun and a verb, "cold" an adjective and
# a noun, and "bo" a name and an adverb, so some word sequences have several hidden paths.
TINY_FULL = {"det": ["the"], "adj": ["cold"], "noun": ["cold", "fish"], "name": ["bo"], "verb": ["fish", "sees"],
             "prep": ["in"], "adv": ["bo"]}
TINY_SHORT = {"det": ["the"], "noun": ["fish", "dog"], "name": ["bo"], "verb": ["fish", "sees"], "adv": ["bo"]}


@pytest.fixture(scope="module")
def grammar() -> demo.Grammar:
    return demo.build_grammar(42, max_sentences=5)


def enumerate_documents(g: demo.Grammar) -> tuple[dict[tuple[str, ...], float], dict[tuple[str, ...], float]]:
    """Every document by brute force over hidden paths: (P(words), probability of the likeliest path)."""
    total: dict[tuple[str, ...], float] = defaultdict(float)
    best: dict[tuple[str, ...], float] = defaultdict(float)

    def walk(state: int, words: tuple[str, ...], p: float) -> None:
        for w in np.flatnonzero(g.emit[state]):
            seq, q = (*words, g.vocab[w]), p * g.emit[state, w]
            if g.end[state] > 0:
                total[seq] += q * g.end[state]
                best[seq] = max(best[seq], q * g.end[state])
            for nxt in np.flatnonzero(g.trans[state]):
                walk(nxt, seq, q * g.trans[state, nxt])

    for s in np.flatnonzero(g.start):
        walk(s, (), g.start[s])
    return total, best


@pytest.mark.parametrize(("lexicon", "max_sentences", "max_adjectives"),
                         [(TINY_FULL, 1, 1), (TINY_SHORT, 2, 0)])
def test_forward_algorithm_matches_enumeration_and_sums_to_one(lexicon, max_sentences, max_adjectives):
    g = demo.build_grammar(5, max_sentences, max_adjectives=max_adjectives, lexicon=lexicon)
    total, best = enumerate_documents(g)
    assert math.fsum(total.values()) == pytest.approx(1.0, abs=1e-9)
    forward = {seq: math.exp(g.log_prob(seq)) for seq in total}
    assert math.fsum(forward.values()) == pytest.approx(1.0, abs=1e-9)
    for seq, p in total.items():
        assert forward[seq] == pytest.approx(p, rel=1e-9)
    assert any(forward[seq] > best[seq] * (1 + 1e-6) for seq in total)  # some sequences are ambiguous
    assert g.log_prob(["the", "fish", "sees", "."]) > -math.inf
    assert g.log_prob(["the", "."]) == g.log_prob(["sees", "the", "fish", "."]) == -math.inf
    assert g.log_prob([]) == -math.inf  # a document has at least one sentence


def segmentations(words: tuple[str, ...], documents) -> list[list[tuple[str, ...]]]:
    """Every way to cut `words` into consecutive pieces that are all documents, enumerated explicitly."""
    if not words:
        return [[]]
    return [[words[:i], *rest] for i in range(1, len(words) + 1) if words[:i] in documents
            for rest in segmentations(words[i:], documents)]


@pytest.mark.parametrize(("lexicon", "max_sentences", "max_adjectives"),
                         [(TINY_FULL, 1, 1), (TINY_SHORT, 2, 0)])
def test_stream_likelihood_matches_enumeration_of_segmentations(lexicon, max_sentences, max_adjectives):
    """log_prob_stream = log Σ over segmentations into documents × hidden paths of Π P(document)."""
    g = demo.build_grammar(5, max_sentences, max_adjectives=max_adjectives, lexicon=lexicon)
    total, _ = enumerate_documents(g)
    docs = sorted(total)
    rng = np.random.default_rng(0)
    several = 0
    for _ in range(150):
        words = tuple(w for k in rng.integers(len(docs), size=rng.integers(1, 4)) for w in docs[k])
        cuts = segmentations(words, total)
        expected = math.fsum(math.prod(total[piece] for piece in cut) for cut in cuts)
        assert math.exp(g.log_prob_stream(words)) == pytest.approx(expected, rel=1e-9)
        assert g.log_prob_stream(words) >= g.log_prob(words)
        several += len(cuts) > 1
    # One-sentence documents split only one way; with two sentences most streams split in several ways.
    assert several > 50 if max_sentences > 1 else several == 0
    assert g.log_prob_stream(["the", "."]) == g.log_prob_stream([]) == -math.inf
    # A document that ends mid-sentence is not a complete document, alone or in a stream.
    assert g.log_prob_stream([*docs[0], *docs[1][:-1]]) == -math.inf


def test_stream_of_sampled_documents(grammar):
    """Packed documents (no separator) get a finite stream likelihood even when no single document reads
    like them; one document that cannot be split gets exactly `log_prob`."""
    rng = np.random.default_rng(4)
    docs = [grammar.sample_words(rng)[0] for _ in range(60)]
    single = 0
    for a, b in zip(docs[::2], docs[1::2], strict=True):
        both = a + b
        stream = grammar.log_prob_stream(both)
        assert math.isfinite(stream) and stream >= grammar.log_prob(a) + grammar.log_prob(b) - 1e-9
        if both.count(".") > 5:  # more sentences than one document of this grammar has
            assert grammar.log_prob(both) == -math.inf
            single += 1
        else:
            assert stream > grammar.log_prob(both)
    assert single > 3
    for words in docs:
        if words.count(".") == 1:  # a document only ends after "." : one sentence has one segmentation
            assert grammar.log_prob_stream(words) == pytest.approx(grammar.log_prob(words), rel=1e-12, abs=1e-12)
        else:
            assert grammar.log_prob_stream(words) > grammar.log_prob(words)
    text = demo.words_to_text(docs[0] + docs[1])
    assert grammar.log_prob_stream_text(text) == (grammar.log_prob_stream(docs[0] + docs[1]),
                                                   len(docs[0]) + len(docs[1]))


def test_log_prob_is_at_least_the_path_probability_and_equal_when_unambiguous(grammar):
    rng = np.random.default_rng(0)
    classes = defaultdict(set)
    for cls, words in demo.LEXICON.items():
        for w in words:
            classes[w].add(cls)
    checked = 0
    for _ in range(200):
        words, path_logp = grammar.sample_words(rng)
        logp = grammar.log_prob(words)
        assert logp >= path_logp - 1e-9
        if all(len(classes[w]) <= 1 for w in words):
            assert logp == pytest.approx(path_logp, abs=1e-9)
            checked += 1
    assert checked > 20


def test_unknown_word_floor(grammar):
    # Only an object noun fits between "the" and ".", so the unknown word just swaps that emission.
    known = ["anna", "sees", "the", "dog", "."]
    emit = grammar.emit[grammar.states.index("OBJ_NOUN@1"), grammar.vocab.index("dog")]
    expected = grammar.log_prob(known) - math.log(emit) + math.log(demo.UNKNOWN_WORD_PROB)
    assert grammar.log_prob(["anna", "sees", "the", "zzyzx", "."]) == pytest.approx(expected, abs=1e-9)
    # Any state may emit an unknown word, but the sentence shape must still be possible.
    assert math.isfinite(grammar.log_prob(["xx", "yy", "."]))
    assert grammar.log_prob(["xx", "yy", "."]) < 2 * math.log(demo.UNKNOWN_WORD_PROB)
    assert grammar.log_prob(["xx", "."]) == -math.inf


def test_text_round_trip(grammar):
    rng = np.random.default_rng(2)
    for _ in range(100):
        words, _ = grammar.sample_words(rng)
        assert demo.text_to_words(demo.words_to_text(words)) == words
    assert demo.words_to_text(["anna", "sees", "the", "dog", ".", "the", "dog", "sees", "anna", "."]) == (
        "Anna sees the dog. The dog sees Anna.")
    assert demo.text_to_words("  The  dog\n sees Anna .\t") == ["the", "dog", "sees", "anna", "."]


def test_grammar_dict_round_trip(grammar):
    back = demo.Grammar.from_dict(json.loads(json.dumps(grammar.to_dict())))
    assert back.to_dict() == grammar.to_dict()
    for text in demo.generate_lm(grammar, 3, 50):
        assert back.log_prob_text(text) == grammar.log_prob_text(text)
    with pytest.raises(ElfError, match="format"):
        demo.Grammar.from_dict({"format": "nope"})


def test_lm_corpus_is_deterministic_and_shaped(grammar):
    a = list(demo.generate_lm(grammar, 7, 50))
    assert a == list(demo.generate_lm(demo.build_grammar(42, max_sentences=5), 7, 50))
    assert a != list(demo.generate_lm(grammar, 8, 50))
    other = demo.build_grammar(43, max_sentences=5)
    assert other.states == grammar.states and not np.array_equal(other.trans, grammar.trans)
    for text in a:
        words = demo.text_to_words(text)
        assert 1 <= words.count(".") <= 5 and words[-1] == "."


def test_oracle_perplexity(grammar):
    texts = list(demo.generate_lm(grammar, 9, 40))
    scored = [grammar.log_prob_text(t) for t in texts]
    expected = math.exp(-sum(lp for lp, _ in scored) / sum(n + 1 for _, n in scored))
    assert demo.oracle_perplexity(grammar, texts) == pytest.approx(expected)
    assert 1 < expected < 100
    assert demo.oracle_perplexity(grammar, [*texts, "the ."]) == math.inf
    packed = [texts[i] + texts[i + 1] for i in range(0, 40, 2)]  # no separator, as packed lm rows are
    scored = [grammar.log_prob_stream_text(t) for t in packed]
    expected = math.exp(-sum(lp for lp, _ in scored) / sum(n + 1 for _, n in scored))
    assert demo.oracle_perplexity(grammar, packed, stream=True) == pytest.approx(expected)
    assert demo.oracle_perplexity(grammar, texts, stream=True) < demo.oracle_perplexity(grammar, texts)


def test_german_lexicon_is_a_bijection():
    assert len(set(demo.TO_GERMAN.values())) == len(demo.TO_GERMAN)
    assert all(demo.FROM_GERMAN[de] == en for en, de in demo.TO_GERMAN.items())


def test_translation_is_deterministic_and_exactly_invertible():
    pairs = list(demo.generate_translation(11, 200))
    assert pairs == list(demo.generate_translation(11, 200))
    assert pairs[:20] != list(demo.generate_translation(12, 20))
    by_source = {}
    for source, target in pairs:
        assert demo.translate_source_to_target(source) == target
        assert by_source.setdefault(source, target) == target
        assert source != target and len(demo.text_to_words(target)) <= 24
    assert sum(s.split() != t.split() for s, t in pairs) == len(pairs)


def test_summarization_is_deterministic_and_follows_the_rule():
    pairs = list(demo.generate_summarization(13, 200))
    assert pairs == list(demo.generate_summarization(13, 200))
    assert pairs[:20] != list(demo.generate_summarization(14, 20))
    for document, summary in pairs:
        assert demo.summarize_document(document) == summary
        words = demo.text_to_words(document)
        assert 4 <= words.count(".") <= 8 and len(words) <= 80
        name = demo.text_to_words(summary)[0]
        assert name in demo.NAMES and summary.startswith(name.capitalize() + " ")
    assert demo.summarize_document("Ben sees Anna. Anna takes a red cup in the park. Anna walks.") == (
        "Anna takes the cup.")


def test_a_smaller_lexicon_and_fewer_sentences_keep_every_corpus_exact():
    """The CPU demo's easier settings (words_per_class, max_sentences) keep the oracle and the exact targets."""
    lexicon = demo.demo_lexicon(5)
    allowed = {w for words in lexicon.values() for w in words} | {demo.PERIOD}
    assert all(len(words) <= 5 for words in lexicon.values()) and demo.demo_lexicon() == demo.LEXICON
    g = demo.build_grammar(3, max_sentences=2, lexicon=lexicon)
    for text in demo.generate_lm(g, 0, 50):
        words = demo.text_to_words(text)
        assert set(words) <= allowed and 1 <= words.count(".") <= 2 and math.isfinite(g.log_prob(words))
    for source, target in demo.generate_translation(5, 100, max_sentences=1, lexicon=lexicon):
        assert demo.translate_source_to_target(source) == target
        assert set(demo.text_to_words(target)) <= allowed and demo.text_to_words(target).count(".") == 1
    for document, summary in demo.generate_summarization(5, 100, min_sentences=3, max_sentences=4, lexicon=lexicon):
        assert demo.summarize_document(document) == summary
        assert set(demo.text_to_words(document)) <= allowed and 3 <= document.count(".") <= 4


def test_impossible_demo_settings_are_one_line_errors():
    with pytest.raises(ElfError, match="min_sentences"):
        next(demo.generate_summarization(0, 1, min_sentences=2, max_sentences=2))
    with pytest.raises(ElfError, match="two names"):
        next(demo.generate_summarization(0, 1, lexicon=demo.demo_lexicon(1)))
    with pytest.raises(ElfError, match="words_per_class"):
        demo.demo_lexicon(0)

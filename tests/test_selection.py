"""Collapse-proof selection (elf/selection.py): sets that game one number are not ranked; real text is."""

import numpy as np
import pytest

from elf.config import DatasetConfig, EvaluateConfig
from elf.data.demo import generate_lm
from elf.data.tokenizer import load_tokenizer
from elf.evaluate import Scorer, primary_metric
from elf.selection import eligibility

N = 64


@pytest.fixture(scope="module")
def scorer(built):
    dataset = DatasetConfig(task="lm", source="demo", max_length=32, demo={"generator": "lm", "train_size": 10,
                                                                        "validation_size": 10})
    return Scorer(dataset, EvaluateConfig(judge=None), built / "data/raw/owt", load_tokenizer(built / "data/tokenizer"),
                  "cpu", packing="documents")


@pytest.fixture(scope="module")
def texts(scorer):
    """Reference text and held-out text of the same kind and count (two draws of the demo language)."""
    reference = list(generate_lm(scorer.grammar, seed=1, n=N))
    held_out = list(generate_lm(scorer.grammar, seed=2, n=N))
    return reference, held_out


def gamed_sets(scorer, held_out):
    """Sets written to game one number each, and a collapse of another kind (two alternating sentences)."""
    best = min(held_out, key=lambda t: scorer.score([t])["oracle_ppl_finite_only"])  # the likeliest document
    vocab = len(scorer.tokenizer)
    random_ids = np.random.default_rng(0).integers(3, vocab, size=(N, 12)).tolist()
    return {
        "one likely document repeated": [best] * N,
        "75% 'the the the'": ["the the the"] * (3 * N // 4) + held_out[: N // 4],
        "two alternating documents": [held_out[0], held_out[1]] * (N // 2),
        "random tokens": scorer.tokenizer.batch_decode(random_ids, skip_special_tokens=True),
        "mostly empty": [""] * (3 * N // 4) + held_out[: N // 4],
    }


def test_held_out_text_is_ranked(scorer, texts):
    reference, held_out = texts
    verdict = eligibility(scorer.score(held_out), scorer.score(reference), ratio=0.5)
    assert verdict["eligible"], verdict["reason"]
    assert set(verdict["checks"]) == {"nonempty_fraction", "oracle_finite_fraction", "entropy", "distinct_2"}


@pytest.mark.parametrize("name, failing", [
    ("one likely document repeated", {"distinct_2"}),
    ("75% 'the the the'", {"oracle_finite_fraction", "entropy"}),
    ("two alternating documents", {"distinct_2"}),
    ("random tokens", {"oracle_finite_fraction"}),
    ("mostly empty", {"nonempty_fraction", "oracle_finite_fraction"}),
])
def test_collapsed_and_broken_sets_are_not_ranked(scorer, texts, name, failing):
    reference, held_out = texts
    candidate = scorer.score(gamed_sets(scorer, held_out)[name])
    verdict = eligibility(candidate, scorer.score(reference), ratio=0.5)
    assert not verdict["eligible"]
    assert failing <= {figure for figure, check in verdict["checks"].items() if not check["passed"]}
    assert verdict["reason"].startswith("not ranked: ")


def test_the_repeated_document_wins_the_one_number_it_games(scorer, texts):
    """Why the checks exist: by oracle perplexity alone the collapsed set beats real text."""
    reference, held_out = texts
    repeated = scorer.score(gamed_sets(scorer, held_out)["one likely document repeated"])
    assert repeated["oracle_ppl_finite_only"] < scorer.score(held_out)["oracle_ppl_finite_only"]
    assert repeated["entropy"] > 0.5 * scorer.score(reference)["entropy"]  # per-sample entropy cannot see it


def test_a_figure_missing_from_the_samples_fails_and_one_missing_from_the_reference_is_not_checked():
    verdict = eligibility({"entropy": None, "distinct_2": 0.4}, {"entropy": 2.0, "distinct_2": None}, 0.5)
    assert not verdict["eligible"] and set(verdict["checks"]) == {"entropy"}


def test_an_lm_without_judge_or_grammar_has_no_metric_to_rank_by():
    assert primary_metric("lm", None, has_grammar=False, has_judge=False) == (None, False)
    assert primary_metric("lm", None, has_grammar=True, has_judge=True) == ("gen_ppl", False)
    assert primary_metric("seq2seq", None, has_grammar=False, has_judge=False) == ("bleu", True)


def test_samples_no_better_than_shuffled_reference_words_are_not_ranked():
    reference = {"entropy": 2.0, "distinct_2": 0.4, "gen_ppl": 20.0, "gen_ppl_shuffled": 90.0}
    diverse_gibberish = {"entropy": 2.5, "distinct_2": 0.5, "gen_ppl": 300.0}
    verdict = eligibility(diverse_gibberish, reference, 0.5)
    assert not verdict["eligible"] and "shuffled" in verdict["reason"]
    assert eligibility({**diverse_gibberish, "gen_ppl": 35.0}, reference, 0.5)["eligible"]


def test_shuffled_words_keep_the_words_and_lose_the_order():
    from elf.evaluate import shuffled_words

    texts = ["the cat sees the small dog .", "a b c d e f g h"]
    shuffled = shuffled_words(texts)
    assert [sorted(t.split()) for t in shuffled] == [sorted(t.split()) for t in texts]
    assert shuffled != texts and shuffled == shuffled_words(texts)  # reproducible

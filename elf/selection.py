"""Which models may be ranked: coverage and diversity against reference text of the same length.

A single quality number is easy to game by collapse: one fluent sentence repeated in every sample has a
better perplexity than real text, and random tokens have the highest entropy. So the primary metric
(elf/evaluate.py) decides the registry's champion only for a model whose samples pass these checks, each
relative to the same figure on reference text of the same count and length (lm: held-out token rows of the
validation split decoded, as long as the model's rows; seq2seq: the test references), never to a fixed number
tuned on a test set:

- coverage: the share of non-empty samples, and with the demo grammar the share the grammar can produce;
- diversity within a sample: mean unigram entropy (§9);
- diversity across samples: pooled distinct-2 (`elf.metrics.distinct_n`), which sees repeated samples.

A check passes when the model's figure is at least `ratio` × the reference's (`evaluate.selection_ratio`,
default 0.5: half of what real text shows). Entropy is only a floor: more entropy than real text is no merit
(random tokens have plenty), and the primary metric judges it.

With a judge there is also a floor on quality: the samples' Gen PPL must be below that of the reference text
with the words of each text shuffled (`gen_ppl_shuffled`): text no better than real words in random order has
learned the vocabulary, not the language, and is never crowned however diverse it is.
"""

from __future__ import annotations

from typing import Any

CHECKS = {  # figure: what it guards against
    "nonempty_fraction": "empty samples",
    "oracle_finite_fraction": "samples the grammar cannot produce",
    "entropy": "repetition within samples",
    "distinct_2": "the same samples over and over",
}

CEILINGS = [  # (figure, the reference figure it must stay below, what that reference is)
    ("gen_ppl", "gen_ppl_shuffled", "the reference text with its words shuffled"),
]


def eligibility(scores: dict[str, Any], reference: dict[str, Any], ratio: float) -> dict[str, Any]:
    """{"eligible": bool, "reason": one line, "checks": {figure: {value, reference, threshold, passed}}}.

    `scores` and `reference` are figures as `elf.evaluate.Scorer.score` reports them (means over seeds for
    `scores`); a figure missing on either side is not checked. A missing sample figure where the reference
    has one (e.g. no non-empty sample, so no entropy) fails.
    """
    checks, failed = {}, []
    for figure, guards in CHECKS.items():
        wanted = reference.get(figure)
        if wanted is None or figure not in scores:
            continue
        value = scores.get(figure)
        threshold = ratio * wanted
        passed = value is not None and value >= threshold
        checks[figure] = {"value": value, "reference": wanted, "threshold": threshold, "passed": passed}
        if not passed:
            shown = "none" if value is None else f"{value:.3g}"
            failed.append(f"{figure} {shown} < {ratio:g} × reference {wanted:.3g} ({guards})")
    for figure, bound, guards in CEILINGS:
        limit = reference.get(bound)
        if limit is None or figure not in scores:
            continue
        value = scores.get(figure)
        passed = value is not None and value < limit
        checks[figure] = {"value": value, "reference": limit, "threshold": limit, "passed": passed}
        if not passed:
            shown = "none" if value is None else f"{value:.3g}"
            failed.append(f"{figure} {shown} ≥ {limit:.3g} of {guards}")
    reason = "coverage, diversity and quality floor hold" if not failed else "not ranked: " + "; ".join(failed)
    return {"eligible": not failed, "reason": reason, "ratio": ratio, "checks": checks}
